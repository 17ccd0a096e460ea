//! The connections that carry PURGE fan-outs to the proxies (SPEC 3.8), bounded by
//! connections, not by fan-outs: at most one per proxy, carrying its PURGE lines pipelined
//! (text form, answered in order), and at most `budget` in all, whatever the number of
//! proxies — so with 128 proxies, 16 fan-outs need 16 descriptors, not 2,048. A proxy whose
//! turn has not come waits in line for a connection; a connection closes once it owes
//! nothing (so a proxy never closes an idle one under a PURGE), giving its place to the next
//! proxy in line. What each outcome means is [`crate::purge`]'s business.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Instant;

use common::peer::{PeerClosed, PeerEnd, PeerId, PeerMap};
use common::protocol::write_text_request;
use common::server::Ctx;
use slab::Slab;

use crate::exchange::{interpret, Heard, Purpose, MAX_ANSWER};
use crate::failure::Failure;

/// PURGE connections open at once, at most.
pub const MAX_CONNS: usize = 16;

/// What became of one proxy's share of a fan-out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heard1 {
    /// It answered: whether it held the key.
    Answered { fan_out: usize, held: bool },
    /// No answer (refused, closed, timed out): the proxy is not counted.
    Silent { fan_out: usize },
    /// It could not be asked for want of local resources: the PURGE is OVERLOADED.
    Short { fan_out: usize },
}

struct PurgeConn {
    peer: PeerId,
    backend: usize,
    /// Fan-outs sent on it, in order, with the deadline of each answer.
    awaiting: VecDeque<(usize, Instant)>,
    /// A deadline timer is pending for it.
    timer_armed: bool,
}

/// The PURGE to send and the deadline of its answer.
pub struct Ask<'a> {
    pub key: &'a str,
    pub deadline: Instant,
}

/// A fan-out (with its key) waiting for a proxy to get a connection.
pub type Waiting = (usize, Box<str>);

pub struct PurgeLinks {
    conns: Slab<PurgeConn>,
    /// The number of each peer connection's PURGE connection.
    by_peer: PeerMap<usize>,
    /// The connection of each proxy, if it has one.
    of_backend: Vec<Option<usize>>,
    /// Per proxy: fan-outs waiting for it to get a connection.
    queued: Vec<VecDeque<Waiting>>,
    /// Proxies with queued fan-outs, in turn order.
    in_line: VecDeque<usize>,
    budget: usize,
}

impl PurgeLinks {
    /// At most `budget` connections (at least 1, at most [`MAX_CONNS`]).
    pub fn new(budget: usize) -> Self {
        PurgeLinks {
            conns: Slab::new(),
            by_peer: PeerMap::new(),
            of_backend: Vec::new(),
            queued: Vec::new(),
            in_line: VecDeque::new(),
            budget: budget.clamp(1, MAX_CONNS),
        }
    }

    /// A new budget (clamped likewise), for the connections opened from now on.
    pub fn set_budget(&mut self, budget: usize) {
        self.budget = budget.clamp(1, MAX_CONNS);
    }

    pub fn open_conns(&self) -> usize {
        self.conns.len()
    }

    /// Whether `backend` has a PURGE connection or PURGEs waiting for one: its slot must
    /// not be reused by another proxy until both are gone (SPEC 7).
    pub fn involve(&self, backend: usize) -> bool {
        self.of_backend.get(backend).is_some_and(Option::is_some)
            || self.queued.get(backend).is_some_and(|q| !q.is_empty())
    }

    fn grow(&mut self, backend: usize) {
        if self.of_backend.len() <= backend {
            self.of_backend.resize(backend + 1, None);
            self.queued.resize_with(backend + 1, VecDeque::new);
        }
    }

    /// Sends fan-out `fan_out`'s PURGE of `ask.key` to `backend` (at `addr`), or queues it
    /// for a connection. Returns the connection whose deadline timer the caller must arm,
    /// if any. A connection that cannot be made ends like any other (see
    /// [`PurgeLinks::on_closed`]).
    pub fn ask<T>(
        &mut self,
        ctx: &mut Ctx<T>,
        ask: &Ask<'_>,
        (backend, addr): (usize, SocketAddr),
        fan_out: usize,
    ) -> Option<usize> {
        self.grow(backend);
        if let Some(conn) = self.of_backend[backend] {
            return self.send(ctx, conn, fan_out, ask);
        }
        if self.conns.len() >= self.budget {
            if self.queued[backend].is_empty() {
                self.in_line.push_back(backend);
            }
            self.queued[backend].push_back((fan_out, ask.key.into()));
            return None;
        }
        let peer = ctx.connect(addr, MAX_ANSWER);
        let conn = self.conns.insert(PurgeConn { peer, backend, awaiting: VecDeque::new(), timer_armed: false });
        self.by_peer.insert(peer, conn);
        self.of_backend[backend] = Some(conn);
        self.send(ctx, conn, fan_out, ask)
    }

    fn send<T>(&mut self, ctx: &mut Ctx<T>, conn: usize, fan_out: usize, ask: &Ask<'_>) -> Option<usize> {
        let c = self.conns.get_mut(conn)?;
        if let Some(out) = ctx.peer_output(c.peer) {
            write_text_request(out, "PURGE", Some(ask.key));
        }
        c.awaiting.push_back((fan_out, ask.deadline));
        if c.timer_armed {
            return None;
        }
        c.timer_armed = true;
        Some(conn)
    }

    /// A line on `peer`: the answer it is, in `heard`. False when `peer` is no PURGE
    /// connection.
    pub fn on_line<T>(&mut self, ctx: &mut Ctx<T>, peer: PeerId, line: &[u8], heard: &mut Vec<Heard1>) -> bool {
        let Some(conn) = self.by_peer.get(peer).copied() else { return false };
        let Some(c) = self.conns.get_mut(conn) else { return false };
        let Some((fan_out, _)) = c.awaiting.pop_front() else {
            self.close(ctx, conn, heard); // an answer nobody asked for
            return true;
        };
        let Some(Heard::Purge { held }) = interpret(Purpose::Purge(fan_out), line) else {
            heard.push(Heard1::Silent { fan_out });
            self.close(ctx, conn, heard); // out of step: no later answer is trusted
            return true;
        };
        heard.push(Heard1::Answered { fan_out, held });
        if c.awaiting.is_empty() {
            self.close(ctx, conn, heard);
        }
        true
    }

    /// The driver ended `peer` (refused, reset, closed, a line too long): what it still owed
    /// is not heard — or, when it could not be made for want of local resources, could not be
    /// asked. False when `peer` is no PURGE connection.
    pub fn on_closed(&mut self, peer: PeerId, closed: &PeerClosed, heard: &mut Vec<Heard1>) -> bool {
        let Some(conn) = self.by_peer.remove(peer) else { return false };
        let short =
            matches!(&closed.end, PeerEnd::ConnectFailed(e) if Failure::of_connect(e) == Failure::CannotConnect);
        if let Some(c) = self.forget(conn) {
            let outcome = |fan_out| if short { Heard1::Short { fan_out } } else { Heard1::Silent { fan_out } };
            heard.extend(c.awaiting.into_iter().map(|(fan_out, _)| outcome(fan_out)));
        }
        true
    }

    /// `conn`'s deadline timer fired at `now`: a connection whose oldest answer is overdue is
    /// closed. Returns when to fire next, if it still waits for answers.
    pub fn on_deadline<T>(
        &mut self,
        ctx: &mut Ctx<T>,
        conn: usize,
        now: Instant,
        heard: &mut Vec<Heard1>,
    ) -> Option<Instant> {
        let c = self.conns.get_mut(conn)?;
        c.timer_armed = false;
        let &(_, due) = c.awaiting.front()?;
        if due <= now {
            self.close(ctx, conn, heard);
            return None;
        }
        c.timer_armed = true;
        Some(due)
    }

    /// The deadline of `conn`'s oldest answer, for a timer armed after [`PurgeLinks::ask`].
    pub fn due(&self, conn: usize) -> Option<Instant> {
        self.conns.get(conn)?.awaiting.front().map(|(_, due)| *due)
    }

    /// Closes `conn`: what it still owed is not heard. Its place goes to the next proxy in
    /// line (whose queued fan-outs are then sent; see [`PurgeLinks::next_in_line`]).
    fn close<T>(&mut self, ctx: &mut Ctx<T>, conn: usize, heard: &mut Vec<Heard1>) {
        let Some(c) = self.forget(conn) else { return };
        self.by_peer.remove(c.peer);
        ctx.close_peer(c.peer);
        heard.extend(c.awaiting.into_iter().map(|(fan_out, _)| Heard1::Silent { fan_out }));
    }

    /// `conn` is gone: it no longer takes its proxy's PURGEs nor a place in the budget.
    fn forget(&mut self, conn: usize) -> Option<PurgeConn> {
        let c = self.conns.try_remove(conn)?;
        if let Some(slot) = self.of_backend.get_mut(c.backend) {
            *slot = None;
        }
        Some(c)
    }

    /// `backend`'s connection, for tests.
    #[cfg(test)]
    fn peer_of(&self, backend: usize) -> Option<PeerId> {
        let conn = self.of_backend.get(backend).copied().flatten()?;
        self.conns.get(conn).map(|c| c.peer)
    }

    /// A proxy in line may have a connection now: returns it with its queued fan-outs, to
    /// [`PurgeLinks::ask`] again (each is counted as asked already).
    pub fn next_in_line(&mut self) -> Option<(usize, VecDeque<Waiting>)> {
        if self.conns.len() >= self.budget {
            return None;
        }
        let backend = self.in_line.pop_front()?;
        Some((backend, std::mem::take(&mut self.queued[backend])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_ctx::with_ctx;
    use std::net::TcpListener;
    use std::time::Duration;

    #[test]
    fn proxies_past_the_budget_wait_in_line_and_share_one_connection_each() {
        let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        with_ctx::<()>(|ctx| {
            let mut links = PurgeLinks::new(2);
            let now = Instant::now();
            let ask = Ask { key: "k", deadline: now + Duration::from_secs(1) };
            // Two fan-outs to three proxies: proxies 0 and 1 get a connection each, carrying
            // both PURGEs; proxy 2 waits.
            for fan_out in 0..2 {
                for (backend, addr) in addrs.iter().enumerate() {
                    let arm = links.ask(ctx, &ask, (backend, *addr), fan_out);
                    assert_eq!(arm.is_some(), fan_out == 0 && backend < 2, "one timer per connection");
                }
            }
            assert_eq!(links.open_conns(), 2);
            assert!(links.next_in_line().is_none(), "no place free");
            // Proxy 0's connection times out: what it owed is not heard, and proxy 2 gets its place.
            let mut heard = Vec::new();
            assert_eq!(links.on_deadline(ctx, 0, now + Duration::from_secs(2), &mut heard), None);
            assert_eq!(heard, vec![Heard1::Silent { fan_out: 0 }, Heard1::Silent { fan_out: 1 }]);
            let (backend, waiting) = links.next_in_line().unwrap();
            assert_eq!(backend, 2);
            assert_eq!(waiting.iter().map(|(f, _)| *f).collect::<Vec<_>>(), vec![0, 1]);
            assert!(links.next_in_line().is_none());
        });
    }

    #[test]
    fn a_connection_that_cannot_be_made_leaves_its_purges_unheard_or_unasked() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 1));
        with_ctx::<()>(|ctx| {
            let mut links = PurgeLinks::new(4);
            let ask = Ask { key: "k", deadline: Instant::now() + Duration::from_secs(1) };
            for fan_out in 0..2 {
                for backend in 0..2 {
                    links.ask(ctx, &ask, (backend, addr), fan_out);
                }
            }
            let failed = |e| PeerClosed { end: PeerEnd::ConnectFailed(e), received: 0, was_connected: false };
            let mut heard = Vec::new();
            // Refused: the proxy holds nothing, it is not counted.
            let refused = failed(std::io::ErrorKind::ConnectionRefused.into());
            assert!(links.on_closed(links.peer_of(0).unwrap(), &refused, &mut heard));
            assert_eq!(heard, vec![Heard1::Silent { fan_out: 0 }, Heard1::Silent { fan_out: 1 }]);
            // Out of descriptors: the proxy could not be asked, so the PURGE is OVERLOADED.
            heard.clear();
            let short = failed(std::io::Error::from_raw_os_error(libc::EMFILE));
            assert!(links.on_closed(links.peer_of(1).unwrap(), &short, &mut heard));
            assert_eq!(heard, vec![Heard1::Short { fan_out: 0 }, Heard1::Short { fan_out: 1 }]);
            assert_eq!(links.open_conns(), 0);
            assert!(!links.involve(0) && !links.involve(1));
        });
    }
}
