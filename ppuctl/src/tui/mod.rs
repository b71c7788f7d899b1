//! `ppuctl tui`: the technician's terminal UI — the queue, the devices with live readings, the
//! alarms and the event log, and the actions taken at the bench (pause/resume, cancel, abort,
//! maintenance, acknowledge, confirm a transfer), each confirmed first.
//!
//! It uses only the public ppu.v1 API, like a planner: [`client`] feeds [`state`] from the
//! event stream and a short poll and runs [`actions`]; [`views`] draws the state; this module
//! owns the terminal, the keyboard and the loop tying them together.

pub mod actions;
pub mod client;
pub mod state;
pub mod views;

use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Args;
use ratatui::crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use tokio::sync::mpsc;

use actions::Action;
use client::{Cmd, Incoming};
use ppu_proto::v1::event::Kind;
use state::{Model, QueueStatus, Update};
use views::Theme;

/// How often the screen is redrawn with nothing new, to keep the staleness current.
const TICK: Duration = Duration::from_millis(250);
/// Updates applied at most between two redraws (a long replay must not freeze the keys).
const BATCH: usize = 2000;

#[derive(Debug, Args)]
pub struct TuiArgs {
    /// Operator name recorded with acknowledgements and transfer confirmations.
    #[arg(long, value_name = "NAME", env = "USER", default_value = "")]
    pub by: String,
    /// No colours (also when the NO_COLOR environment variable is set).
    #[arg(long)]
    pub no_color: bool,
}

/// The three views.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum View {
    Queue,
    Devices,
    Alarms,
}

impl View {
    fn index(self) -> usize {
        match self {
            View::Queue => 0,
            View::Devices => 1,
            View::Alarms => 2,
        }
    }

    fn from_index(i: usize) -> View {
        match i % 3 {
            0 => View::Queue,
            1 => View::Devices,
            _ => View::Alarms,
        }
    }
}

/// What the keyboard is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    Normal,
    /// Typing the queue filter.
    Filter,
    /// Showing the keys.
    Help,
    /// Asking before running an action.
    Confirm(Action),
}

/// The status line's message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub text: String,
    pub error: bool,
}

/// The TUI's state: the lab as the daemon reports it, plus what the user is looking at.
pub struct App {
    pub model: Model,
    pub addr: String,
    pub theme: Theme,
    pub view: View,
    pub mode: Mode,
    /// Selected row per view.
    pub selected: [usize; 3],
    pub filter: String,
    pub status: Option<Status>,
    pub quit: bool,
    reconnects_seen: u32,
}

impl App {
    pub fn new(addr: &str, theme: Theme) -> App {
        App {
            model: Model::default(),
            addr: addr.to_owned(),
            theme,
            view: View::Queue,
            mode: Mode::Normal,
            selected: [0; 3],
            filter: String::new(),
            status: None,
            quit: false,
            reconnects_seen: 0,
        }
    }

    fn say(&mut self, text: impl Into<String>, error: bool) {
        self.status = Some(Status {
            text: text.into(),
            error,
        });
    }

    /// Applies what the client reported; returns the fetches to ask for.
    pub fn on_incoming(&mut self, incoming: Incoming, now: Instant, now_s: i64) -> Vec<Cmd> {
        match incoming {
            Incoming::Update(u) => {
                // Rows move as states change: keep the selection on the same experiment/alarm.
                let reorders = match &u {
                    Update::Event(e) => matches!(
                        e.kind,
                        Some(
                            Kind::ExperimentStateChanged(_)
                                | Kind::Alarm(_)
                                | Kind::AlarmAcknowledged(_)
                        )
                    ),
                    Update::Polled(_) | Update::Experiments { .. } => true,
                    _ => false,
                };
                let anchor =
                    reorders.then(|| (self.selected_experiment_id(), self.selected_alarm()));
                let fetch = self.model.apply(u, now, now_s);
                if let Some((experiment, alarm)) = anchor {
                    self.reselect(experiment, alarm);
                }
                if self.model.reconnects > self.reconnects_seen {
                    self.reconnects_seen = self.model.reconnects;
                    let after = self.model.resumed_after.unwrap_or(0);
                    self.say(
                        format!("reconnected; event stream resumed after sequence {after}"),
                        false,
                    );
                }
                fetch.into_iter().map(Cmd::Fetch).collect()
            }
            Incoming::Done { action, result } => {
                match result {
                    Ok(text) => self.say(text, false),
                    Err(e) => self.say(format!("{} failed: {e}", action.doing()), true),
                }
                Vec::new()
            }
        }
    }

    fn rows(&self, view: View) -> usize {
        match view {
            View::Queue => self.model.queue_rows(&self.filter).len(),
            View::Devices => self.model.devices.len(),
            View::Alarms => self.model.alarms.len(),
        }
    }

    fn move_selection(&mut self, delta: isize) {
        let i = self.view.index();
        let n = self.rows(self.view);
        let cur = self.selected[i].min(n.saturating_sub(1)) as isize;
        self.selected[i] = (cur + delta).clamp(0, n.saturating_sub(1) as isize) as usize;
    }

    fn selected_experiment_id(&self) -> Option<String> {
        self.selected_experiment().map(|r| r.exp.id.clone())
    }

    fn selected_alarm(&self) -> Option<(String, String)> {
        let alarms = self.model.alarm_rows();
        let i = self.selected[2].min(alarms.len().saturating_sub(1));
        alarms.get(i).map(|a| (a.device_id.clone(), a.code.clone()))
    }

    fn reselect(&mut self, experiment: Option<String>, alarm: Option<(String, String)>) {
        if let Some(id) = experiment
            && let Some(i) = self
                .model
                .queue_rows(&self.filter)
                .iter()
                .position(|r| r.exp.id == id)
        {
            self.selected[0] = i;
        }
        if let Some((device, code)) = alarm
            && let Some(i) = self
                .model
                .alarm_rows()
                .iter()
                .position(|a| a.device_id == device && a.code == code)
        {
            self.selected[2] = i;
        }
    }

    fn selected_experiment(&self) -> Option<&state::ExperimentRow> {
        let rows = self.model.queue_rows(&self.filter);
        let i = self.selected[0].min(rows.len().saturating_sub(1));
        rows.get(i).copied()
    }

    /// Handles one key; returns a command when an action was confirmed.
    pub fn on_key(&mut self, key: KeyEvent) -> Option<Cmd> {
        if key.kind != KeyEventKind::Press {
            return None;
        }
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            self.quit = true;
            return None;
        }
        match std::mem::replace(&mut self.mode, Mode::Normal) {
            Mode::Help => None,
            Mode::Confirm(action) => match key.code {
                KeyCode::Char('y' | 'Y') => {
                    self.say(action.doing(), false);
                    Some(Cmd::Act(action))
                }
                KeyCode::Char('n' | 'N' | 'q') | KeyCode::Esc => {
                    self.say("not done", false);
                    None
                }
                _ => {
                    self.mode = Mode::Confirm(action);
                    None
                }
            },
            Mode::Filter => {
                match key.code {
                    KeyCode::Enter => {}
                    KeyCode::Esc => self.filter.clear(),
                    KeyCode::Backspace => {
                        self.filter.pop();
                        self.mode = Mode::Filter;
                    }
                    KeyCode::Char(c) => {
                        self.filter.push(c);
                        self.mode = Mode::Filter;
                    }
                    _ => self.mode = Mode::Filter,
                }
                self.selected[0] = 0;
                None
            }
            Mode::Normal => {
                self.on_normal_key(key);
                None
            }
        }
    }

    fn on_normal_key(&mut self, key: KeyEvent) {
        let page = 10;
        match key.code {
            KeyCode::Char('q') => self.quit = true,
            KeyCode::Char('?') | KeyCode::F(1) => self.mode = Mode::Help,
            KeyCode::Char('1') => self.view = View::Queue,
            KeyCode::Char('2') => self.view = View::Devices,
            KeyCode::Char('3') => self.view = View::Alarms,
            KeyCode::Tab | KeyCode::Right => self.view = View::from_index(self.view.index() + 1),
            KeyCode::BackTab | KeyCode::Left => self.view = View::from_index(self.view.index() + 2),
            KeyCode::Up if key.modifiers.contains(KeyModifiers::SHIFT) => self.ask_move(-1),
            KeyCode::Down if key.modifiers.contains(KeyModifiers::SHIFT) => self.ask_move(1),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::PageUp => self.move_selection(-page),
            KeyCode::PageDown => self.move_selection(page),
            KeyCode::Home | KeyCode::Char('g') => self.selected[self.view.index()] = 0,
            KeyCode::End | KeyCode::Char('G') => self.move_selection(isize::MAX / 2),
            KeyCode::Esc => {
                self.filter.clear();
                self.status = None;
            }
            KeyCode::Char('/') => {
                self.view = View::Queue;
                self.mode = Mode::Filter;
            }
            KeyCode::Char('p') => {
                let action = if self.model.queue_status == QueueStatus::Paused {
                    Action::ResumeQueue
                } else {
                    Action::PauseQueue
                };
                self.mode = Mode::Confirm(action);
            }
            KeyCode::Char('A') => self.mode = Mode::Confirm(Action::AbortQueue),
            KeyCode::Char('c') => self.ask_cancel(),
            KeyCode::Char('h') => self.ask_hold(),
            KeyCode::Char('K') => self.ask_move(-1),
            KeyCode::Char('J') => self.ask_move(1),
            KeyCode::Char('t') => self.ask_transfer(),
            KeyCode::Char('m') => self.ask_maintenance(),
            KeyCode::Char('a') => self.ask_acknowledge(),
            _ => {}
        }
    }

    fn ask_cancel(&mut self) {
        if self.view != View::Queue {
            self.say(
                "c cancels the selected experiment in the Queue view (1)",
                true,
            );
            return;
        }
        let Some(row) = self.selected_experiment() else {
            self.say("no experiment selected", true);
            return;
        };
        if !row.is_active() {
            let state = crate::render::experiment_state(row.exp.state);
            let id = row.exp.id.clone();
            self.say(format!("{id} is already {state}"), true);
            return;
        }
        let action = Action::Cancel {
            id: row.exp.id.clone(),
            name: row.name().to_owned(),
        };
        self.mode = Mode::Confirm(action);
    }

    /// The selected experiment if it is QUEUED (hold, release and move act on the start
    /// order), else says why not.
    fn selected_queued(&mut self, what: &str) -> Option<(String, String)> {
        if self.view != View::Queue {
            self.say(
                format!("{what} the selected experiment in the Queue view (1)"),
                true,
            );
            return None;
        }
        let Some(row) = self.selected_experiment() else {
            self.say("no experiment selected", true);
            return None;
        };
        let (id, name) = (row.exp.id.clone(), row.name().to_owned());
        if row.state() != ppu_proto::v1::ExperimentState::Queued {
            let state = crate::render::experiment_state(row.exp.state);
            self.say(
                format!("{id} is {state}: only a QUEUED experiment can be held or moved"),
                true,
            );
            return None;
        }
        Some((id, name))
    }

    fn ask_hold(&mut self) {
        let Some((id, name)) = self.selected_queued("h holds or releases") else {
            return;
        };
        let held = self
            .model
            .experiments
            .get(&id)
            .is_some_and(|r| self.model.is_held(r));
        self.mode = Mode::Confirm(if held {
            Action::Release { id, name }
        } else {
            Action::Hold { id, name }
        });
    }

    /// Asks to move the selected queued experiment `delta` places in the start order.
    fn ask_move(&mut self, delta: i64) {
        let Some((id, name)) = self.selected_queued("J/K moves") else {
            return;
        };
        let Some(from) = self.model.queued_ids.iter().position(|x| *x == id) else {
            self.say(format!("{id} is not in the daemon's start order yet"), true);
            return;
        };
        let last = self.model.queued_ids.len() - 1;
        let to = from as i64 + delta;
        if to < 0 || to > last as i64 {
            let end = if delta < 0 { "first" } else { "last" };
            self.say(format!("{id} is already {end} in the start order"), true);
            return;
        }
        self.mode = Mode::Confirm(Action::Move {
            id,
            name,
            from: from as u32,
            to: to as u32,
        });
    }

    fn ask_transfer(&mut self) {
        let selected = if self.view == View::Queue {
            self.selected_experiment().map(|r| r.exp.id.clone())
        } else {
            None
        };
        match self.model.transfer_for(selected.as_deref()) {
            Some(t) => {
                self.mode = Mode::Confirm(Action::ConfirmTransfer {
                    id: t.id.clone(),
                    sample: t.sample_id.clone(),
                    from: t.from_device_id.clone(),
                    to: t.to_device_id.clone(),
                })
            }
            None => self.say("no sample transfer is waiting for confirmation", true),
        }
    }

    fn ask_maintenance(&mut self) {
        if self.view != View::Devices {
            self.say(
                "m toggles maintenance of the selected device in the Devices view (2)",
                true,
            );
            return;
        }
        let i = self.selected[1].min(self.model.devices.len().saturating_sub(1));
        match self.model.devices.get(i) {
            Some(d) => {
                self.mode = Mode::Confirm(Action::SetMaintenance {
                    device: d.device.id.clone(),
                    on: !d.device.maintenance,
                })
            }
            None => self.say("no device selected", true),
        }
    }

    fn ask_acknowledge(&mut self) {
        if self.view != View::Alarms {
            self.say(
                "a acknowledges the selected alarm in the Alarms view (3)",
                true,
            );
            return;
        }
        let alarms = self.model.alarm_rows();
        let i = self.selected[2].min(alarms.len().saturating_sub(1));
        match alarms.get(i) {
            Some(a) if a.acknowledged => {
                let text = format!("{} on {} is already acknowledged", a.code, a.device_id);
                self.say(text, true);
            }
            Some(a) => {
                self.mode = Mode::Confirm(Action::AcknowledgeAlarm {
                    device: a.device_id.clone(),
                    code: a.code.clone(),
                })
            }
            None => self.say("no alarm selected", true),
        }
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// Runs the TUI against the daemon `conn` reaches until the user quits.
pub async fn run(conn: &crate::conn::Conn, args: TuiArgs) -> Result<()> {
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        return Err(crate::InputError(
            "ppuctl tui needs a terminal (stdin and stdout); use `ppuctl watch` in scripts"
                .to_owned(),
        )
        .into());
    }
    let ch = client::channel(conn)?;
    let (cmd_tx, feed) = client::start(ch, args.by);
    let mut app = App::new(&conn.addr, Theme::from_env(args.no_color));

    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let result = event_loop(&mut terminal, &mut app, feed, cmd_tx).await;
    let restored = ratatui::try_restore().context("cannot restore the terminal");
    result.and(restored)
}

/// Reads the keyboard on its own thread (crossterm's reader blocks).
fn spawn_input() -> mpsc::Receiver<Event> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::spawn(move || {
        while let Ok(ev) = event::read() {
            if tx.blocking_send(ev).is_err() {
                return;
            }
        }
    });
    rx
}

async fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    app: &mut App,
    mut feed: mpsc::Receiver<Incoming>,
    cmd_tx: mpsc::UnboundedSender<Cmd>,
) -> Result<()> {
    let mut input = spawn_input();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let send = |cmds: Vec<Cmd>| {
        for c in cmds {
            // The client lives as long as this loop; a send can only fail on the way out.
            let _ = cmd_tx.send(c);
        }
    };
    loop {
        terminal
            .draw(|f| views::draw(f, app, Instant::now()))
            .context("cannot draw")?;
        if app.quit {
            return Ok(());
        }
        tokio::select! {
            ev = input.recv() => match ev {
                Some(Event::Key(key)) => {
                    if let Some(cmd) = app.on_key(key) {
                        send(vec![cmd]);
                    }
                }
                Some(_) => {}
                None => return Ok(()),
            },
            incoming = feed.recv() => {
                let Some(incoming) = incoming else { return Ok(()) };
                let (now, now_s) = (Instant::now(), unix_now());
                send(app.on_incoming(incoming, now, now_s));
                // Apply what else is waiting before drawing again.
                for _ in 0..BATCH {
                    match feed.try_recv() {
                        Ok(incoming) => send(app.on_incoming(incoming, now, now_s)),
                        Err(_) => break,
                    }
                }
            }
            _ = tick.tick() => {}
        }
    }
}

#[cfg(test)]
mod tests;
