use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use common::cli::{parse_count, parse_positive_count, parse_positive_millis, parse_seconds, parse_size, ServerArgs};
use proxy::{CacheConfig, Policy, ProxyConfig};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum CacheType {
    Ttl,
    Lru,
}

/// A caching proxy in front of the origin.
#[derive(Parser, Debug)]
#[command(name = "proxy", version, about)]
struct Args {
    /// Port to listen on (0 picks a free one); also this node's id in answers.
    #[arg(long)]
    port: u16,

    /// Origin host.
    #[arg(long, alias = "origin_host", default_value = "127.0.0.1")]
    origin_host: String,

    /// Origin port.
    #[arg(long, alias = "origin_port", default_value_t = 8000)]
    origin_port: u16,

    /// Eviction policy: ttl (entries expire; the soonest to expire is evicted first) or lru.
    #[arg(long, alias = "cache_type", value_enum, default_value = "ttl")]
    cache_type: CacheType,

    /// Seconds an entry stays fresh under --cache-type ttl (fractions allowed).
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    ttl: Duration,

    /// Most entries in the cache.
    #[arg(long, alias = "lru_capacity", default_value = "10000", value_parser = parse_positive_count)]
    capacity: usize,

    /// Most key + value bytes in the cache (unbounded if not given).
    #[arg(long, value_parser = parse_size)]
    max_bytes: Option<u64>,

    /// Cache NOT_FOUND answers for this many seconds (0 = never).
    #[arg(long, default_value = "0", value_parser = parse_seconds)]
    negative_ttl: Duration,

    /// Serve an entry that expired less than this many seconds ago when the origin fails (0 = off).
    #[arg(long, default_value = "0", value_parser = parse_seconds)]
    stale_if_error: Duration,

    /// How often expired entries are swept out.
    #[arg(long = "sweep-interval-ms", default_value = "1000", value_parser = parse_positive_millis)]
    sweep_interval: Duration,

    /// Give up on an origin fetch after this long.
    #[arg(long = "origin-timeout-ms", default_value = "2000", value_parser = parse_positive_millis)]
    origin_timeout: Duration,

    /// Most origin fetches at once; more wait in a queue.
    #[arg(long, default_value = "64", value_parser = parse_positive_count)]
    origin_max_inflight: usize,

    /// Most GETs waiting on the origin at once; past it, OVERLOADED.
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
    let origin = match proxy::resolve(&args.origin_host, args.origin_port) {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("proxy: origin {}:{}: {e}", args.origin_host, args.origin_port);
            return ExitCode::FAILURE;
        }
    };
    let config = ProxyConfig {
        server: common::server::ServerConfig { reuse_port: args.reuse_port, ..args.server.to_config(args.port) },
        origin,
        cache: CacheConfig {
            policy: match args.cache_type {
                CacheType::Ttl => Policy::Ttl,
                CacheType::Lru => Policy::Lru,
            },
            capacity: args.capacity,
            max_bytes: args.max_bytes,
            ttl: args.ttl,
            negative_ttl: args.negative_ttl,
            stale_grace: args.stale_if_error,
        },
        sweep_interval: args.sweep_interval,
        origin_timeout: args.origin_timeout,
        origin_max_inflight: args.origin_max_inflight,
        max_pending: args.max_pending,
    };
    common::cli::exit_status("proxy", proxy::run(config))
}
