//! The balancer's METRICS answer (SPEC 2.4).

use std::collections::BTreeMap;

use common::metrics::{ratio, CommonMetrics, LatencySummary};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::backend::Backend;

#[derive(Serialize)]
pub struct ProxyData<'a> {
    /// The DNS name it was resolved from (SPEC 7).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    pub healthy: bool,
    /// Takes no new GETs: drained on the admin port, or removed by a reload and finishing.
    pub draining: bool,
    pub in_flight: usize,
    pub forwarded: u64,
    pub failures: u64,
    pub consecutive_failures: u32,
    /// Requests go to it multiplexed with balancer ids (it answered HEALTH with a role).
    pub multiplexed: bool,
    /// Multiplexed connections open to it now.
    pub connections: usize,
    pub metrics: Option<&'a RawValue>,
}

#[derive(Serialize, Default)]
pub struct ClusterData {
    pub hits: u64,
    pub misses: u64,
    pub hit_rate: f64,
    pub origin_fetches: u64,
}

/// The balancer's own counters.
#[derive(Default, Clone, Copy, Debug)]
pub struct Counters {
    pub routed: u64,
    pub collapsed: u64,
    pub errors: u64,
    pub retries: u64,
    /// GETs sent again on a new connection because a reused one was found closed (not
    /// failures, not retries).
    pub reopened: u64,
    /// Long answers dropped because their client's output was full, asked for again once it
    /// drained (SPEC 3.8).
    pub refetched: u64,
    /// SIGHUP reloads that changed the set, and those refused (SPEC 7).
    pub reloads: u64,
    pub reloads_failed: u64,
}

#[derive(Serialize)]
pub struct MetricsData<'a> {
    #[serde(flatten)]
    pub common: CommonMetrics,
    pub strategy: &'static str,
    pub current_index: u64,
    pub errors: u64,
    pub retries: u64,
    /// GETs that joined an identical GET already in flight instead of going upstream.
    pub collapsed: u64,
    pub reopened: u64,
    /// Long answers that landed on a full output and were asked for again later.
    pub refetched: u64,
    pub reloads: u64,
    pub reloads_failed: u64,
    pub in_flight: usize,
    /// GETs parked for their connection's forwarding window (SPEC 3.8), not yet routed.
    pub waiting_for_room: usize,
    pub latency_us: LatencySummary,
    pub proxies: BTreeMap<&'a str, ProxyData<'a>>,
    pub cluster: ClusterData,
}

impl<'a> MetricsData<'a> {
    pub fn new(
        common: CommonMetrics,
        strategy: &'static str,
        counters: Counters,
        in_flight: usize,
        latency_us: LatencySummary,
        backends: &'a [Backend],
    ) -> Self {
        let mut cluster = ClusterData::default();
        let mut proxies = BTreeMap::new();
        for b in backends.iter().filter(|b| b.present()) {
            if let Some(sums) = b.sums {
                cluster.hits += sums.hits;
                cluster.misses += sums.misses;
                cluster.origin_fetches += sums.origin_fetches;
            }
            let data = ProxyData {
                name: b.dns_name.as_deref(),
                healthy: b.health.is_healthy(),
                draining: !b.routable(),
                in_flight: b.in_flight,
                forwarded: b.forwarded,
                failures: b.failures,
                consecutive_failures: b.health.consecutive_failures(),
                multiplexed: b.capable,
                connections: b.pool.open_mux(),
                metrics: b.metrics.as_deref(),
            };
            proxies.insert(b.name.as_str(), data);
        }
        cluster.hit_rate = ratio(cluster.hits, cluster.misses);
        MetricsData {
            common,
            strategy,
            current_index: counters.routed,
            errors: counters.errors,
            retries: counters.retries,
            collapsed: counters.collapsed,
            reopened: counters.reopened,
            refetched: counters.refetched,
            reloads: counters.reloads,
            reloads_failed: counters.reloads_failed,
            in_flight,
            waiting_for_room: 0,
            latency_us,
            proxies,
            cluster,
        }
    }
}
