//! Connections from the proxy to its origin.
//!
//! One request at a time per connection (the simplest origins answer one request per
//! connection and understand nothing but `GET key`), reused while the origin keeps it open.
//! An origin that closes after every answer just means a new connection per fetch.

use std::io;
use std::net::SocketAddr;

use common::framing::Frame;
use common::protocol::write_text_request;
use common::server::peer_token;
use common::upstream::{Progress, Upstream};
use mio::Registry;
use slab::Slab;

use crate::fetch::FetchId;

/// Longest origin answer line: the origin's largest file (8 MiB by default) plus room.
pub const MAX_ANSWER_LINE: usize = 16 * 1024 * 1024 + 4096;

#[derive(Debug, Clone, Copy)]
struct Busy {
    fetch: FetchId,
    /// Sent on a connection that had served an earlier request.
    reused: bool,
    /// The connection's received-byte count when the request was sent.
    received_before: u64,
}

#[derive(Debug)]
struct OriginConn {
    up: Upstream,
    busy: Option<Busy>,
}

/// What a readiness event on an origin connection amounts to.
#[derive(Debug)]
pub enum ConnEvent {
    Nothing,
    /// The answer line for `fetch` is ready: read it with [`OriginPool::answer`], then call
    /// [`OriginPool::answered`].
    Answer {
        fetch: FetchId,
    },
    /// The fetch's connection failed; the connection is gone.
    Failed {
        fetch: FetchId,
        failure: Failure,
    },
}

#[derive(Debug)]
pub enum Failure {
    /// A reused connection died before answering anything: most likely the origin closed it
    /// while it was idle. Worth one more try on a fresh connection.
    StaleConnection,
    Refused(io::Error),
    Broken(io::Error),
    ClosedBeforeAnswer,
    AnswerTooLong,
}

impl Failure {
    pub fn describe(&self) -> String {
        match self {
            Failure::StaleConnection => "origin closed a reused connection".into(),
            Failure::Refused(e) => format!("cannot connect to origin: {e}"),
            Failure::Broken(e) => format!("origin connection failed: {e}"),
            Failure::ClosedBeforeAnswer => "origin closed the connection before answering".into(),
            Failure::AnswerTooLong => format!("origin answer longer than {MAX_ANSWER_LINE} bytes"),
        }
    }
}

#[derive(Debug)]
pub struct OriginPool {
    addr: SocketAddr,
    conns: Slab<OriginConn>,
    idle: Vec<usize>,
    max_idle: usize,
    connects: u64,
}

impl OriginPool {
    pub fn new(addr: SocketAddr, max_idle: usize) -> Self {
        OriginPool { addr, conns: Slab::new(), idle: Vec::new(), max_idle, connects: 0 }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Connections opened so far.
    pub fn connects(&self) -> u64 {
        self.connects
    }

    pub fn open(&self) -> usize {
        self.conns.len()
    }

    /// Sends `GET key` for `fetch`, on an idle connection if there is one (or, with `fresh`,
    /// always on a new one). Returns the connection used.
    pub fn send(&mut self, fetch: FetchId, key: &str, fresh: bool, registry: &Registry) -> io::Result<usize> {
        let reused_conn = if fresh { None } else { self.idle.pop() };
        let (index, reused) = match reused_conn {
            Some(index) => (index, true),
            None => {
                let entry = self.conns.vacant_entry();
                let index = entry.key();
                let up = Upstream::connect(self.addr, registry, peer_token(index))?;
                entry.insert(OriginConn { up, busy: None });
                self.connects += 1;
                (index, false)
            }
        };
        let conn = &mut self.conns[index];
        conn.busy = Some(Busy { fetch, reused, received_before: conn.up.received_bytes() });
        write_text_request(conn.up.out_buf(), "GET", Some(key));
        if let Err(e) = conn.up.flush() {
            self.close(index, registry);
            return Err(e);
        }
        Ok(index)
    }

    /// Handles readiness on connection `index`.
    pub fn on_event(&mut self, index: usize, registry: &Registry) -> ConnEvent {
        let Some(conn) = self.conns.get_mut(index) else { return ConnEvent::Nothing };
        let busy = conn.busy;
        let result = conn.up.on_ready(MAX_ANSWER_LINE);
        let failure = match result {
            Ok(Progress::Connecting) => return ConnEvent::Nothing,
            Err(e) if !conn.up.is_connected() => Some(Failure::Refused(e)),
            Err(e) => Some(Failure::Broken(e)),
            Ok(Progress::Ready) => match (conn.up.frame(MAX_ANSWER_LINE), busy) {
                (Frame::Line(..), Some(busy)) => return ConnEvent::Answer { fetch: busy.fetch },
                // A line nobody asked for: this origin cannot be trusted on this connection.
                (Frame::Line(..), None) => None,
                (Frame::TooLong, _) => Some(Failure::AnswerTooLong),
                (Frame::Incomplete, _) if conn.up.is_eof() => Some(Failure::ClosedBeforeAnswer),
                (Frame::Incomplete, _) => return ConnEvent::Nothing,
            },
        };
        let stale = busy.is_some_and(|b| b.reused && conn.up.received_bytes() == b.received_before);
        self.close(index, registry);
        match (busy, failure) {
            (Some(busy), _) if stale => ConnEvent::Failed { fetch: busy.fetch, failure: Failure::StaleConnection },
            (Some(busy), Some(failure)) => ConnEvent::Failed { fetch: busy.fetch, failure },
            _ => ConnEvent::Nothing,
        }
    }

    /// The answer line waiting on connection `index` (after [`ConnEvent::Answer`]).
    pub fn answer(&self, index: usize) -> Option<&[u8]> {
        match self.conns.get(index)?.up.frame(MAX_ANSWER_LINE) {
            Frame::Line(line, _) => Some(line),
            _ => None,
        }
    }

    /// The answer on `index` has been used: the connection becomes idle, or closes if the
    /// origin closed it, sent more than was asked, or enough connections are idle already.
    pub fn answered(&mut self, index: usize, registry: &Registry) {
        let Some(conn) = self.conns.get_mut(index) else { return };
        if let Frame::Line(_, n) = conn.up.frame(MAX_ANSWER_LINE) {
            conn.up.consume(n);
        }
        conn.busy = None;
        if conn.up.is_eof() || conn.up.buffered() > 0 || self.idle.len() >= self.max_idle {
            self.close(index, registry);
        } else {
            self.idle.push(index);
        }
    }

    /// Closes connection `index` (its fetch timed out, or it failed).
    pub fn close(&mut self, index: usize, registry: &Registry) {
        if let Some(mut conn) = self.conns.try_remove(index) {
            conn.up.deregister(registry);
            self.idle.retain(|i| *i != index);
        }
    }
}
