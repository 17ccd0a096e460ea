//! The connections to one proxy, and which one the next GET goes on.
//!
//! A proxy that answered HEALTH with a role takes JSON requests tagged with our ids, many at
//! once on one connection ("multiplexed"). A proxy stops reading a connection that owes it
//! `max_pipeline` (1,024) answers, so one shared connection would let queued misses starve the
//! hits behind them: each multiplexed connection carries at most [`MUX_DEPTH`] GETs, and more
//! connections are opened (up to [`MAX_MUX`]) as they fill. A simpler proxy gets one text-form
//! request at a time per connection; idle ones are reused. Plain data: the service opens and
//! closes the sockets this decides on.

/// GETs outstanding on one multiplexed connection before another is opened: well below a
/// proxy's 1,024 max_pipeline, so a connection is always read by the proxy.
pub const MUX_DEPTH: usize = 256;
/// Multiplexed connections per proxy; past `MUX_DEPTH × MAX_MUX` GETs in flight to one proxy
/// (more than the default `--max-pending`), the least loaded one takes more.
pub const MAX_MUX: usize = 16;
/// Idle single-request connections kept per proxy.
const MAX_IDLE: usize = 64;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnKind {
    /// Many requests at once, tagged with balancer ids.
    Mux,
    /// One text-form request at a time.
    Single,
}

/// Where the next GET to this proxy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// An open connection; `idle` when nothing was outstanding on it.
    Use { conn: usize, idle: bool },
    /// A new connection of this kind.
    Open(ConnKind),
}

#[derive(Debug, Default)]
pub struct Pool {
    mux: Vec<usize>,
    idle: Vec<usize>,
}

impl Pool {
    /// Picks a connection for one more GET; `owed(conn)` is what a connection waits for now.
    pub fn route(&mut self, multiplexed: bool, owed: impl Fn(usize) -> usize) -> Route {
        if !multiplexed {
            return match self.idle.pop() {
                Some(conn) => Route::Use { conn, idle: true },
                None => Route::Open(ConnKind::Single),
            };
        }
        let least = self.mux.iter().copied().map(|conn| (owed(conn), conn)).min();
        match least {
            Some((n, conn)) if n < MUX_DEPTH || self.mux.len() >= MAX_MUX => Route::Use { conn, idle: n == 0 },
            _ => Route::Open(ConnKind::Mux),
        }
    }

    /// A connection of `kind` was opened for a GET.
    pub fn opened(&mut self, conn: usize, kind: ConnKind) {
        if kind == ConnKind::Mux {
            self.mux.push(conn);
        }
    }

    /// A single-request connection answered and may take the next GET. False when enough
    /// are idle already (the caller closes it).
    pub fn release(&mut self, conn: usize) -> bool {
        if self.idle.contains(&conn) {
            return true;
        }
        if self.idle.len() >= MAX_IDLE {
            return false;
        }
        self.idle.push(conn);
        true
    }

    pub fn closed(&mut self, conn: usize) {
        self.mux.retain(|c| *c != conn);
        self.idle.retain(|c| *c != conn);
    }

    pub fn open_mux(&self) -> usize {
        self.mux.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multiplexed_connections_fill_to_their_depth_then_another_opens() {
        let mut pool = Pool::default();
        assert_eq!(pool.route(true, |_| 0), Route::Open(ConnKind::Mux));
        pool.opened(7, ConnKind::Mux);
        assert_eq!(pool.route(true, |_| 0), Route::Use { conn: 7, idle: true });
        assert_eq!(pool.route(true, |_| 3), Route::Use { conn: 7, idle: false });
        assert_eq!(pool.route(true, |_| MUX_DEPTH), Route::Open(ConnKind::Mux));
        pool.opened(9, ConnKind::Mux);
        // The least loaded one takes the GET: a hit never waits behind a full connection.
        let owed = |conn| if conn == 7 { MUX_DEPTH } else { 5 };
        assert_eq!(pool.route(true, owed), Route::Use { conn: 9, idle: false });
        pool.closed(9);
        assert_eq!(pool.open_mux(), 1);
    }

    #[test]
    fn the_number_of_multiplexed_connections_is_bounded() {
        let mut pool = Pool::default();
        for conn in 0..MAX_MUX {
            assert_eq!(pool.route(true, |_| MUX_DEPTH), Route::Open(ConnKind::Mux));
            pool.opened(conn, ConnKind::Mux);
        }
        assert!(matches!(pool.route(true, |_| MUX_DEPTH + 1), Route::Use { .. }));
    }

    #[test]
    fn single_request_connections_are_reused_when_idle() {
        let mut pool = Pool::default();
        assert_eq!(pool.route(false, |_| 0), Route::Open(ConnKind::Single));
        pool.opened(3, ConnKind::Single);
        assert!(pool.release(3));
        assert_eq!(pool.route(false, |_| 0), Route::Use { conn: 3, idle: true });
        assert_eq!(pool.route(false, |_| 0), Route::Open(ConnKind::Single), "3 is busy again");
        for conn in 0..MAX_IDLE {
            assert!(pool.release(100 + conn));
        }
        assert!(!pool.release(1), "bounded");
        pool.closed(100);
        assert!(pool.release(1));
    }
}
