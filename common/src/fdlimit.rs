//! How many client connections the file-descriptor limit leaves room for (SPEC 3.8).
//!
//! A service needs descriptors for its own upstream connections (a proxy's origin
//! connections, a balancer's proxy connections). If clients could take every descriptor, the
//! next cold GET would fail with "Too many open files". So at start-up the loop reads the
//! soft `RLIMIT_NOFILE` (from /proc/self/limits: no unsafe code needed) and the descriptors
//! already open, keeps `reserve` of the rest for upstream use, and admits clients only into
//! what remains; past that, a new client is answered OVERLOADED and closed. Warnings about it
//! are logged at most once a second.

use std::time::{Duration, Instant};

use log::warn;

/// The least time between two warnings about descriptors.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub struct DescriptorBudget {
    client_cap: usize,
    /// The descriptors kept for upstream connections (less than asked under a small limit).
    reserve: usize,
    last_log: Option<Instant>,
}

impl DescriptorBudget {
    /// Measures the limit and the descriptors open now. Without /proc, clients are not capped
    /// here (`--max-connections` still applies).
    pub fn measure(reserve: usize) -> Self {
        let (client_cap, reserve) = match (soft_nofile_limit(), open_descriptors()) {
            (Some(limit), Some(open)) => (Self::cap_for(limit, open, reserve), Self::reserve_for(limit, open, reserve)),
            _ => (usize::MAX, reserve),
        };
        DescriptorBudget { client_cap, reserve, last_log: None }
    }

    /// Clients that fit in `limit` descriptors with `open` in use and `reserve` kept back. When
    /// the limit is too small for the whole reserve, clients and reserve share what is free.
    pub fn cap_for(limit: u64, open: usize, reserve: usize) -> usize {
        let free = usize::try_from(limit).unwrap_or(usize::MAX).saturating_sub(open);
        let reserve = reserve.min(free / 2);
        free.saturating_sub(reserve).max(1)
    }

    /// The reserve kept out of `limit` with `open` in use, `reserve` asked for.
    pub fn reserve_for(limit: u64, open: usize, reserve: usize) -> usize {
        let free = usize::try_from(limit).unwrap_or(usize::MAX).saturating_sub(open);
        reserve.min(free / 2)
    }

    /// Descriptors kept for the service's own upstream connections.
    pub fn reserve(&self) -> usize {
        self.reserve
    }

    pub fn client_cap(&self) -> usize {
        self.client_cap
    }

    /// True at most once per second: whether a warning may be logged now.
    pub fn may_log(&mut self, now: Instant) -> bool {
        match self.last_log {
            Some(at) if now.saturating_duration_since(at) < LOG_INTERVAL => false,
            _ => {
                self.last_log = Some(now);
                true
            }
        }
    }

    /// A client was refused for lack of descriptors: say so, at most once a second.
    pub fn warn_short(&mut self, now: Instant, clients: usize) {
        if self.may_log(now) {
            warn!(
                "refusing new connections: {clients} clients use what the descriptor limit leaves \
                 after the reserve for upstream connections"
            );
        }
    }
}

/// The soft limit on open files, from /proc/self/limits ("Max open files  1024  4096  files").
fn soft_nofile_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line.strip_prefix("Max open files")?.split_whitespace().next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

fn open_descriptors() -> Option<usize> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_comes_off_the_free_descriptors() {
        assert_eq!(DescriptorBudget::cap_for(1024, 10, 64), 950);
        // Too small for the whole reserve: share.
        assert_eq!(DescriptorBudget::cap_for(64, 10, 64), 27);
        assert_eq!(DescriptorBudget::cap_for(5, 10, 64), 1);
        assert_eq!(DescriptorBudget::reserve_for(1024, 10, 64), 64);
        assert_eq!(DescriptorBudget::reserve_for(64, 10, 64), 27);
        assert_eq!(DescriptorBudget::cap_for(u64::MAX, 10, 64), usize::MAX - 74);
        assert!(soft_nofile_limit().is_some());
    }

    #[test]
    fn warnings_are_rate_limited() {
        let mut budget = DescriptorBudget { client_cap: 1, reserve: 1, last_log: None };
        let t = Instant::now();
        assert!(budget.may_log(t));
        assert!(!budget.may_log(t + Duration::from_millis(500)));
        assert!(budget.may_log(t + Duration::from_millis(1000)));
    }
}
