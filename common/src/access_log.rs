//! `--access-log PATH|-` (SPEC 6): one JSON line per answered request.
//!
//! The loop hands every answer to [`AccessLog`] with what it noted about the request when it
//! was read (op, key, arrival time). Lines collect in a memory buffer that is written out when
//! it fills up, on the loop's one-second tick and at exit — never a write per request. A write
//! that fails drops the buffered lines and counts them (`access_log_dropped`); serving goes
//! on. SIGUSR1 reopens the file, for logrotate.
//!
//! When the flag is not given there is no `AccessLog` at all: the loop's cost is one `None`
//! check per answer.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use log::warn;
use serde::Deserialize;
use serde_json::value::RawValue;
use slab::Slab;

use crate::metrics::format_rfc3339;
use crate::protocol::{parse_request, write_json_string, Op};

/// Buffered bytes at which the buffer is written out before the next tick.
const FLUSH_AT: usize = 64 * 1024;
/// Requests awaiting their answer whose notes are kept; past it, their lines are dropped
/// (counted) rather than memory growing without bound.
const MAX_NOTED: usize = 1 << 20;

/// Where the log goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Stderr,
    File(PathBuf),
}

impl Target {
    /// `-` is stderr, anything else a file path.
    pub fn parse(spec: &str) -> Target {
        if spec == "-" {
            Target::Stderr
        } else {
            Target::File(PathBuf::from(spec))
        }
    }
}

/// What is noted about a request when it is read, for the line written when it is answered.
#[derive(Debug)]
struct Note {
    op: &'static str,
    key: Option<Box<str>>,
    received: Instant,
}

/// A deferred request's note, kept until the request is answered (see `Ticket`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NoteId(u32);

enum Sink {
    Stderr,
    File(File),
}

pub struct AccessLog {
    target: Target,
    sink: Sink,
    buf: Vec<u8>,
    lines: u64,
    dropped: u64,
    /// The request being dispatched now (answers given during `on_line` belong to it).
    current: Option<Note>,
    deferred: Slab<Note>,
    /// `ts` of the last line and the millisecond it is for: lines of the same millisecond
    /// share one formatting.
    ts: String,
    ts_ms: u128,
    /// Where a deferred answer is encoded before it is logged and given (reused).
    scratch: Vec<u8>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").field("target", &self.target).field("dropped", &self.dropped).finish()
    }
}

fn open(target: &Target) -> io::Result<Sink> {
    match target {
        Target::Stderr => Ok(Sink::Stderr),
        Target::File(path) => open_file(path)
            .map(Sink::File)
            .map_err(|e| io::Error::new(e.kind(), format!("--access-log {}: {e}", path.display()))),
    }
}

/// Opens the log for appending without ever blocking the loop: O_NONBLOCK, so a FIFO with no
/// reader cannot hold `open(2)` (at start-up, or on SIGUSR1 in a running service), and then
/// only a regular file or a character device (/dev/null, /dev/full, a terminal) is kept. A
/// FIFO or socket is refused: a slow reader would stall every write, and so every client.
fn open_file(path: &std::path::Path) -> io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = OpenOptions::new().create(true).append(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let kind = file.metadata()?.file_type();
    if kind.is_file() || kind.is_char_device() {
        Ok(file)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO or socket could block the service)",
        ))
    }
}

/// The parts of an answer line the log shows: everything but `data`.
#[derive(Deserialize)]
struct AnswerFields<'a> {
    #[serde(borrow)]
    status: &'a str,
    #[serde(default)]
    cache_hit: Option<bool>,
    #[serde(default)]
    node: Option<u64>,
    #[serde(default, borrow)]
    id: Option<&'a RawValue>,
}

impl AccessLog {
    /// Opens the target; an unwritable path is an error (at start-up, SPEC 6).
    pub fn open(target: Target) -> io::Result<AccessLog> {
        let sink = open(&target)?;
        Ok(AccessLog {
            target,
            sink,
            buf: Vec::with_capacity(FLUSH_AT + 1024),
            lines: 0,
            dropped: 0,
            current: None,
            deferred: Slab::new(),
            ts: String::new(),
            ts_ms: u128::MAX,
            scratch: Vec::new(),
        })
    }

    /// Lines lost to failed writes (or to too many requests awaiting answers).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// A request line is about to be dispatched.
    pub fn begin(&mut self, line: &[u8], now: Instant) {
        let (op, key) = match parse_request(line) {
            Ok(request) => match request.op {
                Op::Get(key) => ("get", Some(key.as_str().into())),
                Op::Purge(key) => ("purge", Some(key.as_str().into())),
                Op::Metrics => ("metrics", None),
                Op::Health => ("health", None),
            },
            // A bad request still says which op it was, when the verb was recognised.
            Err(e) => match e.verb {
                Some("GET") => ("get", None),
                Some("PURGE") => ("purge", None),
                Some("METRICS") => ("metrics", None),
                Some("HEALTH") => ("health", None),
                _ => ("invalid", None),
            },
        };
        self.current = Some(Note { op, key, received: now });
    }

    /// The dispatch of the current request is over.
    pub fn end(&mut self) {
        self.current = None;
    }

    /// The current request will be answered later: keeps its note for then.
    pub fn defer(&mut self) -> Option<NoteId> {
        let note = self.current.as_ref()?;
        if self.deferred.len() >= MAX_NOTED {
            return None;
        }
        let copy = Note { op: note.op, key: note.key.clone(), received: note.received };
        u32::try_from(self.deferred.insert(copy)).ok().map(NoteId)
    }

    /// A buffer to encode a deferred answer in; give it back with [`AccessLog::put_scratch`].
    pub fn take_scratch(&mut self) -> Vec<u8> {
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        buf
    }

    pub fn put_scratch(&mut self, buf: Vec<u8>) {
        if buf.capacity() <= 64 * 1024 {
            self.scratch = buf;
        }
    }

    /// Logs an answer given now to the current request (or to none: a line too long).
    pub fn answered_now(&mut self, client: SocketAddr, answer: &[u8]) {
        let note = self.current.take();
        self.write_line(note.as_ref(), client, answer);
        self.current = note;
    }

    /// Logs the answer to a deferred request.
    pub fn answered_later(&mut self, id: Option<NoteId>, client: Option<SocketAddr>, answer: &[u8]) {
        let note = id.and_then(|id| self.deferred.try_remove(id.0 as usize));
        if let Some(client) = client {
            self.write_line(note.as_ref(), client, answer);
        }
    }

    fn write_line(&mut self, note: Option<&Note>, client: SocketAddr, answer: &[u8]) {
        let line = answer.strip_suffix(b"\n").unwrap_or(answer);
        // `data` is skipped by the parser, not built.
        let fields = serde_json::from_slice::<AnswerFields>(line).ok();
        let latency_us = note.map_or(0, |n| u64::try_from(n.received.elapsed().as_micros()).unwrap_or(u64::MAX));
        let now = SystemTime::now();
        let ms = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis());
        if ms != self.ts_ms {
            self.ts = format_rfc3339(now);
            self.ts_ms = ms;
        }
        let out = &mut self.buf;
        out.extend_from_slice(b"{\"ts\":\"");
        out.extend_from_slice(self.ts.as_bytes());
        // Writing into a Vec cannot fail.
        let _ = write!(out, "\",\"client\":\"{client}\",\"op\":\"{}\"", note.map_or("invalid", |n| n.op));
        if let Some(key) = note.and_then(|n| n.key.as_deref()) {
            out.extend_from_slice(b",\"key\":");
            write_json_string(out, key);
        }
        out.extend_from_slice(b",\"status\":");
        write_json_string(out, fields.as_ref().map_or("?", |f| f.status));
        out.extend_from_slice(b",\"latency_us\":");
        out.extend_from_slice(itoa::Buffer::new().format(latency_us).as_bytes());
        if let Some(f) = &fields {
            if let Some(hit) = f.cache_hit {
                out.extend_from_slice(if hit { b",\"cache_hit\":true" } else { b",\"cache_hit\":false" });
            }
            if let Some(node) = f.node {
                out.extend_from_slice(b",\"node\":");
                out.extend_from_slice(itoa::Buffer::new().format(node).as_bytes());
            }
            if let Some(id) = f.id {
                out.extend_from_slice(b",\"id\":");
                out.extend_from_slice(id.get().as_bytes());
            }
        }
        out.extend_from_slice(b"}\n");
        self.lines += 1;
        if self.buf.len() >= FLUSH_AT {
            self.flush();
        }
    }

    /// Writes the buffered lines out (the loop's tick, a full buffer, exit).
    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let result = match &mut self.sink {
            Sink::Stderr => io::stderr().lock().write_all(&self.buf),
            Sink::File(file) => file.write_all(&self.buf),
        };
        if let Err(e) = result {
            // Logged only when the count crosses a power of two, so a full disk is not a
            // flood of warnings.
            let before = self.dropped;
            self.dropped = self.dropped.saturating_add(self.lines);
            if before.checked_next_power_of_two() != self.dropped.checked_next_power_of_two() || before == 0 {
                warn!("access log write failed ({e}); {} lines dropped so far", self.dropped);
            }
        }
        self.buf.clear();
        self.lines = 0;
    }

    /// SIGUSR1: writes what is buffered to the old file, then opens the path again (the old
    /// file was moved away by logrotate). If it cannot be opened, logging goes on to the old one.
    pub fn reopen(&mut self) {
        self.flush();
        match open(&self.target) {
            Ok(sink) => self.sink = sink,
            Err(e) => warn!("cannot reopen the access log: {e}; still writing to the old file"),
        }
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cachetier-access-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        dir
    }

    /// Opens `target` on a thread and waits a bounded time: an open that blocks (a FIFO with
    /// no reader, opened without O_NONBLOCK) fails the test instead of hanging it.
    fn open_within_a_second(target: Target) -> Option<io::Result<AccessLog>> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(AccessLog::open(target));
        });
        rx.recv_timeout(std::time::Duration::from_secs(1)).ok()
    }

    #[test]
    fn a_fifo_is_refused_at_once_and_a_reopen_onto_one_keeps_the_old_file() {
        let fifo = temp("fifo");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(made.success(), "mkfifo failed");
        let opened = open_within_a_second(Target::File(fifo.clone())).expect("opening a FIFO blocked");
        assert!(opened.is_err(), "a FIFO was accepted as the access log");
        // A running log whose path becomes a FIFO (a bad logrotate) keeps its old file.
        let path = temp("fifo-reopen");
        let mut log = AccessLog::open(Target::File(path.clone())).expect("open");
        std::fs::remove_file(&path).expect("remove");
        std::fs::rename(&fifo, &path).expect("rename the FIFO into place");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            log.reopen();
            let _ = tx.send(matches!(log.sink, Sink::File(_)));
        });
        assert_eq!(rx.recv_timeout(std::time::Duration::from_secs(1)), Ok(true), "reopen blocked or lost the file");
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn lines_carry_request_and_answer_fields() {
        let path = temp("fields");
        let mut log = AccessLog::open(Target::File(path.clone())).expect("open");
        let client: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        log.begin(b"GET article/1", Instant::now());
        log.answered_now(
            client,
            b"{\"status\":\"OK\",\"data\":{\"cache_hit\":false},\"cache_hit\":true,\"node\":8001}\n",
        );
        log.end();
        log.begin(b"{\"op\":\"get\",\"key\":\"b\",\"id\":7}", Instant::now());
        let note = log.defer();
        log.end();
        assert!(note.is_some());
        log.answered_later(note, Some(client), b"{\"status\":\"NOT_FOUND\",\"data\":null,\"id\":7}\n");
        log.begin(b"FROB", Instant::now());
        log.answered_now(client, b"{\"status\":\"WRONG_METHOD\",\"data\":\"no\"}\n");
        log.end();
        drop(log);
        let text = std::fs::read_to_string(&path).expect("read");
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["op"], "get");
        assert_eq!(lines[0]["key"], "article/1");
        assert_eq!(lines[0]["cache_hit"], true);
        assert_eq!(lines[0]["node"], 8001);
        assert_eq!(lines[0]["client"], "127.0.0.1:4000");
        assert!(lines[0]["ts"].as_str().is_some_and(|ts| ts.ends_with('Z') && ts.len() == 24));
        assert_eq!(lines[1]["status"], "NOT_FOUND");
        assert_eq!(lines[1]["id"], 7);
        assert_eq!(lines[1]["key"], "b");
        assert_eq!(lines[2]["op"], "invalid");
        assert!(lines[2].get("key").is_none());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn failed_writes_are_counted_not_fatal() {
        let mut log = AccessLog::open(Target::File("/dev/full".into())).expect("open /dev/full");
        let client: SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        for _ in 0..3 {
            log.begin(b"HEALTH", Instant::now());
            log.answered_now(client, b"{\"status\":\"OK\",\"data\":null}\n");
            log.end();
        }
        log.flush();
        assert_eq!(log.dropped(), 3);
    }

    #[test]
    fn unwritable_path_is_an_error() {
        let err = AccessLog::open(Target::File("/nonexistent-dir/x/access.log".into())).expect_err("must fail");
        assert!(err.to_string().contains("--access-log"), "{err}");
    }
}

#[cfg(test)]
mod cost {
    use super::*;

    /// Ad hoc: `cargo test --release -p common access_log_line_cost -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn access_log_line_cost() {
        let path = std::env::temp_dir().join(format!("cachetier-access-cost-{}", std::process::id()));
        let mut log = AccessLog::open(Target::File(path.clone())).expect("open");
        let client: SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let answer = format!(
            "{{\"status\":\"OK\",\"data\":{{\"id\":1,\"v\":\"{}\"}},\"cache_hit\":true,\"node\":8001}}\n",
            "x".repeat(180)
        );
        let n = 200_000;
        let t = Instant::now();
        for _ in 0..n {
            log.begin(b"GET synthetic/123", Instant::now());
            log.answered_now(client, answer.as_bytes());
            log.end();
        }
        let per = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            let _ = serde_json::from_slice::<AnswerFields>(answer.as_bytes());
        }
        let parse = t.elapsed() / n;
        let t = Instant::now();
        for _ in 0..n {
            let _ = parse_request(b"GET synthetic/123");
        }
        let req = t.elapsed() / n;
        eprintln!("per line {per:?}; of which answer parse {parse:?}, request parse {req:?}");
        let _ = std::fs::remove_file(&path);
    }
}
