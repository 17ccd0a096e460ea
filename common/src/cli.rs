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
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// Longest request line in bytes (before the newline).
    #[arg(long, default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(16..))]
    pub max_line: u64,

    /// Close a client connection after this long without progress.
    #[arg(long, default_value_t = 60_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout_ms: u64,

    /// On SIGTERM/SIGINT, how long to keep answering requests already in flight.
    #[arg(long, default_value_t = 5_000)]
    pub drain_timeout_ms: u64,

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
            max_connections: self.max_connections as usize,
            max_line: self.max_line as usize,
            idle_timeout: Duration::from_millis(self.idle_timeout_ms),
            drain_timeout: Duration::from_millis(self.drain_timeout_ms),
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

/// Parses a number of seconds, fractions allowed (`30`, `0.5`), for flags like `--ttl`.
pub fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s.parse().map_err(|_| format!("'{s}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(secs).map_err(|_| format!("'{s}' is not a valid number of seconds (must be >= 0)"))
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
    }
}
