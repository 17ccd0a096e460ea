//! The words and numbers of a [`View`], and the plain-text snapshot `top --once` prints
//! (no terminal control codes: fit for a pipe, a log or a README).

use std::fmt::Write as _;

use super::view::View;

/// Column headings, shared with the live screen.
pub const HEADINGS: [&str; 6] = ["PROXY", "HEALTH", "IN FLIGHT", "REQ/S", "HIT %", "P99"];

/// The view as plain text, one proxy per line after the cluster's totals.
pub fn render(view: &View, source: &str) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{}", title(view, source));
    let _ = writeln!(out, "{}", totals_line(view));
    out.push('\n');
    let mut table: Vec<[String; 6]> = vec![HEADINGS.map(String::from)];
    for row in &view.rows {
        table.push([
            row.name.clone(),
            row.health.label().to_owned(),
            opt_count(row.in_flight),
            opt_rate(row.requests_per_s),
            opt_percent(row.hit_rate),
            opt_us(row.p99_us),
        ]);
    }
    let t = &view.totals;
    table.push([
        "total".into(),
        format!("{}/{}", t.up, t.proxies),
        t.in_flight.to_string(),
        opt_rate(t.forwarded_per_s),
        opt_percent(t.hit_rate),
        String::new(),
    ]);
    let mut widths = [0usize; 6];
    for line in &table {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    for line in &table {
        let mut text = String::new();
        for (i, (cell, width)) in line.iter().zip(widths).enumerate() {
            // Names and health read left to right; numbers line up on the right.
            let _ = if i < 2 { write!(text, "{cell:<width$}  ") } else { write!(text, "{cell:>width$}  ") };
        }
        let _ = writeln!(out, "{}", text.trim_end());
    }
    if view.proxies_left_off > 0 {
        let _ = writeln!(out, "(and {} more proxies not shown)", view.proxies_left_off);
    }
    out
}

/// `cachetier top: balancer HOST:PORT, STRATEGY, up 1m05s, rates over 1.00 s`
pub fn title(view: &View, source: &str) -> String {
    let mut text = format!("cachetier top: balancer {source}");
    if !view.strategy.is_empty() {
        let _ = write!(text, ", {}", view.strategy);
    }
    if let Some(up) = view.uptime_s {
        let _ = write!(text, ", up {}", uptime(up));
    }
    match view.elapsed {
        Some(e) => {
            let _ = write!(text, ", rates over {:.2} s", e.as_secs_f64());
        }
        None => text.push_str(", rates after the next refresh"),
    }
    text
}

/// The cluster's totals on one line.
pub fn totals_line(view: &View) -> String {
    let t = &view.totals;
    format!(
        "requests/s {}  hit rate {}  p50 {}  p99 {}  retries {}  errors {}  proxies {}/{} UP",
        opt_rate(t.requests_per_s),
        opt_percent(t.hit_rate),
        opt_us(t.p50_us),
        opt_us(t.p99_us),
        opt_count(t.retries),
        opt_count(t.errors),
        t.up,
        t.proxies
    )
}

pub fn opt_count(n: Option<u64>) -> String {
    n.map_or_else(|| "-".into(), |n| n.to_string())
}

/// Requests per second: one decimal, or scientific when absurdly large.
pub fn opt_rate(rate: Option<f64>) -> String {
    match rate {
        Some(r) if r.is_finite() && r < 1e9 => format!("{r:.1}"),
        Some(r) if r.is_finite() => format!("{r:.2e}"),
        _ => "-".into(),
    }
}

pub fn opt_percent(ratio: Option<f64>) -> String {
    ratio.filter(|r| r.is_finite()).map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0))
}

/// Microseconds as µs, ms or s, whichever reads best.
pub fn opt_us(us: Option<u64>) -> String {
    match us {
        None => "-".into(),
        Some(us) if us < 1_000 => format!("{us}µs"),
        Some(us) if us < 1_000_000 => format!("{:.2}ms", us as f64 / 1e3),
        Some(us) => format!("{:.2}s", us as f64 / 1e6),
    }
}

/// Seconds as `3d04h`, `1h02m`, `5m03s` or `12s`.
pub fn uptime(s: u64) -> String {
    let (d, h, m, s) = (s / 86_400, s / 3_600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::{Duration, Instant};

    use super::*;
    use crate::top::snapshot::{ProxySnapshot, Snapshot};
    use crate::top::view::Sample;

    #[test]
    fn numbers_read_well() {
        assert_eq!(
            (opt_us(Some(850)), opt_us(Some(1_234)), opt_us(Some(2_500_000))),
            ("850µs".into(), "1.23ms".into(), "2.50s".into())
        );
        assert_eq!(
            (opt_rate(Some(12.34)), opt_rate(None), opt_rate(Some(f64::INFINITY))),
            ("12.3".into(), "-".into(), "-".into())
        );
        assert_eq!(opt_rate(Some(1.8e22)), "1.80e22");
        assert_eq!((opt_percent(Some(0.951)), opt_percent(None)), ("95.1%".into(), "-".into()));
        assert_eq!(
            (uptime(12), uptime(303), uptime(3720), uptime(273_600)),
            ("12s".into(), "5m03s".into(), "1h02m".into(), "3d04h".into())
        );
        assert_eq!(uptime(u64::MAX), "213503982334601d07h");
    }

    #[test]
    fn the_snapshot_has_a_row_per_proxy_and_the_totals_and_no_control_codes() {
        let t0 = Instant::now();
        let proxy = |name: &str, healthy, forwarded, hits| ProxySnapshot {
            name: name.into(),
            healthy: Some(healthy),
            in_flight: Some(1),
            forwarded: Some(forwarded),
            hits: Some(hits),
            misses: Some(10),
            p99_us: Some(900),
        };
        let snap = |total, f1, f2| Snapshot {
            strategy: "consistent_hash".into(),
            uptime_s: Some(65),
            total_requests: Some(total),
            errors: Some(0),
            retries: Some(2),
            p50_us: Some(120),
            p99_us: Some(1500),
            cluster_hits: Some(180),
            cluster_misses: Some(20),
            proxies: vec![proxy("127.0.0.1:8001", true, f1, 90), proxy("127.0.0.1:8002", false, f2, 90)],
            proxies_left_off: 0,
        };
        let a = Sample { at: t0, snapshot: snap(100, 40, 60) };
        let b = Sample { at: t0 + Duration::from_secs(2), snapshot: snap(301, 140, 60) };
        let text = render(&View::compute(Some(&a), &b), "127.0.0.1:9000");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "cachetier top: balancer 127.0.0.1:9000, consistent_hash, up 1m05s, rates over 2.00 s");
        assert_eq!(
            lines[1],
            "requests/s 100.0  hit rate 90.0%  p50 120µs  p99 1.50ms  retries 2  errors 0  proxies 1/2 UP"
        );
        assert_eq!(lines[3], "PROXY           HEALTH  IN FLIGHT  REQ/S  HIT %    P99");
        assert_eq!(lines[4], "127.0.0.1:8001  UP              1   50.0  90.0%  900µs");
        assert_eq!(lines[5], "127.0.0.1:8002  DOWN            1    0.0  90.0%  900µs");
        assert_eq!(lines[6], "total           1/2             2   50.0  90.0%");
        assert!(!text.contains('\u{1b}'));
    }
}
