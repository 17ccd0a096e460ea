//! Logging set up once per process: `log` macros go to stderr through simplelog, so stdout
//! stays free for the `listening on` line and machine-readable output.

use log::LevelFilter;
use simplelog::{ColorChoice, ConfigBuilder, TermLogger, TerminalMode};

/// Installs the stderr logger at `level`. A second call (tests start many services in one
/// process) keeps the first logger and is not an error.
pub fn init(level: LevelFilter) {
    let config = ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .build();
    let _ = TermLogger::init(level, config, TerminalMode::Stderr, ColorChoice::Never);
}
