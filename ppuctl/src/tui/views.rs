//! Rendering: the header (views, queue state, link and staleness), the three views, the status
//! and key-hint lines, and the help and confirmation pop-ups. Drawing reads the [`App`] only;
//! the time is passed in, so a fixed state renders the same frame every time.
//!
//! Everything that matters is also said in text (`UNACK`, `MAINT`, `DISCONNECTED`, markers),
//! so the monochrome theme loses nothing but colour.

use std::time::{Duration, Instant};

use ppu_proto::v1 as pb;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{
    Block, Cell, Clear, Paragraph, Row, Sparkline, Table, TableState, Tabs, Wrap,
};

use super::state::{
    DeviceRow, ExperimentRow, LinkView, Model, QueueStatus, key_value_label, key_value_resolution,
};
use super::{App, Mode, View};
use crate::render;

/// Colours, or the monochrome fallback (NO_COLOR): modifiers only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Theme {
    pub color: bool,
}

impl Theme {
    /// Colour unless `NO_COLOR` is set to a non-empty value (https://no-color.org).
    pub fn from_env(force_mono: bool) -> Theme {
        let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
        Theme {
            color: !(force_mono || no_color),
        }
    }

    fn pick(&self, color: Style, mono: Style) -> Style {
        if self.color { color } else { mono }
    }

    /// An alarm waiting for acknowledgement: impossible to miss.
    pub fn alarm(&self) -> Style {
        self.pick(
            Style::new()
                .fg(Color::White)
                .bg(Color::Red)
                .add_modifier(Modifier::BOLD),
            Style::new().add_modifier(Modifier::REVERSED | Modifier::BOLD),
        )
    }

    pub fn bad(&self) -> Style {
        self.pick(
            Style::new().fg(Color::Red).add_modifier(Modifier::BOLD),
            Style::new().add_modifier(Modifier::BOLD),
        )
    }

    pub fn warn(&self) -> Style {
        self.pick(
            Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD),
            Style::new().add_modifier(Modifier::BOLD),
        )
    }

    pub fn good(&self) -> Style {
        self.pick(Style::new().fg(Color::Green), Style::new())
    }

    pub fn dim(&self) -> Style {
        self.pick(Style::new().fg(Color::DarkGray), Style::new())
    }

    pub fn accent(&self) -> Style {
        self.pick(Style::new().fg(Color::Cyan), Style::new())
    }

    pub fn title(&self) -> Style {
        Style::new().add_modifier(Modifier::BOLD)
    }

    pub fn selected(&self) -> Style {
        self.pick(
            Style::new().bg(Color::Blue).fg(Color::White),
            Style::new().add_modifier(Modifier::REVERSED),
        )
    }

    fn state(&self, state: i32) -> Style {
        match pb::ExperimentState::try_from(state) {
            Ok(pb::ExperimentState::Running) => self.accent().add_modifier(Modifier::BOLD),
            Ok(pb::ExperimentState::Succeeded) => self.good(),
            Ok(pb::ExperimentState::Failed | pb::ExperimentState::Interrupted) => self.bad(),
            Ok(pb::ExperimentState::Cancelled) => self.warn(),
            _ => Style::new(),
        }
    }
}

/// Draws the whole screen.
pub fn draw(frame: &mut Frame, app: &App, now: Instant) {
    let [header, body, status, keys] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    draw_header(frame, app, header, now);
    match app.view {
        View::Queue => draw_queue(frame, app, body),
        View::Devices => draw_devices(frame, app, body),
        View::Alarms => draw_alarms(frame, app, body),
    }
    draw_status(frame, app, status, now);
    draw_keys(frame, app, keys);
    match &app.mode {
        Mode::Help => draw_help(frame, app),
        Mode::Confirm(action) => draw_confirm(frame, app, action),
        Mode::Normal | Mode::Filter => {}
    }
}

// ---------------------------------------------------------------------------------------------
// Header, status line, key hints.
// ---------------------------------------------------------------------------------------------

fn draw_header(frame: &mut Frame, app: &App, area: Rect, now: Instant) {
    let t = &app.theme;
    let m = &app.model;
    let unack = m.unacknowledged();
    let alarms_title = if unack > 0 {
        Line::from(vec![
            Span::raw("3 Alarms "),
            Span::styled(format!("!{unack}"), t.alarm()),
        ])
    } else {
        Line::from("3 Alarms")
    };
    let titles = vec![Line::from("1 Queue"), Line::from("2 Devices"), alarms_title];
    // Each title is padded by one column on both sides; dividers sit between them.
    let tabs_width: usize = titles.iter().map(|l| l.width() + 2).sum::<usize>() + titles.len() - 1;
    let tabs = Tabs::new(titles)
        .select(match app.view {
            View::Queue => 0,
            View::Devices => 1,
            View::Alarms => 2,
        })
        .highlight_style(t.selected().add_modifier(Modifier::BOLD))
        .divider("│")
        .padding(" ", " ");

    let queue = match m.queue_status {
        QueueStatus::Running => Span::styled("queue RUNNING", t.good()),
        QueueStatus::Paused => Span::styled("queue PAUSED", t.warn()),
        QueueStatus::Unknown => Span::styled("queue ?", t.dim()),
    };
    let link = match m.link(now) {
        LinkView::Connecting => Span::styled("… connecting", t.warn()),
        LinkView::Live { age } => Span::styled(
            format!("● LIVE #{} {} ago", m.last_sequence, age_text(age)),
            t.good(),
        ),
        LinkView::Stale { age } => Span::styled(format!("◐ STALE {} ago", age_text(age)), t.warn()),
        LinkView::Disconnected { age, .. } => Span::styled(
            match age {
                Some(age) => format!("✖ DISCONNECTED {} ago", age_text(age)),
                None => "✖ DISCONNECTED".to_owned(),
            },
            t.alarm(),
        ),
    };
    // The link state matters most: on a narrow terminal the queue state goes first.
    let mut right = Line::from(vec![queue, Span::raw(" │ "), link.clone()]).right_aligned();
    if tabs_width + right.width() + 1 > usize::from(area.width) {
        right = Line::from(link).right_aligned();
    }
    let [left_area, right_area] =
        Layout::horizontal([Constraint::Length(tabs_width as u16), Constraint::Min(0)]).areas(area);
    frame.render_widget(tabs, left_area);
    frame.render_widget(right, right_area);
}

/// `0.4 s`, `12 s`, `3 min 05 s`, `2 h 10 min`.
pub fn age_text(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 60.0 {
        format!("{} s", s as u64)
    } else if s < 3600.0 {
        format!("{} min {:02} s", s as u64 / 60, s as u64 % 60)
    } else {
        format!("{} h {:02} min", s as u64 / 3600, (s as u64 % 3600) / 60)
    }
}

fn draw_status(frame: &mut Frame, app: &App, area: Rect, now: Instant) {
    let t = &app.theme;
    let m = &app.model;
    let line = if let Mode::Filter = app.mode {
        Line::from(vec![
            Span::styled("filter: ", t.title()),
            Span::raw(format!("{}▏", app.filter)),
            Span::styled("  (Enter keep, Esc clear)", t.dim()),
        ])
    } else if let LinkView::Disconnected { reason, .. } = m.link(now) {
        Line::styled(format!("reconnecting… {reason}"), t.bad())
    } else if let Some(s) = &app.status {
        Line::styled(s.text.clone(), if s.error { t.bad() } else { t.accent() })
    } else if !m.notices.is_empty() {
        let text: Vec<&str> = m.notices.iter().map(|(_, n)| n.as_str()).collect();
        Line::styled(text.join("; "), t.warn())
    } else if let LinkView::Connecting = m.link(now) {
        Line::styled(format!("connecting to {}…", app.addr), t.dim())
    } else {
        Line::styled(format!("connected to {}", app.addr), t.dim())
    };
    frame.render_widget(Paragraph::new(line), area);
}

fn draw_keys(frame: &mut Frame, app: &App, area: Rect) {
    let t = &app.theme;
    let pause = if app.model.queue_status == QueueStatus::Paused {
        ("p", "resume")
    } else {
        ("p", "pause")
    };
    let mut keys: Vec<(&str, &str)> = vec![("?", "help")];
    match app.view {
        // The full list is under `?`; abort and the views' keys do not fit in 80 columns.
        View::Queue => keys.extend([
            ("/", "filter"),
            pause,
            ("c", "cancel"),
            ("h", "hold"),
            ("J/K", "move"),
        ]),
        View::Devices => keys.extend([("m", "maintenance"), pause, ("Tab", "view")]),
        View::Alarms => keys.extend([("a", "acknowledge"), pause, ("Tab", "view")]),
    }
    keys.extend([("t", "transfer"), ("q", "quit")]);
    let mut spans = Vec::new();
    for (k, what) in keys {
        spans.push(Span::styled(format!(" {k}"), t.title().patch(t.accent())));
        spans.push(Span::raw(format!(" {what} ")));
    }
    frame.render_widget(Paragraph::new(Line::from(spans)), area);
}

// ---------------------------------------------------------------------------------------------
// Queue view.
// ---------------------------------------------------------------------------------------------

/// `~42 s`, `~12 min`, `~1 h 05 min`: the physical time a step says it still needs.
fn eta(remaining_s: f64) -> String {
    if !(remaining_s.is_finite() && remaining_s >= 0.0) {
        return "?".to_owned();
    }
    let s = remaining_s.round() as u64;
    if s < 60 {
        format!("~{s} s")
    } else if s < 3600 {
        format!("~{} min", s.div_ceil(60))
    } else {
        format!("~{} h {:02} min", s / 3600, (s % 3600) / 60)
    }
}

/// `(sim ×600)`: ETAs are physical time on the daemon's scaled clock, not the wall clock.
fn sim_note(model: &Model) -> Option<String> {
    model.sim_scale().map(|x| format!("(sim ×{x})"))
}

fn state_label(model: &Model, row: &ExperimentRow) -> String {
    let s = render::experiment_state(row.exp.state);
    if model.is_held(row) {
        format!("{s}/HELD")
    } else {
        s
    }
}

/// The rows of a list with `capacity` lines that are shown: the first `pinned` rows (the
/// running ones) always, and of the rest a window that holds `selected`. Returns the shown
/// indices and where `selected` is among them.
pub fn visible_rows(
    total: usize,
    pinned: usize,
    capacity: usize,
    selected: usize,
) -> (Vec<usize>, Option<usize>) {
    if total <= capacity {
        let all: Vec<usize> = (0..total).collect();
        return (all, (total > 0).then(|| selected.min(total - 1)));
    }
    // At least one line scrolls, so every row can be reached.
    let pinned = pinned.min(capacity.saturating_sub(1));
    let room = capacity - pinned;
    let rest = total - pinned;
    let start = if selected < pinned {
        0
    } else {
        (selected - pinned + 1)
            .saturating_sub(room)
            .min(rest - room)
    };
    let shown: Vec<usize> = (0..pinned)
        .chain(pinned + start..pinned + start + room)
        .collect();
    let at = shown.iter().position(|i| *i == selected);
    (shown, at)
}

/// The shortest prefix of each id telling it from every other known id (at least 6
/// characters, as git and docker abbreviate), or `…` and its last 8 characters when that
/// prefix would be longer than 10: the ids of one batch, made in the same millisecond, differ
/// only at their end.
pub fn id_labels<'a>(
    ids: impl IntoIterator<Item = &'a str>,
) -> std::collections::HashMap<String, String> {
    let mut ids: Vec<&str> = ids.into_iter().collect();
    ids.sort_unstable();
    ids.dedup();
    let common = |a: &str, b: &str| {
        a.chars()
            .zip(b.chars())
            .take_while(|(x, y)| x.eq_ignore_ascii_case(y))
            .count()
    };
    let mut out = std::collections::HashMap::new();
    for (i, id) in ids.iter().enumerate() {
        let before = i.checked_sub(1).map_or(0, |j| common(ids[j], id));
        let after = ids.get(i + 1).map_or(0, |n| common(n, id));
        let len = (before.max(after) + 1).max(6);
        let label = if len <= 10 {
            id.chars().take(len).collect()
        } else {
            super::state::short_id(id)
        };
        out.insert((*id).to_owned(), label);
    }
    out
}

fn draw_queue(frame: &mut Frame, app: &App, area: Rect) {
    let t = &app.theme;
    let m = &app.model;
    let rows = m.queue_rows(&app.filter);
    let selected = app.selected[0].min(rows.len().saturating_sub(1));

    let transfer_lines = m.transfers.len().min(2) as u16;
    let list_height = (rows.len() as u16 + 3).clamp(4, (area.height / 2).max(4));
    let [list_area, transfer_area, detail_area] = Layout::vertical([
        Constraint::Length(list_height),
        Constraint::Length(transfer_lines),
        Constraint::Min(0),
    ])
    .areas(area);

    // Running rows come first and stay in view; the rest scroll under them.
    let capacity = usize::from(list_height.saturating_sub(3)).max(1);
    let pinned = rows
        .iter()
        .take_while(|r| r.state() == pb::ExperimentState::Running)
        .count();
    let (shown, shown_selected) = visible_rows(rows.len(), pinned, capacity, selected);

    let mut title = vec![
        Span::styled(" Queue ", t.title()),
        Span::raw(format!(
            "{} running · {} queued",
            m.running_ids.len(),
            m.queued_ids.len()
        )),
    ];
    if !m.held_ids.is_empty() {
        title.push(Span::raw(format!(" ({} held)", m.held_ids.len())));
    }
    if !app.filter.is_empty() {
        title.push(Span::styled(
            format!(" · filter \"{}\": {} shown", app.filter, rows.len()),
            t.warn(),
        ));
    }
    if shown.len() < rows.len() {
        title.push(Span::styled(
            format!(" · {} more ↕", rows.len() - shown.len()),
            t.dim(),
        ));
    }
    if let Some(note) = sim_note(m) {
        title.push(Span::styled(format!(" · ETA {note}"), t.warn()));
    }
    title.push(Span::raw(" "));

    let ids = id_labels(m.experiments.keys().map(String::as_str));
    // Cells of every row, so the columns keep their widths as the list scrolls.
    let cells: Vec<(&ExperimentRow, [String; 8])> = rows
        .iter()
        .map(|&r| {
            let spec_steps = r.exp.spec.as_ref().map_or(0, |s| s.steps.len());
            let waiting = m.transfers.iter().any(|tr| tr.experiment_id == r.exp.id);
            let (done, left) = match &r.progress {
                _ if waiting && r.is_active() => ("wait".to_owned(), "transfer".to_owned()),
                Some(p) => (
                    format!("{:.0}%", (p.fraction * 100.0).clamp(0.0, 100.0)),
                    if p.remaining_s >= 0.0 {
                        eta(p.remaining_s)
                    } else {
                        "?".to_owned()
                    },
                ),
                None => ("-".to_owned(), "-".to_owned()),
            };
            let step = if r.fetched || spec_steps > 0 {
                render::step_progress(&r.exp)
            } else {
                "?".to_owned()
            };
            let name = if r.name().is_empty() {
                "…".to_owned()
            } else {
                r.name().to_owned()
            };
            let id = ids
                .get(&r.exp.id)
                .cloned()
                .unwrap_or_else(|| r.exp.id.clone());
            (
                r,
                [
                    state_label(m, r),
                    id,
                    format!("{:>3}", r.priority()),
                    step,
                    format!("{done:>4}"),
                    left,
                    name,
                    r.sample().to_owned(),
                ],
            )
        })
        .collect();
    const HEADER: [&str; 8] = [
        "STATE", "ID", "PRI", "STEP", "DONE", "LEFT", "NAME", "SAMPLE",
    ];
    // Each column as wide as its widest cell; the name takes what is left, the sample at most
    // 12 columns.
    let width = |col: usize| -> u16 {
        let cells = cells.iter().map(|(_, c)| c[col].chars().count());
        cells.chain([HEADER[col].len()]).max().unwrap_or(0) as u16
    };
    let widths = [
        Constraint::Length(width(0)),
        Constraint::Length(width(1)),
        Constraint::Length(width(2)),
        Constraint::Length(width(3)),
        Constraint::Length(width(4)),
        Constraint::Length(width(5)),
        Constraint::Min(12),
        Constraint::Length(width(7).min(12)),
    ];
    let table_rows: Vec<Row> = cells
        .into_iter()
        .enumerate()
        // `shown` is in row order.
        .filter(|(i, _)| shown.binary_search(i).is_ok())
        .map(|(_, (r, c))| {
            let [state, rest @ ..] = c;
            let mut row = vec![Cell::from(state).style(t.state(r.exp.state))];
            row.extend(rest.into_iter().map(Cell::from));
            Row::new(row)
        })
        .collect();
    let table = Table::new(table_rows, widths)
        .header(Row::new(HEADER).style(t.title()))
        .block(Block::bordered().title(Line::from(title)))
        .row_highlight_style(t.selected())
        .highlight_symbol("▶");
    let mut state = TableState::default().with_selected(shown_selected);
    frame.render_stateful_widget(table, list_area, &mut state);
    if rows.is_empty() {
        let inner = list_area.inner(ratatui::layout::Margin::new(1, 1));
        let text = if app.filter.is_empty() {
            "no experiments yet: submit a batch (ppuctl submit FILE)"
        } else {
            "no experiment matches the filter (Esc clears it)"
        };
        if inner.height > 1 {
            let inner = Rect {
                y: inner.y + 1,
                height: inner.height - 1,
                ..inner
            };
            frame.render_widget(Paragraph::new(Line::styled(text, t.dim())), inner);
        }
    }

    let transfers: Vec<Line> = m
        .transfers
        .iter()
        .take(2)
        .map(|tr| {
            Line::from(vec![
                Span::styled(" ⇄ TRANSFER ", t.alarm()),
                Span::styled(
                    format!(
                        " move sample {} to {} (from {}) ",
                        or_dash(&tr.sample_id),
                        or_dash(&tr.to_device_id),
                        if tr.from_device_id.is_empty() {
                            "no location"
                        } else {
                            &tr.from_device_id
                        },
                    ),
                    t.warn(),
                ),
                Span::styled("t confirms", t.dim()),
            ])
        })
        .collect();
    frame.render_widget(Paragraph::new(transfers), transfer_area);

    let row = rows.get(selected).copied();
    draw_experiment_detail(frame, app, row, detail_area);
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "-" } else { s }
}

fn draw_experiment_detail(frame: &mut Frame, app: &App, row: Option<&ExperimentRow>, area: Rect) {
    let t = &app.theme;
    let Some(r) = row else {
        frame.render_widget(Block::bordered().title(" Experiment "), area);
        return;
    };
    let e = &r.exp;
    let block = Block::bordered().title(Line::from(vec![
        Span::styled(" Experiment ", t.title()),
        Span::raw(format!("{} ", e.id)),
    ]));
    let inner_height = area.height.saturating_sub(2) as usize;
    let mut lines: Vec<Line> = Vec::new();
    let spec = e.spec.clone().unwrap_or_default();
    let mut head = vec![
        Span::styled(
            if spec.name.is_empty() {
                "(not fetched yet)".to_owned()
            } else {
                spec.name.clone()
            },
            t.title(),
        ),
        Span::raw(format!(
            " · sample {} · priority {} · ",
            or_dash(&spec.sample_id),
            spec.priority
        )),
        Span::styled(state_label(&app.model, r), t.state(e.state)),
    ];
    if !spec.labels.is_empty() {
        head.push(Span::styled(
            format!(" · {}", render::labels(&spec.labels)),
            t.dim(),
        ));
    }
    lines.push(Line::from(head));
    if !e.message.is_empty() {
        lines.push(Line::styled(format!("message: {}", e.message), t.bad()));
    }
    let running = r.state() == pb::ExperimentState::Running;
    for (i, step) in spec.steps.iter().enumerate() {
        let result = e.results.iter().find(|x| x.step_index as usize == i);
        let (marker, style) = match result.map(|x| pb::StepOutcome::try_from(x.outcome)) {
            Some(Ok(pb::StepOutcome::Succeeded)) => ("✓", t.good()),
            Some(_) => ("✗", t.bad()),
            None if running && i == e.current_step as usize => ("▶", t.accent()),
            None => ("·", t.dim()),
        };
        let device = result
            .map(|x| x.device_id.as_str())
            .filter(|d| !d.is_empty())
            .or((!step.device_id.is_empty()).then_some(step.device_id.as_str()));
        let mut spans = vec![
            Span::styled(format!("{marker} {:>2}. ", i + 1), style),
            Span::raw(render::step_body(step)),
        ];
        if let Some(d) = device {
            spans.push(Span::styled(format!(" [{d}]"), t.dim()));
        }
        lines.push(Line::from(spans));
        if let Some(x) = result {
            let mut s = format!("       {}", render::step_outcome(x.outcome));
            if !x.message.is_empty() {
                s.push_str(&format!(": {}", x.message));
            }
            if let Some(res) = &x.result {
                s.push_str(&format!(" — {}", render::result_summary(res)));
            }
            lines.push(Line::styled(s, style));
        } else if running
            && i == e.current_step as usize
            && let Some(tr) = app
                .model
                .transfers
                .iter()
                .find(|tr| tr.experiment_id == e.id && tr.step_index as usize == i)
        {
            lines.push(Line::styled(
                format!(
                    "       waiting for the move of {} to {} to be confirmed (t)",
                    or_dash(&tr.sample_id),
                    or_dash(&tr.to_device_id)
                ),
                t.warn(),
            ));
        } else if running
            && i == e.current_step as usize
            && let Some(p) = &r.progress
        {
            let mut s = format!("       {:.0}%", p.fraction * 100.0);
            if !p.message.is_empty() {
                s.push_str(&format!(" {}", p.message));
            }
            if p.remaining_s >= 0.0 {
                s.push_str(&format!(", {} left", eta(p.remaining_s)));
                if let Some(note) = sim_note(&app.model) {
                    s.push_str(&format!(" {note}"));
                }
            }
            lines.push(Line::styled(s, t.accent()));
        }
    }
    let room = inner_height.saturating_sub(lines.len() + 1);
    if room > 0 && !r.recent.is_empty() {
        lines.push(Line::styled("recent events:", t.title()));
        let skip = r.recent.len().saturating_sub(room);
        for ev in r.recent.iter().skip(skip) {
            lines.push(event_line(app, ev, false));
        }
    }
    frame.render_widget(Paragraph::new(lines).block(block), area);
}

// ---------------------------------------------------------------------------------------------
// Devices view.
// ---------------------------------------------------------------------------------------------

/// The range a trend is scaled to: the values' own range, but at least 0.1 % of their size
/// and at least `resolution` (the smallest change the reading's display format shows), so the
/// noise of a steady reading, or of one near zero (a 0-bar pressure), does not fill the whole
/// height: it draws flat.
fn trend_span(lo: f64, hi: f64, resolution: Option<f64>) -> f64 {
    (hi - lo)
        .max(1e-3 * lo.abs().max(hi.abs()))
        .max(resolution.unwrap_or(0.0))
        .max(1e-9)
}

/// The last `width` values as block characters scaled between their min and max (see
/// [`trend_span`]).
pub fn sparkline_text(
    values: impl IntoIterator<Item = f64>,
    width: usize,
    resolution: Option<f64>,
) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    let all: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
    let tail = &all[all.len().saturating_sub(width)..];
    let (lo, hi) = tail
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(*v), hi.max(*v))
        });
    let span = trend_span(lo, hi, resolution);
    tail.iter()
        .map(|v| BARS[(((v - lo) / span * 7.0).round() as usize).min(7)])
        .collect()
}

fn draw_devices(frame: &mut Frame, app: &App, area: Rect) {
    let t = &app.theme;
    let m = &app.model;
    let selected = app.selected[1].min(m.devices.len().saturating_sub(1));
    let list_height = (m.devices.len() as u16 + 3).clamp(4, (area.height / 2).max(4));
    let [list_area, detail_area] =
        Layout::vertical([Constraint::Length(list_height), Constraint::Min(0)]).areas(area);

    let rows: Vec<Row> = m
        .devices
        .iter()
        .map(|d| {
            let link = if d.connected() {
                Cell::from("up").style(t.good())
            } else {
                Cell::from("DOWN").style(t.alarm())
            };
            let maint = if d.device.r#unsafe {
                Cell::from("UNSAFE").style(t.alarm())
            } else if d.device.maintenance {
                Cell::from("MAINT").style(t.warn())
            } else {
                Cell::from("-")
            };
            let alarmed = d
                .device
                .latest
                .as_ref()
                .is_some_and(|r| !r.alarms.is_empty());
            let reading =
                Cell::from(d.key_reading()).style(if alarmed { t.bad() } else { Style::new() });
            Row::new(vec![
                Cell::from(d.device.id.clone()),
                link,
                maint,
                reading,
                Cell::from(sparkline_text(
                    d.history.iter().copied(),
                    14,
                    key_value_resolution(&d.device),
                ))
                .style(t.accent()),
            ])
        })
        .collect();
    let table = Table::new(
        rows,
        [
            Constraint::Length(11),
            Constraint::Length(4),
            Constraint::Length(6),
            Constraint::Min(20),
            Constraint::Length(14),
        ],
    )
    .header(Row::new(vec!["DEVICE", "LINK", "STATE", "KEY READING", "TREND"]).style(t.title()))
    .block(Block::bordered().title(Line::from(vec![
        Span::styled(" Devices ", t.title()),
        Span::raw(format!("{} ", m.devices.len())),
    ])))
    .row_highlight_style(t.selected())
    .highlight_symbol("▶");
    let mut state =
        TableState::default().with_selected((!m.devices.is_empty()).then_some(selected));
    frame.render_stateful_widget(table, list_area, &mut state);

    match m.devices.get(selected) {
        Some(d) => draw_device_detail(frame, app, d, detail_area),
        None => frame.render_widget(
            Paragraph::new(Line::styled("no devices reported yet", t.dim()))
                .block(Block::bordered().title(" Device ")),
            detail_area,
        ),
    }
}

fn draw_device_detail(frame: &mut Frame, app: &App, d: &DeviceRow, area: Rect) {
    let t = &app.theme;
    let dev = &d.device;
    let block = Block::bordered().title(Line::from(vec![
        Span::styled(format!(" {} · ", dev.id), t.title()),
        Span::raw(format!(
            "{} · {} · {} ",
            render::device_family(dev.family),
            dev.driver,
            d.activity()
        )),
    ]));
    let inner = block.inner(area);
    frame.render_widget(block, area);

    let mut lines: Vec<Line> = Vec::new();
    let mut link = vec![Span::raw("link ")];
    if d.connected() {
        link.push(Span::styled("connected", t.good()));
    } else {
        link.push(Span::styled("DISCONNECTED", t.alarm()));
        if !dev.connection_error.is_empty() {
            link.push(Span::styled(format!(" {}", dev.connection_error), t.bad()));
        }
    }
    link.push(Span::styled(format!("  {}", dev.transport), t.dim()));
    lines.push(Line::from(link));
    let mut status = if dev.maintenance {
        vec![Span::styled("IN MAINTENANCE", t.warn())]
    } else {
        vec![Span::raw("in service")]
    };
    if dev.maintenance && !dev.maintenance_reason.is_empty() {
        status.push(Span::raw(format!(" ({})", dev.maintenance_reason)));
    }
    status.push(Span::raw(format!(
        " · sample {}",
        or_dash(&dev.holds_sample_id)
    )));
    if let Some((exp, step)) = &d.reserved {
        status.push(Span::raw(format!(
            " · reserved: {} step {}",
            app.model.experiment_label(exp),
            step + 1
        )));
    }
    lines.push(Line::from(status));
    if dev.r#unsafe {
        // Its own line, right under the link: the one thing an operator must not miss.
        lines.push(Line::from(vec![
            Span::styled("UNSAFE", t.alarm()),
            Span::styled(format!(" {}", dev.unsafe_reason), t.bad()),
        ]));
    }
    if let Some(r) = &dev.latest {
        let values: Vec<String> = r
            .values
            .iter()
            .map(|v| format!("{} {}", v.name, render::measured(v.value, 3)))
            .collect();
        lines.push(Line::raw(format!(
            "{}  {}",
            clock_time(r.time.as_ref()),
            values.join("  ")
        )));
        if !r.alarms.is_empty() {
            lines.push(Line::styled(
                format!("device alarms: {}", r.alarms.join(", ")),
                t.alarm(),
            ));
        }
    } else {
        lines.push(Line::styled("no reading yet", t.dim()));
    }
    let history: Vec<f64> = d.history.iter().copied().collect();
    if let (Some(lo), Some(hi), Some(last)) = (
        history.iter().copied().reduce(f64::min),
        history.iter().copied().reduce(f64::max),
        history.last(),
    ) {
        lines.push(Line::styled(
            format!(
                "{}, last {} readings: now {}  min {}  max {}",
                key_value_label(dev),
                history.len(),
                render::measured(*last, 2),
                render::measured(lo, 2),
                render::measured(hi, 2)
            ),
            t.dim(),
        ));
    }
    let text_height = (lines.len() as u16).min(inner.height);
    let [text_area, spark_area] =
        Layout::vertical([Constraint::Length(text_height), Constraint::Min(0)]).areas(inner);
    frame.render_widget(Paragraph::new(lines), text_area);
    if spark_area.height > 0 && !history.is_empty() {
        let width = spark_area.width as usize;
        let tail = &history[history.len().saturating_sub(width)..];
        let lo = tail.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = tail.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let span = trend_span(lo, hi, key_value_resolution(dev));
        // Scaled to the visible range so small changes still show; the floor of 1 keeps a
        // flat line visible.
        let data: Vec<u64> = tail
            .iter()
            .map(|v| 1 + ((v - lo) / span * 99.0).round() as u64)
            .collect();
        frame.render_widget(
            Sparkline::default().data(&data).max(100).style(t.accent()),
            spark_area,
        );
    }
}

/// `HH:MM:SS` (UTC) of a timestamp, `--:--:--` if unset.
pub fn clock_time(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        Some(ts) => {
            let s = ts.seconds.rem_euclid(86_400);
            format!("{:02}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
        }
        None => "--:--:--".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------------
// Alarms and events view.
// ---------------------------------------------------------------------------------------------

fn draw_alarms(frame: &mut Frame, app: &App, area: Rect) {
    let t = &app.theme;
    let m = &app.model;
    let alarms = m.alarm_rows();
    let selected = app.selected[2].min(alarms.len().saturating_sub(1));
    let list_height = (alarms.len() as u16 + 2).clamp(3, (area.height / 2).max(3));
    let [list_area, tail_area] =
        Layout::vertical([Constraint::Length(list_height), Constraint::Min(0)]).areas(area);

    let unack = m.unacknowledged();
    let title = Line::from(vec![
        Span::styled(" Alarms ", t.title()),
        if unack > 0 {
            Span::styled(format!(" {unack} UNACKNOWLEDGED "), t.alarm())
        } else {
            Span::raw(format!("{} listed, all acknowledged ", alarms.len()))
        },
    ]);
    let rows: Vec<Row> = alarms
        .iter()
        .map(|a| {
            let ack = if a.acknowledged {
                if a.acknowledged_by.is_empty() {
                    "ack".to_owned()
                } else {
                    format!("ack {}", a.acknowledged_by)
                }
            } else {
                "UNACK".to_owned()
            };
            let row = Row::new(vec![
                Cell::from(ack),
                Cell::from(render::alarm_severity(a.severity)),
                Cell::from(a.device_id.clone()),
                Cell::from(a.code.clone()),
                Cell::from(if a.cleared { "cleared" } else { "active" }),
                Cell::from(clock_time(a.raised_at.as_ref())),
                Cell::from(a.message.clone()),
            ]);
            if a.acknowledged {
                row.style(t.dim())
            } else {
                row.style(t.alarm())
            }
        })
        .collect();
    let table = Table::new(
        rows,
        [
            Constraint::Length(10),
            Constraint::Length(8),
            Constraint::Length(10),
            Constraint::Length(18),
            Constraint::Length(7),
            Constraint::Length(8),
            Constraint::Min(8),
        ],
    )
    .block(Block::bordered().title(title))
    .row_highlight_style(Style::new().add_modifier(Modifier::UNDERLINED))
    .highlight_symbol("▶");
    let mut state = TableState::default().with_selected((!alarms.is_empty()).then_some(selected));
    frame.render_stateful_widget(table, list_area, &mut state);
    if alarms.is_empty() {
        let inner = list_area.inner(ratatui::layout::Margin::new(1, 1));
        frame.render_widget(Paragraph::new(Line::styled("no alarms", t.good())), inner);
    }

    let block = Block::bordered().title(Line::from(vec![
        Span::styled(" Events ", t.title()),
        Span::raw(format!("live tail, last #{} ", m.last_sequence)),
    ]));
    let height = tail_area.height.saturating_sub(2) as usize;
    let skip = m.tail.len().saturating_sub(height);
    let lines: Vec<Line> = m
        .tail
        .iter()
        .skip(skip)
        .map(|e| event_line(app, e, true))
        .collect();
    frame.render_widget(Paragraph::new(lines).block(block), tail_area);
}

/// One event on one line: `seq time subject summary`; an alarm still unacknowledged is
/// highlighted.
fn event_line<'a>(app: &App, e: &pb::Event, with_subject: bool) -> Line<'a> {
    let t = &app.theme;
    let m = &app.model;
    let mut spans = vec![Span::styled(
        format!("{:>5} {} ", e.sequence, clock_time(e.time.as_ref())),
        t.dim(),
    )];
    if with_subject {
        let subject = if !e.device_id.is_empty() {
            e.device_id.clone()
        } else if !e.experiment_id.is_empty() {
            m.experiment_label(&e.experiment_id)
        } else {
            "queue".to_owned()
        };
        let subject: String = subject.chars().take(14).collect();
        spans.push(Span::raw(format!("{subject:<14} ")));
    }
    let summary = render::event_summary(e);
    let style = match &e.kind {
        Some(pb::event::Kind::Alarm(a)) if !a.cleared => {
            if m.is_unacknowledged(&e.device_id, &a.code) {
                t.alarm()
            } else {
                t.bad()
            }
        }
        Some(pb::event::Kind::ExperimentStateChanged(c)) => t.state(c.to),
        Some(pb::event::Kind::TransferRequested(_)) => t.warn(),
        Some(pb::event::Kind::DeviceConnectionChanged(c))
            if c.state != pb::ConnectionState::Connected as i32 =>
        {
            t.bad()
        }
        _ => Style::new(),
    };
    spans.push(Span::styled(summary, style));
    Line::from(spans)
}

// ---------------------------------------------------------------------------------------------
// Pop-ups.
// ---------------------------------------------------------------------------------------------

/// Lines `s` takes when word-wrapped at `width` columns.
fn wrapped_lines(s: &str, width: usize) -> u16 {
    let (mut lines, mut current) = (1u16, 0usize);
    for word in s.split(' ') {
        let w = word.chars().count();
        if current == 0 {
            current = w;
        } else if current + 1 + w <= width {
            current += 1 + w;
        } else {
            lines += 1;
            current = w;
        }
        lines += (current.saturating_sub(1) / width) as u16;
        current = if current > width {
            current % width
        } else {
            current
        };
    }
    lines
}

/// A centred rectangle of at most `width` × `height` inside `area`.
fn centered(area: Rect, width: u16, height: u16) -> Rect {
    let w = width.min(area.width);
    let h = height.min(area.height);
    Rect {
        x: area.x + (area.width - w) / 2,
        y: area.y + (area.height - h) / 2,
        width: w,
        height: h,
    }
}

/// The keys, for `?`.
pub const HELP: &[(&str, &str)] = &[
    (
        "1 2 3, Tab",
        "Queue, Devices, Alarms & events (Shift-Tab back)",
    ),
    ("↑ ↓  j k", "select a row (PgUp PgDn Home End)"),
    ("/", "filter the queue (Enter keeps it, Esc clears it)"),
    ("p", "pause the queue, or resume it when paused"),
    ("A", "abort: pause and abort every running step"),
    ("c", "cancel the selected experiment"),
    ("h", "hold the selected queued experiment, or release it"),
    ("J K, ⇧↓ ⇧↑", "move it later / earlier in the start order"),
    ("t", "confirm the pending sample transfer"),
    ("m", "take the selected device into/out of maintenance"),
    ("a", "acknowledge the selected alarm"),
    ("y / n, Esc", "answer a confirmation"),
    ("?", "this help (any key closes it)"),
    ("q, Ctrl-C", "quit"),
];

fn draw_help(frame: &mut Frame, app: &App) {
    let t = &app.theme;
    let area = centered(frame.area(), 72, HELP.len() as u16 + 6);
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(format!(" {k:<11}"), t.title().patch(t.accent())),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::raw(""));
    lines.push(Line::styled(
        " Every action asks for confirmation. Staleness: time since the daemon",
        t.dim(),
    ));
    lines.push(Line::styled(
        " last answered; on a restart the TUI reconnects and resumes the log.",
        t.dim(),
    ));
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines).block(Block::bordered().title(Span::styled(" Keys ", t.title()))),
        area,
    );
}

fn draw_confirm(frame: &mut Frame, app: &App, action: &super::actions::Action) {
    let t = &app.theme;
    let width = 64u16.min(frame.area().width);
    let text_width = usize::from(width.saturating_sub(2)).max(1);
    let wrapped = |s: &str| wrapped_lines(s, text_width);
    let height = wrapped(&action.prompt()) + wrapped(&action.consequence()) + 5;
    let area = centered(frame.area(), width, height);
    let lines = vec![
        Line::styled(action.prompt(), t.title()),
        Line::raw(""),
        Line::raw(action.consequence()),
        Line::raw(""),
        Line::from(vec![
            Span::styled(" y ", t.alarm()),
            Span::raw(" yes, do it     "),
            Span::styled(" n ", t.selected()),
            Span::raw(" / Esc  no"),
        ]),
    ];
    frame.render_widget(Clear, area);
    frame.render_widget(
        Paragraph::new(lines)
            .wrap(Wrap { trim: true })
            .block(Block::bordered().title(Span::styled(" Confirm ", t.warn()))),
        area,
    );
}
