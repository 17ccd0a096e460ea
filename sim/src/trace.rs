//! The timeline of a run: what the simulator did (faults, answers worth noting) and what the
//! services logged, each line stamped with the virtual time and the node it happened on.
//! The services log through `log` as they do in production; a logger installed for the
//! simulator's thread files their records under the node whose turn it is.

use std::cell::RefCell;
use std::time::Duration;

use log::{Level, LevelFilter, Log, Metadata, Record};

#[derive(Default)]
struct Context {
    on: bool,
    level: Option<Level>,
    now: Duration,
    node: String,
    lines: Vec<String>,
}

thread_local! {
    static CONTEXT: RefCell<Context> = RefCell::new(Context::default());
}

struct SimLogger;

impl Log for SimLogger {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        // The balancer's retries are logged at debug (they are per request): the timeline
        // has them at info already, as they are much of what a person follows.
        let retries = metadata.target() == "balancer::service";
        CONTEXT.with(|c| {
            c.borrow()
                .level
                .is_some_and(|level| metadata.level() <= level || (retries && metadata.level() <= Level::Debug))
        })
    }

    fn log(&self, record: &Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        CONTEXT.with(|c| {
            let mut c = c.borrow_mut();
            if c.on {
                let line = format!("t={:.3}s {} {}", c.now.as_secs_f64(), c.node, record.args());
                c.lines.push(line);
            }
        });
    }

    fn flush(&self) {}
}

static LOGGER: SimLogger = SimLogger;

/// Routes `log` records of this thread into the trace (once per process; harmless if a
/// logger is already installed, then services' lines are simply not in the trace).
pub fn install() {
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(LevelFilter::Debug);
    }
}

/// Starts collecting on this thread: the services' records at `level` and above, when given.
pub fn begin(on: bool, level: Option<Level>) {
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        c.on = on;
        c.level = if on { level } else { None };
        c.lines.clear();
    });
}

/// What happens next happens at `now` on `node`.
pub fn at(now: Duration, node: &str) {
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        if c.on {
            c.now = now;
            if c.node != node {
                c.node.clear();
                c.node.push_str(node);
            }
        }
    });
}

/// A line of the simulator's own.
pub fn note(now: Duration, who: &str, what: std::fmt::Arguments<'_>) {
    CONTEXT.with(|c| {
        let mut c = c.borrow_mut();
        if c.on {
            let line = format!("t={:.3}s {who} {what}", now.as_secs_f64());
            c.lines.push(line);
        }
    });
}

pub fn take() -> Vec<String> {
    CONTEXT.with(|c| std::mem::take(&mut c.borrow_mut().lines))
}
