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

use common::framing::Frame;
use common::protocol::write_text_request;
use common::upstream::{Progress, Upstream};
use mio::{Registry, Token};
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
    up: Upstream,
    backend: usize,
    /// Fan-outs sent on it, in order, with the deadline of each answer.
    awaiting: VecDeque<(usize, Instant)>,
    /// A deadline timer is pending for it.
    timer_armed: bool,
}

/// Where the caller's key, addresses and deadlines come from.
pub struct Ask<'a> {
    pub registry: &'a Registry,
    pub key: &'a str,
    pub deadline: Instant,
}

/// A fan-out (with its key) waiting for a proxy to get a connection.
pub type Waiting = (usize, Box<str>);

pub struct PurgeLinks {
    conns: Slab<PurgeConn>,
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
    /// if any. `Err`: it could not be asked (refused: the proxy holds nothing; otherwise
    /// short of resources).
    pub fn ask(
        &mut self,
        ask: &Ask<'_>,
        (backend, addr): (usize, SocketAddr),
        fan_out: usize,
        token: impl Fn(usize) -> Token,
    ) -> Result<Option<usize>, Failure> {
        self.grow(backend);
        if let Some(conn) = self.of_backend[backend] {
            return Ok(self.send(conn, fan_out, ask));
        }
        if self.conns.len() >= self.budget {
            if self.queued[backend].is_empty() {
                self.in_line.push_back(backend);
            }
            self.queued[backend].push_back((fan_out, ask.key.into()));
            return Ok(None);
        }
        let conn = self.open(ask.registry, backend, addr, &token)?;
        Ok(self.send(conn, fan_out, ask))
    }

    fn open(
        &mut self,
        registry: &Registry,
        backend: usize,
        addr: SocketAddr,
        token: &impl Fn(usize) -> Token,
    ) -> Result<usize, Failure> {
        let entry = self.conns.vacant_entry();
        let conn = entry.key();
        let up = Upstream::connect(addr, registry, token(conn)).map_err(|e| Failure::of_connect(&e))?;
        entry.insert(PurgeConn { up, backend, awaiting: VecDeque::new(), timer_armed: false });
        self.of_backend[backend] = Some(conn);
        Ok(conn)
    }

    fn send(&mut self, conn: usize, fan_out: usize, ask: &Ask<'_>) -> Option<usize> {
        let c = self.conns.get_mut(conn)?;
        write_text_request(c.up.out_buf(), "PURGE", Some(ask.key));
        c.awaiting.push_back((fan_out, ask.deadline));
        if c.timer_armed {
            return None;
        }
        c.timer_armed = true;
        Some(conn)
    }

    /// Writes what was queued on `conn` (after a batch of [`PurgeLinks::ask`]).
    pub fn flush_all(&mut self, registry: &Registry, heard: &mut Vec<Heard1>) {
        let failed: Vec<usize> =
            self.conns.iter_mut().filter_map(|(i, c)| c.up.flush().is_err().then_some(i)).collect();
        for conn in failed {
            self.close(registry, conn, heard);
        }
    }

    /// Readiness on `conn`: the answers that came, in `heard`.
    pub fn on_event(&mut self, registry: &Registry, conn: usize, heard: &mut Vec<Heard1>) {
        let Some(c) = self.conns.get_mut(conn) else { return };
        match c.up.on_ready(MAX_ANSWER) {
            Ok(Progress::Connecting) => return,
            Ok(Progress::Ready) => {}
            Err(_) => return self.close(registry, conn, heard),
        }
        while let Frame::Line(line, used) = c.up.frame(MAX_ANSWER) {
            let Some((fan_out, _)) = c.awaiting.pop_front() else {
                return self.close(registry, conn, heard); // an answer nobody asked for
            };
            let Some(Heard::Purge { held }) = interpret(Purpose::Purge(fan_out), line) else {
                heard.push(Heard1::Silent { fan_out });
                return self.close(registry, conn, heard); // out of step: no later answer is trusted
            };
            heard.push(Heard1::Answered { fan_out, held });
            c.up.consume(used);
        }
        if c.awaiting.is_empty() || c.up.is_eof() || matches!(c.up.frame(MAX_ANSWER), Frame::TooLong) {
            self.close(registry, conn, heard);
        }
    }

    /// `conn`'s deadline timer fired at `now`: a connection whose oldest answer is overdue is
    /// closed. Returns when to fire next, if it still waits for answers.
    pub fn on_deadline(
        &mut self,
        registry: &Registry,
        conn: usize,
        now: Instant,
        heard: &mut Vec<Heard1>,
    ) -> Option<Instant> {
        let c = self.conns.get_mut(conn)?;
        c.timer_armed = false;
        let &(_, due) = c.awaiting.front()?;
        if due <= now {
            self.close(registry, conn, heard);
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
    fn close(&mut self, registry: &Registry, conn: usize, heard: &mut Vec<Heard1>) {
        let Some(mut c) = self.conns.try_remove(conn) else { return };
        c.up.deregister(registry);
        if let Some(slot) = self.of_backend.get_mut(c.backend) {
            *slot = None;
        }
        heard.extend(c.awaiting.drain(..).map(|(fan_out, _)| Heard1::Silent { fan_out }));
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
    use std::net::TcpListener;
    use std::time::Duration;

    #[test]
    fn proxies_past_the_budget_wait_in_line_and_share_one_connection_each() {
        let poll = mio::Poll::new().unwrap();
        let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<SocketAddr> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let mut links = PurgeLinks::new(2);
        let now = Instant::now();
        let ask = Ask { registry: poll.registry(), key: "k", deadline: now + Duration::from_secs(1) };
        // Two fan-outs to three proxies: proxies 0 and 1 get a connection each, carrying
        // both PURGEs; proxy 2 waits.
        for fan_out in 0..2 {
            for (backend, addr) in addrs.iter().enumerate() {
                let arm = links.ask(&ask, (backend, *addr), fan_out, Token).unwrap();
                assert_eq!(arm.is_some(), fan_out == 0 && backend < 2, "one timer per connection");
            }
        }
        assert_eq!(links.open_conns(), 2);
        assert!(links.next_in_line().is_none(), "no place free");
        // Proxy 0's connection times out: what it owed is not heard, and proxy 2 gets its place.
        let mut heard = Vec::new();
        assert_eq!(links.on_deadline(poll.registry(), 0, now + Duration::from_secs(2), &mut heard), None);
        assert_eq!(heard, vec![Heard1::Silent { fan_out: 0 }, Heard1::Silent { fan_out: 1 }]);
        let (backend, waiting) = links.next_in_line().unwrap();
        assert_eq!(backend, 2);
        assert_eq!(waiting.iter().map(|(f, _)| *f).collect::<Vec<_>>(), vec![0, 1]);
        assert!(links.next_in_line().is_none());
    }
}
