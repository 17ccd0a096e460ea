//! The loop glue of membership changes (SPEC 7): SIGHUP reloads, DNS answers from the
//! resolver thread, leaving proxies freed once nothing uses them, and drain/enable on the
//! admin port. What changes is decided by `roster`; this applies it to timers and connections.

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
        let Some(waker) = ctx.waker() else {
            // Off the real network (the simulator): names are not looked up again.
            return warn!("no waker for the resolver thread: DNS names are not looked up again");
        };
        match Resolver::spawn(waker) {
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
        match self.roster.reload(&mut self.core.backends, &self.core.config) {
            Ok(applied) => {
                self.core.counters.reloads += 1;
                self.started(ctx, &applied);
                info!("reload: {} proxies added, {} leaving", applied.added, applied.removed);
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
                } else if self.links.close(ctx, conn).is_some() {
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
        // `:` and the brackets of an IPv6 address as some HTTP clients percent-encode them.
        let addr = decode_addr(addr);
        // HOST:PORT is a proxy's `ip:port`, or the DNS name it came from with that port: then
        // every address of that name (SPEC 7).
        let named = |b: &crate::backend::Backend| {
            b.dns_name.as_deref().is_some_and(|name| {
                addr.strip_prefix(name).and_then(|p| p.strip_prefix(':')).and_then(|p| p.parse::<u16>().ok())
                    == Some(b.addr.port())
            })
        };
        let chosen: Vec<usize> = (0..self.core.backends.len())
            .filter(|&i| {
                let b = &self.core.backends[i];
                b.present() && (b.name == addr || named(b))
            })
            .collect();
        if chosen.is_empty() {
            return Some(AdminResponse::text(404, "no such proxy"));
        }
        if request.method != "POST" {
            return Some(AdminResponse::method_not_allowed());
        }
        if chosen.iter().any(|&i| self.core.backends[i].state == SlotState::Leaving) {
            return Some(AdminResponse::text(409, "the proxy is leaving the set"));
        }
        for &i in &chosen {
            let b = &mut self.core.backends[i];
            b.state = if drain { SlotState::Drained } else { SlotState::Active };
            info!("proxy {} {} on the admin port", b.name, if drain { "drained" } else { "enabled" });
        }
        let b = &self.core.backends[chosen[0]];
        #[derive(serde::Serialize)]
        struct State<'a> {
            proxy: &'a str,
            draining: bool,
        }
        Some(AdminResponse::json(&State { proxy: &b.name, draining: drain }))
    }
}

/// `127.0.0.1%3A8001` → `127.0.0.1:8001` (also `%5B`/`%5D` around an IPv6 address); other
/// text is left as it is.
fn decode_addr(path_part: &str) -> String {
    let mut out = String::with_capacity(path_part.len());
    let mut rest = path_part;
    while let Some(at) = rest.find('%') {
        out.push_str(rest.get(..at).unwrap_or_default());
        let code = rest.get(at + 1..at + 3).unwrap_or_default();
        let decoded = match code.to_ascii_uppercase().as_str() {
            "3A" => Some(':'),
            "5B" => Some('['),
            "5D" => Some(']'),
            _ => None,
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = rest.get(at + 3..).unwrap_or_default();
            }
            None => {
                out.push('%');
                rest = rest.get(at + 1..).unwrap_or_default();
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use common::server::Service;

    use crate::membership::{Host, Member, ProxySpec};
    use crate::service::{Balancer, Timer};
    use crate::test_ctx::with_ctx;
    use crate::BalancerConfig;

    #[test]
    fn without_a_waker_names_are_not_looked_up_and_addresses_still_serve() {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 1));
        let mut config = BalancerConfig::new(&[]);
        config.proxies = vec![Member { addr, name: Some("localhost".into()) }];
        config.specs = vec![ProxySpec { host: Host::Name("localhost".into()), port: 1 }];
        let mut balancer = Balancer::new(config);
        with_ctx::<Timer>(|ctx| balancer.on_start(ctx));
        assert!(balancer.resolver.is_none(), "no resolver thread without a waker");
        assert_eq!(balancer.core.backends.len(), 1);
    }
}
