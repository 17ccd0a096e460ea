//! Code shared by every service of the cache tier: the wire protocol, line framing, the
//! deadline queue, the event-loop scaffolding (listener, limits, signals, drain), logging and
//! metrics building blocks, and a small blocking line client for tools (`line_client`).

pub mod access_log;
pub mod admin;
pub mod cli;
pub mod fdlimit;
pub mod framing;
pub mod line_client;
pub mod logging;
pub mod metrics;
pub mod outbuf;
pub mod peer;
pub mod prom;
pub mod protocol;
pub mod random;
pub mod server;
pub mod sockopt;
pub mod timers;
pub mod upstream;
pub mod window;
