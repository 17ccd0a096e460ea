//! PURGE fan-out (SPEC 2.6, 3.8): every PURGE goes to every proxy, bounded like GETs. At
//! most [`MAX_RUNNING`] fan-outs are out at once (their lines share the bounded PURGE
//! connections of [`crate::purge_links`]), up to
//! [`MAX_QUEUED`] more wait their turn, and past that a PURGE gets `OVERLOADED`. A PURGE that
//! could not be sent to some proxy for want of local resources is `OVERLOADED` too, so a PURGE
//! answered `OK` reached every proxy it counts. Plain bookkeeping; the service does the I/O.

use std::collections::VecDeque;

use slab::Slab;

pub const MAX_RUNNING: usize = 16;
pub const MAX_QUEUED: usize = 4096;

/// A client's PURGE. `T` is the promise to keep.
#[derive(Debug)]
pub struct Job<T> {
    pub ticket: T,
    pub key: String,
    pub client_id: Option<Box<str>>,
}

#[derive(Debug)]
struct FanOut<T> {
    job: Job<T>,
    waiting: usize,
    purged: usize,
    answered: usize,
    short: bool,
}

/// How a fan-out ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `purged` proxies held the key, of `proxies` that answered.
    Ok { purged: usize, proxies: usize },
    /// Some proxy could not be asked.
    Overloaded,
}

/// What to do with a submitted PURGE.
#[derive(Debug)]
pub enum Admit<T> {
    /// Send it now: call [`Purges::begin`].
    Start(Job<T>),
    /// It waits; [`Purges::next_queued`] hands it out later.
    Queued,
    /// Answer OVERLOADED.
    Overloaded(Job<T>),
}

#[derive(Debug)]
pub struct Purges<T> {
    running: Slab<FanOut<T>>,
    queued: VecDeque<Job<T>>,
}

impl<T> Default for Purges<T> {
    fn default() -> Self {
        Purges { running: Slab::new(), queued: VecDeque::new() }
    }
}

impl<T> Purges<T> {
    pub fn submit(&mut self, job: Job<T>) -> Admit<T> {
        if self.running.len() < MAX_RUNNING && self.queued.is_empty() {
            Admit::Start(job)
        } else if self.queued.len() < MAX_QUEUED {
            self.queued.push_back(job);
            Admit::Queued
        } else {
            Admit::Overloaded(job)
        }
    }

    /// A queued PURGE that may start now.
    pub fn next_queued(&mut self) -> Option<Job<T>> {
        if self.running.len() < MAX_RUNNING {
            self.queued.pop_front()
        } else {
            None
        }
    }

    /// Starts a fan-out; returns its number and the key to send.
    pub fn begin(&mut self, job: Job<T>) -> usize {
        self.running.insert(FanOut { job, waiting: 0, purged: 0, answered: 0, short: false })
    }

    pub fn key(&self, fan_out: usize) -> Option<&str> {
        self.running.get(fan_out).map(|f| f.job.key.as_str())
    }

    /// The PURGE went out to one more proxy.
    pub fn asked(&mut self, fan_out: usize) {
        if let Some(f) = self.running.get_mut(fan_out) {
            f.waiting += 1;
        }
    }

    /// One proxy could not be asked for want of local resources.
    pub fn could_not_ask(&mut self, fan_out: usize) {
        if let Some(f) = self.running.get_mut(fan_out) {
            f.short = true;
        }
    }

    /// A proxy it was queued for could not be asked after all, for want of local resources.
    pub fn short_after_asked(&mut self, fan_out: usize) {
        if let Some(f) = self.running.get_mut(fan_out) {
            f.waiting = f.waiting.saturating_sub(1);
            f.short = true;
        }
    }

    /// One proxy's outcome: `Some(held)` when it answered, `None` when it did not in time.
    pub fn heard(&mut self, fan_out: usize, answer: Option<bool>) {
        if let Some(f) = self.running.get_mut(fan_out) {
            f.waiting = f.waiting.saturating_sub(1);
            if let Some(held) = answer {
                f.answered += 1;
                f.purged += usize::from(held);
            }
        }
    }

    /// The finished fan-out, once every proxy asked has been heard from.
    pub fn finished(&mut self, fan_out: usize) -> Option<(Job<T>, Outcome)> {
        if self.running.get(fan_out)?.waiting > 0 {
            return None;
        }
        let f = self.running.remove(fan_out);
        let outcome = if f.short { Outcome::Overloaded } else { Outcome::Ok { purged: f.purged, proxies: f.answered } };
        Some((f.job, outcome))
    }

    pub fn running(&self) -> usize {
        self.running.len()
    }

    pub fn queued(&self) -> usize {
        self.queued.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(n: u32) -> Job<u32> {
        Job { ticket: n, key: format!("k{n}"), client_id: None }
    }

    #[test]
    fn a_fan_out_ends_when_every_proxy_asked_is_heard_from() {
        let mut p = Purges::default();
        let Admit::Start(j) = p.submit(job(1)) else { panic!() };
        let f = p.begin(j);
        assert_eq!(p.key(f), Some("k1"));
        for _ in 0..3 {
            p.asked(f);
        }
        p.heard(f, Some(true));
        p.heard(f, None);
        assert!(p.finished(f).is_none());
        p.heard(f, Some(false));
        let (j, outcome) = p.finished(f).unwrap();
        assert_eq!((j.ticket, outcome), (1, Outcome::Ok { purged: 1, proxies: 2 }));
        assert_eq!(p.running(), 0);
    }

    #[test]
    fn a_proxy_not_asked_makes_it_overloaded() {
        let mut p = Purges::default();
        let f = p.begin(job(1));
        p.could_not_ask(f);
        assert_eq!(p.finished(f).map(|(_, o)| o), Some(Outcome::Overloaded));
    }

    #[test]
    fn running_and_waiting_purges_are_bounded() {
        let mut p = Purges::default();
        for n in 0..MAX_RUNNING {
            let Admit::Start(j) = p.submit(job(n as u32)) else { panic!("{n}") };
            p.begin(j);
        }
        for _ in 0..MAX_QUEUED {
            assert!(matches!(p.submit(job(0)), Admit::Queued));
        }
        assert!(matches!(p.submit(job(9)), Admit::Overloaded(_)));
        assert!(p.next_queued().is_none(), "all running slots taken");
        p.finished(0);
        assert!(p.next_queued().is_some());
    }
}
