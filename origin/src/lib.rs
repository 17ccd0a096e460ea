//! The origin: the source of truth behind the proxies. It serves `DIR/a/b.json` for key
//! `a/b`, optionally generated `synthetic/N` values, and can delay each GET to model a slow
//! backend — with a loop timer, never a blocking sleep (SPEC 3.1).

pub mod service;
pub mod store;

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use common::server::{Server, ServerConfig};

pub use service::Origin;
pub use store::{Store, Synthetic};

/// Everything the origin needs to run.
#[derive(Clone, Debug)]
pub struct OriginConfig {
    pub server: ServerConfig,
    pub data_dir: PathBuf,
    pub latency: Duration,
    pub synthetic: Option<Synthetic>,
    pub max_file_bytes: u64,
}

/// The default for `--max-file-bytes` (SPEC 2.3).
pub const DEFAULT_MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

impl OriginConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        OriginConfig {
            server: ServerConfig::default(),
            data_dir: data_dir.into(),
            latency: Duration::ZERO,
            synthetic: None,
            max_file_bytes: DEFAULT_MAX_FILE_BYTES,
        }
    }
}

/// Checks the data directory and binds the listener; `run()` on the result serves.
pub fn bind(config: OriginConfig) -> io::Result<Server<Origin>> {
    let store = Store::open(&config.data_dir, config.max_file_bytes, config.synthetic)?;
    let latency = config.latency;
    let mut server = config.server;
    // No upstream connections: a few descriptors for opening data files are reserve enough.
    server.fd_reserve = 4;
    Server::bind(server, move |_| Ok(Origin::new(store, latency)))
}

/// Binds and serves until SIGTERM/SIGINT (or a shutdown handle) drains the loop.
pub fn run(config: OriginConfig) -> io::Result<()> {
    bind(config)?.run()
}
