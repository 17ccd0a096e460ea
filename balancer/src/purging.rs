//! The PURGE fan-out's glue (SPEC 2.6, 3.8): what [`crate::purge`] decides, sent over the
//! bounded connections of [`crate::purge_links`]. A child of the service module.

use common::peer::{PeerClosed, PeerId};
use common::protocol::Id;
use common::server::{ClientId, Ctx, Ticket};

use super::{Balancer, Timer};
use crate::purge::{Admit, Job, Outcome};
use crate::purge_links::{Ask, Heard1};

impl Balancer {
    pub(super) fn purge(&mut self, ctx: &mut Ctx<Timer>, client: ClientId, key: &str, id: Option<Id<'_>>) {
        // A GET in flight may bring pre-purge data: later GETs must not join it.
        let core = &mut self.core;
        let key_hash = core.collapser.hash(key);
        if let Some(leader) = core.collapser.leader(key_hash) {
            if core.requests.get(leader).is_some_and(|r| r.key == key) {
                core.collapser.finished(key_hash, leader);
            }
        }
        let ticket = ctx.defer(client, id.is_none());
        let job = Job { ticket, key: key.to_owned(), client_id: id.map(|id| id.as_json().into()) };
        match core.purges.submit(job) {
            Admit::Start(job) => {
                self.launch_purge(ctx, job);
                self.purge_heard(ctx, Vec::new());
            }
            Admit::Queued => {}
            Admit::Overloaded(job) => core.answer_purge(ctx, job, Outcome::Overloaded),
        }
    }

    fn launch_purge(&mut self, ctx: &mut Ctx<Timer>, job: Job<Ticket>) {
        let key = job.key.clone();
        let fan_out = self.core.purges.begin(job);
        for backend in 0..self.core.backends.len() {
            // Free slots and leaving proxies (SPEC 7) are not part of the set.
            if self.core.backends[backend].present() {
                self.ask_purge(ctx, backend, fan_out, &key);
            }
        }
        self.purge_finished(ctx, fan_out);
    }

    /// One proxy's share of fan-out `fan_out`: sent, or queued for a connection. (A proxy
    /// that refuses the connection holds nothing: it is simply not counted.)
    fn ask_purge(&mut self, ctx: &mut Ctx<Timer>, backend: usize, fan_out: usize, key: &str) {
        let addr = self.core.backends[backend].addr;
        let ask = Ask { key, deadline: ctx.now() + self.core.config.request_timeout };
        let arm = self.purge_links.ask(ctx, &ask, (backend, addr), fan_out);
        self.core.purges.asked(fan_out);
        self.arm_purge_deadline(ctx, arm);
    }

    /// A deadline timer for PURGE connection `arm`, when [`PurgeLinks::ask`] wants one.
    fn arm_purge_deadline(&mut self, ctx: &mut Ctx<Timer>, arm: Option<usize>) {
        if let Some((conn, due)) = arm.and_then(|conn| self.purge_links.due(conn).map(|due| (conn, due))) {
            ctx.schedule(due, Timer::PurgeDeadline(conn));
        }
    }

    pub(super) fn on_purge_line(&mut self, ctx: &mut Ctx<Timer>, peer: PeerId, line: &[u8]) {
        let mut heard = Vec::new();
        if self.purge_links.on_line(ctx, peer, line, &mut heard) {
            self.purge_heard(ctx, heard);
        }
    }

    pub(super) fn on_purge_closed(&mut self, ctx: &mut Ctx<Timer>, peer: PeerId, closed: &PeerClosed) {
        let mut heard = Vec::new();
        if self.purge_links.on_closed(peer, closed, &mut heard) {
            self.purge_heard(ctx, heard);
        }
    }

    pub(super) fn on_purge_deadline(&mut self, ctx: &mut Ctx<Timer>, conn: usize) {
        let mut heard = Vec::new();
        if let Some(due) = self.purge_links.on_deadline(ctx, conn, ctx.now(), &mut heard) {
            ctx.schedule(due, Timer::PurgeDeadline(conn));
        }
        self.purge_heard(ctx, heard);
    }

    /// Applies what the proxies answered, then hands freed connections to the proxies in
    /// line and starts queued PURGEs, until nothing more happens (the driver writes what
    /// was queued at the end of the turn).
    fn purge_heard(&mut self, ctx: &mut Ctx<Timer>, mut heard: Vec<Heard1>) {
        loop {
            for h in heard.drain(..) {
                let fan_out = match h {
                    Heard1::Answered { fan_out, held } => {
                        self.core.purges.heard(fan_out, Some(held));
                        fan_out
                    }
                    Heard1::Silent { fan_out } => {
                        self.core.purges.heard(fan_out, None);
                        fan_out
                    }
                    Heard1::Short { fan_out } => {
                        self.core.purges.short_after_asked(fan_out);
                        fan_out
                    }
                };
                self.purge_finished(ctx, fan_out);
            }
            if let Some((backend, queued)) = self.purge_links.next_in_line() {
                let addr = self.core.backends.get(backend).map(|b| b.addr);
                for (fan_out, key) in queued {
                    let Some(addr) = addr else {
                        heard.push(Heard1::Silent { fan_out }); // the proxy left the set
                        continue;
                    };
                    let ask = Ask { key: &key, deadline: ctx.now() + self.core.config.request_timeout };
                    let arm = self.purge_links.ask(ctx, &ask, (backend, addr), fan_out);
                    self.arm_purge_deadline(ctx, arm);
                }
                continue;
            }
            match self.core.purges.next_queued() {
                Some(job) => self.launch_purge(ctx, job),
                None if heard.is_empty() => break,
                None => {}
            }
        }
    }

    fn purge_finished(&mut self, ctx: &mut Ctx<Timer>, fan_out: usize) {
        if let Some((job, outcome)) = self.core.purges.finished(fan_out) {
            self.core.answer_purge(ctx, job, outcome);
        }
    }
}
