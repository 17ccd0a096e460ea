//! DNS names of proxies, resolved off the event loop (SPEC 7).
//!
//! One dedicated thread calls the system resolver (`getaddrinfo`, through `ToSocketAddrs`)
//! and hands each answer back to the loop through a channel and a mio `Waker`. Why a thread
//! and not an in-loop UDP resolver: the system resolver is what the deployments we aim at
//! rely on — Kubernetes pods resolve a headless Service's short name through the `search`
//! domains and `ndots` of /etc/resolv.conf, Consul setups often go through /etc/hosts or
//! nsswitch — and re-implementing those rules over a raw DNS client is where resolvers go
//! subtly wrong. A lookup can take seconds when a nameserver is down; on its own thread that
//! delays only the next lookup, never a request. The loop stays the only owner of all state:
//! the thread sees names, never proxies.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;

use log::warn;
use mio::Waker;

/// Names looked up in one go, tagged so that the loop can tell answers to an old request
/// (from before a reload) from the current one.
#[derive(Debug)]
struct Job {
    generation: u64,
    names: Vec<(String, u16)>,
}

/// The answer to one request: for each name, its addresses or why there are none.
#[derive(Debug)]
pub struct Resolved {
    pub generation: u64,
    pub answers: Vec<(String, u16, Result<Vec<SocketAddr>, String>)>,
}

/// Lookups a resolver may have queued and not yet answered; a loop that asks faster than
/// the resolver answers (a nameserver that hangs) has further requests dropped until one
/// completes — the next interval asks again.
const MAX_QUEUED: usize = 2;

#[derive(Debug)]
pub struct Resolver {
    jobs: Option<Sender<Job>>,
    answers: Receiver<Resolved>,
    queued: usize,
    thread: Option<JoinHandle<()>>,
}

impl Resolver {
    /// Starts the resolver thread; each answer wakes the loop through `waker`.
    pub fn spawn(waker: Arc<Waker>) -> io::Result<Resolver> {
        Resolver::spawn_with(waker, |name, port| {
            (name, port).to_socket_addrs().map(|addrs| addrs.collect()).map_err(|e| e.to_string())
        })
    }

    /// [`Resolver::spawn`] with the lookup function given (for tests).
    pub fn spawn_with(
        waker: Arc<Waker>,
        lookup: impl Fn(&str, u16) -> Result<Vec<SocketAddr>, String> + Send + 'static,
    ) -> io::Result<Resolver> {
        let (job_tx, job_rx) = channel::<Job>();
        let (answer_tx, answer_rx) = channel();
        let thread = std::thread::Builder::new().name("resolver".into()).spawn(move || {
            // Ends when the loop drops its sender (the Resolver).
            for job in job_rx {
                let answers = job
                    .names
                    .into_iter()
                    .map(|(name, port)| {
                        let result = lookup(&name, port);
                        (name, port, result)
                    })
                    .collect();
                if answer_tx.send(Resolved { generation: job.generation, answers }).is_err() {
                    return;
                }
                if let Err(e) = waker.wake() {
                    warn!("resolver: cannot wake the event loop: {e}");
                }
            }
        })?;
        Ok(Resolver { jobs: Some(job_tx), answers: answer_rx, queued: 0, thread: Some(thread) })
    }

    /// Asks for `names` to be resolved; returns false (asking nothing) when earlier requests
    /// are still unanswered past the queue bound, or the thread is gone.
    pub fn request(&mut self, generation: u64, names: Vec<(String, u16)>) -> bool {
        if self.queued >= MAX_QUEUED {
            return false;
        }
        let Some(jobs) = self.jobs.as_ref() else { return false };
        if jobs.send(Job { generation, names }).is_err() {
            return false;
        }
        self.queued += 1;
        true
    }

    /// The next answer that has arrived, without blocking.
    pub fn try_next(&mut self) -> Option<Resolved> {
        match self.answers.try_recv() {
            Ok(resolved) => {
                self.queued = self.queued.saturating_sub(1);
                Some(resolved)
            }
            Err(TryRecvError::Empty | TryRecvError::Disconnected) => None,
        }
    }
}

impl Drop for Resolver {
    fn drop(&mut self) {
        // Closing the channel ends the thread after its current lookup. It is not joined: a
        // lookup stuck on a dead nameserver must not hold up the exit.
        self.jobs = None;
        drop(self.thread.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll, Token};
    use std::time::{Duration, Instant};

    fn wait_for(poll: &mut Poll, resolver: &mut Resolver) -> Resolved {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut events = Events::with_capacity(8);
        loop {
            if let Some(r) = resolver.try_next() {
                return r;
            }
            assert!(Instant::now() < deadline, "no answer from the resolver thread");
            poll.poll(&mut events, Some(Duration::from_millis(500))).expect("poll");
        }
    }

    #[test]
    fn answers_arrive_through_the_waker_with_their_generation() {
        let mut poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).expect("waker"));
        let mut resolver = Resolver::spawn_with(waker, |name, port| match name {
            "two.test" => {
                Ok(vec![SocketAddr::new([10, 0, 0, 1].into(), port), SocketAddr::new([10, 0, 0, 2].into(), port)])
            }
            _ => Err("no such name".into()),
        })
        .expect("spawn");
        assert!(resolver.request(4, vec![("two.test".into(), 8001), ("none.test".into(), 8001)]));
        let r = wait_for(&mut poll, &mut resolver);
        assert_eq!(r.generation, 4);
        assert_eq!(r.answers.len(), 2);
        assert_eq!(r.answers[0].2.as_ref().map(Vec::len), Ok(2));
        assert!(r.answers[1].2.is_err());
    }

    #[test]
    fn a_hung_lookup_bounds_the_queue_instead_of_growing_it() {
        let poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).expect("waker"));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let mut resolver = Resolver::spawn_with(waker, move |_, _| {
            let _ = release_rx.lock().map(|rx| rx.recv_timeout(Duration::from_secs(10)));
            Ok(vec![])
        })
        .expect("spawn");
        assert!(resolver.request(1, vec![("slow.test".into(), 1)]));
        assert!(resolver.request(2, vec![("slow.test".into(), 1)]));
        assert!(!resolver.request(3, vec![("slow.test".into(), 1)]), "a third request was queued");
        drop(release_tx);
    }

    #[test]
    fn the_system_resolver_answers_for_an_ip_literal_and_localhost() {
        let mut poll = Poll::new().expect("poll");
        let waker = Arc::new(Waker::new(poll.registry(), Token(7)).expect("waker"));
        let mut resolver = Resolver::spawn(waker).expect("spawn");
        assert!(resolver.request(1, vec![("127.0.0.1".into(), 8001), ("localhost".into(), 8002)]));
        let r = wait_for(&mut poll, &mut resolver);
        assert_eq!(r.answers[0].2.as_deref().ok(), Some(&["127.0.0.1:8001".parse().expect("addr")][..]));
        let localhost = r.answers[1].2.as_ref().expect("localhost resolves");
        assert!(localhost.iter().all(|a| a.ip().is_loopback() && a.port() == 8002), "{localhost:?}");
    }
}
