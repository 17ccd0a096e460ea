//! The systemd units in deploy/systemd/ (docs/DEPLOY.md): `systemd-analyze verify` accepts
//! an instance of each with no warning, they carry the hardening and limits DEPLOY.md promises,
//! and the flags in each example env file are flags the binary accepts.
//!
//! `systemd-analyze verify` needs no running systemd, but it does need systemd's own units
//! (the targets a service depends on) and the unit's commands to exist: it runs against a
//! root of its own holding a copy of the system's units, the templates, this build's binaries
//! at the path the units name (/opt/cachetier/bin) and /bin/kill (ExecReload).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use testkit::{temp_dir, workspace_bin};

/// Each template: its unit name, the binary it runs, an instance to verify, its example env file.
struct Template {
    unit: &'static str,
    binary: &'static str,
    instance: &'static str,
    env: &'static str,
}

const TEMPLATES: [Template; 4] = [
    Template { unit: "cachetier-origin@", binary: "origin", instance: "8000", env: "origin-8000" },
    Template { unit: "cachetier-proxy@", binary: "proxy", instance: "8001", env: "proxy-8001" },
    Template { unit: "cachetier-balancer@", binary: "balancer", instance: "9000", env: "balancer-9000" },
    // Several balancer processes on one port (--reuse-port): the instance is a worker number.
    Template { unit: "cachetier-balancer-worker@", binary: "balancer", instance: "1", env: "balancer-workers" },
];
/// The services' default --max-connections (SPEC 3.7).
const DEFAULT_MAX_CONNECTIONS: u64 = 10_000;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

fn unit_text(unit: &str) -> String {
    std::fs::read_to_string(deploy_dir().join(format!("{unit}.service"))).unwrap()
}

/// The value of `key=` in a unit (the last one wins, as in systemd), if present.
fn setting(unit: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    unit.lines().filter_map(|l| l.trim().strip_prefix(prefix.as_str())).next_back().map(str::to_owned)
}

fn link_or_copy(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

fn copy_tree(from: &Path, to: &Path) {
    // `cp -a` keeps the symlinks between systemd's units (aliases) as they are.
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().unwrap();
    assert!(status.success(), "cp -a {from:?} {to:?}");
}

#[test]
fn systemd_analyze_verify_accepts_an_instance_of_each_unit() {
    let found = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        found.as_ref().is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: apt-get install systemd (.ci/run installs it)"
    );
    let system_units = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("multi-user.target").exists())
        .expect("systemd's own units (multi-user.target) are not installed");

    let root = temp_dir("systemd-verify");
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    copy_tree(system_units, &root.join("usr/lib/systemd/system"));
    let units = root.join("etc/systemd/system");
    let bin = root.join("opt/cachetier/bin");
    std::fs::create_dir_all(&units).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    // ExecReload's command must exist in the root too.
    std::fs::create_dir_all(root.join("bin")).unwrap();
    link_or_copy(
        &Path::new("/bin/kill").canonicalize().expect("/bin/kill (procps) is missing"),
        &root.join("bin/kill"),
    );
    let mut instances = Vec::new();
    for t in &TEMPLATES {
        let template = format!("{}.service", t.unit);
        std::fs::copy(deploy_dir().join(&template), units.join(&template)).unwrap();
        if !bin.join(t.binary).exists() {
            link_or_copy(&workspace_bin(t.binary).unwrap(), &bin.join(t.binary));
        }
        instances.push(format!("{}{}.service", t.unit, t.instance));
    }

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(&instances)
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let _ = std::fs::remove_dir_all(&root);
    assert!(out.status.success(), "systemd-analyze verify failed:\n{said}");
    // Unknown keys and bad values are only warnings to verify: none is accepted here.
    assert!(said.trim().is_empty(), "systemd-analyze verify warned:\n{said}");
}

#[test]
fn every_unit_is_hardened_and_sized_for_its_connections() {
    for t in &TEMPLATES {
        let (unit, name) = (unit_text(t.unit), t.unit);
        for (key, value) in [
            ("DynamicUser", "yes"),
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("CapabilityBoundingSet", ""),
            ("RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"),
            ("KillSignal", "SIGTERM"),
            ("EnvironmentFile", &format!("/etc/cachetier/{}.env", t.env.replace(t.instance, "%i"))),
        ] {
            assert_eq!(setting(&unit, key).as_deref(), Some(value), "{name}: {key}");
        }
        let exec = setting(&unit, "ExecStart").unwrap();
        assert!(exec.starts_with(&format!("/opt/cachetier/bin/{} ", t.binary)), "{name}: {exec}");
        // One descriptor per client connection, and room for upstream sockets, listener, logs.
        let nofile: u64 = setting(&unit, "LimitNOFILE").unwrap().parse().unwrap();
        assert!(nofile >= DEFAULT_MAX_CONNECTIONS + 1024, "{name}: LimitNOFILE {nofile}");
    }
    for unit in ["cachetier-balancer@", "cachetier-balancer-worker@"] {
        let text = unit_text(unit);
        // The balancer's upstream sockets can reach --max-pending (10,000) with proxies that
        // do not multiplex, so it gets room for both.
        let nofile: u64 = setting(&text, "LimitNOFILE").unwrap().parse().unwrap();
        assert!(nofile >= 2 * DEFAULT_MAX_CONNECTIONS + 1024, "{unit}: LimitNOFILE {nofile}");
        assert_eq!(setting(&text, "ExecReload").as_deref(), Some("/bin/kill -HUP $MAINPID"), "{unit}");
    }
    // The port is the instance name, or, for workers sharing one port, --reuse-port and a user
    // they share (the kernel lets only one user's sockets share a port).
    for t in &TEMPLATES[..3] {
        assert!(setting(&unit_text(t.unit), "ExecStart").unwrap().contains(" --port %i "), "{}", t.unit);
    }
    let workers = unit_text("cachetier-balancer-worker@");
    assert!(setting(&workers, "ExecStart").unwrap().contains(" --reuse-port "));
    assert_eq!(setting(&workers, "User").as_deref(), Some("cachetier-balancer"));
}

#[test]
fn the_example_env_files_hold_flags_the_binaries_accept() {
    for t in &TEMPLATES {
        let name = t.binary;
        let env = std::fs::read_to_string(deploy_dir().join(format!("env/{}.env", t.env))).unwrap();
        let var = format!("{}_ARGS=", name.to_uppercase());
        let args = env.lines().find_map(|l| l.strip_prefix(var.as_str())).unwrap_or_else(|| panic!("{name}: no {var}"));
        // As systemd expands an unquoted $VAR in ExecStart: split on whitespace.
        // The unit's own flags first, as in its ExecStart.
        let exec = setting(&unit_text(t.unit), "ExecStart").unwrap().replace("%i", "0");
        let mut argv: Vec<&str> = exec.split_whitespace().skip(1).filter(|a| !a.starts_with('$')).collect();
        argv.extend(args.split_whitespace());
        // --version is acted on once every flag before it has parsed, so an unknown flag or a
        // bad value fails here, and nothing is started.
        argv.push("--version");
        let out = Command::new(workspace_bin(name).unwrap()).args(&argv).output().unwrap();
        assert!(out.status.success(), "{name} {argv:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stdout).starts_with(name));
    }
}

#[test]
fn every_binary_answers_version() {
    for name in ["origin", "proxy", "balancer", "client"] {
        let out = Command::new(workspace_bin(name).unwrap()).arg("--version").output().unwrap();
        assert!(out.status.success(), "{name} --version");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("{name} {}", env!("CARGO_PKG_VERSION")));
    }
}
