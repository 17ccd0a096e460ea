//! The connections that carry GETs to the proxies: a slab of upstream connections, each with
//! the requests queued on it this loop turn (written in one write at the turn's end). I/O
//! only: which connection a GET takes is the pool's decision, what an answer means is the
//! in-flight book's.

use common::upstream::Upstream;
use mio::{Registry, Token};
use slab::Slab;

use crate::failure::Failure;
use crate::pool::ConnKind;

pub struct Link {
    pub up: Upstream,
    pub backend: usize,
    pub kind: ConnKind,
    /// Answers received on it: a connection that answered before is "reused" when it idles.
    pub answered: u64,
    dirty: bool,
}

#[derive(Default)]
pub struct Links {
    conns: Slab<Link>,
    /// Connections with output queued this turn.
    dirty: Vec<usize>,
}

impl Links {
    /// Starts connecting to `addr` for `backend`; `token` names the socket from its index.
    pub fn open(
        &mut self,
        registry: &Registry,
        addr: std::net::SocketAddr,
        backend: usize,
        kind: ConnKind,
        token: impl Fn(usize) -> Token,
    ) -> Result<usize, Failure> {
        let entry = self.conns.vacant_entry();
        let conn = entry.key();
        let up = Upstream::connect(addr, registry, token(conn)).map_err(|e| Failure::of_connect(&e))?;
        entry.insert(Link { up, backend, kind, answered: 0, dirty: false });
        Ok(conn)
    }

    pub fn get(&self, conn: usize) -> Option<&Link> {
        self.conns.get(conn)
    }

    pub fn get_mut(&mut self, conn: usize) -> Option<&mut Link> {
        self.conns.get_mut(conn)
    }

    /// The output buffer of `conn` to append one more request to.
    pub fn queue(&mut self, conn: usize) -> Option<(&mut Vec<u8>, ConnKind)> {
        let link = self.conns.get_mut(conn)?;
        if !link.dirty {
            link.dirty = true;
            self.dirty.push(conn);
        }
        Some((link.up.out_buf(), link.kind))
    }

    /// Stops watching `conn` and hands it back to be dropped (which closes it).
    pub fn close(&mut self, registry: &Registry, conn: usize) -> Option<Link> {
        let mut link = self.conns.try_remove(conn)?;
        link.up.deregister(registry);
        Some(link)
    }

    /// Writes what was queued; returns a connection whose write failed (call again until
    /// `None`).
    pub fn flush(&mut self) -> Option<usize> {
        while let Some(conn) = self.dirty.pop() {
            let Some(link) = self.conns.get_mut(conn) else { continue };
            link.dirty = false;
            if link.up.flush().is_err() {
                return Some(conn);
            }
        }
        None
    }

    pub fn of_backend(&self, backend: usize) -> Vec<usize> {
        self.conns.iter().filter(|(_, l)| l.backend == backend).map(|(i, _)| i).collect()
    }
}
