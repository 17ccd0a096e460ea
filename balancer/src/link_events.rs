//! What arrives on the connections that carry GETs (SPEC 3.5, 3.6): each answer line, handed
//! to the in-flight book, and the end of a connection, which fails or resends what it carried.
//! A child of the service module.

use common::peer::{PeerClosed, PeerLine};
use common::server::Ctx;

use super::{Balancer, Timer};
use crate::attempts::Attempt;
use crate::failure::Failure;
use crate::pool::ConnKind;

impl Balancer {
    /// One answer line on connection `conn`. Answers of 32 KiB or more are relayed from the
    /// input buffer they were read into, not copied.
    pub(super) fn on_link_line(&mut self, ctx: &mut Ctx<Timer>, conn: usize, line: PeerLine<'_>) {
        let Some(link) = self.links.get(conn) else { return };
        let (backend, kind) = (link.backend, link.kind);
        let shared = line.share(line.bytes());
        let answered = self.core.on_answer(ctx, (conn, backend, kind), line.bytes(), shared);
        if let Some(link) = self.links.get_mut(conn) {
            link.answered += 1;
        }
        match answered {
            Ok(None) => {}
            Ok(Some(garbled)) => self.fail(ctx, garbled, Failure::Garbage),
            Err(failure) => return self.lose(ctx, conn, failure),
        }
        if kind == ConnKind::Single
            && self.core.book.owed_by(conn) == 0
            && self.links.get(conn).is_some()
            && !self.core.backends[backend].pool.release(conn)
        {
            self.lose(ctx, conn, Failure::Closed); // enough idle ones kept already
        }
    }

    /// The driver ended connection `conn` to `backend` (refused, reset, closed by the proxy,
    /// an answer too long).
    pub(super) fn on_link_closed(&mut self, ctx: &mut Ctx<Timer>, conn: usize, backend: usize, closed: &PeerClosed) {
        self.lost(ctx, conn, backend, closed.received, Failure::of_end(closed));
    }

    /// Closes connection `conn`, failing (or resending) what it carried.
    pub(super) fn lose(&mut self, ctx: &mut Ctx<Timer>, conn: usize, failure: Failure) {
        if let Some((link, received)) = self.links.close(ctx, conn) {
            self.lost(ctx, conn, link.backend, received, failure);
        }
    }

    /// Connection `conn` to `backend` is gone, `received` bytes into its life. Its GETs fail
    /// — except those sent on it after it idled, when it closed without a byte more: the
    /// proxy had closed it, which is no failure (SPEC 3.5), and they go again on a new
    /// connection. A lost connection counts as one failure of its proxy however many GETs it
    /// carried (so `--fall` counts events, not requests).
    fn lost(&mut self, ctx: &mut Ctx<Timer>, conn: usize, backend: usize, received: u64, failure: Failure) {
        self.core.backends[backend].pool.closed(conn);
        let mut counted = false;
        for a in self.core.book.conn_lost(conn) {
            let closed_while_idle =
                matches!(failure, Failure::Closed | Failure::Reset) && a.reused_at == Some(received);
            if !closed_while_idle {
                if !std::mem::replace(&mut counted, true) {
                    self.core.note_failure(a.backend, failure);
                }
                self.retry(ctx, a, failure);
                continue;
            }
            self.core.counters.reopened += 1;
            let b = &mut self.core.backends[a.backend];
            b.in_flight = b.in_flight.saturating_sub(1);
            b.forwarded = b.forwarded.saturating_sub(1);
            if let Err(failure) = self.send(ctx, a.backend, a.request, true) {
                self.fail(ctx, Attempt { reused_at: None, ..a }, failure);
            }
        }
    }
}
