//! The client side of the cache tier: one-shot requests as the `client` CLI makes them, and
//! the `client bench` load generator.

pub mod bench;
pub mod top;

use std::time::{Duration, Instant};

use common::line_client::LineClient;
use serde_json::{json, Map, Value};

/// The status the CLI reports when it could not talk to the service at all.
pub const CONNECTION_ERROR: &str = "CLIENT_CONNECTION_ERROR";

/// Sends one request line to `host:port` and returns the answer object with `latency_ms`
/// added (connect included). Refusal, timeout, a close or an unreadable answer become a
/// `CLIENT_CONNECTION_ERROR` object.
pub fn request_once(host: &str, port: u16, line: &str, timeout: Duration) -> Value {
    let started = Instant::now();
    let result = LineClient::connect_timeout((host, port), timeout).and_then(|mut c| c.request(line));
    let latency_ms = (started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
    let mut answer = match result {
        Ok(Value::Object(map)) => map,
        Ok(other) => {
            let mut map = Map::new();
            map.insert("status".into(), json!(CONNECTION_ERROR));
            map.insert("data".into(), json!(format!("answer is not a JSON object: {other}")));
            map
        }
        Err(e) => {
            let mut map = Map::new();
            map.insert("status".into(), json!(CONNECTION_ERROR));
            map.insert("data".into(), json!(format!("{host}:{port}: {e}")));
            map
        }
    };
    answer.insert("latency_ms".into(), json!(latency_ms));
    Value::Object(answer)
}

/// Refuses a key the CLI must not send as typed: one holding a control character (a newline
/// would end the request line and start another, SPEC 3.8).
pub fn check_key(key: &str) -> Result<(), String> {
    match key.chars().find(|c| c.is_control()) {
        Some(c) => Err(format!("key {key:?} contains the control character {c:?}; nothing was sent")),
        None => Ok(()),
    }
}

/// Whether an answer from [`request_once`] means success (exit status 0).
pub fn is_ok(answer: &Value) -> bool {
    answer["status"] == "OK"
}
