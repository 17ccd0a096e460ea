//! Drawing one [`Screen`] with ratatui. Holds no state of its own: everything shown is in
//! the screen, so a frame can be drawn into a test buffer as well as onto a terminal.

use std::time::Duration;

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row, Table};
use ratatui::Frame;

use super::snapshot::MAX_NAME_CHARS;
use super::text::{self, opt_count, opt_percent, opt_rate, opt_us, HEADINGS};
use super::view::{Health, View};

/// What the live view shows now.
#[derive(Clone, Debug)]
pub struct Screen {
    pub source: String,
    pub interval: Duration,
    pub view: View,
    /// Why the last refresh failed (the view is then the last good one).
    pub error: Option<String>,
    /// First proxy row shown.
    pub scroll: usize,
}

impl Screen {
    /// Moves the first shown row by `by` rows, staying within the rows there are.
    pub fn scroll_by(&mut self, by: isize) {
        let last = self.view.rows.len().saturating_sub(1);
        self.scroll = self.scroll.saturating_add_signed(by).min(last);
    }

    pub fn scroll_to(&mut self, row: usize) {
        self.scroll = row.min(self.view.rows.len().saturating_sub(1));
    }
}

pub fn draw(frame: &mut Frame, screen: &Screen) {
    let [title, totals, status, table, help] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Min(0),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    let view = &screen.view;
    let bold = Style::default().add_modifier(Modifier::BOLD);
    frame.render_widget(Paragraph::new(Span::styled(text::title(view, &screen.source), bold)), title);
    frame.render_widget(Paragraph::new(text::totals_line(view)), totals);
    let status_line = match &screen.error {
        Some(error) => Line::from(Span::styled(format!("refresh failed: {error}"), Style::default().fg(Color::Red))),
        None if view.proxies_left_off > 0 => Line::from(format!("{} more proxies not shown", view.proxies_left_off)),
        None => Line::default(),
    };
    frame.render_widget(Paragraph::new(status_line), status);
    draw_table(frame, table, screen);
    let help_text = format!(
        "q quit   ↑ ↓ PgUp PgDn Home End scroll   rows {}-{} of {}   refresh every {} ms",
        screen.scroll.saturating_add(1).min(view.rows.len()),
        screen.scroll.saturating_add(visible_rows(table)).min(view.rows.len()),
        view.rows.len(),
        screen.interval.as_millis()
    );
    frame.render_widget(Paragraph::new(Span::styled(help_text, Style::default().add_modifier(Modifier::DIM))), help);
}

/// Proxy rows that fit in the table's area (borders, heading and footer take 4 lines).
fn visible_rows(area: Rect) -> usize {
    usize::from(area.height.saturating_sub(4))
}

fn draw_table(frame: &mut Frame, area: Rect, screen: &Screen) {
    let view = &screen.view;
    let shown = view.rows.iter().skip(screen.scroll).take(visible_rows(area));
    let rows = shown.map(|r| {
        let health = match r.health {
            Health::Up => Style::default().fg(Color::Green),
            Health::Down => Style::default().fg(Color::Red).add_modifier(Modifier::BOLD),
            Health::Unknown => Style::default().fg(Color::Yellow),
        };
        Row::new([
            Cell::from(r.name.as_str()),
            Cell::from(r.health.label()).style(health),
            Cell::from(right(opt_count(r.in_flight))),
            Cell::from(right(opt_rate(r.requests_per_s))),
            Cell::from(right(opt_percent(r.hit_rate))),
            Cell::from(right(opt_us(r.p99_us))),
        ])
        // A down proxy's hit % and p99 are its last polled ones: shown, but dimmed.
        .style(if r.health == Health::Down {
            Style::default().add_modifier(Modifier::DIM)
        } else {
            Style::default()
        })
    });
    let t = &view.totals;
    let footer = Row::new([
        Cell::from("total"),
        Cell::from(format!("{}/{}", t.up, t.proxies)),
        Cell::from(right(t.in_flight.to_string())),
        Cell::from(right(opt_rate(t.forwarded_per_s))),
        Cell::from(right(opt_percent(t.hit_rate))),
        Cell::from(""),
    ])
    .style(Style::default().add_modifier(Modifier::BOLD));
    let name_width = view.rows.iter().map(|r| r.name.chars().count()).max().unwrap_or(0).clamp(5, MAX_NAME_CHARS);
    let widths = [
        Constraint::Length(u16::try_from(name_width).unwrap_or(u16::MAX)),
        Constraint::Length(6),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(7),
        Constraint::Length(9),
    ];
    let header = Row::new(HEADINGS.iter().enumerate().map(|(i, h)| {
        if i < 2 {
            Cell::from(*h)
        } else {
            Cell::from(right((*h).to_owned()))
        }
    }))
    .style(Style::default().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let table = Table::new(rows, widths)
        .header(header)
        .footer(footer)
        .column_spacing(2)
        .block(Block::default().borders(Borders::ALL).title(" proxies "));
    frame.render_widget(table, area);
}

fn right(text: String) -> Line<'static> {
    Line::from(text).right_aligned()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::time::Instant;

    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    use super::*;
    use crate::top::snapshot::{ProxySnapshot, Snapshot};
    use crate::top::view::Sample;

    fn screen(proxies: usize) -> Screen {
        let proxies = (0..proxies)
            .map(|i| ProxySnapshot {
                name: format!("10.0.{}.{}:8001", i / 256, i % 256),
                healthy: Some(i % 3 != 0),
                in_flight: Some(u64::MAX),
                forwarded: Some(u64::MAX),
                hits: Some(1),
                misses: Some(3),
                p99_us: Some(u64::MAX),
            })
            .collect();
        let sample = Sample { at: Instant::now(), snapshot: Snapshot { proxies, ..Default::default() } };
        Screen {
            source: "127.0.0.1:9000".into(),
            interval: Duration::from_millis(1000),
            view: View::compute(None, &sample),
            error: Some("cannot reach the balancer".into()),
            scroll: 0,
        }
    }

    fn text_of(terminal: &Terminal<TestBackend>) -> String {
        let buffer = terminal.backend().buffer();
        let width = usize::from(buffer.area.width);
        let symbols: Vec<&str> = buffer.content.iter().map(|c| c.symbol()).collect();
        symbols.chunks(width).map(|line| line.concat()).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn rows_health_and_the_error_are_drawn() {
        let mut terminal = Terminal::new(TestBackend::new(100, 12)).unwrap();
        terminal.draw(|f| draw(f, &screen(3))).unwrap();
        let text = text_of(&terminal);
        assert!(text.contains("10.0.0.0:8001") && text.contains("DOWN"), "{text}");
        assert!(text.contains("10.0.0.1:8001") && text.contains("UP"), "{text}");
        assert!(text.contains("refresh failed: cannot reach the balancer"), "{text}");
        assert!(text.contains("total") && text.contains("25.0%"), "{text}");
    }

    #[test]
    fn thousands_of_rows_and_tiny_terminals_draw_without_panicking() {
        let mut s = screen(10_000);
        for (w, h) in [(200, 60), (80, 24), (10, 3), (1, 1), (0, 0)] {
            let mut terminal = Terminal::new(TestBackend::new(w, h)).unwrap();
            terminal.draw(|f| draw(f, &s)).unwrap();
        }
        s.scroll_by(isize::MAX);
        assert_eq!(s.scroll, 9_999);
        s.scroll_by(isize::MIN);
        assert_eq!(s.scroll, 0);
        s.scroll_to(9_990);
        let mut terminal = Terminal::new(TestBackend::new(100, 30)).unwrap();
        terminal.draw(|f| draw(f, &s)).unwrap();
        let text = text_of(&terminal);
        assert!(text.contains("10.0.39.6:8001") && !text.contains("10.0.0.0:8001"), "{text}");
        assert!(text.contains("rows 9991-10000 of 10000"), "{text}");
    }
}
