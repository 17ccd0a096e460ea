//! `GET /metrics` (SPEC 6): a service's METRICS data, as the Prometheus text exposition
//! format 0.0.4, written by the official `prometheus-client` crate's encoder.
//!
//! The families are read out of the very METRICS object the line protocol answers with (one
//! table per role below), so the two views cannot disagree. Fields a service does not report
//! are simply left out.
//!
//! One detail of the crate: its text encoder writes OpenMetrics, where a counter's `# TYPE`
//! line names the family without `_total` and the sample adds it. A 0.0.4 parser (what
//! `promtool check metrics` and Prometheus use for `text/plain; version=0.0.4`) reads that
//! sample as a second, untyped family without HELP. So counters are declared under their
//! full `_total` name and their value is written through the gauge value encoder, which
//! writes the name as declared: the same bytes a 0.0.4 exposition has.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value;

use crate::metrics::{LatencyHistogram, BUCKET_BOUNDS_US};

/// The Content-Type of the exposition.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Counter,
    Gauge,
}

/// METRICS field → family, for one role.
type Table = &'static [(&'static str, &'static str, Kind, &'static str)];

const COMMON: Table = &[
    (
        "total_requests",
        "cachetier_requests_total",
        Kind::Counter,
        "Request lines answered, of any op, malformed ones included.",
    ),
    ("connections", "cachetier_connections", Kind::Gauge, "Client connections open now."),
    ("uptime_s", "cachetier_uptime_seconds", Kind::Gauge, "Seconds since the service started."),
    (
        "access_log_dropped",
        "cachetier_access_log_dropped_total",
        Kind::Counter,
        "Access log lines lost to failed writes.",
    ),
];

const ORIGIN: Table = &[("pending", "cachetier_origin_pending", Kind::Gauge, "GETs waiting out --latency-ms now.")];

const PROXY: Table = &[
    ("hits", "cachetier_cache_hits_total", Kind::Counter, "GETs answered fresh from the cache."),
    ("misses", "cachetier_cache_misses_total", Kind::Counter, "GETs not answered fresh from the cache."),
    ("origin_fetches", "cachetier_origin_fetches_total", Kind::Counter, "Fetches sent to the origin."),
    (
        "origin_errors",
        "cachetier_origin_errors_total",
        Kind::Counter,
        "Fetches that ended in ORIGIN_ERROR or ORIGIN_FAILURE.",
    ),
    ("coalesced", "cachetier_coalesced_total", Kind::Counter, "GETs that waited on another GET's origin fetch."),
    ("stale_served", "cachetier_stale_served_total", Kind::Counter, "Answers served stale because the origin failed."),
    ("overloaded", "cachetier_overloaded_total", Kind::Counter, "GETs refused with OVERLOADED."),
    ("entries", "cachetier_cache_entries", Kind::Gauge, "Entries in the cache, expired ones not yet swept included."),
    ("capacity", "cachetier_cache_capacity", Kind::Gauge, "Most entries the cache holds."),
    ("bytes", "cachetier_cache_bytes", Kind::Gauge, "Key and value bytes in the cache."),
    ("evictions", "cachetier_cache_evictions_total", Kind::Counter, "Entries evicted to make room."),
    ("expirations", "cachetier_cache_expirations_total", Kind::Counter, "Entries removed because they expired."),
    ("purges", "cachetier_cache_purges_total", Kind::Counter, "Entries removed by PURGE."),
];

const BALANCER: Table = &[
    ("current_index", "cachetier_routed_total", Kind::Counter, "GETs routed to a proxy (first attempts)."),
    ("retries", "cachetier_retries_total", Kind::Counter, "GET attempts retried on another proxy."),
    ("collapsed", "cachetier_collapsed_total", Kind::Counter, "GETs that joined an identical GET already in flight."),
    ("errors", "cachetier_errors_total", Kind::Counter, "Requests answered with an error by the balancer itself."),
    ("in_flight", "cachetier_in_flight", Kind::Gauge, "GETs forwarded and not yet answered."),
    ("reloads", "cachetier_reloads_total", Kind::Counter, "SIGHUP reloads of the proxy set that were applied."),
    ("reloads_failed", "cachetier_reloads_failed_total", Kind::Counter, "SIGHUP reloads refused (set unchanged)."),
];

/// Per proxy at the balancer: field of `proxies["host:port"]` → family with a `proxy` label.
const BALANCER_PROXY: Table = &[
    ("healthy", "cachetier_proxy_up", Kind::Gauge, "1 while the balancer routes to the proxy, 0 while it is down."),
    ("draining", "cachetier_proxy_draining", Kind::Gauge, "1 while the proxy takes no new GETs (drained or leaving)."),
    ("in_flight", "cachetier_proxy_in_flight", Kind::Gauge, "GETs forwarded to the proxy and not yet answered."),
    ("forwarded", "cachetier_proxy_forwarded_total", Kind::Counter, "GET attempts forwarded to the proxy."),
    ("failures", "cachetier_proxy_failures_total", Kind::Counter, "GET attempts to the proxy that failed."),
    (
        "consecutive_failures",
        "cachetier_proxy_consecutive_failures",
        Kind::Gauge,
        "Failures since the proxy last answered.",
    ),
];

/// The balancer's sums over its proxies' last polled METRICS (`cluster`).
const CLUSTER: Table = &[
    ("hits", "cachetier_cluster_hits_total", Kind::Counter, "Cache hits summed over the proxies' last polled METRICS."),
    (
        "misses",
        "cachetier_cluster_misses_total",
        Kind::Counter,
        "Cache misses summed over the proxies' last polled METRICS.",
    ),
    ("hit_rate", "cachetier_cluster_hit_ratio", Kind::Gauge, "hits / (hits + misses) over the cluster."),
];

/// What the admin listener knows about itself, exposed next to the service's families.
#[derive(Clone, Copy, Debug, Default)]
pub struct AdminStats {
    pub requests: u64,
    /// Loop time spent answering admin requests.
    pub busy_seconds: f64,
}

#[derive(Clone, Debug)]
enum Sample {
    Number(f64),
    Histogram { sum: f64, count: u64, buckets: Vec<(f64, u64)> },
}

#[derive(Clone, Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    /// (label name, label value) for each sample; no label when the name is empty.
    samples: Vec<(&'static str, String, Sample)>,
}

/// One scrape's families, owned so that the crate's registry can hold them for the encoder.
#[derive(Clone, Debug, Default)]
struct Snapshot {
    families: Vec<Family>,
}

impl Snapshot {
    fn push(&mut self, name: &'static str, help: &'static str, kind: Kind, value: f64) {
        self.push_labelled(name, help, kind, "", String::new(), value);
    }

    /// Adds a sample, to the family of that name if it is already there (labelled series).
    fn push_labelled(
        &mut self,
        name: &'static str,
        help: &'static str,
        kind: Kind,
        label: &'static str,
        label_value: String,
        value: f64,
    ) {
        let kind = match kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
        };
        let sample = (label, label_value, Sample::Number(value));
        match self.families.iter_mut().find(|f| f.name == name) {
            Some(family) => family.samples.push(sample),
            None => self.families.push(Family { name, help, kind, samples: vec![sample] }),
        }
    }

    fn table(&mut self, object: &Value, table: Table) {
        for (field, name, kind, help) in table {
            if let Some(value) = number(object.get(field)) {
                self.push(name, help, *kind, value);
            }
        }
    }
}

/// A JSON number or boolean (true = 1) as a sample value.
fn number(value: Option<&Value>) -> Option<f64> {
    match value? {
        Value::Number(n) => n.as_f64(),
        Value::Bool(b) => Some(if *b { 1.0 } else { 0.0 }),
        _ => None,
    }
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.families {
            let mut metric = encoder.encode_descriptor(family.name, family.help, None, family.kind)?;
            for (label, label_value, sample) in &family.samples {
                if label.is_empty() {
                    encode_sample(&mut metric, sample)?;
                } else {
                    let labels = [(*label, label_value.as_str())];
                    encode_sample(&mut metric.encode_family(&labels.as_slice())?, sample)?;
                }
            }
        }
        Ok(())
    }
}

fn encode_sample(metric: &mut MetricEncoder<'_>, sample: &Sample) -> Result<(), std::fmt::Error> {
    match sample {
        // Counters too: see the module comment.
        Sample::Number(value) => match integer(*value) {
            Some(n) => metric.encode_gauge(&n),
            None => metric.encode_gauge(value),
        },
        Sample::Histogram { sum, count, buckets } => {
            metric.encode_histogram::<prometheus_client::encoding::NoLabelSet>(*sum, *count, buckets, None)
        }
    }
}

/// Whole numbers are written without a fraction (`12`, not `12.0`).
fn integer(value: f64) -> Option<u64> {
    (value.fract() == 0.0 && (0.0..9.0e15).contains(&value)).then_some(value as u64)
}

/// The latency histogram as Prometheus buckets: (upper bound in seconds, count in that bucket
/// alone), the last bound `f64::MAX` standing for `+Inf` as the crate's encoder expects.
pub fn latency_buckets(histogram: &LatencyHistogram) -> Vec<(f64, u64)> {
    let bounds = BUCKET_BOUNDS_US.iter().map(|us| *us as f64 / 1e6).chain([f64::MAX]);
    bounds.zip(histogram.bucket_counts().iter().copied()).collect()
}

/// Renders a service's METRICS `data` (and its GET latency histogram) as an exposition.
pub fn render(metrics: &Value, latency: Option<&LatencyHistogram>, admin: AdminStats) -> String {
    let mut snapshot = Snapshot::default();
    snapshot.table(metrics, COMMON);
    snapshot.families.push(Family {
        name: "cachetier_build_info",
        help: "The version of cachetier serving; always 1.",
        kind: MetricType::Gauge,
        samples: vec![("version", env!("CARGO_PKG_VERSION").to_owned(), Sample::Number(1.0))],
    });
    if let Some(histogram) = latency {
        let count = histogram.bucket_counts().iter().sum();
        let sum = histogram.sum_us() as f64 / 1e6;
        snapshot.families.push(Family {
            name: "cachetier_request_duration_seconds",
            help: "Time from reading a GET to writing its answer.",
            kind: MetricType::Histogram,
            samples: vec![("", String::new(), Sample::Histogram { sum, count, buckets: latency_buckets(histogram) })],
        });
    }
    match metrics.get("role").and_then(Value::as_str) {
        Some("origin") => {
            snapshot.table(metrics, ORIGIN);
            for (field, status) in [("ok", "ok"), ("not_found", "not_found"), ("errors", "error")] {
                if let Some(value) = number(metrics.get(field)) {
                    let help = "GETs answered, by status: ok, not_found or error.";
                    let name = "cachetier_origin_answers_total";
                    snapshot.push_labelled(name, help, Kind::Counter, "status", status.to_owned(), value);
                }
            }
        }
        Some("proxy") => snapshot.table(metrics, PROXY),
        Some("balancer") => {
            snapshot.table(metrics, BALANCER);
            if let Some(cluster) = metrics.get("cluster") {
                snapshot.table(cluster, CLUSTER);
            }
            if let Some(Value::Object(proxies)) = metrics.get("proxies") {
                for (field, name, kind, help) in BALANCER_PROXY {
                    for (proxy, data) in proxies {
                        if let Some(value) = number(data.get(field)) {
                            snapshot.push_labelled(name, help, *kind, "proxy", proxy.clone(), value);
                        }
                    }
                }
            }
        }
        _ => {}
    }
    snapshot.push(
        "cachetier_admin_requests_total",
        "HTTP requests answered by the admin listener.",
        Kind::Counter,
        admin.requests as f64,
    );
    snapshot.push(
        "cachetier_admin_busy_seconds_total",
        "Event-loop time spent answering admin HTTP requests.",
        Kind::Counter,
        admin.busy_seconds,
    );
    encode(snapshot)
}

fn encode(snapshot: Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail. The OpenMetrics `# EOF` marker is left off: 0.0.4
    // has none.
    let _ = prometheus_client::encoding::text::encode_registry(&mut out, &registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn proxy_exposition_has_help_type_and_total_counters() {
        let metrics = serde_json::json!({
            "role": "proxy", "total_requests": 12, "connections": 2, "uptime_s": 5,
            "hits": 7, "misses": 3, "entries": 3, "bytes": 120, "evictions": 0, "hit_rate": 0.7,
            "access_log_dropped": 0
        });
        let mut latency = LatencyHistogram::new();
        latency.record(Duration::from_micros(30));
        latency.record(Duration::from_micros(700));
        latency.record(Duration::from_secs(9));
        let text = render(&metrics, Some(&latency), AdminStats::default());
        assert!(text.contains("# TYPE cachetier_cache_hits_total counter\ncachetier_cache_hits_total 7\n"), "{text}");
        assert!(text.contains("cachetier_requests_total 12\n"), "{text}");
        assert!(text.contains("cachetier_build_info{version=\""), "{text}");
        assert!(text.contains("cachetier_request_duration_seconds_count 3\n"), "{text}");
        assert!(text.contains("cachetier_request_duration_seconds_bucket{le=\"+Inf\"} 3\n"), "{text}");
        assert!(text.contains("cachetier_request_duration_seconds_bucket{le=\"0.001\"} 2\n"), "{text}");
        assert!(text.contains("cachetier_request_duration_seconds_bucket{le=\"5.0\"} 2\n"), "{text}");
        assert!(!text.contains("# EOF"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split(' ').nth(2).unwrap_or("");
            assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}");
            assert!(name.starts_with("cachetier_"));
        }
    }

    #[test]
    fn balancer_proxies_are_labelled() {
        let metrics = serde_json::json!({
            "role": "balancer", "total_requests": 1, "retries": 2, "collapsed": 0,
            "proxies": {
                "127.0.0.1:8001": {"healthy": true, "in_flight": 1, "forwarded": 10, "failures": 0},
                "127.0.0.1:8002": {"healthy": false, "in_flight": 0, "forwarded": 4, "failures": 3}
            },
            "cluster": {"hits": 5, "misses": 5, "hit_rate": 0.5}
        });
        let text = render(&metrics, None, AdminStats::default());
        assert!(text.contains("cachetier_proxy_up{proxy=\"127.0.0.1:8001\"} 1\n"), "{text}");
        assert!(text.contains("cachetier_proxy_up{proxy=\"127.0.0.1:8002\"} 0\n"), "{text}");
        assert!(text.contains("cachetier_proxy_failures_total{proxy=\"127.0.0.1:8002\"} 3\n"), "{text}");
        assert_eq!(text.matches("# TYPE cachetier_proxy_up gauge").count(), 1);
        assert!(text.contains("cachetier_retries_total 2\n"));
        assert!(text.contains("cachetier_cluster_hit_ratio 0.5\n"), "{text}");
    }
}
