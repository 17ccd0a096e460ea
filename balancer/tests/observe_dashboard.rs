//! The balancer's dashboard in a real browser (SPEC 6): headless Chromium against a running
//! cluster of real binaries. The page lists every proxy as up and its charts have data; a
//! proxy killed with SIGKILL shows as down on the open page within 3 s; a screenshot is saved.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod observe;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use observe::{get, http, scratch, tool_or_skip, Child2};
use serde_json::Value;
use testkit::{free_port, wait_until, LineClient};

/// The flags every Chromium run gets: headless, as root, nothing fetched from the network
/// but our page, and a profile of its own.
fn chromium(profile: &Path) -> Command {
    let mut command = Command::new("chromium");
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--window-size=1280,680",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .stdin(Stdio::null());
    command
}

/// Runs Chromium once on `url` for `budget_ms` of virtual time and returns the DOM it had.
fn dump_dom(url: &str, budget_ms: u64) -> String {
    let profile = scratch("chromium-dom");
    let out = chromium(&profile)
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg("--dump-dom")
        .arg(url)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn screenshot(url: &str, path: &Path) {
    let profile = scratch("chromium-shot");
    let status = chromium(&profile)
        .arg("--virtual-time-budget=3000")
        .arg(format!("--screenshot={}", path.display()))
        .arg(url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// A Chromium left running on a page, read through its DevTools HTTP endpoint.
struct LivePage {
    child: Child,
    devtools: SocketAddr,
}

impl Drop for LivePage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl LivePage {
    fn open(url: &str) -> LivePage {
        let profile = scratch("chromium-live");
        let port = free_port().unwrap();
        let child = chromium(&profile)
            .arg(format!("--remote-debugging-port={port}"))
            .arg("--remote-debugging-address=127.0.0.1")
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        LivePage { child, devtools: format!("127.0.0.1:{port}").parse().unwrap() }
    }

    /// The page's title now (the dashboard keeps a summary of what it shows there).
    fn title(&self) -> Option<String> {
        let answer = http(self.devtools, "GET", "/json/list").ok()?;
        let targets: Value = serde_json::from_slice(&answer.body).ok()?;
        targets.as_array()?.iter().find(|t| t["type"] == "page").and_then(|t| t["title"].as_str()).map(str::to_owned)
    }
}

/// The `data-points` count of the chart with this id in a dumped DOM.
fn chart_points(dom: &str, id: &str) -> usize {
    let Some(at) = dom.find(&format!("id=\"{id}\"")) else { return 0 };
    let tag_end = dom[at..].find('>').map_or(dom.len(), |e| at + e);
    let tag = &dom[at..tag_end];
    tag.split("data-points=\"").nth(1).and_then(|rest| rest.split('"').next()).and_then(|n| n.parse().ok()).unwrap_or(0)
}

fn samples_with_traffic(admin: SocketAddr) -> usize {
    let history: Value = serde_json::from_slice(&get(admin, "/api/history").body).unwrap_or_default();
    history["samples"].as_array().map_or(0, |s| s.iter().filter(|s| s["rps"].as_f64() > Some(0.0)).count())
}

#[test]
fn dashboard_in_a_real_browser() {
    if !tool_or_skip("chromium") {
        return;
    }
    let origin = Child2::spawn(
        "origin",
        &[
            "--port",
            "0",
            "--data-dir",
            &observe::data_dir(),
            "--synthetic-keys",
            "500",
            "--latency-ms",
            "2",
            "--log-level",
            "warn",
        ],
    )
    .unwrap();
    let origin_port = origin.addr.port().to_string();
    let mut proxies: Vec<Child2> = (0..3)
        .map(|_| {
            Child2::spawn(
                "proxy",
                &["--port", "0", "--origin-port", &origin_port, "--cache-type", "lru", "--log-level", "warn"],
            )
            .unwrap()
        })
        .collect();
    let names: Vec<String> = proxies.iter().map(|p| p.addr.to_string()).collect();
    let mut args = vec!["--port", "0", "--admin-port", "0", "--strategy", "consistent_hash", "--log-level", "error"];
    // Probes every 250 ms, down after 2 failures: the balancer knows within about half a
    // second, and the page (polling every second) must show it within 3 s.
    args.extend(["--health-interval-ms", "250", "--fall", "2", "--metrics-interval-ms", "500", "--proxies"]);
    args.extend(names.iter().map(String::as_str));
    let balancer = Child2::spawn_path(&testkit::workspace_bin("balancer").unwrap(), &args, Stdio::inherit()).unwrap();
    let admin = balancer.admin.unwrap();
    let url = format!("http://{admin}/");

    // Traffic for the charts: zipf-ish keys so that there are hits, bounded in time.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, addr) = (stop.clone(), balancer.addr);
        thread::spawn(move || {
            let mut client = LineClient::connect(addr).unwrap();
            let started = Instant::now();
            let mut i: u64 = 0;
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(90) {
                i += 1;
                let key = (i * i) % 97;
                let _ = client.request(&format!("GET synthetic/{key}"));
            }
        })
    };
    assert!(wait_until(Duration::from_secs(30), || samples_with_traffic(admin) >= 4), "no history");

    // One page load, read after a few seconds of (virtual) time.
    let dom = dump_dom(&url, 3000);
    for name in &names {
        let row = format!("data-proxy=\"{name}\" data-state=\"up\"");
        assert!(dom.contains(&row), "{name} not shown up:\n{dom}");
    }
    assert!(chart_points(&dom, "chart-rps") >= 3, "requests chart empty:\n{dom}");
    assert!(chart_points(&dom, "chart-latency") >= 3, "latency chart empty:\n{dom}");
    assert!(chart_points(&dom, "chart-hit") >= 1, "hit ratio chart empty:\n{dom}");

    // A page left open sees a proxy die.
    let page = LivePage::open(&url);
    let all_up = format!("{}/{} up", names.len(), names.len());
    assert!(
        wait_until(Duration::from_secs(30), || page.title().is_some_and(|t| t.contains(&all_up))),
        "page title: {:?}",
        page.title()
    );
    let victim = proxies.remove(1);
    victim.signal("KILL");
    let killed = Instant::now();
    let down = format!("{}=down", names[1]);
    assert!(
        wait_until(Duration::from_secs(10), || page.title().is_some_and(|t| t.contains(&down))),
        "page title: {:?}",
        page.title()
    );
    let shown_after = killed.elapsed();
    eprintln!("dashboard showed the killed proxy down after {shown_after:?}");
    assert!(shown_after <= Duration::from_secs(3), "shown down only after {shown_after:?}");
    drop(victim);

    // The screenshot (with the dead proxy in red), for the README.
    let path = std::env::var_os("CACHETIER_SCREENSHOT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png"));
    let _ = std::fs::remove_file(&path);
    screenshot(&url, &path);
    let png = std::fs::read(&path).unwrap();
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "screenshot {} bytes", png.len());
    eprintln!("screenshot saved to {}", path.display());

    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
}
