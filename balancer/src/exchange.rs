//! One-shot exchanges with a proxy, each on its own short connection: a HEALTH probe, a
//! METRICS poll, one proxy's share of a PURGE fan-out. What each asks and how its answer
//! reads (plain functions), and the slab of their connections (I/O only).

use common::framing::Frame;
use common::protocol::{parse_answer, write_text_request, Status};
use common::timers::TimerKey;
use common::upstream::{Progress, Upstream};
use mio::{Registry, Token};
use serde::Deserialize;
use serde_json::value::RawValue;
use slab::Slab;

use crate::failure::Failure;

/// Longest answer line accepted from a proxy.
pub const MAX_ANSWER: usize = 16 * 1024 * 1024 + 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    Probe,
    Poll,
    /// Part of PURGE fan-out N.
    Purge(usize),
}

/// What an exchange's answer said.
#[derive(Debug)]
pub enum Heard {
    /// Any well-formed answer: the proxy is alive. `multiplexed` when it answered OK with a
    /// `role`, so it takes JSON requests tagged with our ids (SPEC 2.1).
    Probe { multiplexed: bool },
    /// The METRICS `data`, when it answered OK.
    Poll(Option<Box<RawValue>>),
    /// Whether it held the key.
    Purge { held: bool },
}

/// The request line for `purpose` (`key` for a PURGE).
pub fn request_line(purpose: Purpose, key: &str, out: &mut Vec<u8>) {
    match purpose {
        Purpose::Probe => write_text_request(out, "HEALTH", None),
        Purpose::Poll => write_text_request(out, "METRICS", None),
        Purpose::Purge(_) => write_text_request(out, "PURGE", Some(key)),
    }
}

#[derive(Deserialize)]
struct Role<'a> {
    #[serde(borrow)]
    role: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Purged {
    purged: bool,
}

/// Reads an exchange's answer line; `None` when it is not a well-formed answer.
pub fn interpret(purpose: Purpose, line: &[u8]) -> Option<Heard> {
    let answer = parse_answer(line).ok()?;
    let ok = answer.status_is(Status::Ok);
    let data = ok.then_some(answer.data);
    Some(match purpose {
        Purpose::Probe => Heard::Probe {
            multiplexed: data.and_then(|d| serde_json::from_slice::<Role>(d).ok()).is_some_and(|r| r.role.is_some()),
        },
        Purpose::Poll => Heard::Poll(data.and_then(|d| serde_json::from_slice::<Box<RawValue>>(d).ok())),
        Purpose::Purge(_) => {
            Heard::Purge { held: data.and_then(|d| serde_json::from_slice::<Purged>(d).ok()).is_some_and(|p| p.purged) }
        }
    })
}

pub struct Exchange {
    up: Upstream,
    pub backend: usize,
    pub purpose: Purpose,
    pub timer: Option<TimerKey>,
}

/// The exchanges under way, each on its own connection.
#[derive(Default)]
pub struct Exchanges {
    slab: Slab<Exchange>,
}

impl Exchanges {
    /// Connects to `addr` and sends the request for `purpose`; returns the exchange's number.
    pub fn start(
        &mut self,
        registry: &Registry,
        addr: std::net::SocketAddr,
        (backend, purpose, key): (usize, Purpose, &str),
        token: impl Fn(usize) -> Token,
    ) -> Result<usize, Failure> {
        let entry = self.slab.vacant_entry();
        let index = entry.key();
        let mut up = Upstream::connect(addr, registry, token(index)).map_err(|e| Failure::of_connect(&e))?;
        let mut line = Vec::new();
        request_line(purpose, key, &mut line);
        if up.send(&line).is_err() {
            up.deregister(registry);
            return Err(Failure::Reset);
        }
        entry.insert(Exchange { up, backend, purpose, timer: None });
        Ok(index)
    }

    pub fn set_timer(&mut self, index: usize, timer: TimerKey) {
        if let Some(x) = self.slab.get_mut(index) {
            x.timer = Some(timer);
        }
    }

    /// Handles readiness: `None` while the answer is still to come, else what was heard
    /// (`Some(None)`: no well-formed answer).
    pub fn on_event(&mut self, index: usize) -> Option<Option<Heard>> {
        let x = self.slab.get_mut(index)?;
        match x.up.on_ready(MAX_ANSWER) {
            Ok(Progress::Connecting) => None,
            Ok(Progress::Ready) => match x.up.frame(MAX_ANSWER) {
                Frame::Line(line, _) => Some(interpret(x.purpose, line)),
                Frame::Incomplete if !x.up.is_eof() => None,
                _ => Some(None),
            },
            Err(_) => Some(None),
        }
    }

    /// Whether any exchange under way talks to `backend` (its slot may not be reused yet).
    pub fn involve(&self, backend: usize) -> bool {
        self.slab.iter().any(|(_, x)| x.backend == backend)
    }

    /// Ends exchange `index`, closing its connection.
    pub fn finish(&mut self, registry: &Registry, index: usize) -> Option<Exchange> {
        let mut x = self.slab.try_remove(index)?;
        x.up.deregister(registry);
        Some(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_read_per_purpose() {
        let probe = |line: &str| match interpret(Purpose::Probe, line.as_bytes()) {
            Some(Heard::Probe { multiplexed }) => Some(multiplexed),
            _ => None,
        };
        assert_eq!(probe(r#"{"status":"OK","data":{"role":"proxy","uptime_s":1}}"#), Some(true));
        assert_eq!(probe(r#"{"status":"WRONG_METHOD","data":"unknown"}"#), Some(false), "alive, but simple");
        assert_eq!(probe(r#"{"status":"OK","data":{"uptime_s":1}}"#), Some(false));
        assert_eq!(probe("HTTP/1.1 400"), None);
        let purge = |line: &str| match interpret(Purpose::Purge(0), line.as_bytes()) {
            Some(Heard::Purge { held }) => Some(held),
            _ => None,
        };
        assert_eq!(purge(r#"{"status":"OK","data":{"purged":true}}"#), Some(true));
        assert_eq!(purge(r#"{"status":"OK","data":{"purged":false,"note":"true"}}"#), Some(false));
        assert_eq!(purge(r#"{"status":"WRONG_METHOD","data":{"purged":true}}"#), Some(false));
        assert!(matches!(
            interpret(Purpose::Poll, br#"{"status":"OK","data":{"hits":3}}"#),
            Some(Heard::Poll(Some(_)))
        ));
        let mut line = Vec::new();
        request_line(Purpose::Purge(3), "a/b", &mut line);
        assert_eq!(line, b"PURGE a/b\n");
    }
}
