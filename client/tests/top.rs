//! `client top` against a real in-process cluster (origin, three proxies, balancer): the
//! `--once` snapshot, its errors, and the live view driven through a real terminal (tmux).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use balancer::BalancerConfig;
use testkit::{metrics, refused_addr, wait_until, FakeBehavior, FakeServer, LineClient, RunningServer};

const CLIENT: &str = env!("CARGO_BIN_EXE_client");

struct Cluster {
    _origin: RunningServer,
    proxies: Vec<Option<RunningServer>>,
    balancer: RunningServer,
}

impl Cluster {
    /// Three proxies behind a balancer that probes every 50 ms and polls METRICS every 100 ms,
    /// once the balancer has seen every proxy up and polled each one's METRICS.
    fn start() -> Cluster {
        let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../origin/data");
        let mut origin_config = origin::OriginConfig::new(data);
        origin_config.synthetic = Some(origin::Synthetic { count: 100, value_bytes: 100 });
        let origin = RunningServer::start(origin::bind(origin_config).unwrap());
        let proxies: Vec<RunningServer> = (0..3)
            .map(|_| RunningServer::start(proxy::bind(proxy::ProxyConfig::new(origin.addr())).unwrap()))
            .collect();
        let addrs: Vec<SocketAddr> = proxies.iter().map(RunningServer::addr).collect();
        let mut config = BalancerConfig::new(&addrs);
        config.health_interval = Duration::from_millis(50);
        config.health_timeout = Duration::from_millis(100);
        config.metrics_interval = Duration::from_millis(100);
        let balancer = RunningServer::start(balancer::bind(config).unwrap());
        let cluster = Cluster { _origin: origin, proxies: proxies.into_iter().map(Some).collect(), balancer };
        assert!(
            wait_until(Duration::from_secs(10), || cluster
                .all_proxies(|p| p["healthy"] == true && p["metrics"].is_object())),
            "the balancer never saw every proxy up: {}",
            metrics(cluster.balancer.addr()).unwrap()
        );
        cluster
    }

    fn port(&self) -> String {
        self.balancer.addr().port().to_string()
    }

    fn proxy_names(&self) -> Vec<String> {
        self.proxies.iter().flatten().map(|p| p.addr().to_string()).collect()
    }

    fn all_proxies(&self, condition: impl Fn(&serde_json::Value) -> bool) -> bool {
        let data = metrics(self.balancer.addr()).unwrap();
        let proxies = data["proxies"].as_object().unwrap();
        proxies.len() == 3 && proxies.values().all(condition)
    }
}

fn top_once(port: &str) -> Output {
    Command::new(CLIENT)
        .args(["--port", port, "--timeout-ms", "2000", "top", "--once", "--interval-ms", "200"])
        .output()
        .unwrap()
}

/// The line of `screen` that starts with `name` (after a table border, if any).
fn row<'a>(screen: &'a str, name: &str) -> Option<&'a str> {
    screen.lines().map(|l| l.trim_start_matches(['│', ' '])).find(|l| l.starts_with(&format!("{name} ")))
}

fn health_of(screen: &str, name: &str) -> Option<String> {
    row(screen, name).and_then(|r| r.split_whitespace().nth(1)).map(str::to_owned)
}

#[test]
fn once_prints_every_proxy_up_and_the_cluster_totals_as_plain_text() {
    let cluster = Cluster::start();
    let mut c = LineClient::connect(cluster.balancer.addr()).unwrap();
    for i in 0..60 {
        assert_eq!(c.request(&format!("GET synthetic/{}", i % 10)).unwrap()["status"], "OK");
    }
    // Let the balancer's polled copies of the proxies' METRICS catch up with those GETs.
    assert!(wait_until(Duration::from_secs(10), || {
        metrics(cluster.balancer.addr()).unwrap()["cluster"]["hits"].as_u64().unwrap_or(0)
            + metrics(cluster.balancer.addr()).unwrap()["cluster"]["misses"].as_u64().unwrap_or(0)
            >= 60
    }));
    // GETs keep flowing while top samples, so its rates have something to measure.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (stop, addr) = (stop.clone(), cluster.balancer.addr());
        std::thread::spawn(move || {
            let mut c = LineClient::connect(addr).unwrap();
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) && sent < 50_000 {
                assert_eq!(c.request(&format!("GET synthetic/{}", sent % 10)).unwrap()["status"], "OK");
                sent += 1;
            }
            sent
        })
    };
    let out = top_once(&cluster.port());
    stop.store(true, Ordering::SeqCst);
    let sent = load.join().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains('\u{1b}'), "terminal control codes in --once output: {text:?}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with(&format!("cachetier top: balancer 127.0.0.1:{}, round_robin", cluster.port())),
        "{text}"
    );
    assert!(lines[0].contains("rates over 0."), "{text}");
    // The totals: numbers, not unknowns. 60 GETs round-robin over 10 keys on 3 proxies: each
    // proxy misses each key at most once, so at least half of them hit.
    let totals = lines[1];
    assert!(
        totals.starts_with("requests/s ") && totals.contains("errors 0") && totals.contains("proxies 3/3 UP"),
        "{text}"
    );
    let hit_rate: f64 = totals.split("hit rate ").nth(1).unwrap().split('%').next().unwrap().parse().unwrap();
    assert!((50.0..=100.0).contains(&hit_rate), "{text}");
    assert!(!totals.contains(" - "), "an unknown total: {text}");
    for name in cluster.proxy_names() {
        let line = row(&text, &name).unwrap_or_else(|| panic!("no row for {name}: {text}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        // PROXY HEALTH IN-FLIGHT REQ/S HIT% P99, every one known.
        assert_eq!(cells.len(), 6, "{line}");
        assert_eq!(cells[1], "UP", "{line}");
        assert!(cells[4].ends_with('%') && cells[5].ends_with('s'), "{line}");
    }
    let total: Vec<&str> = row(&text, "total").unwrap().split_whitespace().collect();
    assert_eq!(total[1], "3/3", "{text}");
    // Rates: the balancer's and the proxies' forwarded ones, measured while the load ran (one
    // GET may be forwarded and not yet answered at either sample: the slack).
    let balancer_rate: f64 = totals.split_whitespace().nth(1).unwrap().parse().unwrap();
    let forwarded_rate: f64 = total[3].parse().unwrap();
    assert!(
        balancer_rate > 0.0 && forwarded_rate > 0.0 && forwarded_rate <= balancer_rate + 20.0,
        "{sent} GETs: {text}"
    );
}

#[test]
fn once_fails_with_a_clear_message_when_there_is_no_balancer_to_read() {
    let refused = top_once(&refused_addr().port().to_string());
    assert!(!refused.status.success() && refused.stdout.is_empty());
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(message.starts_with("client top: cannot reach the balancer at 127.0.0.1:"), "{message}");

    let cluster = Cluster::start();
    let at_a_proxy = top_once(&cluster.proxies[0].as_ref().unwrap().addr().port().to_string());
    assert!(!at_a_proxy.status.success() && at_a_proxy.stdout.is_empty());
    let message = String::from_utf8_lossy(&at_a_proxy.stderr);
    assert!(message.contains("did not answer with balancer METRICS: role proxy"), "{message}");

    let live_into_a_pipe = Command::new(CLIENT).args(["--port", &cluster.port(), "top"]).output().unwrap();
    assert!(!live_into_a_pipe.status.success() && live_into_a_pipe.stdout.is_empty());
    let message = String::from_utf8_lossy(&live_into_a_pipe.stderr);
    assert!(message.contains("not a terminal (use --once"), "{message}");

    let garbage = FakeServer::start(FakeBehavior::Reply("<html>".into())).unwrap();
    let out = top_once(&garbage.addr().port().to_string());
    assert!(!out.status.success() && out.stdout.is_empty());
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("did not answer with balancer METRICS: not JSON"), "{message}");
}

#[test]
fn once_lists_thousands_of_proxies_from_a_hostile_balancer_without_failing() {
    // Well-formed enough to be a balancer's METRICS, otherwise anything: missing, wrong-typed
    // and huge values, terminal escapes in names, 5,000 proxies.
    let mut proxies = serde_json::Map::new();
    for i in 0..5000 {
        let entry = match i % 4 {
            0 => {
                serde_json::json!({"healthy": true, "in_flight": u64::MAX, "forwarded": i, "metrics": {"hits": 1e300}})
            }
            1 => serde_json::json!({"healthy": "yes", "in_flight": -1, "metrics": "none"}),
            2 => serde_json::json!(null),
            _ => serde_json::json!({"healthy": false, "forwarded": u64::MAX, "metrics": {"hits": 3, "misses": 1}}),
        };
        proxies.insert(format!("10.1.{}.{}:80\u{1b}[2J", i / 256, i % 256), entry);
    }
    let answer = serde_json::json!({"status": "OK", "data": {
        "role": "balancer", "total_requests": "lots", "errors": -5, "latency_us": [1, 2], "proxies": proxies,
    }});
    let fake = FakeServer::start(FakeBehavior::Reply(answer.to_string())).unwrap();
    let out = top_once(&fake.addr().port().to_string());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains('\u{1b}'), "a name's escape reached the output");
    assert!(text.lines().nth(1).unwrap().contains("errors -  proxies 1250/5000 UP"), "{}", &text[..500]);
    let rows = text.lines().filter(|l| l.starts_with("10.1.")).count();
    assert_eq!(rows, 5000);
    assert_eq!(health_of(&text, "10.1.0.3:80?[2J").as_deref(), Some("DOWN"));
    assert_eq!(health_of(&text, "10.1.0.1:80?[2J").as_deref(), Some("?"));
}

/// A private tmux server (its own socket) with one detached session of a fixed size running a
/// plain `sh`, into which commands are typed as a user would. Dropping it stops that server.
struct Tmux {
    socket: String,
    config: std::path::PathBuf,
}

impl Tmux {
    fn start() -> Tmux {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let socket = format!("cachetier-top-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let dir = testkit::temp_dir("top-tmux");
        let config = dir.join("tmux.conf");
        std::fs::write(&config, "set -g status off\n").unwrap();
        let tmux = Tmux { socket, config };
        let shell = "env PS1='top-test$ ' ENV= sh";
        let started = tmux.run(&["new-session", "-d", "-s", "top", "-x", "110", "-y", "24", shell]);
        assert!(started.status.success(), "tmux new-session: {}", String::from_utf8_lossy(&started.stderr));
        assert!(wait_until(Duration::from_secs(10), || tmux.screen().contains("top-test$")), "no shell prompt");
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        let mut command = Command::new("tmux");
        command.arg("-L").arg(&self.socket).arg("-f").arg(&self.config).args(args).env("TERM", "xterm-256color");
        command.output().expect("tmux is needed for this test (.ci/run installs it)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "top"]).stdout).into_owned()
    }

    /// `#{…}` formats of the pane, e.g. `#{alternate_on}`.
    fn pane(&self, format: &str) -> String {
        let out = self.run(&["display-message", "-p", "-t", "top", format]);
        assert!(out.status.success(), "tmux display-message: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "top"];
        args.extend_from_slice(keys);
        assert!(self.run(&args).status.success());
    }

    /// Types `line` and Enter at the shell.
    fn type_line(&self, line: &str) {
        self.keys(&["-l", line]);
        self.keys(&["Enter"]);
    }

    /// Waits until the shell is in the foreground again (the program exited) and returns the
    /// program's exit status, as the shell reports it.
    fn exit_status(&self) -> String {
        let back = wait_until(Duration::from_secs(10), || self.pane("#{pane_current_command}") == "sh");
        assert!(back, "still running:\n{}", self.screen());
        self.type_line("echo \"exit=$?.\"");
        let mut status = None;
        let echoed = wait_until(Duration::from_secs(10), || {
            let screen = self.screen();
            status = screen
                .lines()
                .filter_map(|l| l.strip_prefix("exit=")?.strip_suffix('.'))
                .next_back()
                .map(str::to_owned);
            status.is_some()
        });
        assert!(echoed, "no exit status:\n{}", self.screen());
        status.unwrap_or_default()
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

fn live_top(cluster: &Cluster) -> Tmux {
    let tmux = Tmux::start();
    tmux.type_line(&format!("'{CLIENT}' --port {} top --interval-ms 100", cluster.port()));
    tmux
}

#[test]
fn the_live_view_shows_every_proxy_turns_a_stopped_one_down_and_quits_on_q() {
    let mut cluster = Cluster::start();
    let names = cluster.proxy_names();
    let tmux = live_top(&cluster);
    let all_up = wait_until(Duration::from_secs(10), || {
        let screen = tmux.screen();
        names.iter().all(|n| health_of(&screen, n).as_deref() == Some("UP")) && screen.contains("proxies 3/3 UP")
    });
    assert!(all_up, "rows never showed every proxy UP:\n{}", tmux.screen());
    assert_eq!(tmux.pane("#{alternate_on}"), "1", "the live view draws on the alternate screen");

    cluster.proxies[1].take().unwrap().stop().unwrap();
    let one_down = wait_until(Duration::from_secs(10), || {
        let screen = tmux.screen();
        health_of(&screen, &names[1]).as_deref() == Some("DOWN")
            && [&names[0], &names[2]].iter().all(|n| health_of(&screen, n).as_deref() == Some("UP"))
            && screen.contains("proxies 2/3 UP")
    });
    assert!(one_down, "the stopped proxy never turned DOWN:\n{}", tmux.screen());

    tmux.keys(&["q"]);
    assert_eq!(tmux.exit_status(), "0");
    // The terminal is given back: off the alternate screen, the table gone, the shell there.
    assert_eq!(tmux.pane("#{alternate_on}"), "0");
    let after = tmux.screen();
    assert!(!after.contains("PROXY") && !after.contains(&names[0]), "table left on the screen:\n{after}");
    assert!(after.contains("top-test$ echo"), "{after}");
}

#[test]
fn ctrl_c_and_esc_quit_the_live_view_cleanly_too() {
    let cluster = Cluster::start();
    for keys in ["C-c", "Escape"] {
        let tmux = live_top(&cluster);
        assert!(wait_until(Duration::from_secs(10), || tmux.screen().contains("proxies 3/3 UP")), "{}", tmux.screen());
        tmux.keys(&[keys]);
        assert_eq!(tmux.exit_status(), "0", "{keys}");
        assert_eq!(tmux.pane("#{alternate_on}"), "0", "{keys}");
    }
}
