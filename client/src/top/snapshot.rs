//! One balancer METRICS answer (SPEC 2.4) read into the plain numbers `client top` shows.
//!
//! The answer comes from the network, so nothing in it is trusted: a field that is missing,
//! of the wrong type, negative or too large for a `u64` is simply unknown (`None`), names are
//! cleaned of control characters and cut to a length, and only so many proxies are kept.
//! Only the shape that says "this is a balancer's METRICS" is required.

use std::fmt;

use serde_json::Value;

/// Proxies kept from one answer; any more are counted in [`Snapshot::proxies_left_off`].
pub const MAX_PROXIES: usize = 10_000;

/// Longest proxy name (or strategy) shown, in characters.
pub const MAX_NAME_CHARS: usize = 64;

/// What one METRICS answer said about the cluster.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub strategy: String,
    pub uptime_s: Option<u64>,
    pub total_requests: Option<u64>,
    pub errors: Option<u64>,
    pub retries: Option<u64>,
    pub p50_us: Option<u64>,
    pub p99_us: Option<u64>,
    pub cluster_hits: Option<u64>,
    pub cluster_misses: Option<u64>,
    pub proxies: Vec<ProxySnapshot>,
    /// Proxies in the answer beyond [`MAX_PROXIES`].
    pub proxies_left_off: usize,
}

/// One entry of the balancer's `proxies` object.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProxySnapshot {
    /// The `host:port` key, cleaned for printing.
    pub name: String,
    pub healthy: Option<bool>,
    pub in_flight: Option<u64>,
    pub forwarded: Option<u64>,
    /// From the proxy's own METRICS as the balancer last polled them (null until polled).
    pub hits: Option<u64>,
    pub misses: Option<u64>,
    pub p99_us: Option<u64>,
}

/// Why an answer is not a balancer's METRICS.
#[derive(Clone, Debug, PartialEq)]
pub enum NotBalancerMetrics {
    NotAnObject,
    Status(String),
    NoData,
    Role(String),
    NoProxies,
}

impl fmt::Display for NotBalancerMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotBalancerMetrics::NotAnObject => write!(f, "the answer is not a JSON object"),
            NotBalancerMetrics::Status(status) => write!(f, "status {status} instead of OK"),
            NotBalancerMetrics::NoData => write!(f, "no METRICS data object in the answer"),
            NotBalancerMetrics::Role(role) => write!(f, "role {role}, not balancer (point top at the balancer)"),
            NotBalancerMetrics::NoProxies => write!(f, "no proxies object in the METRICS data"),
        }
    }
}

impl Snapshot {
    /// Reads a whole answer line's JSON (`{"status":"OK","data":{…}}`).
    pub fn from_answer(answer: &Value) -> Result<Snapshot, NotBalancerMetrics> {
        let answer = answer.as_object().ok_or(NotBalancerMetrics::NotAnObject)?;
        match answer.get("status").and_then(Value::as_str) {
            Some("OK") => {}
            Some(other) => return Err(NotBalancerMetrics::Status(printable(other))),
            None => return Err(NotBalancerMetrics::Status("(none)".into())),
        }
        let data = answer.get("data").filter(|d| d.is_object()).ok_or(NotBalancerMetrics::NoData)?;
        match data.get("role") {
            Some(Value::String(role)) if role == "balancer" => {}
            Some(Value::String(role)) => return Err(NotBalancerMetrics::Role(printable(role))),
            _ => return Err(NotBalancerMetrics::Role("(none)".into())),
        }
        let proxies = data.get("proxies").and_then(Value::as_object).ok_or(NotBalancerMetrics::NoProxies)?;
        Ok(Snapshot {
            strategy: data.get("strategy").and_then(Value::as_str).map(printable).unwrap_or_default(),
            uptime_s: count(data, &["uptime_s"]),
            total_requests: count(data, &["total_requests"]),
            errors: count(data, &["errors"]),
            retries: count(data, &["retries"]),
            p50_us: count(data, &["latency_us", "p50"]),
            p99_us: count(data, &["latency_us", "p99"]),
            cluster_hits: count(data, &["cluster", "hits"]),
            cluster_misses: count(data, &["cluster", "misses"]),
            proxies: proxies.iter().take(MAX_PROXIES).map(|(name, p)| ProxySnapshot::read(name, p)).collect(),
            proxies_left_off: proxies.len().saturating_sub(MAX_PROXIES),
        })
    }
}

impl ProxySnapshot {
    fn read(name: &str, entry: &Value) -> ProxySnapshot {
        ProxySnapshot {
            name: printable(name),
            healthy: entry.get("healthy").and_then(Value::as_bool),
            in_flight: count(entry, &["in_flight"]),
            forwarded: count(entry, &["forwarded"]),
            hits: count(entry, &["metrics", "hits"]),
            misses: count(entry, &["metrics", "misses"]),
            p99_us: count(entry, &["metrics", "latency_us", "p99"]),
        }
    }
}

/// The non-negative integer at `path` under `value`, if there is one.
fn count(value: &Value, path: &[&str]) -> Option<u64> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_u64()
}

/// `text` safe to print on a terminal: control and bidi-override characters (which could
/// move the cursor or reorder the line) become `?`, and it is cut to [`MAX_NAME_CHARS`].
pub fn printable(text: &str) -> String {
    let mut out: String = text
        .chars()
        .take(MAX_NAME_CHARS)
        .map(|c| if c.is_control() || is_invisible_format(c) { '?' } else { c })
        .collect();
    if text.chars().nth(MAX_NAME_CHARS).is_some() {
        out.pop();
        out.push('…');
    }
    out
}

fn is_invisible_format(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use serde_json::json;

    fn answer(data: Value) -> Value {
        json!({"status": "OK", "data": data})
    }

    #[test]
    fn a_full_balancer_answer_is_read() {
        let a = answer(json!({
            "role": "balancer", "strategy": "consistent_hash", "uptime_s": 12, "total_requests": 500,
            "errors": 2, "retries": 1, "latency_us": {"p50": 120, "p90": 300, "p99": 900, "max": 4000},
            "cluster": {"hits": 90, "misses": 10, "hit_rate": 0.9, "origin_fetches": 10},
            "proxies": {
                "127.0.0.1:8001": {"healthy": true, "in_flight": 3, "forwarded": 250, "failures": 0,
                    "consecutive_failures": 0, "metrics": {"hits": 45, "misses": 5, "latency_us": {"p99": 800}}},
                "127.0.0.1:8002": {"healthy": false, "in_flight": 0, "forwarded": 250, "metrics": null}
            }
        }));
        let s = Snapshot::from_answer(&a).unwrap();
        assert_eq!((s.strategy.as_str(), s.uptime_s, s.total_requests), ("consistent_hash", Some(12), Some(500)));
        assert_eq!((s.errors, s.retries, s.p50_us, s.p99_us), (Some(2), Some(1), Some(120), Some(900)));
        assert_eq!((s.cluster_hits, s.cluster_misses), (Some(90), Some(10)));
        assert_eq!(s.proxies.len(), 2);
        let p = &s.proxies[0];
        assert_eq!(
            (p.name.as_str(), p.healthy, p.in_flight, p.forwarded),
            ("127.0.0.1:8001", Some(true), Some(3), Some(250))
        );
        assert_eq!((p.hits, p.misses, p.p99_us), (Some(45), Some(5), Some(800)));
        let q = &s.proxies[1];
        assert_eq!((q.healthy, q.hits, q.p99_us), (Some(false), None, None));
    }

    #[test]
    fn anything_but_a_balancer_metrics_answer_is_refused_with_the_reason() {
        let cases = [
            (json!([1, 2]), NotBalancerMetrics::NotAnObject),
            (json!({"status": "WRONG_METHOD", "data": null}), NotBalancerMetrics::Status("WRONG_METHOD".into())),
            (json!({"data": {}}), NotBalancerMetrics::Status("(none)".into())),
            (json!({"status": "OK", "data": 5}), NotBalancerMetrics::NoData),
            (answer(json!({"role": "proxy", "proxies": {}})), NotBalancerMetrics::Role("proxy".into())),
            (answer(json!({"role": 7, "proxies": {}})), NotBalancerMetrics::Role("(none)".into())),
            (answer(json!({"role": "balancer", "proxies": []})), NotBalancerMetrics::NoProxies),
        ];
        for (value, want) in cases {
            assert_eq!(Snapshot::from_answer(&value), Err(want), "{value}");
        }
    }

    #[test]
    fn missing_wrong_typed_negative_and_huge_fields_are_unknown() {
        let a = answer(json!({
            "role": "balancer", "strategy": ["x"], "uptime_s": -1, "total_requests": 1.5e300,
            "errors": "many", "retries": u64::MAX, "latency_us": "fast", "cluster": null,
            "proxies": {"a": 7, "b": {"healthy": "yes", "in_flight": -3, "forwarded": 1e20, "metrics": {"hits": [1]}}}
        }));
        let s = Snapshot::from_answer(&a).unwrap();
        assert_eq!((s.strategy.as_str(), s.uptime_s, s.total_requests, s.errors), ("", None, None, None));
        assert_eq!((s.retries, s.p50_us, s.cluster_hits), (Some(u64::MAX), None, None));
        assert_eq!(s.proxies[0], ProxySnapshot { name: "a".into(), ..ProxySnapshot::default() });
        assert_eq!(s.proxies[1], ProxySnapshot { name: "b".into(), ..ProxySnapshot::default() });
    }

    #[test]
    fn thousands_of_proxies_are_kept_up_to_the_bound_and_the_rest_counted() {
        let proxies: serde_json::Map<String, Value> = (0..MAX_PROXIES + 5)
            .map(|i| (format!("10.0.{}.{}:80", i / 256, i % 256), json!({"healthy": true})))
            .collect();
        let s = Snapshot::from_answer(&answer(json!({"role": "balancer", "proxies": proxies}))).unwrap();
        assert_eq!((s.proxies.len(), s.proxies_left_off), (MAX_PROXIES, 5));
    }

    #[test]
    fn names_lose_terminal_control_characters_and_are_cut() {
        assert_eq!(printable("127.0.0.1:1\u{1b}[2J\u{7}"), "127.0.0.1:1?[2J?");
        assert_eq!(printable("a\u{202e}b\nc"), "a?b?c");
        let long = "é".repeat(200);
        let cut = printable(&long);
        assert_eq!(cut.chars().count(), MAX_NAME_CHARS);
        assert!(cut.ends_with('…'));
        assert_eq!(printable(&"x".repeat(MAX_NAME_CHARS)), "x".repeat(MAX_NAME_CHARS));
    }
}
