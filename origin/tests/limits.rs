//! SPEC 3.8 at the origin, against the real binary: limits that hold whatever clients do and
//! whatever is in the data directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use testkit::{data_dir_with_big_value, metrics, rss_growth_under_a_non_reading_client, ChildService, LineClient};

const ORIGIN: &str = env!("CARGO_BIN_EXE_origin");

/// Measured: 259 MB before the fix (every delayed answer read and queued at once), 1.2 MiB
/// after (the answers that fit the output bound; the rest wait as small records). The bound
/// is that plus a margin for allocator noise.
const RSS_BOUND_KIB: u64 = 4 * 1024;

#[test]
fn delayed_answers_to_a_client_that_never_reads_stay_within_the_output_bound() {
    let dir = data_dir_with_big_value("origin-rss", 256 * 1024);
    let origin =
        ChildService::spawn(ORIGIN, &["--port", "0", "--data-dir", dir.to_str().unwrap(), "--latency-ms", "300"])
            .unwrap();
    let addr = origin.addr();
    let growth = rss_growth_under_a_non_reading_client(addr, origin.pid(), "GET big\n", 1000, || {
        let d = metrics(addr).unwrap();
        // Every timer has fired and every GET is either answered or waiting for room.
        d["pending"] == 0 && d["ok"].as_u64().unwrap() + d["waiting_for_room"].as_u64().unwrap() == 1000
    })
    .unwrap();
    eprintln!("origin RSS growth under 1,000 x 256 KiB for a non-reading client: {growth} KiB");
    assert!(growth < RSS_BOUND_KIB, "origin grew by {growth} KiB");
    // The waiting GETs were never answered, so the origin did not read the file 1,000 times.
    let ok = metrics(addr).unwrap()["ok"].as_u64().unwrap();
    assert!(ok < 100, "{ok} answers were made for a client that reads nothing");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn delayed_answers_all_arrive_once_the_client_reads() {
    let dir = data_dir_with_big_value("origin-pull", 256 * 1024);
    let origin =
        ChildService::spawn(ORIGIN, &["--port", "0", "--data-dir", dir.to_str().unwrap(), "--latency-ms", "50"])
            .unwrap();
    let mut c = LineClient::connect(origin.addr()).unwrap();
    c.send_raw("GET big\n".repeat(50).as_bytes()).unwrap();
    for i in 0..50 {
        let answer = c.recv().unwrap();
        assert_eq!(answer["status"], "OK", "answer {i}");
        assert_eq!(answer["data"].as_str().unwrap().len(), 256 * 1024 - 2);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// SPEC 3.8: a FIFO, a device, a directory or a symlink leading out of the data dir is never
/// opened in a way that blocks, and is answered NOT_FOUND or ORIGIN_ERROR.
#[test]
fn only_regular_files_inside_the_data_dir_are_served() {
    let dir = testkit::temp_dir("origin-types");
    let outside = testkit::temp_dir("origin-outside");
    std::fs::write(outside.join("secret.json"), "{\"secret\":true}").unwrap();
    std::fs::write(dir.join("ok.json"), "{\"ok\":true}").unwrap();
    std::os::unix::fs::symlink(outside.join("secret.json"), dir.join("ext.json")).unwrap();
    std::os::unix::fs::symlink(&outside, dir.join("extdir")).unwrap();
    std::os::unix::fs::symlink(dir.join("ok.json"), dir.join("inside.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.json")).unwrap();
    let status = std::process::Command::new("mkfifo").arg(dir.join("fifo.json")).status().unwrap();
    assert!(status.success(), "mkfifo is needed for this test");
    let origin = ChildService::spawn(ORIGIN, &["--port", "0", "--data-dir", dir.to_str().unwrap()]).unwrap();
    let mut c = LineClient::connect(origin.addr()).unwrap();
    c.set_timeout(Duration::from_secs(5)).unwrap();
    for (key, expected) in [
        ("fifo", "ORIGIN_ERROR"),
        ("zero", "NOT_FOUND"),
        ("ext", "NOT_FOUND"),
        ("extdir/secret", "NOT_FOUND"),
        ("ok", "OK"),
        ("inside", "OK"),
    ] {
        let answer = c.request(&format!("GET {key}")).unwrap();
        assert_eq!(answer["status"], expected, "{key}: {answer}");
        // The loop was not frozen: another client is served at once.
        let health = LineClient::connect(origin.addr()).unwrap().request("HEALTH").unwrap();
        assert_eq!(health["status"], "OK");
    }
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&outside);
}

/// SPEC 3.8: numeric flags out of range are start-up errors naming the flag, never a wrap.
#[test]
fn numeric_flags_out_of_range_are_errors_naming_the_flag() {
    for (flag, value) in [
        ("--max-file-bytes", "18446744073709551615"),
        ("--latency-ms", "18446744073709551616"),
        ("--idle-timeout-ms", "0"),
        ("--max-connections", "0"),
        ("--value-bytes", "99999999999"),
    ] {
        let out =
            std::process::Command::new(ORIGIN).args(["--port", "0", &format!("{flag}={value}")]).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}
