//! The flags every service shares (SPEC 3.7), flattened into each binary's clap parser.

use std::time::Duration;

use clap::Args;
use log::LevelFilter;

use crate::server::ServerConfig;

#[derive(Args, Clone, Debug)]
pub struct ServerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,

    /// Client connections served at once; past it a new connection gets OVERLOADED and is closed.
    #[arg(long, default_value = "10000", value_parser = parse_positive_count)]
    pub max_connections: usize,

    /// Longest request line in bytes (before the newline).
    #[arg(long, default_value = "65536", value_parser = parse_max_line)]
    pub max_line: usize,

    /// Close a client connection after this long without progress.
    #[arg(long = "idle-timeout-ms", default_value = "60000", value_parser = parse_positive_millis)]
    pub idle_timeout: Duration,

    /// On SIGTERM/SIGINT, how long to keep answering requests already in flight.
    #[arg(long = "drain-timeout-ms", default_value = "5000", value_parser = parse_millis)]
    pub drain_timeout: Duration,

    /// error, warn, info, debug, trace or off.
    #[arg(long, default_value = "info")]
    pub log_level: LevelFilter,

    /// Serve HTTP (/metrics, /healthz; the balancer's dashboard) on this port (0 picks a free
    /// one); off when not given.
    #[arg(long)]
    pub admin_port: Option<u16>,

    /// Address for the admin listener [default: --host].
    #[arg(long)]
    pub admin_host: Option<String>,

    /// Write one JSON line per answered request to PATH (- = stderr); off when not given.
    #[arg(long, value_name = "PATH")]
    pub access_log: Option<String>,
}

impl ServerArgs {
    /// The server configuration for a binary: listening on `port`, announcing readiness on
    /// stdout and handling SIGTERM/SIGINT.
    pub fn to_config(&self, port: u16) -> ServerConfig {
        ServerConfig {
            host: self.host.clone(),
            port,
            max_connections: self.max_connections,
            max_line: self.max_line,
            idle_timeout: self.idle_timeout,
            drain_timeout: self.drain_timeout,
            announce: true,
            handle_signals: true,
            admin_port: self.admin_port,
            admin_host: self.admin_host.clone(),
            access_log: self.access_log.as_deref().map(crate::access_log::Target::parse),
            ..ServerConfig::default()
        }
    }
}

/// The end of every service binary: exit 0 after a clean drain, or print the error (a port
/// in use, a missing data directory, ...) and exit 1.
pub fn exit_status(program: &str, result: std::io::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{program}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

// Checked parsing for every numeric flag (SPEC 3.8): a value out of range is an error that
// clap reports naming the flag ("invalid value '…' for '--ttl <TTL>': …"), never a panic and
// never a silent wrap further on. Durations stay below `MAX_MILLIS`, so adding one to an
// `Instant` or turning it into u64 milliseconds cannot overflow anywhere.

/// The longest duration a flag may give: 100 years, in milliseconds.
pub const MAX_MILLIS: u64 = 100 * 365 * 24 * 3600 * 1000;
/// The largest size in bytes a flag may give: 1 TiB.
pub const MAX_SIZE: u64 = 1 << 40;
/// The most retries a flag may ask for.
pub const MAX_RETRIES: u32 = 1000;

/// Parses a number of seconds, fractions allowed (`30`, `0.5`), for flags like `--ttl`.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("'{s}' is not a valid number of seconds (must be >= 0)"));
    }
    let max_secs = MAX_MILLIS / 1000;
    if secs > max_secs as f64 {
        return Err(format!("'{s}' seconds is too long (at most {max_secs})"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is not a valid number of seconds"))
}

fn parse_u64_in(s: &str, what: &str, min: u64, max: u64) -> Result<u64, String> {
    let n: u64 = s.trim().parse().map_err(|_| format!("'{s}' is not a whole number of {what}"))?;
    if n < min || n > max {
        return Err(format!("{n} is out of range: {what} from {min} to {max}"));
    }
    Ok(n)
}

/// Whole milliseconds, 0 allowed, for `*-ms` flags.
pub fn parse_millis(s: &str) -> Result<Duration, String> {
    parse_u64_in(s, "milliseconds", 0, MAX_MILLIS).map(Duration::from_millis)
}

/// Whole milliseconds, at least 1.
pub fn parse_positive_millis(s: &str) -> Result<Duration, String> {
    parse_u64_in(s, "milliseconds", 1, MAX_MILLIS).map(Duration::from_millis)
}

/// A count, 0 allowed.
pub fn parse_count(s: &str) -> Result<usize, String> {
    let max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
    parse_u64_in(s, "items", 0, max).and_then(to_usize)
}

/// A count, at least 1 (`--capacity 0` is an error).
pub fn parse_positive_count(s: &str) -> Result<usize, String> {
    let max = u64::try_from(usize::MAX).unwrap_or(u64::MAX);
    parse_u64_in(s, "items", 1, max).and_then(to_usize)
}

/// A size in bytes, at least 1 and at most [`MAX_SIZE`].
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_u64_in(s, "bytes", 1, MAX_SIZE)
}

fn parse_max_line(s: &str) -> Result<usize, String> {
    parse_u64_in(s, "bytes", 16, MAX_SIZE).and_then(to_usize)
}

fn to_usize(n: u64) -> Result<usize, String> {
    usize::try_from(n).map_err(|_| format!("{n} is too large for this machine"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_with_fractions() {
        assert_eq!(parse_seconds("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_seconds("0.25"), Ok(Duration::from_millis(250)));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("NaN").is_err());
        assert!(parse_seconds("soon").is_err());
        assert!(parse_seconds("inf").is_err());
        // Once a 384 ms TTL through a wrapping cast.
        assert!(parse_seconds("18446744073709552").is_err());
    }

    #[test]
    fn numbers_out_of_range_are_errors_not_wraps() {
        assert_eq!(parse_millis("0"), Ok(Duration::ZERO));
        assert!(parse_positive_millis("0").is_err());
        assert!(parse_millis("18446744073709551615").is_err());
        assert!(parse_millis("18446744073709551616").is_err());
        assert!(parse_millis("-1").is_err());
        assert_eq!(parse_positive_count("3"), Ok(3));
        assert!(parse_positive_count("0").is_err());
        assert!(parse_count("99999999999999999999").is_err());
        assert!(parse_size("18446744073709551615").is_err());
        assert_eq!(parse_size("8388608"), Ok(8 << 20));
    }
}
