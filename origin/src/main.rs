use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use common::cli::{parse_count, parse_millis, parse_size, ServerArgs};
use origin::{OriginConfig, Synthetic, DEFAULT_MAX_FILE_BYTES};

/// The origin server: the source of truth for the cache tier.
#[derive(Parser, Debug)]
#[command(name = "origin", version, about)]
struct Args {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8000)]
    port: u16,

    /// Directory holding the data: key a/b is the file DIR/a/b.json.
    #[arg(long, default_value = "origin/data")]
    data_dir: PathBuf,

    /// Delay every GET answer by this many milliseconds (a loop timer, not a sleep).
    #[arg(long = "latency-ms", default_value = "0", value_parser = parse_millis)]
    latency: Duration,

    /// Also serve synthetic/0 … synthetic/N-1 with generated values.
    #[arg(long, default_value = "0", value_parser = parse_count)]
    synthetic_keys: usize,

    /// Size of each synthetic value's JSON encoding, in bytes.
    #[arg(long, default_value = "200", value_parser = parse_value_bytes)]
    value_bytes: usize,

    /// Data files larger than this are answered with ORIGIN_ERROR.
    #[arg(long, default_value_t = DEFAULT_MAX_FILE_BYTES, value_parser = parse_size)]
    max_file_bytes: u64,

    #[command(flatten)]
    server: ServerArgs,
}

/// A synthetic value is built in memory for every answer: at most 64 MiB.
fn parse_value_bytes(s: &str) -> Result<usize, String> {
    const MAX: usize = 64 << 20;
    match parse_count(s)? {
        n if n <= MAX => Ok(n),
        n => Err(format!("{n} is out of range: at most {MAX} bytes")),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    common::logging::init(args.server.log_level);
    let config = OriginConfig {
        server: args.server.to_config(args.port),
        data_dir: args.data_dir,
        latency: args.latency,
        synthetic: (args.synthetic_keys > 0).then_some(Synthetic {
            count: u64::try_from(args.synthetic_keys).unwrap_or(u64::MAX),
            value_bytes: args.value_bytes,
        }),
        max_file_bytes: args.max_file_bytes,
    };
    common::cli::exit_status("origin", origin::run(config))
}
