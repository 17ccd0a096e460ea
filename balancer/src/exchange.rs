//! One-shot exchanges with a proxy, each on its own short connection: a HEALTH probe, a
//! METRICS poll, one proxy's share of a PURGE fan-out. What each asks and how its answer
//! reads (plain functions), and the slab of those under way (bookkeeping: the driver owns
//! their sockets).

use std::net::SocketAddr;

use common::peer::{PeerId, PeerMap};
use common::protocol::{parse_answer, write_text_request, Status};
use common::server::Ctx;
use common::timers::TimerKey;
use serde::Deserialize;
use serde_json::value::RawValue;
use slab::Slab;

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
    peer: PeerId,
    pub backend: usize,
    pub purpose: Purpose,
    pub timer: Option<TimerKey>,
}

/// The exchanges under way, each on its own connection.
#[derive(Default)]
pub struct Exchanges {
    slab: Slab<Exchange>,
    /// The number of each connection's exchange.
    by_peer: PeerMap<usize>,
}

impl Exchanges {
    /// Connects to `addr` and queues the request for `purpose` (written once connected);
    /// returns the exchange's number. A connect that fails ends it like a silence.
    pub fn start<T>(
        &mut self,
        ctx: &mut Ctx<T>,
        addr: SocketAddr,
        (backend, purpose, key): (usize, Purpose, &str),
    ) -> usize {
        let peer = ctx.connect(addr, MAX_ANSWER);
        if let Some(out) = ctx.peer_output(peer) {
            request_line(purpose, key, out);
        }
        let index = self.slab.insert(Exchange { peer, backend, purpose, timer: None });
        self.by_peer.insert(peer, index);
        index
    }

    pub fn set_timer(&mut self, index: usize, timer: TimerKey) {
        if let Some(x) = self.slab.get_mut(index) {
            x.timer = Some(timer);
        }
    }

    /// The number of `peer`'s exchange, when it is one.
    pub fn index_of(&self, peer: PeerId) -> Option<usize> {
        self.by_peer.get(peer).copied()
    }

    /// A line on `peer`: the exchange it ends, with what it heard (`None`: not a well-formed
    /// answer); `None` when `peer` is no exchange's.
    pub fn heard(&self, peer: PeerId, line: &[u8]) -> Option<(usize, Option<Heard>)> {
        let index = self.index_of(peer)?;
        Some((index, interpret(self.slab.get(index)?.purpose, line)))
    }

    /// Whether any exchange under way talks to `backend` (its slot may not be reused yet).
    pub fn involve(&self, backend: usize) -> bool {
        self.slab.iter().any(|(_, x)| x.backend == backend)
    }

    /// Ends exchange `index`, closing its connection (if the driver has not).
    pub fn finish<T>(&mut self, ctx: &mut Ctx<T>, index: usize) -> Option<Exchange> {
        let x = self.slab.try_remove(index)?;
        self.by_peer.remove(x.peer);
        ctx.close_peer(x.peer);
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
