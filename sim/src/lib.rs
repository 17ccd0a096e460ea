//! A deterministic simulator of the whole cluster. The real origin, proxy and balancer
//! services — the same code as the binaries, through the same `common::server::Engine` — run
//! with simulated clients in one thread, on a virtual clock and a simulated network, all
//! driven by one seed: latencies, reads and writes cut at random points, refused connects,
//! resets, stopped and crashed processes, partitions, a slow or failing origin, values that
//! change. Invariants are checked as it runs and at the end; the same seed gives the same
//! run, byte for byte, so any failure comes back from its seed.

pub mod check;
pub mod clients;
pub mod net;
pub mod node;
pub mod scenario;
pub mod trace;
pub mod values;
pub mod world;

use std::fmt::Write;

pub use check::Violation;
pub use world::{Outcome, World};

/// Runs scenario `name` with `seed`; with `trace`, the timeline is collected (services' log
/// records at that level and above).
pub fn run(name: &str, seed: u64, trace: Option<log::Level>) -> Result<Outcome, String> {
    let plan = scenario::plan(name, seed).ok_or_else(|| format!("unknown scenario {name:?}"))?;
    trace::install();
    trace::begin(trace.is_some(), trace);
    Ok(World::new(seed, plan).run())
}

/// What a run prints: its summary, then its violations (the same for the same seed).
pub fn summary(name: &str, seed: u64, outcome: &Outcome) -> String {
    let mut out = String::new();
    let answered: usize = outcome.by_status.values().sum();
    let _ = writeln!(out, "scenario {name} seed {seed}: {:.3} s simulated", outcome.simulated.as_secs_f64());
    let _ = writeln!(
        out,
        "  {} requests, {answered} answered ({} hits, {} stale), {} faults injected, {} retries",
        outcome.requests, outcome.hits, outcome.stale, outcome.faults, outcome.retries
    );
    let statuses: Vec<String> = outcome.by_status.iter().map(|(s, n)| format!("{s} {n}")).collect();
    let _ = writeln!(out, "  answers: {}", statuses.join(", "));
    if outcome.violations.is_empty() {
        let _ = writeln!(out, "  all invariants held");
    }
    for v in &outcome.violations {
        let _ = writeln!(out, "  VIOLATED {v}");
    }
    out
}
