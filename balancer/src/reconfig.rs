//! The loop glue of membership changes (SPEC 7): SIGHUP reloads, DNS answers from the
//! resolver thread, leaving proxies freed once nothing uses them, and drain/enable on the
//! admin port. What changes is decided by `roster`; this applies it to timers and sockets.

use std::time::Instant;

use common::admin::{Request as AdminRequest, Response as AdminResponse};
use common::server::Ctx;
use log::{error, info, warn};

use crate::backend::SlotState;
use crate::resolver::Resolver;
use crate::roster::Applied;
use crate::service::{Balancer, Timer};

impl Balancer {
    /// At start-up: the resolver thread (when names may appear) and the re-resolve timer.
    pub(crate) fn start_membership(&mut self, ctx: &mut Ctx<Timer>) {
        if !self.roster.may_need_resolver() {
            return;
        }
        match Resolver::spawn(ctx.waker()) {
            Ok(resolver) => self.resolver = Some(resolver),
            Err(e) => error!("cannot start the resolver thread, names are not looked up again: {e}"),
        }
        if self.roster.has_unresolved() {
            self.look_up_names();
        }
        let interval = self.core.config.resolve_interval;
        if !interval.is_zero() {
            ctx.schedule(ctx.now() + interval, Timer::Resolve);
        }
    }

    /// Asks the resolver thread for every name of the set (answers come through the waker).
    fn look_up_names(&mut self) {
        let names = self.roster.names();
        if names.is_empty() {
            return;
        }
        if let Some(resolver) = self.resolver.as_mut() {
            if !resolver.request(0, names) {
                warn!("DNS lookups are still pending; skipping this round");
            }
        }
    }

    pub(crate) fn on_resolve_timer(&mut self, ctx: &mut Ctx<Timer>) {
        ctx.schedule(ctx.now() + self.core.config.resolve_interval, Timer::Resolve);
        self.look_up_names();
    }

    /// SIGHUP: re-read the file, swap the set in if it is valid, and look the names up again.
    pub(crate) fn reload(&mut self, ctx: &mut Ctx<Timer>) {
        let began = Instant::now();
        match self.roster.reload(&mut self.core.backends, &self.core.config) {
            Ok(applied) => {
                self.core.counters.reloads += 1;
                self.started(ctx, &applied);
                info!(
                    "reload: {} proxies added, {} leaving, in {} µs",
                    applied.added,
                    applied.removed,
                    began.elapsed().as_micros()
                );
            }
            Err(e) => {
                self.core.counters.reloads_failed += 1;
                error!("reload failed, the proxy set is unchanged: {e}");
            }
        }
        self.look_up_names();
    }

    /// The resolver thread has answers: keep the good ones, and apply the set they give.
    pub(crate) fn on_resolver_wake(&mut self, ctx: &mut Ctx<Timer>) {
        let mut any = false;
        while let Some(resolved) = self.resolver.as_mut().and_then(Resolver::try_next) {
            for (name, port, answer) in resolved.answers {
                if let Some(why) = self.roster.resolved(name, port, answer) {
                    warn!("DNS: {why}");
                }
            }
            any = true;
        }
        if !any {
            return;
        }
        match self.roster.refresh(&mut self.core.backends, &self.core.config) {
            Ok(applied) => {
                if applied.added + applied.removed > 0 {
                    info!("DNS: {} proxies added, {} leaving", applied.added, applied.removed);
                }
                self.started(ctx, &applied);
            }
            Err(e) => warn!("DNS: the set is unchanged: {e}"),
        }
    }

    /// New occupants of slots get their first probe now and metrics polls soon after.
    fn started(&mut self, ctx: &mut Ctx<Timer>, applied: &Applied) {
        for &slot in &applied.started {
            let Some(b) = self.core.backends.get(slot) else { continue };
            info!("proxy {} joins the set", b.name);
            ctx.schedule(ctx.now(), Timer::Probe(slot, b.generation));
            ctx.schedule(ctx.now() + self.core.config.health_timeout, Timer::PollMetrics(slot, b.generation));
        }
    }

    /// End of turn: leaving proxies close their idle connections, and a slot nothing uses
    /// any more (no GET in flight, no connection, no exchange, no PURGE) is freed — it leaves METRICS.
    pub(crate) fn sweep_leaving(&mut self, ctx: &mut Ctx<Timer>) {
        if self.roster.leaving.is_empty() {
            return;
        }
        let mut i = 0;
        while let Some(&slot) = self.roster.leaving.get(i) {
            let mut open = 0;
            for conn in self.links.of_backend(slot) {
                if self.core.book.owed_by(conn) > 0 {
                    open += 1;
                } else if self.links.close(ctx.registry(), conn).is_some() {
                    self.core.backends[slot].pool.closed(conn);
                }
            }
            let b = &mut self.core.backends[slot];
            if open == 0
                && b.in_flight == 0
                && !b.probing
                && !b.polling
                && !self.exchanges.involve(slot)
                && !self.purge_links.involve(slot)
            {
                info!("proxy {} has drained and left the set", b.name);
                b.state = SlotState::Free;
                b.metrics = None;
                b.sums = None;
                self.roster.leaving.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// `POST /proxies/HOST:PORT/drain|enable` (SPEC 7); `None` for other paths.
    pub(crate) fn admin_proxies(&mut self, request: &AdminRequest<'_>) -> Option<AdminResponse> {
        let rest = request.path.strip_prefix("/proxies/")?;
        let (addr, action) = rest.rsplit_once('/')?;
        let drain = match action {
            "drain" => true,
            "enable" => false,
            _ => return None,
        };
        let Some(b) = self.core.backends.iter_mut().find(|b| b.present() && b.name == addr) else {
            return Some(AdminResponse::text(404, "no such proxy"));
        };
        if request.method != "POST" {
            return Some(AdminResponse::method_not_allowed());
        }
        match (b.state, drain) {
            (SlotState::Leaving, _) => return Some(AdminResponse::text(409, "the proxy is leaving the set")),
            (_, true) => b.state = SlotState::Drained,
            (_, false) => b.state = SlotState::Active,
        }
        info!("proxy {} {} on the admin port", b.name, if drain { "drained" } else { "enabled" });
        #[derive(serde::Serialize)]
        struct State<'a> {
            proxy: &'a str,
            draining: bool,
        }
        Some(AdminResponse::json(&State { proxy: &b.name, draining: drain }))
    }
}
