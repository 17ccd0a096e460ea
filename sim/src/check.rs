//! The invariants, checked as the run goes and at its end. Each violation names itself, so a
//! failing seed says what broke.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use crate::net::{whole_lines, EndId, EndInfo, NodeId, Observer};

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    pub at: Duration,
    /// The invariant's short name (what `sim` prints and exits with).
    pub invariant: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t={:.3}s {}: {}", self.at.as_secs_f64(), self.invariant, self.detail)
    }
}

#[derive(Debug, Default)]
pub struct Checker {
    pub violations: Vec<Violation>,
}

impl Checker {
    pub fn fail(&mut self, at: Duration, invariant: &'static str, detail: String) {
        // The first few say what happened; the rest would only repeat it.
        if self.violations.len() < 20 {
            self.violations.push(Violation { at, invariant, detail });
        }
    }
}

/// Watches what proxies send their origin and what comes back: at most one fetch per key may
/// be in flight from one proxy (SPEC 3.3, coalescing).
pub struct OriginFetches {
    origin: SocketAddr,
    /// Per proxy end toward the origin: the bytes of an unfinished request line, and the keys
    /// asked and not yet answered, in order.
    ends: BTreeMap<EndId, (NodeId, Vec<u8>, VecDeque<String>)>,
    /// Violations found, collected by the run after each step.
    pub found: Vec<(&'static str, String)>,
}

impl OriginFetches {
    pub fn new(origin: SocketAddr) -> Self {
        OriginFetches { origin, ends: BTreeMap::new(), found: Vec::new() }
    }

    fn in_flight(&self, node: NodeId, key: &str) -> usize {
        self.ends.values().filter(|(n, _, keys)| *n == node && keys.iter().any(|k| k == key)).count()
    }
}

impl Observer for OriginFetches {
    fn wrote(&mut self, end: EndInfo, bytes: &[u8]) {
        if end.remote != self.origin || !matches!(end.tag, crate::net::Tag::Peer(_)) {
            return;
        }
        let entry = self.ends.entry(end.end).or_insert_with(|| (end.owner, Vec::new(), VecDeque::new()));
        let mut asked = Vec::new();
        for line in whole_lines(&mut entry.1, bytes).split(|b| *b == b'\n') {
            if let Some(key) = line.strip_prefix(b"GET ") {
                asked.push(String::from_utf8_lossy(key).trim_end().to_string());
            }
        }
        for key in asked {
            if self.in_flight(end.owner, &key) > 0 {
                self.found.push(("one-fetch-per-key", format!("node {} fetches {key} twice at once", end.owner)));
            }
            if let Some(entry) = self.ends.get_mut(&end.end) {
                entry.2.push_back(key);
            }
        }
    }

    fn read(&mut self, end: EndInfo, bytes: &[u8]) {
        if let Some(entry) = self.ends.get_mut(&end.end) {
            for _ in bytes.iter().filter(|b| **b == b'\n') {
                entry.2.pop_front();
            }
        }
    }

    fn closed(&mut self, end: EndInfo) {
        self.ends.remove(&end.end);
    }
}
