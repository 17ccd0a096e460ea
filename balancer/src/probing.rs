//! Probes and metrics polls (SPEC 3.6, 2.4): a short exchange with one proxy on a timer,
//! and what its answer (or its silence) means for that proxy's health and METRICS. A child
//! of the service module.

use common::server::Ctx;

use super::{Balancer, Timer};
use crate::exchange::{Heard, Purpose};

impl Balancer {
    /// Timer: probe proxy `backend` (of slot generation `generation`) and schedule the next.
    pub(super) fn on_probe_timer(&mut self, ctx: &mut Ctx<Timer>, backend: usize, generation: u64) {
        if !self.core.backends.get(backend).is_some_and(|b| b.present() && b.generation == generation) {
            return; // its proxy has left the set
        }
        ctx.schedule(ctx.now() + self.core.config.health_interval, Timer::Probe(backend, generation));
        if !self.core.backends[backend].probing {
            // A connect that fails ends the exchange (in this turn) as a failed probe.
            self.core.backends[backend].probing = true;
            self.start_exchange(ctx, backend, Purpose::Probe, "");
        }
    }

    /// Timer: poll proxy `backend`'s METRICS and schedule the next.
    pub(super) fn on_poll_timer(&mut self, ctx: &mut Ctx<Timer>, backend: usize, generation: u64) {
        if !self.core.backends.get(backend).is_some_and(|b| b.present() && b.generation == generation) {
            return;
        }
        let next = Timer::PollMetrics(backend, generation);
        ctx.schedule(ctx.now() + self.core.config.metrics_interval, next);
        if !self.core.backends[backend].polling {
            self.core.backends[backend].polling = true;
            self.start_exchange(ctx, backend, Purpose::Poll, "");
        }
    }

    pub(super) fn start_exchange(&mut self, ctx: &mut Ctx<Timer>, backend: usize, purpose: Purpose, key: &str) {
        let addr = self.core.backends[backend].addr;
        let index = self.exchanges.start(ctx, addr, (backend, purpose, key));
        let timeout = match purpose {
            Purpose::Purge(_) => self.core.config.request_timeout,
            Purpose::Probe | Purpose::Poll => self.core.config.health_timeout,
        };
        let timer = ctx.schedule(ctx.now() + timeout, Timer::Exchange(index));
        self.exchanges.set_timer(index, timer);
    }

    /// Ends an exchange with what it heard (`None`: no well-formed answer in time, or its
    /// connection ended first).
    pub(super) fn finish_exchange(&mut self, ctx: &mut Ctx<Timer>, index: usize, heard: Option<Heard>) {
        let Some(x) = self.exchanges.finish(ctx, index) else { return };
        if let Some(timer) = x.timer {
            ctx.cancel(timer);
        }
        let core = &mut self.core;
        let b = &mut core.backends[x.backend];
        match (x.purpose, heard) {
            (Purpose::Probe, heard) => {
                b.probing = false;
                let transition = match heard {
                    Some(Heard::Probe { multiplexed }) => {
                        b.capable = multiplexed;
                        b.health.record_success()
                    }
                    _ => b.health.record_failure(),
                };
                core.transition(x.backend, transition, "health probes failed");
            }
            (Purpose::Poll, heard) => {
                b.polling = false;
                if let Some(Heard::Poll(Some(data))) = heard {
                    b.set_metrics(&data);
                }
            }
            (Purpose::Purge(_), _) => {} // PURGEs go on their own connections
        }
    }
}
