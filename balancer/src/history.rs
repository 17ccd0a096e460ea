//! The samples behind the dashboard's charts (SPEC 6): about one a second, the last five
//! minutes in a fixed ring, so that a page opened now has full charts at once.
//!
//! Each sample is computed from the balancer's METRICS data (the same object `/api/cluster`
//! serves) and its GET latency histogram: rates are differences from the previous sample over
//! the time between them, latency percentiles are over the GETs answered in between. Every
//! input, the clock included, is passed in.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use common::metrics::LatencyHistogram;
use serde::Serialize;
use serde_json::Value;

/// Samples kept: five minutes at one a second.
pub const CAPACITY: usize = 300;
/// Samples over which the hit ratio is computed: the proxies' counters arrive with the
/// balancer's METRICS polls (every 2 s by default), so one second alone is often empty.
const HIT_WINDOW: usize = 5;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ProxySample {
    pub up: bool,
    pub in_flight: u64,
    /// GET attempts forwarded per second.
    pub rps: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sample {
    /// Wall clock, milliseconds since the Unix epoch.
    pub t: u64,
    /// Requests answered per second (every op).
    pub rps: f64,
    /// Answered with an error by the balancer per second.
    pub errors_ps: f64,
    /// Cluster hits / (hits + misses) over the last few seconds; `None` with no GETs.
    pub hit_ratio: Option<f64>,
    /// GET latency percentiles over the interval, µs (0 with no GETs).
    pub p50_us: u64,
    pub p99_us: u64,
    pub proxies: BTreeMap<String, ProxySample>,
    #[serde(skip)]
    cumulative: Totals,
}

/// The counters a sample differs from the previous one by.
#[derive(Clone, Debug, Default)]
struct Totals {
    requests: u64,
    errors: u64,
    hits: u64,
    misses: u64,
    forwarded: BTreeMap<String, u64>,
}

/// A proxy's health as the dashboard shows it: since when it has been up or down.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Health {
    pub up: bool,
    /// Wall clock of the last change (or of the first sighting), ms since the epoch.
    pub since_ms: u64,
}

pub struct History {
    samples: VecDeque<Sample>,
    previous: Option<(Instant, Totals)>,
    /// The latency histogram as of the previous sample.
    latency_then: LatencyHistogram,
    health: BTreeMap<String, Health>,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History").field("samples", &self.samples.len()).finish()
    }
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

fn u64_at(value: &Value, field: &str) -> u64 {
    value.get(field).and_then(Value::as_u64).unwrap_or(0)
}

fn totals(metrics: &Value) -> Totals {
    let cluster = metrics.get("cluster").unwrap_or(&Value::Null);
    let forwarded = match metrics.get("proxies") {
        Some(Value::Object(proxies)) => proxies.iter().map(|(k, v)| (k.clone(), u64_at(v, "forwarded"))).collect(),
        _ => BTreeMap::new(),
    };
    Totals {
        requests: u64_at(metrics, "total_requests"),
        errors: u64_at(metrics, "errors"),
        hits: u64_at(cluster, "hits"),
        misses: u64_at(cluster, "misses"),
        forwarded,
    }
}

/// `(now - then) / seconds`, 0 when a counter went backwards (a restarted proxy).
fn rate(now: u64, then: u64, seconds: f64) -> f64 {
    if seconds <= 0.0 {
        0.0
    } else {
        now.saturating_sub(then) as f64 / seconds
    }
}

impl History {
    pub fn new() -> Self {
        History {
            samples: VecDeque::with_capacity(CAPACITY),
            previous: None,
            latency_then: LatencyHistogram::new(),
            health: BTreeMap::new(),
        }
    }

    pub fn samples(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter()
    }

    pub fn health(&self) -> &BTreeMap<String, Health> {
        &self.health
    }

    /// Notes each proxy's `healthy` flag, remembering when it last changed. Called with every
    /// sample and whenever the dashboard asks, so a change is dated to within a poll.
    pub fn observe_health(&mut self, metrics: &Value, wall_ms: u64) {
        let Some(Value::Object(proxies)) = metrics.get("proxies") else { return };
        self.health.retain(|name, _| proxies.contains_key(name));
        for (name, data) in proxies {
            let up = data.get("healthy").and_then(Value::as_bool).unwrap_or(false);
            match self.health.get_mut(name) {
                Some(h) if h.up == up => {}
                Some(h) => *h = Health { up, since_ms: wall_ms },
                None => {
                    self.health.insert(name.clone(), Health { up, since_ms: wall_ms });
                }
            }
        }
    }

    /// Takes a sample at `now` (`wall_ms` on the wall clock).
    pub fn sample(&mut self, now: Instant, wall_ms: u64, metrics: &Value, latency: &LatencyHistogram) {
        self.observe_health(metrics, wall_ms);
        let current = totals(metrics);
        let Some((then, previous)) = self.previous.take() else {
            // The first call only sets the baseline.
            self.previous = Some((now, current));
            self.latency_then = latency.clone();
            return;
        };
        let seconds = now.saturating_duration_since(then).as_secs_f64();
        let percentiles = latency.quantile_since_us(&self.latency_then, &[0.5, 0.99]);
        self.latency_then = latency.clone();
        let window_start = self
            .samples
            .len()
            .checked_sub(HIT_WINDOW - 1)
            .and_then(|i| self.samples.get(i))
            .map_or(&previous, |s| &s.cumulative);
        let hits = current.hits.saturating_sub(window_start.hits);
        let misses = current.misses.saturating_sub(window_start.misses);
        let hit_ratio = (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64);
        let mut proxies = BTreeMap::new();
        if let Some(Value::Object(list)) = metrics.get("proxies") {
            for (name, data) in list {
                let forwarded = current.forwarded.get(name).copied().unwrap_or(0);
                let before = previous.forwarded.get(name).copied().unwrap_or(forwarded);
                proxies.insert(
                    name.clone(),
                    ProxySample {
                        up: data.get("healthy").and_then(Value::as_bool).unwrap_or(false),
                        in_flight: u64_at(data, "in_flight"),
                        rps: rate(forwarded, before, seconds),
                    },
                );
            }
        }
        let sample = Sample {
            t: wall_ms,
            rps: rate(current.requests, previous.requests, seconds),
            errors_ps: rate(current.errors, previous.errors, seconds),
            hit_ratio,
            p50_us: percentiles.first().copied().unwrap_or(0),
            p99_us: percentiles.get(1).copied().unwrap_or(0),
            proxies,
            cumulative: current.clone(),
        };
        if self.samples.len() == CAPACITY {
            self.samples.pop_front();
        }
        self.samples.push_back(sample);
        self.previous = Some((now, current));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn metrics(requests: u64, hits: u64, misses: u64, forwarded: u64, healthy: bool) -> Value {
        json!({
            "role": "balancer", "total_requests": requests, "errors": 0,
            "proxies": {"p1": {"healthy": healthy, "in_flight": 2, "forwarded": forwarded}},
            "cluster": {"hits": hits, "misses": misses}
        })
    }

    #[test]
    fn rates_percentiles_and_a_bounded_ring() {
        let t0 = Instant::now();
        let mut h = History::new();
        let mut latency = LatencyHistogram::new();
        h.sample(t0, 0, &metrics(0, 0, 0, 0, true), &latency);
        assert_eq!(h.samples().count(), 0, "the first call is the baseline");
        for us in [100, 200, 300, 400, 10_000] {
            latency.record(Duration::from_micros(us));
        }
        h.sample(t0 + Duration::from_secs(2), 2000, &metrics(200, 30, 10, 100, true), &latency);
        let s = h.samples().last().cloned().expect("a sample");
        assert_eq!(s.rps, 100.0);
        assert_eq!(s.hit_ratio, Some(0.75));
        assert!((290..=310).contains(&s.p50_us), "{s:?}");
        assert!((9_900..=10_100).contains(&s.p99_us), "{s:?}");
        assert_eq!(s.proxies["p1"], ProxySample { up: true, in_flight: 2, rps: 50.0 });
        // Nothing new in the next interval: no latency, no rate.
        h.sample(t0 + Duration::from_secs(3), 3000, &metrics(200, 30, 10, 100, true), &latency);
        let s = h.samples().last().cloned().expect("a sample");
        assert_eq!((s.rps, s.p50_us, s.p99_us), (0.0, 0, 0));
        for i in 0..(CAPACITY as u64 + 20) {
            h.sample(t0 + Duration::from_secs(4 + i), 4000 + i * 1000, &metrics(200, 30, 10, 100, true), &latency);
        }
        assert_eq!(h.samples().count(), CAPACITY);
    }

    #[test]
    fn health_changes_are_dated() {
        let mut h = History::new();
        h.observe_health(&metrics(0, 0, 0, 0, true), 1000);
        h.observe_health(&metrics(0, 0, 0, 0, true), 2000);
        assert_eq!(h.health()["p1"], Health { up: true, since_ms: 1000 });
        h.observe_health(&metrics(0, 0, 0, 0, false), 3000);
        assert_eq!(h.health()["p1"], Health { up: false, since_ms: 3000 });
    }
}
