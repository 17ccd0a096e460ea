//! What `client top` shows, computed from two METRICS snapshots and the real time between
//! them. Plain data in, plain data out: no sockets, no terminal, times passed in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::snapshot::Snapshot;

/// A snapshot and when it was taken (when its answer arrived).
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub snapshot: Snapshot,
}

/// Requests `client top` itself adds between two of its samples: the METRICS request that took
/// the later one (a balancer counts the METRICS it is answering, SPEC 2.4). Left out of the
/// balancer's requests/s, so an idle cluster reads 0.
const OWN_REQUESTS_PER_SAMPLE: u64 = 1;

/// Below this, two samples are too close together for a rate to mean anything.
const MIN_ELAPSED: Duration = Duration::from_millis(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    Up,
    Down,
    /// The balancer did not say (a field missing or of the wrong type).
    Unknown,
}

impl Health {
    pub fn label(self) -> &'static str {
        match self {
            Health::Up => "UP",
            Health::Down => "DOWN",
            Health::Unknown => "?",
        }
    }
}

/// One proxy's line.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub name: String,
    pub health: Health,
    pub in_flight: Option<u64>,
    /// Requests the balancer forwarded to it per second, over the last interval.
    pub requests_per_s: Option<f64>,
    /// Its hits / (hits + misses), as it last reported them to the balancer.
    pub hit_rate: Option<f64>,
    pub p99_us: Option<u64>,
}

/// The cluster as a whole.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    /// Requests the balancer answered per second (any op), over the last interval.
    pub requests_per_s: Option<f64>,
    /// Sum of the rows' forwarded rates (None when none is known).
    pub forwarded_per_s: Option<f64>,
    pub in_flight: u64,
    pub hit_rate: Option<f64>,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub retries: Option<u64>,
    pub errors: Option<u64>,
    pub up: usize,
    pub proxies: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct View {
    pub strategy: String,
    pub uptime_s: Option<u64>,
    /// The real time the rates are measured over (None on the first sample).
    pub elapsed: Option<Duration>,
    pub totals: Totals,
    pub rows: Vec<Row>,
    pub proxies_left_off: usize,
}

impl View {
    /// The view after `current`, with rates against `previous` when there is one.
    pub fn compute(previous: Option<&Sample>, current: &Sample) -> View {
        let elapsed =
            previous.and_then(|p| current.at.checked_duration_since(p.at)).filter(|elapsed| *elapsed >= MIN_ELAPSED);
        let before = previous.map(|p| &p.snapshot);
        let forwarded_before: HashMap<&str, Option<u64>> =
            before.map(|b| b.proxies.iter().map(|p| (p.name.as_str(), p.forwarded)).collect()).unwrap_or_default();
        let now = &current.snapshot;
        let rows: Vec<Row> = now
            .proxies
            .iter()
            .map(|p| Row {
                name: p.name.clone(),
                health: match p.healthy {
                    Some(true) => Health::Up,
                    Some(false) => Health::Down,
                    None => Health::Unknown,
                },
                in_flight: p.in_flight,
                requests_per_s: elapsed
                    .and_then(|e| rate(forwarded_before.get(p.name.as_str()).copied().flatten(), p.forwarded, e)),
                hit_rate: hit_rate(p.hits, p.misses),
                p99_us: p.p99_us,
            })
            .collect();
        let known_rates: Vec<f64> = rows.iter().filter_map(|r| r.requests_per_s).collect();
        let totals = Totals {
            requests_per_s: elapsed.and_then(|e| {
                let own = before.and_then(|b| b.total_requests).and_then(|b| b.checked_add(OWN_REQUESTS_PER_SAMPLE));
                rate(own, now.total_requests, e)
            }),
            forwarded_per_s: (!known_rates.is_empty()).then(|| known_rates.iter().sum()),
            in_flight: rows.iter().filter_map(|r| r.in_flight).fold(0, u64::saturating_add),
            hit_rate: hit_rate(now.cluster_hits, now.cluster_misses),
            p50_us: now.p50_us,
            p99_us: now.p99_us,
            retries: now.retries,
            errors: now.errors,
            up: rows.iter().filter(|r| r.health == Health::Up).count(),
            proxies: rows.len().saturating_add(now.proxies_left_off),
        };
        View {
            strategy: now.strategy.clone(),
            uptime_s: now.uptime_s,
            elapsed,
            totals,
            rows,
            proxies_left_off: now.proxies_left_off,
        }
    }
}

/// How fast a counter grew from `before` to `after` over `elapsed`, per second. Unknown when
/// either end is unknown or the counter went backwards (the balancer restarted).
pub fn rate(before: Option<u64>, after: Option<u64>, elapsed: Duration) -> Option<f64> {
    let delta = after?.checked_sub(before?)?;
    let secs = elapsed.as_secs_f64();
    (secs > 0.0).then(|| delta as f64 / secs)
}

/// hits / (hits + misses); unknown when either is unknown or both are 0.
pub fn hit_rate(hits: Option<u64>, misses: Option<u64>) -> Option<f64> {
    let (hits, misses) = (hits? as f64, misses? as f64);
    let all = hits + misses;
    (all > 0.0).then(|| hits / all)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::top::snapshot::ProxySnapshot;

    fn proxy(name: &str, healthy: bool, forwarded: u64) -> ProxySnapshot {
        ProxySnapshot { name: name.into(), healthy: Some(healthy), forwarded: Some(forwarded), ..Default::default() }
    }

    fn sample(at: Instant, total: u64, proxies: Vec<ProxySnapshot>) -> Sample {
        Sample { at, snapshot: Snapshot { total_requests: Some(total), proxies, ..Default::default() } }
    }

    #[test]
    fn rates_are_counter_deltas_over_the_real_elapsed_time() {
        let t0 = Instant::now();
        let a = sample(t0, 1000, vec![proxy("p1", true, 100), proxy("p2", true, 50)]);
        // 1.25 s later (a slow refresh), not the nominal interval.
        let b = sample(t0 + Duration::from_millis(1250), 3501, vec![proxy("p1", true, 600), proxy("p2", false, 50)]);
        let v = View::compute(Some(&a), &b);
        assert_eq!(v.elapsed, Some(Duration::from_millis(1250)));
        assert_eq!(v.totals.requests_per_s, Some(2000.0));
        assert_eq!(v.rows[0].requests_per_s, Some(400.0));
        assert_eq!(v.rows[1].requests_per_s, Some(0.0));
        assert_eq!((v.rows[0].health, v.rows[1].health), (Health::Up, Health::Down));
        assert_eq!(v.totals.forwarded_per_s, Some(400.0));
        assert_eq!((v.totals.up, v.totals.proxies), (1, 2));
    }

    #[test]
    fn the_first_sample_has_no_rates() {
        let t0 = Instant::now();
        let v = View::compute(None, &sample(t0, 10, vec![proxy("p1", true, 5)]));
        assert_eq!((v.elapsed, v.totals.requests_per_s, v.rows[0].requests_per_s), (None, None, None));
        assert_eq!(v.totals.forwarded_per_s, None);
        // Two samples at the same instant (or out of order) are no interval either.
        let same = View::compute(Some(&sample(t0, 0, vec![])), &sample(t0, 10, vec![]));
        assert_eq!(same.totals.requests_per_s, None);
        let later = sample(t0 + Duration::from_secs(1), 0, vec![]);
        assert_eq!(View::compute(Some(&later), &sample(t0, 10, vec![])).elapsed, None);
    }

    #[test]
    fn a_counter_that_went_backwards_or_a_new_proxy_has_no_rate() {
        let t0 = Instant::now();
        let a = sample(t0, 5000, vec![proxy("p1", true, 900)]);
        let b = sample(t0 + Duration::from_secs(1), 10, vec![proxy("p1", true, 3), proxy("new", true, 7)]);
        let v = View::compute(Some(&a), &b);
        assert_eq!((v.totals.requests_per_s, v.rows[0].requests_per_s, v.rows[1].requests_per_s), (None, None, None));
    }

    #[test]
    fn huge_counters_neither_overflow_nor_panic() {
        let t0 = Instant::now();
        let mut p = proxy("p1", true, u64::MAX);
        p.in_flight = Some(u64::MAX);
        p.hits = Some(u64::MAX);
        p.misses = Some(u64::MAX);
        let mut q = proxy("p2", true, 0);
        q.in_flight = Some(u64::MAX);
        let a = sample(t0, 0, vec![proxy("p1", true, 0)]);
        let b = sample(t0 + Duration::from_nanos(1_000_001), u64::MAX, vec![p, q]);
        let idle = View::compute(Some(&sample(t0, 7, vec![])), &sample(t0 + Duration::from_secs(1), 8, vec![]));
        assert_eq!(idle.totals.requests_per_s, Some(0.0), "top's own METRICS is not traffic");
        let v = View::compute(Some(&a), &b);
        assert!(v.totals.requests_per_s.unwrap() > 1e21);
        assert_eq!(v.totals.in_flight, u64::MAX);
        assert_eq!(v.rows[0].hit_rate, Some(0.5));
    }

    #[test]
    fn hit_rates_come_from_hits_and_misses() {
        assert_eq!(hit_rate(Some(9), Some(1)), Some(0.9));
        assert_eq!(hit_rate(Some(0), Some(0)), None);
        assert_eq!(hit_rate(None, Some(1)), None);
        let t0 = Instant::now();
        let mut s = sample(t0, 0, vec![]);
        s.snapshot.cluster_hits = Some(3);
        s.snapshot.cluster_misses = Some(1);
        assert_eq!(View::compute(None, &s).totals.hit_rate, Some(0.75));
    }
}
