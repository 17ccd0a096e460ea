//! The simulator in CI: every scenario over a fixed range of seeds (one test per scenario, so
//! they run side by side), the seeds that once found a bug, and the promise that a seed gives
//! the same run byte for byte. `SIM_SEEDS=N` changes how many seeds each scenario sweeps.

#![allow(clippy::expect_used)]

use std::time::Instant;

/// Seeds each scenario sweeps in CI (about a minute in all on two cores).
const CI_SEEDS: u64 = 200;

fn seeds() -> u64 {
    std::env::var("SIM_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(CI_SEEDS)
}

fn sweep(name: &str) {
    let began = Instant::now();
    let mut failing = Vec::new();
    let mut simulated = 0.0;
    for seed in 0..seeds() {
        let outcome = sim::run(name, seed, None).expect("a known scenario");
        simulated += outcome.simulated.as_secs_f64();
        if let Some(v) = outcome.violations.first() {
            failing.push(format!("seed {seed}: {v}"));
        }
    }
    eprintln!("{name}: {} seeds, {simulated:.0} simulated s in {:.1} s", seeds(), began.elapsed().as_secs_f64());
    assert!(failing.is_empty(), "scenario {name}: {} failing seeds:\n{}", failing.len(), failing.join("\n"));
}

#[test]
fn kill_proxy() {
    sweep("kill-proxy");
}

#[test]
fn partition() {
    sweep("partition");
}

#[test]
fn slow_origin() {
    sweep("slow-origin");
}

#[test]
fn herd() {
    sweep("herd");
}

#[test]
fn flapping() {
    sweep("flapping");
}

#[test]
fn lying_proxy() {
    sweep("lying-proxy");
}

#[test]
fn mixed() {
    sweep("mixed");
}

/// Seeds that caught a defect put back on purpose (issue 12: the 1 s per-attempt time-out,
/// the attempt-id map shared by all connections, parked answers left out of the output
/// bound): each run on its own, so that a change that lets one through names it.
const CAUGHT_DEFECTS: [(&str, u64, &str); 3] = [
    ("slow-origin", 0, "a fixed 1 s per-attempt time-out: PROXY_UNREACHABLE for a slow origin"),
    ("lying-proxy", 1, "one attempt-id map for every connection: another proxy's answer delivered"),
    ("mixed", 23, "parked answers not counted: a slow reader's output beyond its bound"),
];

#[test]
fn the_seeds_that_caught_put_back_defects() {
    for (name, seed, caught) in CAUGHT_DEFECTS {
        let outcome = sim::run(name, seed, None).expect("a known scenario");
        assert!(outcome.violations.is_empty(), "{name} seed {seed} (it caught {caught}): {:?}", outcome.violations);
    }
}

#[test]
fn a_seed_gives_the_same_run_byte_for_byte() {
    for name in sim::scenario::NAMES {
        let once = sim::run(name, 7, Some(log::Level::Debug)).expect("known");
        let again = sim::run(name, 7, Some(log::Level::Debug)).expect("known");
        assert!(!once.trace.is_empty(), "{name}: the trace says something");
        assert_eq!(once.trace, again.trace, "{name}: the same trace");
        assert_eq!(sim::summary(name, 7, &once), sim::summary(name, 7, &again));
        let other = sim::run(name, 8, Some(log::Level::Debug)).expect("known");
        assert_ne!(once.trace, other.trace, "{name}: another seed, another run");
    }
}
