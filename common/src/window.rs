//! The forwarding window of each client connection (SPEC 3.8).
//!
//! The output bound counts the bytes queued for a client, but a request forwarded upstream
//! (a balancer's GET to a proxy, a proxy's origin fetch) brings its answer back whether or
//! not the client reads: a client that pipelines 1,000 GETs of big values and never reads
//! would have all 1,000 answers land in its output. So a service forwards a client's next
//! request only while that connection's window is open: its output is within its bound
//! (`Ctx::has_room`) and the answers already on their way fit in the output limit too,
//! judged by the largest answer it got lately (at least one is always allowed, at most
//! [`MAX_WINDOW`]). The other requests wait here, parked in order, and go on as answers
//! arrive or the output drains (`Ctx::notify_room`). Memory per connection is then about
//! the output limit plus the answers in flight, which fit in the output limit too.
//!
//! Plain bookkeeping, no sockets: the service asks [`Windows::try_forward`] before sending,
//! reports each answer with [`Windows::answered`], and moves parked requests on with
//! [`Windows::next_resumable`] and [`Windows::unpark`]. On a connection under its bound the
//! check is an index into a table and a few comparisons.

use std::collections::VecDeque;

use crate::server::ClientId;

/// Requests one connection may have forwarded at once, however small their answers.
pub const MAX_WINDOW: usize = 64;
/// Until a connection has seen answers, each is assumed to weigh the output limit divided by
/// this: a fresh connection may forward 16 at once (pipelining works from the start, and a
/// burst of big answers costs at most 16 of them).
const FIRST_WINDOW: usize = 16;

#[derive(Debug)]
struct Conn<P> {
    client: ClientId,
    /// Requests forwarded and not yet answered.
    forwarded: usize,
    /// The largest answer lately: the biggest seen, decaying by an eighth per answer.
    weight: usize,
    parked: VecDeque<P>,
    /// In the resume list already.
    resuming: bool,
}

impl<P> Conn<P> {
    fn fits(&self, has_room: bool, limit: usize) -> bool {
        has_room
            && (self.forwarded == 0
                || (self.forwarded < MAX_WINDOW && (self.forwarded + 1).saturating_mul(self.weight) <= limit))
    }
}

/// For [`Windows::refetch`]: whether an answer in place `a` (`Ticket::order`) is due before
/// one in place `b`: one without an id before any later one; those with ids wait for nobody,
/// so they go last.
pub fn due_before(a: Option<u64>, b: Option<u64>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a < b,
        (Some(_), None) => true,
        (None, _) => false,
    }
}

/// The windows of every client connection; `P` is a parked request.
#[derive(Debug)]
pub struct Windows<P> {
    /// Indexed by [`ClientId::index`].
    conns: Vec<Option<Conn<P>>>,
    /// The output limit the answers in flight must fit in.
    limit: usize,
    parked: usize,
    /// Connections with parked requests that may go on now.
    resume: Vec<ClientId>,
    /// Parked requests of connections that closed, for the service to drop.
    orphans: Vec<P>,
}

impl<P> Windows<P> {
    pub fn new(output_limit: usize) -> Self {
        Windows { conns: Vec::new(), limit: output_limit.max(1), parked: 0, resume: Vec::new(), orphans: Vec::new() }
    }

    /// The entry of `client`, made fresh when its slot held none or a gone connection's
    /// (whose parked requests become orphans).
    fn conn(&mut self, client: ClientId) -> &mut Conn<P> {
        let index = client.index();
        if self.conns.len() <= index {
            self.conns.resize_with(index + 1, || None);
        }
        let weight = self.limit / FIRST_WINDOW;
        let slot = &mut self.conns[index];
        if slot.as_ref().is_some_and(|c| c.client != client) {
            if let Some(gone) = slot.take() {
                self.parked -= gone.parked.len();
                self.orphans.extend(gone.parked);
            }
        }
        slot.get_or_insert_with(|| Conn { client, forwarded: 0, weight, parked: VecDeque::new(), resuming: false })
    }

    fn live(&mut self, client: ClientId) -> Option<&mut Conn<P>> {
        self.conns.get_mut(client.index())?.as_mut().filter(|c| c.client == client)
    }

    /// Whether `client` may forward one more request now (`has_room`: `Ctx::has_room`); if
    /// so it is counted as forwarded until [`Windows::answered`]. If not, park it.
    pub fn try_forward(&mut self, client: ClientId, has_room: bool) -> bool {
        let limit = self.limit;
        let c = self.conn(client);
        if !c.parked.is_empty() || !c.fits(has_room, limit) {
            return false;
        }
        c.forwarded += 1;
        true
    }

    /// Parks a request [`Windows::try_forward`] refused. The caller asks `Ctx::notify_room`
    /// when the client had no room; otherwise an answer on its way reopens the window.
    pub fn park(&mut self, client: ClientId, request: P) {
        let c = self.conn(client);
        c.parked.push_back(request);
        let idle = c.forwarded == 0 && !c.resuming;
        if idle {
            // Nothing in flight will reopen it: look again at the end of the turn.
            c.resuming = true;
            self.resume.push(client);
        }
        self.parked += 1;
    }

    /// Answers up to this size are always delivered; a longer one that lands on a connection
    /// already over its bound is sent for again later instead (see [`Windows::refetch`]), so
    /// a wrong guess costs at most [`MAX_WINDOW`] of these beyond the output limit.
    pub fn small_answer(&self) -> usize {
        self.limit / MAX_WINDOW
    }

    /// A forwarded request of `client` came back with a long answer (`bytes`) while its
    /// output was over its bound: the answer is dropped and the request goes first among
    /// the parked ones, to be sent again once the client drains (SPEC 3.8: memory per
    /// connection stays about the output limit plus one answer, however wrong the window's
    /// guess was — tiny answers first, then a pipeline of huge ones).
    /// `before(request, parked)`: whether it must go before that parked request (its answer
    /// is due earlier), so that the answer others wait behind is always asked for first.
    pub fn refetch(&mut self, client: ClientId, bytes: usize, request: P, before: impl Fn(&P, &P) -> bool) {
        self.answered(client, bytes);
        let Some(c) = self.live(client) else {
            self.orphans.push(request);
            return;
        };
        let at = c.parked.iter().position(|p| before(&request, p)).unwrap_or(c.parked.len());
        c.parked.insert(at, request);
        if !c.resuming {
            c.resuming = true;
            self.resume.push(client);
        }
        self.parked += 1;
    }

    /// One forwarded request of `client` is answered, with `bytes` (0 when it failed).
    pub fn answered(&mut self, client: ClientId, bytes: usize) {
        let Some(c) = self.live(client) else { return };
        c.forwarded = c.forwarded.saturating_sub(1);
        c.weight = bytes.max(c.weight - c.weight / 8);
        if !c.parked.is_empty() && !c.resuming {
            c.resuming = true;
            self.resume.push(client);
        }
    }

    /// A connection whose parked requests may go on: call [`Windows::unpark`] for it.
    pub fn next_resumable(&mut self) -> Option<ClientId> {
        let client = self.resume.pop()?;
        if let Some(c) = self.live(client) {
            c.resuming = false;
        }
        Some(client)
    }

    /// The next parked request of `client` if its window is open now (it is then counted as
    /// forwarded).
    pub fn unpark(&mut self, client: ClientId, has_room: bool) -> Option<P> {
        let limit = self.limit;
        let c = self.live(client)?;
        if !c.fits(has_room, limit) {
            return None;
        }
        let request = c.parked.pop_front()?;
        c.forwarded += 1;
        self.parked -= 1;
        Some(request)
    }

    pub fn has_parked(&mut self, client: ClientId) -> bool {
        self.live(client).is_some_and(|c| !c.parked.is_empty())
    }

    /// The parked requests of `client`, which has gone: the service drops them.
    pub fn take_parked(&mut self, client: ClientId) -> VecDeque<P> {
        let Some(c) = self.live(client) else { return VecDeque::new() };
        let parked = std::mem::take(&mut c.parked);
        self.parked -= parked.len();
        parked
    }

    /// A parked request of a connection that closed, for the service to drop.
    pub fn take_orphan(&mut self) -> Option<P> {
        self.orphans.pop()
    }

    /// Requests parked now, over every connection (they count against `--max-pending`).
    pub fn parked(&self) -> usize {
        self.parked + self.orphans.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: usize = 256 * 1024;

    #[test]
    fn a_fresh_connection_forwards_a_first_window_then_parks() {
        let mut w = Windows::new(LIMIT);
        let c = ClientId::for_test(3, 1);
        for _ in 0..FIRST_WINDOW {
            assert!(w.try_forward(c, true));
        }
        assert!(!w.try_forward(c, true), "16 answers of unknown size are on their way");
        w.park(c, 1);
        assert!(!w.try_forward(c, true), "behind a parked request, in order");
        w.park(c, 2);
        assert_eq!(w.parked(), 2);
        assert_eq!(w.next_resumable(), None, "answers on their way reopen it");
        // A small answer: the guess shrinks by an eighth, room for two more, parked first.
        w.answered(c, 100);
        assert_eq!(w.next_resumable(), Some(c));
        assert_eq!(w.unpark(c, true), Some(1));
        assert_eq!(w.unpark(c, true), Some(2));
        assert_eq!(w.parked(), 0);
    }

    #[test]
    fn big_answers_shrink_the_window_to_one_and_no_room_closes_it() {
        let mut w = Windows::new(LIMIT);
        let c = ClientId::for_test(0, 7);
        assert!(w.try_forward(c, true));
        w.answered(c, LIMIT);
        assert!(w.try_forward(c, true), "one is always allowed");
        assert!(!w.try_forward(c, true), "a second answer that big would not fit");
        w.answered(c, LIMIT);
        assert!(!w.try_forward(c, false), "the output is over its bound");
        w.park(c, 9);
        assert_eq!(w.next_resumable(), Some(c), "nothing in flight: looked at again");
        assert_eq!(w.unpark(c, false), None);
        assert_eq!(w.unpark(c, true), Some(9), "room again (on_room)");
    }

    #[test]
    fn small_answers_open_the_window_up_to_its_maximum() {
        let mut w: Windows<u32> = Windows::new(LIMIT);
        let c = ClientId::for_test(1, 1);
        for _ in 0..100 {
            assert!(w.try_forward(c, true));
            w.answered(c, 80);
        }
        let mut open = 0;
        while w.try_forward(c, true) {
            open += 1;
        }
        assert_eq!(open, MAX_WINDOW);
    }

    #[test]
    fn a_refetched_request_goes_first_and_the_guess_grows() {
        let mut w = Windows::new(LIMIT);
        let c = ClientId::for_test(4, 1);
        assert!(w.try_forward(c, true));
        assert!(w.try_forward(c, true));
        w.park(c, 3);
        w.refetch(c, LIMIT * 4, 2, |a, b| a < b);
        w.refetch(c, LIMIT * 4, 1, |a, b| a < b);
        assert_eq!(w.parked(), 3);
        assert_eq!(w.next_resumable(), Some(c));
        assert_eq!(w.unpark(c, false), None, "over its bound");
        // Nothing in flight now: one goes, the one due first.
        assert_eq!(w.unpark(c, true), Some(1));
        assert_eq!(w.unpark(c, true), None, "a huge answer is on its way");
        let gone = ClientId::for_test(5, 1);
        w.refetch(gone, 10, 7, |_, _| true);
        assert_eq!(w.take_orphan(), Some(7), "a client never seen: dropped by the service");
    }

    #[test]
    fn a_gone_connections_parked_requests_are_handed_back() {
        let mut w = Windows::new(LIMIT);
        let old = ClientId::for_test(2, 1);
        w.try_forward(old, false);
        w.park(old, 5);
        assert_eq!(w.take_parked(old).into_iter().collect::<Vec<_>>(), vec![5]);
        w.park(old, 6);
        // A new connection in the same slot: the old one's requests are orphans.
        let new = ClientId::for_test(2, 2);
        assert!(w.try_forward(new, true));
        assert_eq!(w.take_orphan(), Some(6));
        assert_eq!(w.parked(), 0);
        w.answered(old, 10); // a late answer for the old connection changes nothing
        assert!(w.try_forward(new, true));
    }
}
