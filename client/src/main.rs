use std::io::Write as _;
use std::net::ToSocketAddrs;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Args, Parser, Subcommand};
use client::bench::{self, BenchConfig, Dist};
use common::cli::{parse_positive_count, parse_positive_millis, parse_seconds};

/// Talk to any tier of the cache (balancer, proxy or origin), or load it with `bench`.
#[derive(Parser, Debug)]
#[command(name = "client", version, about, group(ArgGroup::new("action").args(["get", "metrics", "purge", "health"])))]
struct Cli {
    #[arg(long, default_value = "127.0.0.1", global = true)]
    host: String,

    #[arg(long, default_value_t = 9000, global = true)]
    port: u16,

    /// Give up on connecting or on an answer after this long.
    #[arg(long = "timeout-ms", default_value = "5000", value_parser = parse_positive_millis)]
    timeout: Duration,

    /// GET a key.
    #[arg(long, value_name = "KEY")]
    get: Option<String>,

    /// Show the service's METRICS.
    #[arg(long)]
    metrics: bool,

    /// PURGE a key.
    #[arg(long, value_name = "KEY")]
    purge: Option<String>,

    /// Ask for HEALTH.
    #[arg(long)]
    health: bool,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Closed-loop load: each connection keeps --pipeline GETs outstanding.
    Bench(BenchArgs),
    /// Live view of the cluster from the balancer's METRICS (q quits); --once prints one snapshot.
    Top(TopArgs),
}

#[derive(Args, Debug)]
struct TopArgs {
    /// Time between refreshes (with --once: between its two samples).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(50..=3_600_000))]
    interval_ms: u64,

    /// Print one plain-text snapshot (rates over one interval) and exit.
    #[arg(long)]
    once: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    connections: u64,

    /// Seconds to measure (after the warm-up).
    #[arg(long, default_value = "10", value_parser = parse_seconds, conflicts_with = "requests")]
    duration: Duration,

    /// Measure this many requests instead of a duration.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    requests: Option<u64>,

    /// Keys are PREFIX0 … PREFIX(N-1).
    #[arg(long, default_value = "1000", value_parser = parse_positive_count)]
    keys: usize,

    #[arg(long, default_value = "synthetic/")]
    key_prefix: String,

    /// uniform, zipf (exponent 0.99) or zipf:S.
    #[arg(long, default_value = "uniform")]
    dist: Dist,

    /// GETs outstanding per connection.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    pipeline: u64,

    /// Seconds of load before measuring starts.
    #[arg(long, default_value = "1", value_parser = parse_seconds)]
    warmup: Duration,

    /// Seed for the key sequence (the same seed replays the same keys).
    #[arg(long, default_value_t = 42)]
    seed: u64,

    /// Print the result as one JSON object on stdout.
    #[arg(long)]
    json: bool,

    /// Also compute the hit ratio one LRU of N entries would have on the same key sequence.
    #[arg(long, value_name = "N", value_parser = parse_positive_count)]
    simulate_lru: Option<usize>,

    /// line (this project's protocol) or memcache (`get KEY`, to load twemproxy or memcached
    /// with the same generator).
    #[arg(long, default_value = "line")]
    wire: bench::Wire,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Bench(args)) = &cli.command {
        return run_bench(&cli, args);
    }
    if let Some(Command::Top(args)) = &cli.command {
        return run_top(&cli, args);
    }
    // SPEC 3.8: a key with a control character could smuggle a second request line in
    // (`--get $'a\nPURGE a'`); refuse it and send nothing.
    for key in [&cli.get, &cli.purge].into_iter().flatten() {
        if let Err(why) = client::check_key(key) {
            eprintln!("client: {why}");
            return ExitCode::from(2);
        }
    }
    let line = match (&cli.get, cli.metrics, &cli.purge, cli.health) {
        (Some(key), ..) => format!("GET {key}"),
        (_, true, ..) => "METRICS".to_owned(),
        (_, _, Some(key), _) => format!("PURGE {key}"),
        (.., true) => "HEALTH".to_owned(),
        _ => {
            eprintln!("client: say what to do: --get KEY, --metrics, --purge KEY, --health, or bench (see --help)");
            return ExitCode::from(2);
        }
    };
    let answer = client::request_once(&cli.host, cli.port, &line, cli.timeout);
    let shown = serde_json::to_string_pretty(&answer).unwrap_or_default() + "\n";
    if let Err(e) = write_stdout(&shown) {
        eprintln!("client: stdout: {e}");
        return ExitCode::FAILURE;
    }
    if client::is_ok(&answer) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_top(cli: &Cli, args: &TopArgs) -> ExitCode {
    let config = client::top::TopConfig {
        host: cli.host.clone(),
        port: cli.port,
        interval: Duration::from_millis(args.interval_ms),
        timeout: cli.timeout,
    };
    let result = if args.once {
        client::top::once(&config)
            .map_err(|e| e.to_string())
            .and_then(|snapshot| write_stdout(&snapshot).map_err(|e| format!("stdout: {e}")))
    } else {
        client::top::live(&config).map_err(|e| e.to_string())
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("client top: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_bench(cli: &Cli, args: &BenchArgs) -> ExitCode {
    let addr = match (cli.host.as_str(), cli.port).to_socket_addrs().map(|mut a| a.next()) {
        Ok(Some(addr)) => addr,
        _ => {
            eprintln!("client bench: cannot resolve {}:{}", cli.host, cli.port);
            return ExitCode::from(2);
        }
    };
    let config = BenchConfig {
        addr,
        connections: usize::try_from(args.connections).unwrap_or(usize::MAX),
        duration: args.duration,
        requests: args.requests,
        keys: args.keys,
        key_prefix: args.key_prefix.clone(),
        dist: args.dist.clone(),
        pipeline: usize::try_from(args.pipeline).unwrap_or(usize::MAX),
        warmup: args.warmup,
        seed: args.seed,
        progress: true,
        simulate_lru: args.simulate_lru,
        wire: args.wire,
    };
    match bench::run(&config) {
        Ok(report) => {
            let shown = if args.json {
                serde_json::to_string(&report).unwrap_or_default() + "\n"
            } else {
                bench::summary(&report)
            };
            if let Err(e) = write_stdout(&shown) {
                eprintln!("client bench: stdout: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("client bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Writes `text` to stdout. Written, not `print!`ed: a closed pipe (`| head -1`) is an error
/// to report, not a panic.
fn write_stdout(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}
