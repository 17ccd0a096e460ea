//! The rise/fall health state machine of one proxy (SPEC 3.6), as HAProxy does it: `fall`
//! consecutive failures take an up proxy down, `rise` consecutive successes bring a down
//! proxy back. It counts events only; the caller decides what an event is (a probe
//! answered in time, a refused connection, a timed-out request), so it is tested without
//! any clock or socket.

/// A change of state, reported by the call that caused it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    WentDown,
    CameUp,
}

#[derive(Clone, Debug)]
pub struct HealthState {
    healthy: bool,
    rise: u32,
    fall: u32,
    consecutive_successes: u32,
    consecutive_failures: u32,
}

impl HealthState {
    /// Starts healthy, so a freshly started balancer sends traffic at once; a dead proxy is
    /// found by its first refused request or failed probes.
    pub fn new(rise: u32, fall: u32) -> Self {
        HealthState {
            healthy: true,
            rise: rise.max(1),
            fall: fall.max(1),
            consecutive_successes: 0,
            consecutive_failures: 0,
        }
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy
    }

    pub fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures
    }

    pub fn record_success(&mut self) -> Option<Transition> {
        self.consecutive_failures = 0;
        self.consecutive_successes = self.consecutive_successes.saturating_add(1);
        if !self.healthy && self.consecutive_successes >= self.rise {
            self.healthy = true;
            return Some(Transition::CameUp);
        }
        None
    }

    pub fn record_failure(&mut self) -> Option<Transition> {
        self.consecutive_successes = 0;
        self.consecutive_failures = self.consecutive_failures.saturating_add(1);
        if self.healthy && self.consecutive_failures >= self.fall {
            self.healthy = false;
            return Some(Transition::WentDown);
        }
        None
    }

    /// Marks the proxy down at once (its port refused a connection: nothing listens there).
    pub fn force_down(&mut self) -> Option<Transition> {
        self.consecutive_successes = 0;
        self.consecutive_failures = self.consecutive_failures.max(self.fall);
        if self.healthy {
            self.healthy = false;
            return Some(Transition::WentDown);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_failures_take_it_down_and_rise_successes_bring_it_back() {
        let mut h = HealthState::new(2, 3);
        assert!(h.is_healthy());
        assert_eq!(h.record_failure(), None);
        assert_eq!(h.record_failure(), None);
        assert_eq!(h.record_success(), None, "a success resets the failure count");
        assert_eq!(h.record_failure(), None);
        assert_eq!(h.record_failure(), None);
        assert_eq!(h.record_failure(), Some(Transition::WentDown));
        assert!(!h.is_healthy());
        assert_eq!(h.record_failure(), None, "reported once");
        assert_eq!(h.consecutive_failures(), 4);
        assert_eq!(h.record_success(), None);
        assert_eq!(h.record_failure(), None, "a failure resets the success count");
        assert_eq!(h.record_success(), None);
        assert_eq!(h.record_success(), Some(Transition::CameUp));
        assert!(h.is_healthy());
        assert_eq!(h.record_success(), None);
    }

    #[test]
    fn a_refusal_takes_it_down_at_once() {
        let mut h = HealthState::new(2, 3);
        assert_eq!(h.force_down(), Some(Transition::WentDown));
        assert_eq!(h.force_down(), None);
        assert_eq!(h.record_success(), None);
        assert_eq!(h.record_success(), Some(Transition::CameUp));
    }
}
