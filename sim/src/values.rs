//! The origin's values in a simulated run: every key has a version that the run bumps from
//! time to time, and the history of versions, so that an answer can be checked against what
//! the origin held when (SPEC 3.2: nothing fresh is older than its TTL). The origin serves
//! them through `origin::store::Values`, exactly as it would serve files.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use origin::store::{Lookup, Values};

#[derive(Debug, Default)]
pub struct Table {
    /// Per key, its versions and when each became current (oldest first).
    history: BTreeMap<String, Vec<Duration>>,
    /// While set, every lookup is answered ORIGIN_ERROR (a failing source of truth).
    pub failing: bool,
    /// Bytes of padding in each value (large-value runs).
    pub pad: usize,
}

impl Table {
    pub fn new(keys: usize, pad: usize) -> Self {
        let history = (0..keys).map(|k| (key_name(k), vec![Duration::ZERO])).collect();
        Table { history, failing: false, pad }
    }

    /// `key` gets a new version, current from `now`.
    pub fn bump(&mut self, key: &str, now: Duration) {
        if let Some(versions) = self.history.get_mut(key) {
            versions.push(now);
        }
    }

    pub fn current(&self, key: &str) -> Option<usize> {
        self.history.get(key).map(|v| v.len() - 1)
    }

    /// Until when version `v` of `key` was current: `Some(None)` while it still is, `None`
    /// when the origin never held such a version.
    pub fn ended(&self, key: &str, v: usize) -> Option<Option<Duration>> {
        let versions = self.history.get(key)?;
        (v < versions.len()).then(|| versions.get(v + 1).copied())
    }
}

pub fn key_name(k: usize) -> String {
    format!("k{k}")
}

/// The origin's view of the table.
#[derive(Debug, Clone)]
pub struct SimValues(pub Arc<Mutex<Table>>);

impl Values for SimValues {
    fn lookup(&self, key: &str, out: &mut Vec<u8>) -> Lookup {
        let Ok(table) = self.0.lock() else { return Lookup::Error("table poisoned".into()) };
        if table.failing {
            return Lookup::Error("the simulated origin is failing".into());
        }
        match table.current(key) {
            Some(v) => {
                out.extend_from_slice(format!("{{\"key\":\"{key}\",\"v\":{v},\"pad\":\"").as_bytes());
                out.resize(out.len() + table.pad, b'x');
                out.extend_from_slice(b"\"}");
                Lookup::Found
            }
            None => Lookup::NotFound,
        }
    }
}
