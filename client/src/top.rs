//! `client top`: a live terminal view of the cluster from the balancer's METRICS (SPEC 6),
//! like varnishstat or hatop, and `--once` for one plain-text snapshot.
//!
//! [`snapshot`] reads an answer, [`view`] turns two snapshots and the time between them into
//! rows and totals, [`text`] and [`ui`] show a view; this module only runs the refresh loop.
//! The loop's thread owns the terminal and the refresh timer; a helper thread does the
//! blocking METRICS exchange, so keys are answered at once even when the balancer is slow.

pub mod fetch;
pub mod snapshot;
pub mod text;
pub mod ui;
pub mod view;

use std::io::{self, stdout, IsTerminal};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers};
use crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use crossterm::{cursor, execute};
use ratatui::backend::CrosstermBackend;
use ratatui::Terminal;

use fetch::{FetchError, MetricsSource};
use ui::Screen;
use view::{Sample, View};

#[derive(Clone, Debug)]
pub struct TopConfig {
    pub host: String,
    pub port: u16,
    /// Time between refreshes (and, for `--once`, between its two samples).
    pub interval: Duration,
    /// How long one METRICS exchange may take.
    pub timeout: Duration,
}

/// Longest wait for a key before looking whether a refresh has arrived.
const INPUT_POLL: Duration = Duration::from_millis(50);

/// The plain-text snapshot `--once` prints: two samples one interval apart, so that its rates
/// are real rates (the same view the live screen shows after its first refresh).
pub fn once(config: &TopConfig) -> Result<String, FetchError> {
    let mut source = MetricsSource::new(&config.host, config.port, config.timeout);
    let first = source.sample()?;
    // A CLI waiting out its own measuring interval; nothing else runs here.
    thread::sleep(config.interval);
    let second = source.sample()?;
    Ok(text::render(&View::compute(Some(&first), &second), &source.name()))
}

#[derive(Debug)]
pub enum TopError {
    /// The first sample failed: nothing to show, the terminal untouched.
    Fetch(FetchError),
    /// Live mode needs a terminal (`--once` does not).
    NotATerminal,
    Terminal(io::Error),
}

impl std::fmt::Display for TopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopError::Fetch(e) => write!(f, "{e}"),
            TopError::NotATerminal => write!(f, "stdout is not a terminal (use --once for a plain snapshot)"),
            TopError::Terminal(e) => write!(f, "terminal: {e}"),
        }
    }
}

/// The live view, until `q`, Esc, Ctrl-C, SIGINT, SIGTERM or SIGHUP. The terminal is put back
/// as it was on every way out, errors and panics included.
pub fn live(config: &TopConfig) -> Result<(), TopError> {
    if !stdout().is_terminal() {
        return Err(TopError::NotATerminal);
    }
    let mut source = MetricsSource::new(&config.host, config.port, config.timeout);
    // Check the address before taking over the terminal, so a typo is a plain message.
    let first = source.sample().map_err(TopError::Fetch)?;
    let mut screen = Screen {
        source: source.name(),
        interval: config.interval,
        view: View::compute(None, &first),
        error: None,
        scroll: 0,
    };
    let mut previous = first;
    let (ask, asked) = mpsc::channel::<()>();
    let (answer, answers) = mpsc::channel::<Result<Sample, FetchError>>();
    thread::spawn(move || {
        for () in asked {
            if answer.send(source.sample()).is_err() {
                break;
            }
        }
    });
    let quit = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(signal, Arc::clone(&quit)).map_err(TopError::Terminal)?;
    }

    let _restore = TerminalGuard::enter().map_err(TopError::Terminal)?;
    let mut terminal = Terminal::new(CrosstermBackend::new(stdout())).map_err(TopError::Terminal)?;
    let mut next_refresh = Instant::now() + config.interval;
    let mut waiting = false;
    let mut dirty = true;
    while !quit.load(Ordering::Relaxed) {
        if dirty {
            terminal.draw(|frame| ui::draw(frame, &screen)).map_err(TopError::Terminal)?;
            dirty = false;
        }
        let now = Instant::now();
        if now >= next_refresh && !waiting {
            waiting = ask.send(()).is_ok();
            next_refresh = now + config.interval;
        }
        while let Ok(result) = answers.try_recv() {
            waiting = false;
            dirty = true;
            match result {
                Ok(sample) => {
                    screen.view = View::compute(Some(&previous), &sample);
                    screen.scroll_by(0);
                    screen.error = None;
                    previous = sample;
                }
                Err(e) => screen.error = Some(e.to_string()),
            }
        }
        let wait = next_refresh.saturating_duration_since(Instant::now()).min(INPUT_POLL);
        if !event::poll(wait).map_err(TopError::Terminal)? {
            continue;
        }
        dirty = true;
        let Event::Key(key) = event::read().map_err(TopError::Terminal)? else { continue };
        if key.kind != KeyEventKind::Press {
            continue;
        }
        let page = isize::try_from(terminal.size().map_or(10, |s| s.height).saturating_sub(8).max(1)).unwrap_or(10);
        match key.code {
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => break,
            KeyCode::Char('c') if key.modifiers.contains(KeyModifiers::CONTROL) => break,
            KeyCode::Down | KeyCode::Char('j') => screen.scroll_by(1),
            KeyCode::Up | KeyCode::Char('k') => screen.scroll_by(-1),
            KeyCode::PageDown | KeyCode::Char(' ') => screen.scroll_by(page),
            KeyCode::PageUp => screen.scroll_by(-page),
            KeyCode::Home => screen.scroll_to(0),
            KeyCode::End => screen.scroll_to(usize::MAX),
            _ => {}
        }
    }
    Ok(())
}

/// Raw mode and the alternate screen while it lives; dropping it (or a panic) restores the
/// terminal.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> io::Result<TerminalGuard> {
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore_terminal();
            hook(info);
        }));
        enable_raw_mode()?;
        // From here on, whatever fails, Drop puts things back.
        let guard = TerminalGuard;
        execute!(stdout(), EnterAlternateScreen, cursor::Hide)?;
        Ok(guard)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore_terminal();
    }
}

fn restore_terminal() {
    let _ = disable_raw_mode();
    let _ = execute!(stdout(), LeaveAlternateScreen, cursor::Show);
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use proptest::prelude::*;
    use ratatui::backend::TestBackend;
    use serde_json::{json, Map, Value};

    use super::snapshot::Snapshot;
    use super::*;

    /// Any JSON, biased towards the field names a METRICS answer has.
    fn any_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(Value::from),
            "\\PC{0,12}|\u{1b}\\[2J|OK|balancer".prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            let key = "[a-z_]{0,8}|healthy|in_flight|forwarded|metrics|hits|misses|latency_us|p50|p99|cluster";
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key, inner, 0..8).prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// A balancer-looking answer whose every field but the shape is anything.
    fn hostile_answer() -> impl Strategy<Value = Value> {
        let fields = prop::collection::btree_map(
            "total_requests|errors|retries|uptime_s|strategy|latency_us|cluster",
            any_json(),
            0..7,
        );
        let proxies = prop::collection::btree_map("\\PC{0,80}", any_json(), 0..20);
        (fields, proxies).prop_map(|(fields, proxies)| {
            let mut data: Map<String, Value> = fields.into_iter().collect();
            data.insert("role".into(), json!("balancer"));
            data.insert("proxies".into(), Value::Object(proxies.into_iter().collect()));
            json!({"status": "OK", "data": data})
        })
    }

    fn show_everything(answer: &Value) {
        let Ok(snapshot) = Snapshot::from_answer(answer) else { return };
        let t0 = Instant::now();
        let earlier = Sample { at: t0, snapshot: Snapshot::default() };
        let sample = Sample { at: t0 + Duration::from_millis(1), snapshot };
        for view in [
            View::compute(None, &sample),
            View::compute(Some(&earlier), &sample),
            View::compute(Some(&sample), &sample),
        ] {
            let plain = text::render(&view, "h:1");
            assert!(!plain.contains('\u{1b}'), "{plain:?}");
            let screen =
                Screen { source: "h:1".into(), interval: Duration::from_secs(1), view, error: None, scroll: 0 };
            let mut terminal = Terminal::new(TestBackend::new(60, 12)).unwrap();
            terminal.draw(|frame| ui::draw(frame, &screen)).unwrap();
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

        #[test]
        fn no_answer_whatever_its_content_makes_top_panic(answer in prop_oneof![any_json(), hostile_answer()]) {
            show_everything(&answer);
        }
    }
}
