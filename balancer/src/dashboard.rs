//! The balancer's admin pages (SPEC 6): the live dashboard at `/` (one HTML page with its
//! script and style, embedded in the binary, nothing fetched from elsewhere), `/api/cluster`
//! (the METRICS data as JSON) and `/api/history` (the samples behind the charts).

use std::time::{SystemTime, UNIX_EPOCH};

use common::admin::{Body, Request, Response};
use serde::Serialize;
use serde_json::Value;

use crate::history::{Health, History, Sample, CAPACITY};

const PAGE: &str = include_str!("../assets/dashboard.html");
const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");

/// Milliseconds since the Unix epoch, for the samples' timestamps.
pub fn wall_ms() -> u64 {
    let since = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Whether answering `request` needs the METRICS data (computed only then).
pub fn wants_metrics(request: &Request<'_>) -> bool {
    matches!(request.path, "/api/cluster" | "/api/history")
}

#[derive(Serialize)]
struct HistoryData<'a> {
    interval_ms: u64,
    capacity: usize,
    now_ms: u64,
    health: &'a std::collections::BTreeMap<String, Health>,
    samples: Vec<&'a Sample>,
}

/// Answers the dashboard's paths; `None` for any other (404).
pub fn route(request: &Request<'_>, history: &mut History, metrics: Option<Value>) -> Option<Response> {
    let known =
        matches!(request.path, "/" | "/index.html" | "/dashboard.js" | "/dashboard.css") || wants_metrics(request);
    if !known {
        return None;
    }
    if !request.is_get_or_head() {
        return Some(Response::method_not_allowed());
    }
    let asset =
        |content_type, text: &'static str| Some(Response::new(200, content_type, Body::Static(text.as_bytes())));
    match request.path {
        "/" | "/index.html" => asset("text/html; charset=utf-8", PAGE),
        "/dashboard.js" => asset("text/javascript; charset=utf-8", SCRIPT),
        "/dashboard.css" => asset("text/css; charset=utf-8", STYLE),
        "/api/cluster" => {
            let metrics = metrics.unwrap_or_default();
            history.observe_health(&metrics, wall_ms());
            Some(Response::json(&metrics))
        }
        _ => {
            if let Some(metrics) = &metrics {
                history.observe_health(metrics, wall_ms());
            }
            let data = HistoryData {
                interval_ms: 1000,
                capacity: CAPACITY,
                now_ms: wall_ms(),
                health: history.health(),
                samples: history.samples().collect(),
            };
            Some(Response::json(&data))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request<'_> {
        Request { method: "GET", path, query: "", body: b"" }
    }

    #[test]
    fn serves_the_page_and_refuses_other_methods() {
        let mut history = History::new();
        let page = route(&get("/"), &mut history, None).expect("page");
        assert_eq!(page.status, 200);
        assert!(page.content_type.starts_with("text/html"));
        assert!(route(&get("/nope"), &mut history, None).is_none());
        let post = Request { method: "POST", path: "/api/cluster", query: "", body: b"" };
        assert_eq!(route(&post, &mut history, None).map(|r| r.status), Some(405));
        let cluster = route(&get("/api/cluster"), &mut history, Some(serde_json::json!({"role": "balancer"})));
        assert_eq!(cluster.map(|r| r.content_type), Some("application/json"));
    }

    #[test]
    fn the_page_fetches_nothing_from_elsewhere() {
        for text in [PAGE, SCRIPT, STYLE] {
            assert!(!text.contains("http://") && !text.contains("https://") && !text.contains("//cdn"), "external URL");
        }
    }
}
