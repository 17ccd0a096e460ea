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
