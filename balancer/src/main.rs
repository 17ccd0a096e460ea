use std::process::ExitCode;
use std::time::Duration;

use balancer::{BalancerConfig, ProxySpec, Strategy};
use clap::{Parser, ValueEnum};
use common::cli::{parse_count, ServerArgs, MAX_MILLIS, MAX_RETRIES};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum StrategyName {
    #[value(name = "round_robin", alias = "round-robin")]
    RoundRobin,
    #[value(name = "least_loaded", alias = "least-loaded")]
    LeastLoaded,
    #[value(name = "consistent_hash", alias = "consistent-hash")]
    ConsistentHash,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum OnOff {
    On,
    Off,
}

/// Load balancer in front of the caching proxies.
#[derive(Parser, Debug)]
#[command(name = "balancer", version, about)]
struct Args {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 9000)]
    port: u16,

    /// The proxies, as host:port, in one flag: --proxies 127.0.0.1:8001 127.0.0.1:8002. A host
    /// may be a DNS name: one proxy per address it resolves to.
    #[arg(long, num_args = 1.., required_unless_present = "proxies_file")]
    proxies: Vec<String>,

    /// A file of proxies, one host:port per line (# comments), re-read on SIGHUP.
    #[arg(long)]
    proxies_file: Option<std::path::PathBuf>,

    /// How often DNS names of proxies are looked up again (0: only at start-up and SIGHUP).
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(0..=MAX_MILLIS))]
    resolve_interval_ms: u64,

    /// round_robin, least_loaded or consistent_hash (kebab-case spellings work too).
    #[arg(long, value_enum, default_value = "round_robin")]
    strategy: StrategyName,

    /// How often each proxy gets a HEALTH probe.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=MAX_MILLIS))]
    health_interval_ms: u64,

    /// A probe without a well-formed answer in this time has failed.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(1..=MAX_MILLIS))]
    health_timeout_ms: u64,

    /// Consecutive failures that mark a proxy down.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    fall: u32,

    /// Consecutive successful probes that mark it up again.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    rise: u32,

    /// How often each proxy's METRICS are polled.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(1..=MAX_MILLIS))]
    metrics_interval_ms: u64,

    /// Other proxies to try after a failed attempt, before PROXY_UNREACHABLE.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_RETRIES)))]
    retries: u32,

    /// The longest one attempt of a GET waits for its answer before another proxy is tried.
    #[arg(long, default_value_t = 3000, value_parser = clap::value_parser!(u64).range(1..=MAX_MILLIS))]
    request_timeout_ms: u64,

    /// Overrides the per-attempt deadline [default: --request-timeout-ms].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=MAX_MILLIS))]
    try_timeout_ms: Option<u64>,

    /// Request collapsing: GETs for a key already on its way to a proxy wait for its answer.
    #[arg(long, value_enum, default_value = "on")]
    collapse: OnOff,

    /// bounded load for consistent_hash: a proxy takes a key only while its in-flight count is
    /// below ceil(factor × (total in flight + 1) / healthy proxies).
    #[arg(long, default_value_t = 1.25)]
    hash_load_factor: f64,

    /// Most GETs forwarded and not yet answered; past it, OVERLOADED.
    #[arg(long, default_value = "10000", value_parser = parse_count)]
    max_pending: usize,

    /// SO_REUSEPORT: several processes started with it share --port, each its own loop; the
    /// kernel spreads new connections over them (one process per core).
    #[arg(long)]
    reuse_port: bool,

    #[command(flatten)]
    server: ServerArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::logging::init(args.server.log_level);
    // Names are resolved (blocking, for seconds when a nameserver is slow) before the loop
    // installs its handlers; a SIGHUP meanwhile must not kill the balancer (the default
    // action): it is noted, and sent again once the loop listens for it.
    let early_reload = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Err(e) = signal_hook::flag::register(signal_hook::consts::SIGHUP, early_reload.clone()) {
        log::warn!("cannot catch SIGHUP during start-up: {e}");
    }
    if !(args.hash_load_factor.is_finite() && args.hash_load_factor >= 1.0) {
        eprintln!("balancer: --hash-load-factor must be a number >= 1");
        return ExitCode::from(2);
    }
    let specs: Result<Vec<ProxySpec>, String> = args.proxies.iter().map(|p| ProxySpec::parse(p)).collect();
    let file_specs = match &args.proxies_file {
        Some(path) => balancer::membership::read_file(path).map_err(|e| format!("{}: {e}", path.display())),
        None => Ok(Vec::new()),
    };
    let (specs, file_specs) = match (specs, file_specs) {
        (Ok(specs), Ok(file_specs)) => (specs, file_specs),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("balancer: {e}");
            return ExitCode::from(2);
        }
    };
    let all: Vec<ProxySpec> = specs.iter().chain(&file_specs).cloned().collect();
    let proxies = match balancer::resolve_proxies(&all) {
        Ok(proxies) => proxies,
        Err(e) => {
            eprintln!("balancer: {e}");
            return ExitCode::from(2);
        }
    };
    let request_timeout = Duration::from_millis(args.request_timeout_ms);
    let config = BalancerConfig {
        server: common::server::ServerConfig { reuse_port: args.reuse_port, ..args.server.to_config(args.port) },
        proxies,
        specs,
        proxies_file: args.proxies_file,
        file_specs,
        resolve_interval: Duration::from_millis(args.resolve_interval_ms),
        strategy: match args.strategy {
            StrategyName::RoundRobin => Strategy::RoundRobin,
            StrategyName::LeastLoaded => Strategy::LeastLoaded,
            StrategyName::ConsistentHash => Strategy::ConsistentHash { load_factor: args.hash_load_factor },
        },
        health_interval: Duration::from_millis(args.health_interval_ms),
        health_timeout: Duration::from_millis(args.health_timeout_ms),
        fall: args.fall,
        rise: args.rise,
        metrics_interval: Duration::from_millis(args.metrics_interval_ms),
        retries: args.retries,
        request_timeout,
        try_timeout: args.try_timeout_ms.map_or(request_timeout, Duration::from_millis),
        max_pending: args.max_pending,
        collapse: matches!(args.collapse, OnOff::On),
    };
    let server = match balancer::bind(config) {
        Ok(server) => server,
        Err(e) => return common::cli::exit_status("balancer", Err(e)),
    };
    if early_reload.load(std::sync::atomic::Ordering::SeqCst) {
        // The file may have changed after it was read: the loop reloads it first thing.
        let _ = signal_hook::low_level::raise(signal_hook::consts::SIGHUP);
    }
    common::cli::exit_status("balancer", server.run())
}
