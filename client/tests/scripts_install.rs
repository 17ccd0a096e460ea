//! The scripts where they meet the machine: they run the binaries cargo built wherever
//! `CARGO_TARGET_DIR` puts them, `kill_cluster.sh` signals a recorded PID only while it is still
//! this checkout's binary, and `failover.sh` stops everything it started when it fails.
//!
//! Each test builds a sandbox: a target dir of its own holding this build's binaries (hard
//! links, or copies) under `release/`, and a `cargo` on PATH that builds nothing, so the
//! scripts run the real binaries without a release build.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use testkit::{free_port, refused_addr, temp_dir, wait_until, workspace_bin, ChildService};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn write_executable(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

struct Sandbox {
    dir: PathBuf,
    /// `CARGO_TARGET_DIR` for the scripts (canonical, as /proc/PID/exe shows it).
    target: PathBuf,
    vars: Vec<(&'static str, String)>,
    run_dir: PathBuf,
    ports: Vec<u16>,
}

impl Sandbox {
    fn new(label: &str) -> Sandbox {
        let dir = temp_dir(label).canonicalize().unwrap();
        let target = dir.join("target");
        let release = target.join("release");
        std::fs::create_dir_all(&release).unwrap();
        for name in ["origin", "proxy", "balancer", "client"] {
            let built = workspace_bin(name).unwrap();
            if std::fs::hard_link(&built, release.join(name)).is_err() {
                std::fs::copy(&built, release.join(name)).unwrap();
            }
        }
        let fake_bin = dir.join("bin");
        std::fs::create_dir_all(&fake_bin).unwrap();
        write_executable(&fake_bin.join("cargo"), "#!/bin/sh\n# the binaries are already in place\nexit 0\n");
        let path = format!("{}:{}", fake_bin.display(), std::env::var("PATH").unwrap_or_default());
        let ports: Vec<u16> = (0..5).map(|_| free_port().unwrap()).collect();
        let run_dir = dir.join("run");
        let vars = vec![
            ("CARGO_TARGET_DIR", target.display().to_string()),
            ("PATH", path),
            ("ORIGIN_PORT", ports[0].to_string()),
            ("PROXY_PORTS", format!("{} {} {}", ports[1], ports[2], ports[3])),
            ("LB_PORT", ports[4].to_string()),
            ("ORIGIN_LATENCY_MS", "1".into()),
            ("RUN_DIR", run_dir.display().to_string()),
        ];
        Sandbox { dir, target, vars, run_dir, ports }
    }

    fn binary(&self, name: &str) -> PathBuf {
        self.target.join("release").join(name)
    }

    fn script(&self, name: &str, extra: &[(&str, &str)]) -> Output {
        Command::new("bash")
            .arg(root().join("scripts").join(name))
            .envs(self.vars.iter().cloned())
            .envs(extra.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn recorded_pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.run_dir.join("pids"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
            .collect()
    }

    /// Running processes whose executable lies inside this sandbox.
    fn processes_inside(&self) -> Vec<u32> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
            if std::fs::read_link(entry.path().join("exe")).is_ok_and(|exe| exe.starts_with(&self.dir)) && running(pid)
            {
                found.push(pid);
            }
        }
        found
    }
}

impl Drop for Sandbox {
    /// Whatever happened, stop what the scripts started from this sandbox (by recorded PID).
    fn drop(&mut self) {
        if self.run_dir.join("pids").exists() {
            let _ = self.script("kill_cluster.sh", &[]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

fn exe_of(pid: u32) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default()
}

fn text(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A child process that is killed (by its PID) and reaped when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn start_status_and_kill_run_the_binaries_under_cargo_target_dir() {
    let sandbox = Sandbox::new("scripts-target-dir");
    let started = sandbox.script("start_cluster.sh", &[]);
    assert!(started.status.success(), "{}", text(&started));
    let pids = sandbox.recorded_pids();
    assert_eq!(pids.len(), 5, "origin, three proxies and the balancer");
    for &pid in &pids {
        let exe = exe_of(pid);
        assert!(
            exe.starts_with(sandbox.target.join("release")),
            "pid {pid} runs {exe:?}, not a binary of CARGO_TARGET_DIR"
        );
    }

    let status = sandbox.script("status.sh", &[]);
    let shown = String::from_utf8_lossy(&status.stdout);
    assert_eq!(shown.matches(" UP ").count(), 5, "{}", text(&status));

    let stopped = sandbox.script("kill_cluster.sh", &[]);
    assert!(stopped.status.success(), "{}", text(&stopped));
    assert!(wait_until(Duration::from_secs(10), || pids.iter().all(|&pid| !running(pid))), "left running: {pids:?}");
}

#[test]
fn kill_cluster_signals_a_recorded_pid_only_while_it_is_still_this_checkouts_binary() {
    let sandbox = Sandbox::new("scripts-pid-reuse");
    // A PID the service had, now another program's.
    let other_program = Guard(Command::new("sleep").arg("300").stdin(Stdio::null()).spawn().unwrap());
    let other_pid = other_program.0.id();
    // The same service, but a binary outside this checkout's target dir (another build).
    let foreign = ChildService::spawn(
        workspace_bin("proxy").unwrap().to_str().unwrap(),
        &["--port", "0", "--origin-port", &refused_addr().port().to_string(), "--log-level", "warn"],
    )
    .unwrap();
    // And one that is still ours: it must be stopped.
    let ours = ChildService::spawn(
        sandbox.binary("proxy").to_str().unwrap(),
        &["--port", "0", "--origin-port", &refused_addr().port().to_string(), "--log-level", "warn"],
    )
    .unwrap();
    std::fs::create_dir_all(&sandbox.run_dir).unwrap();
    let p = &sandbox.ports;
    let records = format!(
        "proxy-{} {other_pid} {}\nproxy-{} {} {}\nproxy-{} {} {}\n",
        p[1],
        p[1],
        p[2],
        foreign.pid(),
        p[2],
        p[3],
        ours.pid(),
        p[3]
    );
    std::fs::write(sandbox.run_dir.join("pids"), records).unwrap();

    let stopped = sandbox.script("kill_cluster.sh", &[]);
    assert!(stopped.status.success(), "{}", text(&stopped));
    assert!(
        wait_until(Duration::from_secs(10), || !running(ours.pid())),
        "our own proxy was not stopped: {}",
        text(&stopped)
    );
    assert!(running(other_pid), "kill_cluster.sh signalled a PID that belongs to another program");
    assert!(running(foreign.pid()), "kill_cluster.sh signalled a binary outside this checkout's target dir");
    let said = String::from_utf8_lossy(&stopped.stdout);
    assert!(said.contains(&format!("leaving pid {other_pid} alone")), "{}", text(&stopped));
}

#[test]
fn start_cluster_is_not_refused_by_a_recorded_pid_that_is_now_another_program() {
    let sandbox = Sandbox::new("scripts-stale-pids");
    let other_program = Guard(Command::new("sleep").arg("300").stdin(Stdio::null()).spawn().unwrap());
    std::fs::create_dir_all(&sandbox.run_dir).unwrap();
    std::fs::write(sandbox.run_dir.join("pids"), format!("balancer {} {}\n", other_program.0.id(), sandbox.ports[4]))
        .unwrap();
    let started = sandbox.script("start_cluster.sh", &[]);
    assert!(started.status.success(), "a stale PID file stopped the start: {}", text(&started));
    assert!(!sandbox.recorded_pids().contains(&other_program.0.id()));
    let stopped = sandbox.script("kill_cluster.sh", &[]);
    assert!(stopped.status.success(), "{}", text(&stopped));
    assert!(running(other_program.0.id()));
}

#[test]
fn failover_stops_everything_it_started_when_it_fails() {
    let sandbox = Sandbox::new("scripts-failover");
    // A balancer that never comes up: failover.sh fails after its origin and proxies started.
    let balancer = sandbox.binary("balancer");
    std::fs::remove_file(&balancer).unwrap();
    write_executable(&balancer, "#!/bin/sh\necho 'no balancer here' >&2\nexit 3\n");

    let out = sandbox.script("failover.sh", &[("RUNS", "1")]);
    let mut left = Vec::new();
    let clean = wait_until(Duration::from_secs(10), || {
        left = sandbox.processes_inside();
        left.is_empty()
    });
    let mut kill = Command::new("kill");
    kill.arg("-KILL").args(left.iter().map(u32::to_string));
    if !clean {
        let _ = kill.status();
    }
    assert!(clean, "failover.sh left running: {left:?}");
    assert!(!out.status.success(), "failover.sh succeeded without a balancer: {}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing answers HEALTH"), "{}", text(&out));
}
