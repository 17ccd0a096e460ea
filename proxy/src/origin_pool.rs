//! Connections from the proxy to its origin.
//!
//! One request at a time per connection (the simplest origins answer one request per
//! connection and understand nothing but `GET key`), reused while the origin keeps it open.
//! An origin that closes after every answer just means a new connection per fetch.

use std::io;
use std::net::SocketAddr;

use common::peer::{PeerClosed, PeerEnd, PeerId, PeerMap};
use common::protocol::write_text_request;
use common::server::Ctx;

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
    busy: Option<Busy>,
}

/// What a line or the end of an origin connection amounts to.
#[derive(Debug)]
pub enum ConnEvent {
    Nothing,
    /// The line is the answer for `fetch`: use it, then call [`OriginPool::answered`].
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
    conns: PeerMap<OriginConn>,
    idle: Vec<PeerId>,
    max_idle: usize,
    connects: u64,
}

impl OriginPool {
    pub fn new(addr: SocketAddr, max_idle: usize) -> Self {
        OriginPool { addr, conns: PeerMap::new(), idle: Vec::new(), max_idle, connects: 0 }
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
    pub fn send<T>(&mut self, ctx: &mut Ctx<T>, fetch: FetchId, key: &str, fresh: bool) -> PeerId {
        let reused_conn = if fresh { None } else { self.idle.pop() };
        let (peer, reused) = match reused_conn {
            Some(peer) => (peer, true),
            None => {
                let peer = ctx.connect(self.addr, MAX_ANSWER_LINE);
                self.conns.insert(peer, OriginConn { busy: None });
                self.connects += 1;
                (peer, false)
            }
        };
        let received_before = ctx.peer_received(peer).unwrap_or(0);
        if let Some(conn) = self.conns.get_mut(peer) {
            conn.busy = Some(Busy { fetch, reused, received_before });
        }
        if let Some(out) = ctx.peer_output(peer) {
            write_text_request(out, "GET", Some(key));
        }
        peer
    }

    /// A line arrived on `peer`: the answer for its fetch, or one nobody asked for (then this
    /// origin cannot be trusted on this connection, and it is closed).
    pub fn on_line<T>(&mut self, ctx: &mut Ctx<T>, peer: PeerId) -> ConnEvent {
        let Some(conn) = self.conns.get_mut(peer) else { return ConnEvent::Nothing };
        match conn.busy {
            Some(busy) => ConnEvent::Answer { fetch: busy.fetch },
            None => {
                self.close(ctx, peer);
                ConnEvent::Nothing
            }
        }
    }

    /// `peer` ended (the driver has closed it).
    pub fn on_closed(&mut self, peer: PeerId, closed: PeerClosed) -> ConnEvent {
        let Some(conn) = self.conns.remove(peer) else { return ConnEvent::Nothing };
        self.idle.retain(|p| *p != peer);
        let Some(busy) = conn.busy else { return ConnEvent::Nothing };
        let failure = if busy.reused && closed.received == busy.received_before {
            Failure::StaleConnection
        } else {
            match closed.end {
                PeerEnd::ConnectFailed(e) => Failure::Refused(e),
                PeerEnd::Failed(e) if !closed.was_connected => Failure::Refused(e),
                PeerEnd::Failed(e) => Failure::Broken(e),
                PeerEnd::Closed => Failure::ClosedBeforeAnswer,
                PeerEnd::LineTooLong => Failure::AnswerTooLong,
            }
        };
        ConnEvent::Failed { fetch: busy.fetch, failure }
    }

    /// The answer on `peer` has been used: the connection becomes idle, or closes if the
    /// origin sent more than was asked, or enough connections are idle already.
    pub fn answered<T>(&mut self, ctx: &mut Ctx<T>, peer: PeerId) {
        let Some(conn) = self.conns.get_mut(peer) else { return };
        conn.busy = None;
        if ctx.peer_unread(peer) > 0 || self.idle.len() >= self.max_idle {
            self.close(ctx, peer);
        } else {
            self.idle.push(peer);
        }
    }

    /// Closes `peer` (its fetch timed out, or it failed).
    pub fn close<T>(&mut self, ctx: &mut Ctx<T>, peer: PeerId) {
        if self.conns.remove(peer).is_some() {
            ctx.close_peer(peer);
            self.idle.retain(|p| *p != peer);
        }
    }
}
