//! The connections that carry GETs to the proxies: a slab of them (the pool and the attempt
//! book name a connection by its number here), each with its peer connection, its proxy and
//! its kind. The driver owns the sockets and writes what a turn queued on a connection in one
//! write at the turn's end. Bookkeeping only: which connection a GET takes is the pool's
//! decision, what an answer means is the in-flight book's.

use std::net::SocketAddr;

use common::peer::{PeerId, PeerMap};
use common::server::Ctx;
use slab::Slab;

use crate::exchange::MAX_ANSWER;
use crate::pool::ConnKind;

pub struct Link {
    pub peer: PeerId,
    pub backend: usize,
    pub kind: ConnKind,
    /// Answers received on it: a connection that answered before is "reused" when it idles.
    pub answered: u64,
}

#[derive(Default)]
pub struct Links {
    conns: Slab<Link>,
    /// The number of each connection's link.
    by_peer: PeerMap<usize>,
}

impl Links {
    /// Starts connecting to `addr` for `backend`; returns the connection's number.
    pub fn open<T>(&mut self, ctx: &mut Ctx<T>, addr: SocketAddr, backend: usize, kind: ConnKind) -> usize {
        let peer = ctx.connect(addr, MAX_ANSWER);
        let conn = self.conns.insert(Link { peer, backend, kind, answered: 0 });
        self.by_peer.insert(peer, conn);
        conn
    }

    pub fn get(&self, conn: usize) -> Option<&Link> {
        self.conns.get(conn)
    }

    pub fn get_mut(&mut self, conn: usize) -> Option<&mut Link> {
        self.conns.get_mut(conn)
    }

    /// The number of `peer`'s link, when it is one.
    pub fn conn_of(&self, peer: PeerId) -> Option<usize> {
        self.by_peer.get(peer).copied()
    }

    /// The output of `conn` to append one more request to (written at the end of the turn).
    pub fn queue<'c, T>(&self, ctx: &'c mut Ctx<T>, conn: usize) -> Option<(&'c mut Vec<u8>, ConnKind)> {
        let link = self.conns.get(conn)?;
        Some((ctx.peer_output(link.peer)?, link.kind))
    }

    /// Closes `conn`; returns its link with the bytes it had received.
    pub fn close<T>(&mut self, ctx: &mut Ctx<T>, conn: usize) -> Option<(Link, u64)> {
        let link = self.conns.try_remove(conn)?;
        self.by_peer.remove(link.peer);
        let received = ctx.peer_received(link.peer).unwrap_or(0);
        ctx.close_peer(link.peer);
        Some((link, received))
    }

    /// The driver ended `peer`: its link and that link's number, when it was one.
    pub fn ended(&mut self, peer: PeerId) -> Option<(usize, Link)> {
        let conn = self.by_peer.remove(peer)?;
        Some((conn, self.conns.try_remove(conn)?))
    }

    pub fn of_backend(&self, backend: usize) -> Vec<usize> {
        self.conns.iter().filter(|(_, l)| l.backend == backend).map(|(i, _)| i).collect()
    }
}
