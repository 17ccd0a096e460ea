//! Building blocks for METRICS and HEALTH: the start time, uptime, and a latency histogram.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// When a service started, on both clocks: the wall clock for `start_time`, the monotonic
/// one for `uptime_s`.
#[derive(Clone, Copy, Debug)]
pub struct StartTime {
    wall: SystemTime,
    mono: Instant,
}

impl StartTime {
    pub fn now() -> Self {
        StartTime { wall: SystemTime::now(), mono: Instant::now() }
    }

    /// Started at `mono` on the loop's clock (which the simulator drives), now on the wall's.
    pub fn at(mono: Instant) -> Self {
        StartTime { wall: SystemTime::now(), mono }
    }

    pub fn rfc3339(&self) -> String {
        format_rfc3339(self.wall)
    }

    /// Whole seconds since the start.
    pub fn uptime_s(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.mono).as_secs()
    }
}

/// Formats a wall-clock time as RFC 3339 in UTC with millisecond precision, e.g.
/// `2026-11-26T05:29:01.123Z`.
pub fn format_rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_millis()
    )
}

/// Days since 1970-01-01 to a (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The latency percentiles every METRICS answer carries, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LatencySummary {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

/// A latency histogram in microseconds, from 1 µs to 1 hour at 3 significant figures: a fixed
/// amount of memory, O(1) to record, and percentiles that cost the same however many samples
/// it holds.
#[derive(Clone, Debug)]
pub struct LatencyHistogram {
    hist: Histogram<u64>,
    /// The same samples counted in the Prometheus buckets of [`BUCKET_BOUNDS_US`] (the last
    /// one unbounded), and their exact sum: kept as samples arrive so that a scrape is O(1).
    buckets: [u64; BUCKET_BOUNDS_US.len() + 1],
    sum_us: u64,
}

/// Upper bounds (µs) of the latency buckets `/metrics` exports (SPEC 6): from a cache hit on
/// loopback (tens of µs) to an origin fetch that times out (seconds).
pub const BUCKET_BOUNDS_US: [u64; 16] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000,
];

const HIGHEST_US: u64 = 3_600_000_000;

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHistogram {
    pub fn new() -> Self {
        // These bounds are constants that hdrhistogram accepts (low >= 1, high >= 2 * low,
        // sigfig <= 5), so construction cannot fail; the fallback is never taken.
        let hist = Histogram::new_with_bounds(1, HIGHEST_US, 3)
            .or_else(|_| Histogram::new(3))
            .unwrap_or_else(|_| unreachable!("3 significant figures is a valid histogram"));
        LatencyHistogram { hist, buckets: [0; BUCKET_BOUNDS_US.len() + 1], sum_us: 0 }
    }

    pub fn record(&mut self, latency: Duration) {
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX).clamp(1, HIGHEST_US);
        self.hist.saturating_record(us);
        let bucket = BUCKET_BOUNDS_US.iter().position(|le| us <= *le).unwrap_or(BUCKET_BOUNDS_US.len());
        self.buckets[bucket] = self.buckets[bucket].saturating_add(1);
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Samples per bucket of [`BUCKET_BOUNDS_US`] (not cumulative; the last is above them all).
    pub fn bucket_counts(&self) -> &[u64] {
        &self.buckets
    }

    /// The exact sum of every sample, µs.
    pub fn sum_us(&self) -> u64 {
        self.sum_us
    }

    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }

    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.hist.is_empty() {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }

    pub fn mean_us(&self) -> f64 {
        self.hist.mean()
    }

    pub fn max_us(&self) -> u64 {
        self.hist.max()
    }

    pub fn summary(&self) -> LatencySummary {
        LatencySummary {
            p50: self.quantile_us(0.50),
            p90: self.quantile_us(0.90),
            p99: self.quantile_us(0.99),
            max: self.max_us(),
        }
    }

    pub fn clear(&mut self) {
        self.hist.reset();
        self.buckets = [0; BUCKET_BOUNDS_US.len() + 1];
        self.sum_us = 0;
    }

    /// The `q` quantile of what was recorded since `earlier` (an older copy of this
    /// histogram), for per-interval percentiles; 0 when nothing was.
    pub fn quantile_since_us(&self, earlier: &LatencyHistogram, qs: &[f64]) -> Vec<u64> {
        let mut delta = self.hist.clone();
        if delta.subtract(&earlier.hist).is_err() || delta.is_empty() {
            return vec![0; qs.len()];
        }
        qs.iter().map(|q| delta.value_at_quantile(*q)).collect()
    }
}

/// The METRICS fields every service reports, with the counting rules of SPEC 2.4 applied once
/// (see `Ctx::common_metrics`). Services flatten it into their own METRICS data.
#[derive(Clone, Debug, Serialize)]
pub struct CommonMetrics {
    pub role: &'static str,
    pub start_time: String,
    pub uptime_s: u64,
    /// Every answered request line, malformed ones and the METRICS being answered included.
    pub total_requests: u64,
    /// Client connections open now (not connections to other tiers).
    pub connections: usize,
    /// Access log lines lost to failed writes (SPEC 6).
    pub access_log_dropped: u64,
}

/// The `data` of a HEALTH answer (SPEC 2.5).
#[derive(Clone, Copy, Debug, Serialize)]
pub struct HealthData {
    pub role: &'static str,
    pub uptime_s: u64,
}

/// hits / (hits + misses), 0 when both are 0.
pub fn ratio(part: u64, other: u64) -> f64 {
    let total = part + other;
    if total == 0 {
        0.0
    } else {
        part as f64 / total as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        let at = |secs: u64, ms: u64| UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(ms);
        assert_eq!(format_rfc3339(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_rfc3339(at(951_782_400, 5)), "2000-02-29T00:00:00.005Z");
        assert_eq!(format_rfc3339(at(1_795_671_741, 999)), "2026-11-26T05:42:21.999Z");
        assert_eq!(format_rfc3339(at(4_102_444_799, 0)), "2099-12-31T23:59:59.000Z");
    }

    #[test]
    fn histogram_percentiles() {
        let mut h = LatencyHistogram::new();
        assert_eq!(h.summary(), LatencySummary::default());
        for us in 1..=1000 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert!((495..=505).contains(&s.p50), "{s:?}");
        assert!((895..=905).contains(&s.p90), "{s:?}");
        assert!((985..=995).contains(&s.p99), "{s:?}");
        assert!((999..=1001).contains(&s.max), "{s:?}");
        h.record(Duration::from_secs(100_000));
        assert_eq!(h.len(), 1001);
    }

    #[test]
    fn ratio_handles_zero() {
        assert_eq!(ratio(0, 0), 0.0);
        assert_eq!(ratio(3, 1), 0.75);
    }
}
