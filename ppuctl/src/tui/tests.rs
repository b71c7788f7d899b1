//! Rendering tests: a fixed lab state, built through the same updates the client produces,
//! drawn on ratatui's `TestBackend` and compared with insta snapshots (under `snapshots/`);
//! plus the keyboard: every action asks first and runs only on `y`.

use std::time::{Duration, Instant};

use insta::assert_snapshot;
use ppu_proto::v1 as pb;
use ppu_proto::v1::event::Kind;
use prost_types::Timestamp;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::style::Color;

use super::actions::Action;
use super::client::{Cmd, Incoming};
use super::state::{Polled, Update};
use super::views::Theme;
use super::{App, Mode, View};

/// 2026-05-29T08:26:40Z.
const T0: i64 = 1_780_043_200;

fn ts(s: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: s,
        nanos: 0,
    })
}

fn spec(name: &str, sample: &str, priority: i32, steps: Vec<pb::Step>) -> pb::ExperimentSpec {
    pb::ExperimentSpec {
        name: name.into(),
        sample_id: sample.into(),
        priority,
        steps,
        ..Default::default()
    }
}

fn furnace(temperature_c: f64, hold_s: f64) -> pb::Step {
    use pb::furnace_segment::Kind as S;
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
            segments: [
                S::Ramp(pb::Ramp {
                    temperature_c,
                    rate_c_per_min: 5.0,
                }),
                S::Hold(pb::Hold { duration_s: hold_s }),
            ]
            .into_iter()
            .map(|k| pb::FurnaceSegment { kind: Some(k) })
            .collect(),
        })),
    }
}

fn transfer(sample: &str, from: &str, to: &str) -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Transfer(pb::Transfer {
            sample_id: sample.into(),
            from_device_id: from.into(),
            to_device_id: to.into(),
        })),
    }
}

fn isotherm() -> pb::Step {
    pb::Step {
        device_id: String::new(),
        kind: Some(pb::step::Kind::Isotherm(pb::Isotherm {
            adsorptive: "CO2".into(),
            temperature_c: 25.0,
            pressure_bar: vec![0.1, 0.5, 1.0],
            ..Default::default()
        })),
    }
}

fn experiment(
    id: &str,
    state: pb::ExperimentState,
    current_step: u32,
    spec: pb::ExperimentSpec,
) -> pb::Experiment {
    pb::Experiment {
        id: id.into(),
        batch_id: "01JX0000000000000000BATCH1".into(),
        spec: Some(spec),
        state: state as i32,
        current_step,
        created_at: ts(T0 - 3600),
        updated_at: ts(T0 - 60),
        ..Default::default()
    }
}

fn succeeded_furnace(step_index: u32, device: &str) -> pb::StepResult {
    pb::StepResult {
        step_index,
        device_id: device.into(),
        outcome: pb::StepOutcome::Succeeded as i32,
        started_at: ts(T0 - 3000),
        finished_at: ts(T0 - 600),
        result: Some(pb::step_result::Result::Furnace(pb::FurnaceResult {
            trace: vec![],
            max_overshoot_c: 1.5,
            targets: vec![],
        })),
        ..Default::default()
    }
}

fn values(pairs: &[(&str, f64)]) -> Vec<pb::Reading> {
    pairs
        .iter()
        .map(|(n, v)| pb::Reading {
            name: (*n).into(),
            value: *v,
        })
        .collect()
}

fn device(
    id: &str,
    family: pb::DeviceFamily,
    driver: &str,
    time: i64,
    readings: &[(&str, f64)],
) -> pb::Device {
    pb::Device {
        id: id.into(),
        family: family as i32,
        driver: driver.into(),
        transport: format!("sim://{id}"),
        connection: pb::ConnectionState::Connected as i32,
        latest: Some(pb::DeviceReading {
            device_id: id.into(),
            time: ts(time),
            values: values(readings),
            alarms: vec![],
        }),
        ..Default::default()
    }
}

/// The lab at one poll `i` (readings change with `i`, so the sparklines have a shape).
fn devices_at(i: i64) -> Vec<pb::Device> {
    let t = T0 - 40 + i;
    let x = i as f64;
    let mut furnace_2 = device(
        "furnace-2",
        pb::DeviceFamily::Furnace,
        "eurotherm",
        t,
        &[
            ("pv_c", 25.0),
            ("target_sp_c", 25.0),
            ("working_sp_c", 25.0),
            ("output_pct", 0.0),
        ],
    );
    furnace_2.maintenance = true;
    furnace_2.maintenance_reason = "thermocouple replacement".into();
    furnace_2.r#unsafe = true;
    furnace_2.unsafe_reason = "safe state pending: safe state failed: timeout after 500 ms".into();
    furnace_2.connection = pb::ConnectionState::Disconnected as i32;
    furnace_2.connection_error = "timeout after 500 ms".into();
    if let Some(r) = furnace_2.latest.as_mut() {
        r.alarms = vec!["sensor break".into()];
    }
    let mut analyser = device(
        "analyser-1",
        pb::DeviceFamily::Analyser,
        "sorption-mqtt",
        t,
        &[
            ("pressure_bar", 0.05 + 0.01 * x),
            ("sample_temperature_c", 25.0),
        ],
    );
    analyser.holds_sample_id = "S-012".into();
    vec![
        device(
            "furnace-1",
            pb::DeviceFamily::Furnace,
            "eurotherm",
            t,
            &[
                ("pv_c", 100.0 + 2.5 * x),
                ("target_sp_c", 450.0),
                ("working_sp_c", 102.0 + 2.5 * x),
                ("output_pct", 62.0),
            ],
        ),
        furnace_2,
        device(
            "pump-1",
            pb::DeviceFamily::Dispenser,
            "ne1000",
            t,
            &[
                ("fill_ml", 10.0 - 0.1 * x),
                ("infused_ml", 0.1 * x),
                ("withdrawn_ml", 0.0),
                ("pumping", 1.0),
            ],
        ),
        analyser,
        device(
            "balance-1",
            pb::DeviceFamily::Balance,
            "sics",
            t,
            &[("mass_g", 0.1523), ("stable", 1.0)],
        ),
    ]
}

fn event(seq: u64, at: i64, exp: &str, device: &str, kind: Kind) -> Update {
    Update::Event(Box::new(pb::Event {
        sequence: seq,
        time: ts(at),
        experiment_id: exp.into(),
        batch_id: String::new(),
        device_id: device.into(),
        kind: Some(kind),
    }))
}

const RUNNING: &str = "01JX0000000000000000000RUN1";
const WAITING: &str = "01JX0000000000000000000RUN2";
const QUEUED: &str = "01JX00000000000000000QUEUE1";
const HELD: &str = "01JX00000000000000000QUEUE2";
const DONE: &str = "01JX0000000000000000000DONE";
const FAILED: &str = "01JX000000000000000000FAIL1";

/// A connected lab in the middle of a working day.
fn fixture(theme: Theme) -> (App, Instant) {
    let now = Instant::now();
    let mut app = App::new("http://127.0.0.1:50051", theme);
    let at = now - Duration::from_millis(400);
    let apply = |app: &mut App, u: Update| {
        app.on_incoming(Incoming::Update(u), at, T0);
    };
    apply(&mut app, Update::StreamUp { resumed_after: 0 });
    let mut failed = experiment(
        FAILED,
        pb::ExperimentState::Failed,
        0,
        spec("ZIF-8 activation", "S-009", 0, vec![furnace(300.0, 3600.0)]),
    );
    failed.message = "furnace-2: sensor break".into();
    failed.results = vec![pb::StepResult {
        step_index: 0,
        device_id: "furnace-2".into(),
        outcome: pb::StepOutcome::Failed as i32,
        message: "sensor break".into(),
        ..Default::default()
    }];
    let mut done = experiment(
        DONE,
        pb::ExperimentState::Succeeded,
        0,
        spec(
            "UiO-66 activation",
            "S-008",
            0,
            vec![furnace(150.0, 1800.0)],
        ),
    );
    done.results = vec![succeeded_furnace(0, "furnace-1")];
    let mut waiting = experiment(
        WAITING,
        pb::ExperimentState::Running,
        1,
        spec(
            "HKUST-1 CO2 isotherm",
            "S-017",
            10,
            vec![
                furnace(170.0, 7200.0),
                transfer("S-017", "furnace-1", "analyser-1"),
                isotherm(),
            ],
        ),
    );
    waiting.results = vec![succeeded_furnace(0, "furnace-1")];
    let mut held = experiment(
        HELD,
        pb::ExperimentState::Queued,
        0,
        spec(
            "SBA-15 template removal",
            "S-021",
            0,
            vec![furnace(550.0, 21600.0)],
        ),
    );
    held.held = true;
    let mut labelled = spec(
        "Mg-Al LDH calcination 450 C",
        "S-019",
        5,
        vec![furnace(450.0, 14400.0)],
    );
    labelled.labels.insert("campaign".into(), "co2-2026".into());
    apply(
        &mut app,
        Update::Experiments {
            experiments: vec![
                failed,
                done,
                experiment(
                    RUNNING,
                    pb::ExperimentState::Running,
                    0,
                    spec(
                        "MOF-74 calcination",
                        "S-018",
                        10,
                        vec![furnace(450.0, 3600.0)],
                    ),
                ),
                waiting,
                experiment(QUEUED, pb::ExperimentState::Queued, 0, labelled),
                held,
            ],
            as_of: 0,
        },
    );
    for i in 0..40 {
        apply(
            &mut app,
            Update::Polled(Box::new(Polled {
                as_of: 0,
                queue: pb::Queue {
                    state: pb::QueueState::Running as i32,
                    running_ids: vec![RUNNING.into(), WAITING.into()],
                    queued_ids: vec![QUEUED.into(), HELD.into()],
                    held_ids: vec![HELD.into()],
                },
                devices: Ok(devices_at(i)),
                alarms: Ok(vec![]),
                transfers: Ok(vec![]),
            })),
        );
    }
    let transfer = pb::PendingTransfer {
        id: "01JX00000000000000TRANSFER".into(),
        experiment_id: WAITING.into(),
        step_index: 1,
        sample_id: "S-017".into(),
        from_device_id: "furnace-1".into(),
        to_device_id: "analyser-1".into(),
        requested_at: ts(T0 - 30),
    };
    let events = [
        event(
            1228,
            T0 - 50,
            RUNNING,
            "",
            Kind::StepStarted(pb::StepStarted {
                step_index: 0,
                step: Some(furnace(450.0, 3600.0)),
            }),
        ),
        event(
            1229,
            T0 - 45,
            RUNNING,
            "furnace-1",
            Kind::DeviceReserved(pb::DeviceReserved { step_index: 0 }),
        ),
        event(
            1230,
            T0 - 30,
            WAITING,
            "",
            Kind::TransferRequested(pb::TransferRequested {
                transfer: Some(transfer),
            }),
        ),
        event(
            1231,
            T0 - 20,
            "",
            "furnace-2",
            Kind::Alarm(pb::Alarm {
                code: "sensor_break".into(),
                message: "sensor break".into(),
                severity: pb::AlarmSeverity::Critical as i32,
                cleared: false,
            }),
        ),
        event(
            1232,
            T0 - 15,
            "",
            "pump-1",
            Kind::Alarm(pb::Alarm {
                code: "stall".into(),
                message: "motor stall".into(),
                severity: pb::AlarmSeverity::Warning as i32,
                cleared: false,
            }),
        ),
        event(
            1233,
            T0 - 10,
            "",
            "pump-1",
            Kind::AlarmAcknowledged(pb::AlarmAcknowledged {
                code: "stall".into(),
                acknowledged_by: "alice".into(),
            }),
        ),
        event(
            1234,
            T0 - 5,
            RUNNING,
            "",
            Kind::StepProgress(pb::StepProgress {
                step_index: 0,
                fraction: 0.45,
                message: "segment 1/2: ramp to 450 °C".into(),
                remaining_s: 3900.0,
            }),
        ),
    ];
    for e in events {
        apply(&mut app, e);
    }
    (app, now)
}

fn render(app: &App, now: Instant, width: u16, height: u16) -> Terminal<TestBackend> {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).expect("test terminal");
    terminal
        .draw(|f| super::views::draw(f, app, now))
        .expect("draw");
    terminal
}

fn screen(app: &App, now: Instant) -> String {
    render(app, now, 80, 24).backend().to_string()
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

fn ch(c: char) -> KeyEvent {
    key(KeyCode::Char(c))
}

const COLOR: Theme = Theme { color: true };
const MONO: Theme = Theme { color: false };

#[test]
fn queue_view_80x24() {
    let (mut app, now) = fixture(COLOR);
    let text = screen(&app, now);
    for expected in [
        "MOF-74 calcination",
        "45%",
        "~1 h 05",
        "QUEUED/HELD",
        "move sample S-017 to analyser-1",
        "queue RUNNING",
        "● LIVE #1234 0.4 s ago",
        "segment 1/2",
    ] {
        assert!(text.contains(expected), "{expected:?} missing:\n{text}");
    }
    assert_snapshot!("queue_80x24", text);
    // The detail pane follows the selection.
    app.on_key(key(KeyCode::Down));
    assert_snapshot!("queue_80x24_second_row", screen(&app, now));
}

#[test]
fn queue_filter_narrows_the_list() {
    let (mut app, now) = fixture(COLOR);
    for c in "/co2".chars() {
        app.on_key(ch(c));
    }
    assert_eq!(app.mode, Mode::Filter);
    let text = screen(&app, now);
    assert!(text.contains("filter: co2"), "{text}");
    app.on_key(key(KeyCode::Enter));
    assert_eq!(app.mode, Mode::Normal);
    let text = screen(&app, now);
    // "co2" matches the isotherm experiment's name and the labelled one's campaign.
    assert!(text.contains("HKUST-1 CO2 isotherm"), "{text}");
    assert!(text.contains("Mg-Al LDH"), "{text}");
    assert!(!text.contains("MOF-74"), "{text}");
    assert_snapshot!("queue_filtered_80x24", text);
    app.on_key(key(KeyCode::Esc));
    assert!(screen(&app, now).contains("MOF-74"));
}

#[test]
fn devices_view_80x24() {
    let (mut app, now) = fixture(COLOR);
    app.on_key(ch('2'));
    assert_eq!(app.view, View::Devices);
    let text = screen(&app, now);
    for expected in [
        "PV 197.5 °C  SP 199.5→450 °C  out 62 %",
        "pumping, 3.9 mL dispensed, fill 6.1 mL",
        "idle, 0.44 bar",
        "0.1523 g stable",
        "STATE",
        "UNSAFE",
        "DOWN",
        "▁▂▂▃▃▄▄▅▅▆▆▇▇█",
    ] {
        assert!(text.contains(expected), "{expected:?} missing:\n{text}");
    }
    assert_snapshot!("devices_80x24", text);
    app.on_key(ch('j'));
    let text = screen(&app, now);
    assert!(text.contains("thermocouple replacement"), "{text}");
    assert!(text.contains("timeout after 500 ms"), "{text}");
    assert!(text.contains("UNSAFE safe state pending"), "{text}");
    assert_snapshot!("devices_80x24_in_maintenance", text);
}

#[test]
fn alarms_view_80x24() {
    let (mut app, now) = fixture(COLOR);
    app.on_key(ch('3'));
    let text = screen(&app, now);
    for expected in [
        "UNACK",
        "sensor_break",
        "ack alice",
        "1 UNACKNOWLEDGED",
        "!1",
    ] {
        assert!(text.contains(expected), "{expected:?} missing:\n{text}");
    }
    assert_snapshot!("alarms_80x24", text);
}

#[test]
fn help_and_confirmation_popups() {
    let (mut app, now) = fixture(COLOR);
    app.on_key(ch('?'));
    assert_eq!(app.mode, Mode::Help);
    assert_snapshot!("help_80x24", screen(&app, now));
    app.on_key(key(KeyCode::Esc));
    assert_eq!(app.mode, Mode::Normal);

    app.on_key(ch('j'));
    assert!(app.on_key(ch('t')).is_none(), "asks first");
    let text = screen(&app, now);
    assert!(
        text.contains("Confirm transfer: move sample S-017 to analyser-1?"),
        "{text}"
    );
    assert_snapshot!("confirm_transfer_80x24", text);
}

#[test]
fn disconnected_and_stale_are_shown() {
    let (mut app, now) = fixture(MONO);
    // Nothing new for 3 s: stale.
    let later = now + Duration::from_secs(3);
    let text = screen(&app, later);
    assert!(text.contains("◐ STALE 3.4 s ago"), "{text}");
    app.on_incoming(
        Incoming::Update(Update::StreamDown {
            reason: "event stream: UNAVAILABLE: the daemon closed the event stream".into(),
        }),
        later,
        T0,
    );
    let text = screen(&app, later + Duration::from_millis(100));
    assert!(text.contains("✖ DISCONNECTED 3.5 s ago"), "{text}");
    assert!(
        text.contains("reconnecting… event stream: UNAVAILABLE"),
        "{text}"
    );
    assert_snapshot!("disconnected_80x24", text);
}

#[test]
fn monochrome_uses_no_colour_and_colour_highlights_alarms() {
    let (mut app, now) = fixture(MONO);
    for view in ['1', '2', '3'] {
        app.on_key(ch(view));
        let terminal = render(&app, now, 80, 24);
        let buffer = terminal.backend().buffer();
        for cell in buffer.content() {
            assert_eq!(cell.fg, Color::Reset, "view {view}: {cell:?}");
            assert_eq!(cell.bg, Color::Reset, "view {view}: {cell:?}");
        }
    }
    let (mut app, now) = fixture(COLOR);
    app.on_key(ch('3'));
    let terminal = render(&app, now, 80, 24);
    let buffer = terminal.backend().buffer();
    let red_row = (0..24).find(|y| {
        let line: String = (0..80).map(|x| buffer[(x, *y)].symbol()).collect();
        line.contains("sensor_break") && line.contains("UNACK")
    });
    let y = red_row.expect("an unacknowledged alarm row");
    let x = (0..80)
        .find(|x| buffer[(*x, y)].symbol() == "U")
        .expect("UNACK cell");
    assert_eq!(buffer[(x, y)].bg, Color::Red);
}

#[test]
fn every_action_asks_first_and_runs_only_on_yes() {
    let (mut app, _) = fixture(COLOR);
    // Pause: asked, then `n` does nothing.
    assert!(app.on_key(ch('p')).is_none());
    assert_eq!(app.mode, Mode::Confirm(Action::PauseQueue));
    assert!(app.on_key(ch('x')).is_none(), "other keys keep asking");
    assert!(app.on_key(ch('n')).is_none());
    assert_eq!(app.mode, Mode::Normal);
    // Pause, confirmed.
    app.on_key(ch('p'));
    assert!(matches!(
        app.on_key(ch('y')),
        Some(Cmd::Act(Action::PauseQueue))
    ));
    // Abort.
    app.on_key(ch('A'));
    assert!(matches!(
        app.on_key(ch('y')),
        Some(Cmd::Act(Action::AbortQueue))
    ));
    // Cancel the selected (first) experiment.
    app.on_key(ch('c'));
    match app.on_key(ch('y')) {
        Some(Cmd::Act(Action::Cancel { id, name })) => {
            assert_eq!(id, RUNNING);
            assert_eq!(name, "MOF-74 calcination");
        }
        other => panic!("{other:?}"),
    }
    // A finished experiment cannot be cancelled: no question.
    app.on_key(key(KeyCode::End));
    assert!(app.on_key(ch('c')).is_none());
    assert_eq!(app.mode, Mode::Normal);
    assert!(app.status.as_ref().is_some_and(|s| s.error));
    // Maintenance of the second device: furnace-2 is in maintenance, so this returns it.
    app.on_key(ch('2'));
    app.on_key(ch('j'));
    app.on_key(ch('m'));
    assert!(matches!(
        app.on_key(ch('y')),
        Some(Cmd::Act(Action::SetMaintenance { ref device, on: false })) if device == "furnace-2"
    ));
    // Acknowledge the unacknowledged alarm (listed first); the acknowledged one refuses.
    app.on_key(ch('3'));
    app.on_key(ch('a'));
    assert!(matches!(
        app.on_key(ch('y')),
        Some(Cmd::Act(Action::AcknowledgeAlarm { ref device, ref code }))
            if device == "furnace-2" && code == "sensor_break"
    ));
    app.on_key(ch('j'));
    app.on_key(ch('a'));
    assert_eq!(app.mode, Mode::Normal);
    // The transfer, from any view.
    app.on_key(ch('t'));
    assert!(matches!(
        app.on_key(ch('y')),
        Some(Cmd::Act(Action::ConfirmTransfer { ref sample, ref to, .. }))
            if sample == "S-017" && to == "analyser-1"
    ));
    // Quit.
    app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL));
    assert!(app.quit);
}

#[test]
fn an_unimplemented_reply_is_a_status_message() {
    let (mut app, now) = fixture(COLOR);
    app.on_incoming(
        Incoming::Done {
            action: Action::AbortQueue,
            result: Err("UNIMPLEMENTED: AbortQueue is not implemented yet".into()),
        },
        now,
        T0,
    );
    let text = screen(&app, now);
    assert!(
        text.contains("aborting the queue… failed: UNIMPLEMENTED"),
        "{text}"
    );
}

#[test]
fn a_reconnect_says_where_the_stream_resumed() {
    let (mut app, now) = fixture(COLOR);
    app.on_incoming(
        Incoming::Update(Update::StreamDown {
            reason: "gone".into(),
        }),
        now,
        T0,
    );
    app.on_incoming(
        Incoming::Update(Update::StreamUp {
            resumed_after: 1234,
        }),
        now,
        T0,
    );
    let text = screen(&app, now);
    assert!(
        text.contains("reconnected; event stream resumed after sequence 1234"),
        "{text}"
    );
}

#[test]
fn wide_terminal_queue_view() {
    let (app, now) = fixture(COLOR);
    assert_snapshot!(
        "queue_120x32",
        render(&app, now, 120, 32).backend().to_string()
    );
}

#[test]
fn the_selection_follows_its_experiment_when_rows_move() {
    let (mut app, now) = fixture(COLOR);
    app.on_key(ch('j'));
    assert_eq!(app.selected_experiment_id().as_deref(), Some(WAITING));
    // The first running experiment finishes: it moves down among the finished ones.
    app.on_incoming(
        Incoming::Update(event(
            1235,
            T0,
            RUNNING,
            "",
            Kind::ExperimentStateChanged(pb::ExperimentStateChanged {
                from: pb::ExperimentState::Running as i32,
                to: pb::ExperimentState::Succeeded as i32,
                reason: String::new(),
            }),
        )),
        now,
        T0,
    );
    assert_eq!(app.selected[0], 0);
    assert_eq!(app.selected_experiment_id().as_deref(), Some(WAITING));
}

/// A family added as a plugin (mass-flow controllers) shows in the devices view with the key
/// reading and trend its schema declares, with no TUI code naming it.
#[test]
fn a_plugin_family_shows_its_declared_key_reading() {
    let now = Instant::now();
    let mut app = App::new("http://127.0.0.1:50051", MONO);
    let at = now - Duration::from_millis(400);
    app.on_incoming(
        Incoming::Update(Update::StreamUp { resumed_after: 0 }),
        at,
        T0,
    );
    for i in 0..10 {
        let mut mfc = device(
            "mfc-1",
            pb::DeviceFamily::Unspecified,
            "alicat",
            T0 - 10 + i,
            &[
                ("mass_flow_sccm", 40.0 + i as f64),
                ("setpoint_sccm", 50.0),
                ("pressure_psia", 14.7),
            ],
        );
        mfc.family_name = "mfc".into();
        app.on_incoming(
            Incoming::Update(Update::Polled(Box::new(Polled {
                as_of: 0,
                queue: pb::Queue {
                    state: pb::QueueState::Running as i32,
                    ..Default::default()
                },
                devices: Ok(vec![mfc]),
                alarms: Ok(vec![]),
                transfers: Ok(vec![]),
            }))),
            at,
            T0,
        );
    }
    app.on_key(ch('2'));
    let text = screen(&app, now);
    assert!(text.contains("mfc-1"), "{text}");
    assert!(text.contains("49 sccm → 50 sccm"), "{text}");
}

/// Issue 17: hold, release and move (which `ppuctl queue` has) have keys, each asked first.
#[test]
fn hold_release_and_move_have_keys_and_ask_first() {
    let (mut app, _) = fixture(COLOR);
    // A running experiment can be neither held nor moved: said, not asked.
    assert!(app.on_key(ch('h')).is_none());
    assert_eq!(app.mode, Mode::Normal);
    assert!(
        app.status
            .as_ref()
            .is_some_and(|s| s.error && s.text.contains("only a QUEUED experiment"))
    );
    // The first queued experiment (third row): hold it.
    app.on_key(ch('j'));
    app.on_key(ch('j'));
    assert_eq!(app.selected_experiment_id().as_deref(), Some(QUEUED));
    assert!(app.on_key(ch('h')).is_none(), "asks first");
    match &app.mode {
        Mode::Confirm(a) => assert_eq!(a.prompt(), "Hold \"Mg-Al LDH calcination 450 C\"?"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        app.on_key(ch('y')),
        Some(Cmd::Act(Action::Hold { ref id, .. })) if id == QUEUED
    ));
    // It is next to start: it cannot go earlier, it can go later.
    app.on_key(ch('K'));
    assert_eq!(app.mode, Mode::Normal);
    assert!(
        app.status
            .as_ref()
            .is_some_and(|s| s.text.contains("already first"))
    );
    app.on_key(ch('J'));
    match &app.mode {
        Mode::Confirm(a) => assert_eq!(
            a.prompt(),
            "Move \"Mg-Al LDH calcination 450 C\" from position 1 to 2 in the start order?"
        ),
        other => panic!("{other:?}"),
    }
    assert!(app.on_key(ch('n')).is_none(), "no does nothing");
    app.on_key(KeyEvent::new(KeyCode::Down, KeyModifiers::SHIFT));
    assert!(matches!(
        app.on_key(ch('y')),
        Some(Cmd::Act(Action::Move { ref id, from: 0, to: 1, .. })) if id == QUEUED
    ));
    // The held one: h releases it; Shift-Up moves it earlier.
    app.on_key(ch('j'));
    assert_eq!(app.selected_experiment_id().as_deref(), Some(HELD));
    app.on_key(ch('h'));
    assert!(matches!(
        app.on_key(ch('y')),
        Some(Cmd::Act(Action::Release { ref id, .. })) if id == HELD
    ));
    app.on_key(KeyEvent::new(KeyCode::Up, KeyModifiers::SHIFT));
    assert!(matches!(
        app.on_key(ch('y')),
        Some(Cmd::Act(Action::Move { from: 1, to: 0, .. }))
    ));
    assert_eq!(
        app.selected_experiment_id().as_deref(),
        Some(HELD),
        "not moved by it"
    );
}

/// Issue 17: with more rows than fit at 80×24, the running rows stay in view while the
/// selection scrolls the rest.
#[test]
fn the_running_rows_stay_in_view_when_the_list_scrolls() {
    let (mut app, now) = fixture(MONO);
    let finished: Vec<pb::Experiment> = (0..20)
        .map(|i| {
            let mut e = experiment(
                &format!("01JX00000000000000000OLD{i:02}"),
                pb::ExperimentState::Succeeded,
                0,
                spec(
                    &format!("old run {i:02}"),
                    "S-100",
                    0,
                    vec![furnace(150.0, 60.0)],
                ),
            );
            e.results = vec![succeeded_furnace(0, "furnace-1")];
            e
        })
        .collect();
    app.on_incoming(
        Incoming::Update(Update::Experiments {
            experiments: finished,
            as_of: 1234,
        }),
        now,
        T0,
    );
    app.on_key(key(KeyCode::End));
    let text = screen(&app, now);
    assert!(text.contains("MOF-74 calcination"), "{text}");
    assert!(text.contains("HKUST-1 CO2 isotherm"), "{text}");
    // The last row is selected and shown.
    let selected = text
        .lines()
        .find(|l| l.contains('▶'))
        .unwrap_or_else(|| panic!("a selected row:\n{text}"));
    assert!(selected.contains("UiO-66 activation"), "{text}");
    assert!(text.contains("more ↕"), "{text}");
    assert_snapshot!("queue_scrolled_80x24", text);
}

#[test]
fn visible_rows_pin_the_first_and_scroll_the_rest() {
    use super::views::visible_rows;
    assert_eq!(visible_rows(3, 1, 5, 2), (vec![0, 1, 2], Some(2)));
    assert_eq!(visible_rows(0, 0, 5, 0), (vec![], None));
    // 10 rows, 2 pinned, 5 lines: the selection at the top of the rest, then at the bottom.
    assert_eq!(visible_rows(10, 2, 5, 0), (vec![0, 1, 2, 3, 4], Some(0)));
    assert_eq!(visible_rows(10, 2, 5, 4), (vec![0, 1, 2, 3, 4], Some(4)));
    assert_eq!(visible_rows(10, 2, 5, 5), (vec![0, 1, 3, 4, 5], Some(4)));
    assert_eq!(visible_rows(10, 2, 5, 9), (vec![0, 1, 7, 8, 9], Some(4)));
    // More running rows than lines: one line still scrolls.
    assert_eq!(visible_rows(10, 8, 3, 9), (vec![0, 1, 9], Some(2)));
}

#[test]
fn ids_show_their_shortest_unique_prefix() {
    let labels = super::views::id_labels([
        "01JX4A0000000000000000000A",
        "01JX4B0000000000000000000A",
        "01JX4B1000000000000000000A",
        "01JX4B1000000000000000000B",
    ]);
    assert_eq!(labels["01JX4A0000000000000000000A"], "01JX4A");
    assert_eq!(labels["01JX4B0000000000000000000A"], "01JX4B0");
    // Made in the same millisecond: only their ends differ, so the end is shown.
    assert_eq!(labels["01JX4B1000000000000000000A"], "…0000000A");
    assert_eq!(labels["01JX4B1000000000000000000B"], "…0000000B");
}

/// Issue 17: a 0-bar pressure (transducer noise around zero) draws flat, not full-scale noise.
#[test]
fn a_trend_near_zero_draws_flat() {
    let analyser = device(
        "analyser-1",
        pb::DeviceFamily::Analyser,
        "sorption-mqtt",
        T0,
        &[("pressure_bar", 0.0)],
    );
    let resolution = super::state::key_value_resolution(&analyser);
    assert_eq!(resolution, Some(1e-4), "the reading's format is ~4");
    let noise = [1e-7, -2e-7, 3e-7, 0.0, -1e-7, 2e-7];
    assert_eq!(super::views::sparkline_text(noise, 6, resolution), "▁▁▁▁▁▁");
    // A real change still shows.
    assert_eq!(
        super::views::sparkline_text([0.0, 0.5, 1.0], 3, resolution),
        "▁▅█"
    );
}

/// Issue 17: under a time speed-up, ETAs say they are simulated time.
#[test]
fn etas_under_a_speed_up_say_they_are_simulated() {
    let (mut app, now) = fixture(MONO);
    let mut remaining = 7_920.0;
    for i in 0..5 {
        app.on_incoming(
            Incoming::Update(Update::Event(Box::new(pb::Event {
                sequence: 1235 + i,
                time: Some(Timestamp {
                    seconds: T0 + i as i64,
                    nanos: 0,
                }),
                experiment_id: RUNNING.into(),
                kind: Some(Kind::StepProgress(pb::StepProgress {
                    step_index: 0,
                    fraction: 0.5,
                    message: "segment 2/2: hold 1 h at 450 °C".into(),
                    remaining_s: remaining,
                })),
                ..Default::default()
            }))),
            now,
            T0,
        );
        remaining -= 50.0;
    }
    let text = screen(&app, now);
    assert!(text.contains("~2 h 08 min left (sim ×50)"), "{text}");
    assert!(text.contains("ETA (sim ×50)"), "{text}");
    let row = text
        .lines()
        .find(|l| l.contains("MOF-74"))
        .unwrap_or_default();
    assert!(
        row.contains("~2 h 08 min"),
        "the LEFT column fits it:\n{text}"
    );
}
