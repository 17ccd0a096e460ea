//! `sim --seed N [--scenario NAME] [--trace]`, or `sim --seeds A..B` to sweep.

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;

#[derive(Parser, Debug)]
#[command(name = "sim", about = "Deterministic simulation of the cache tier (origin, proxies, balancer, clients)")]
struct Args {
    /// Run one seed.
    #[arg(long, conflicts_with = "seeds")]
    seed: Option<u64>,
    /// Sweep the seeds A..B (B excluded) and list the failing ones.
    #[arg(long, value_parser = parse_range)]
    seeds: Option<(u64, u64)>,
    /// One of kill-proxy, partition, slow-origin, herd, flapping, mixed; or `all`.
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Print the timeline of the run (with --seed).
    #[arg(long)]
    trace: bool,
    /// Also the services' debug records in the timeline.
    #[arg(long)]
    trace_debug: bool,
}

fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let (a, b) = text.split_once("..").ok_or("expected A..B")?;
    let a: u64 = a.parse().map_err(|e| format!("{a:?}: {e}"))?;
    let b: u64 = b.parse().map_err(|e| format!("{b:?}: {e}"))?;
    if b <= a {
        return Err("the range A..B is empty".into());
    }
    Ok((a, b))
}

fn scenarios(name: &str) -> Result<Vec<&'static str>, String> {
    if name == "all" {
        return Ok(sim::scenario::NAMES.to_vec());
    }
    sim::scenario::NAMES
        .iter()
        .find(|n| **n == name)
        .map(|n| vec![*n])
        .ok_or_else(|| format!("unknown scenario {name:?}; known: all, {}", sim::scenario::NAMES.join(", ")))
}

fn main() -> ExitCode {
    let args = Args::parse();
    let names = match scenarios(&args.scenario) {
        Ok(names) => names,
        Err(e) => {
            eprintln!("sim: {e}");
            return ExitCode::from(2);
        }
    };
    let level = if args.trace_debug {
        Some(log::Level::Debug)
    } else if args.trace {
        Some(log::Level::Info)
    } else {
        None
    };
    let (from, to) = match (args.seed, args.seeds) {
        (Some(seed), _) => (seed, seed.saturating_add(1)),
        (None, Some(range)) => range,
        (None, None) => (0, 1),
    };
    let single = to - from == 1;
    let began = Instant::now();
    let mut simulated = 0.0;
    let mut failing = Vec::new();
    for name in &names {
        for seed in from..to {
            let outcome = match sim::run(name, seed, if single { level } else { None }) {
                Ok(outcome) => outcome,
                Err(e) => {
                    eprintln!("sim: {e}");
                    return ExitCode::from(2);
                }
            };
            simulated += outcome.simulated.as_secs_f64();
            if single {
                for line in &outcome.trace {
                    println!("{line}");
                }
                print!("{}", sim::summary(name, seed, &outcome));
            }
            if let Some(first) = outcome.violations.first() {
                failing.push((name, seed, first.invariant));
                if !single {
                    println!("FAIL scenario {name} seed {seed}: {first}");
                }
            }
        }
    }
    let wall = began.elapsed().as_secs_f64();
    if !single {
        let runs = names.len() as u64 * (to - from);
        println!("{runs} runs, {} failing", failing.len());
    }
    // Wall time varies from run to run: it goes to stderr, so stdout stays the same per seed.
    eprintln!("{simulated:.1} simulated seconds in {wall:.2} wall seconds ({:.0}x)", simulated / wall.max(1e-9));
    if let Some((name, seed, invariant)) = failing.first() {
        eprintln!("sim: invariant {invariant} violated (scenario {name}, seed {seed})");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}
