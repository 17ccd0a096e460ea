//! The real `origin` binary, started as a child process on port 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testkit::{metrics, wait_until, ChildService, LineClient};

const BIN: &str = env!("CARGO_BIN_EXE_origin");

fn data_dir() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data").display().to_string()
}

#[test]
fn the_binary_announces_its_port_and_answers_a_pipelined_burst_in_order() {
    let origin = ChildService::spawn(BIN, &["--port", "0", "--data-dir", &data_dir()]).unwrap();
    let mut c = LineClient::connect(origin.addr()).unwrap();
    c.send_raw(b"GET article/1\n{\"op\":\"get\",\"key\":\"article/2\",\"id\":5}\nMETRICS\n").unwrap();
    let a = c.recv().unwrap();
    let b = c.recv().unwrap();
    let m = c.recv().unwrap();
    assert_eq!((a["status"].as_str(), &a["data"]["id"]), (Some("OK"), &serde_json::json!(1)));
    assert_eq!((b["data"]["id"].as_u64(), b["id"].as_u64()), (Some(2), Some(5)));
    assert_eq!(m["data"]["role"], "origin");
    assert_eq!(m["data"]["ok"], 2);
}

#[test]
fn sigterm_while_a_delayed_request_is_pending_answers_it_and_exits_zero() {
    let mut origin = ChildService::spawn(
        BIN,
        &["--port", "0", "--data-dir", &data_dir(), "--latency-ms", "500", "--log-level", "warn"],
    )
    .unwrap();
    let addr = origin.addr();
    let mut c = LineClient::connect(addr).unwrap();
    c.send("GET article/1").unwrap();
    assert!(wait_until(Duration::from_secs(5), || metrics(addr).unwrap()["pending"] == 1));
    origin.signal("TERM").unwrap();
    let answer = c.recv().unwrap();
    assert_eq!(answer["status"], "OK");
    assert_eq!(answer["data"]["id"], 1);
    assert_eq!(origin.wait_exit(Duration::from_secs(5)).unwrap(), Some(0));
}

#[test]
fn sigint_on_an_idle_origin_exits_zero() {
    let mut origin = ChildService::spawn(BIN, &["--port", "0", "--data-dir", &data_dir()]).unwrap();
    let _idle = LineClient::connect(origin.addr()).unwrap();
    origin.signal("INT").unwrap();
    assert_eq!(origin.wait_exit(Duration::from_secs(5)).unwrap(), Some(0));
}

#[test]
fn start_up_errors_are_clear_and_non_zero() {
    let missing = Command::new(BIN).args(["--port", "0", "--data-dir", "/nonexistent/origin-data"]).output().unwrap();
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("/nonexistent/origin-data"), "{stderr}");

    let unknown = Command::new(BIN).args(["--port", "0", "--frobnicate"]).output().unwrap();
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("--frobnicate"));

    // A taken port is an error too, not a silent retry elsewhere.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let taken = Command::new(BIN).args(["--port", &port, "--data-dir", &data_dir()]).output().unwrap();
    assert!(!taken.status.success());
    assert!(String::from_utf8_lossy(&taken.stderr).contains(&port));
}

/// CPU time (user + system) of process `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
fn out_of_file_descriptors_the_origin_refuses_clients_without_spinning_and_recovers() {
    // 32 descriptors: the loop's own few and a small reserve, then room for about 20 clients;
    // past that a client gets OVERLOADED at once (SPEC 3.8) instead of waiting in the backlog.
    let script = format!("ulimit -n 32 && exec {BIN} --port 0 --data-dir {} --log-level error", data_dir());
    let origin = ChildService::spawn("sh", &["-c", &script]).unwrap();
    let mut clients: Vec<LineClient> = (0..40).map(|_| LineClient::connect(origin.addr()).unwrap()).collect();
    let (mut accepted, mut refused) = (Vec::new(), 0);
    for mut c in clients.drain(..) {
        c.set_timeout(Duration::from_secs(5)).unwrap();
        c.send("HEALTH").unwrap();
        let answer = c.recv().unwrap();
        match answer["status"].as_str() {
            Some("OK") => accepted.push(c),
            Some("OVERLOADED") => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(refused > 0 && accepted.len() >= 15, "{} accepted, {refused} refused", accepted.len());
    // A data file still opens: the reserve was kept.
    assert_eq!(accepted[0].request("GET article/1").unwrap()["status"], "OK");
    // Refusing is not a busy loop: a whole second of CPU would show here.
    let before = cpu_ticks(origin.pid());
    std::thread::sleep(Duration::from_secs(1)); // measuring CPU use over a fixed interval
    let spent = cpu_ticks(origin.pid()) - before;
    assert!(spent < 20, "{spent} ticks of CPU in 1 s while out of descriptors");
    // Free descriptors: new clients are served again.
    drop(accepted);
    assert!(testkit::wait_until(Duration::from_secs(5), || {
        LineClient::connect(origin.addr()).unwrap().request("HEALTH").unwrap()["status"] == "OK"
    }));
}
