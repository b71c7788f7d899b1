//! Register map, controller and plant tests. All of them drive [`FurnaceModel`] through its
//! register interface with explicit time, so they are deterministic and wall-clock free (except
//! the one `SimFurnace` test, which waits on a condition with a real deadline).

use std::time::{Duration, Instant};

use tokio_modbus::ExceptionCode::{IllegalDataAddress, IllegalDataValue};

use super::*;

/// °C → integer-region word with 1 decimal place.
fn t(c: f64) -> u16 {
    ((c * 10.0).round() as i16) as u16
}

fn model() -> FurnaceModel {
    FurnaceModel::new(FurnaceConfig::default(), 0.0)
}

fn read1(m: &FurnaceModel, addr: u16) -> u16 {
    m.read_registers(addr, 1).unwrap()[0]
}

fn read_c(m: &FurnaceModel, addr: u16) -> f64 {
    f64::from(read1(m, addr) as i16) / 10.0
}

fn float_words(v: f32) -> [u16; 2] {
    let b = v.to_bits();
    [(b >> 16) as u16, b as u16]
}

/// Advances in 1 s steps, calling `f` with each snapshot, until `end_s`.
fn run_until(m: &mut FurnaceModel, end_s: f64, mut f: impl FnMut(&FurnaceSnapshot)) {
    let mut now = m.time_s();
    while now < end_s {
        now = (now + 1.0).min(end_s);
        m.advance_to(now);
        f(&m.snapshot());
    }
}

// ---------------------------------------------------------------------------------------------
// Register map

#[test]
fn power_up_registers_are_scaled() {
    let m = model();
    assert_eq!(read1(&m, reg::PV), 250);
    assert_eq!(read1(&m, reg::TARGET_SP), 250);
    assert_eq!(read1(&m, reg::WORKING_SP), 250);
    assert_eq!(read1(&m, reg::OUTPUT), 0);
    assert_eq!(read1(&m, reg::XP), 13);
    assert_eq!(read1(&m, reg::TI), 150);
    assert_eq!(read1(&m, reg::TD), 10);
    assert_eq!(read1(&m, reg::RATE_LIMIT), 0);
    assert_eq!(read1(&m, reg::STATUS), 0);
    assert_eq!(read1(&m, reg::FAST_STATUS), 0);
    assert_eq!(read1(&m, reg::IDENT), 0x2440);
    assert_eq!(read1(&m, reg::FIRMWARE), 0x0312);
    assert_eq!(read1(&m, reg::AUTO_MANUAL), 0);
    assert_eq!(read1(&m, reg::INPUT_MV), 0);
    assert_eq!(read1(&m, reg::SP_SELECT), 0);
    assert_eq!(
        m.read_registers(reg::PV, 5).unwrap(),
        vec![250, 250, 0, 0, 250]
    );
}

#[test]
fn unknown_registers_answer_illegal_address() {
    let mut m = model();
    for addr in [0, 7, 10, 100, 123, 275, 0x7FFF, 0x8000, 0x8001, 0xFFFF] {
        assert_eq!(
            m.read_registers(addr, 1),
            Err(IllegalDataAddress),
            "read {addr}"
        );
        assert_eq!(
            m.write_register(addr, 0),
            Err(IllegalDataAddress),
            "write {addr}"
        );
    }
    // A block read spanning an unmapped register (7) fails as a whole.
    assert_eq!(m.read_registers(reg::PV, 10), Err(IllegalDataAddress));
    assert_eq!(m.read_registers(0xFFFF, 2), Err(IllegalDataAddress));
    // A block write spanning one too, and nothing is written.
    assert_eq!(
        m.write_registers(reg::TD, &[20, 0]),
        Err(IllegalDataAddress)
    );
    assert_eq!(read1(&m, reg::TD), 10);
}

#[test]
fn setpoint_writes_are_range_checked() {
    let mut m = model();
    m.write_register(reg::TARGET_SP, t(500.0)).unwrap();
    assert_eq!(read1(&m, reg::TARGET_SP), 5000);
    assert_eq!(read1(&m, reg::SP1), 5000);
    assert_eq!(
        read1(&m, reg::WORKING_SP),
        5000,
        "rate 0: working SP follows at once"
    );
    m.write_register(reg::TARGET_SP, t(1200.0)).unwrap();
    m.write_register(reg::TARGET_SP, t(0.0)).unwrap();
    assert_eq!(
        m.write_register(reg::TARGET_SP, t(1200.1)),
        Err(IllegalDataValue)
    );
    assert_eq!(
        m.write_register(reg::TARGET_SP, t(-0.1)),
        Err(IllegalDataValue)
    );
    assert_eq!(m.write_register(reg::SP1, t(1500.0)), Err(IllegalDataValue));
    assert_eq!(read1(&m, reg::TARGET_SP), 0);

    // SP1 aliases the target SP.
    m.write_register(reg::SP1, t(321.5)).unwrap();
    assert_eq!(read1(&m, reg::TARGET_SP), 3215);
    // SP2 and the remote SP are stored (and range checked) but do not drive the loop.
    m.write_register(reg::SP2, t(100.0)).unwrap();
    m.write_register(reg::REMOTE_SP, t(200.0)).unwrap();
    assert_eq!(read1(&m, reg::SP2), 1000);
    assert_eq!(read1(&m, reg::REMOTE_SP), 2000);
    assert_eq!(read1(&m, reg::TARGET_SP), 3215);
    assert_eq!(m.write_register(reg::SP2, t(2000.0)), Err(IllegalDataValue));
    assert_eq!(
        m.write_register(reg::REMOTE_SP, t(-5.0)),
        Err(IllegalDataValue)
    );
}

#[test]
fn read_only_registers_refuse_writes() {
    let mut m = model();
    for addr in [
        reg::PV,
        reg::OUTPUT,
        reg::WORKING_SP,
        reg::ERROR,
        reg::FAST_STATUS,
        reg::STATUS,
        reg::FIRMWARE,
        reg::IDENT,
        reg::INPUT_MV,
    ] {
        assert_eq!(
            m.write_register(addr, 0),
            Err(IllegalDataValue),
            "reg {addr}"
        );
    }
    assert_eq!(read1(&m, reg::IDENT), 0x2440);
}

#[test]
fn tuning_select_and_rate_registers() {
    let mut m = model();
    m.write_register(reg::XP, 55).unwrap();
    m.write_register(reg::TI, 300).unwrap();
    m.write_register(reg::TD, 0).unwrap();
    assert_eq!(m.read_registers(reg::XP, 1).unwrap(), vec![55]);
    assert_eq!(read1(&m, reg::TI), 300);
    assert_eq!(read1(&m, reg::TD), 0);
    assert_eq!(m.write_register(reg::XP, 0), Err(IllegalDataValue));
    assert_eq!(m.write_register(reg::TI, 10000), Err(IllegalDataValue));
    assert_eq!(m.write_register(reg::TD, 10000), Err(IllegalDataValue));

    m.write_register(reg::SP_SELECT, 0).unwrap();
    assert_eq!(m.write_register(reg::SP_SELECT, 1), Err(IllegalDataValue));

    m.write_register(reg::RATE_LIMIT, t(12.5)).unwrap();
    assert_eq!(read1(&m, reg::RATE_LIMIT), 125);
    assert_eq!(
        m.write_register(reg::RATE_LIMIT, t(-1.0)),
        Err(IllegalDataValue)
    );
    assert_eq!(
        m.write_register(reg::RATE_LIMIT, t(1000.0)),
        Err(IllegalDataValue)
    );

    assert_eq!(m.write_register(reg::AUTO_MANUAL, 2), Err(IllegalDataValue));
    m.write_register(reg::ACK_ALARMS, 0xABCD).unwrap();
    assert_eq!(read1(&m, reg::ACK_ALARMS), 0);
}

#[test]
fn working_output_is_writable_in_manual_only() {
    let mut m = model();
    assert_eq!(
        m.write_register(reg::WORKING_OUTPUT, 500),
        Err(IllegalDataValue)
    );
    m.write_register(reg::AUTO_MANUAL, 1).unwrap();
    assert_eq!(read1(&m, reg::AUTO_MANUAL), 1);
    assert_eq!(read1(&m, reg::FAST_STATUS) & (1 << 4), 1 << 4);
    m.write_register(reg::WORKING_OUTPUT, 425).unwrap();
    assert_eq!(read1(&m, reg::OUTPUT), 425);
    assert_eq!(read1(&m, reg::WORKING_OUTPUT), 425);
    assert_eq!(
        m.write_register(reg::WORKING_OUTPUT, 1001),
        Err(IllegalDataValue)
    );
    assert_eq!(
        m.write_register(reg::WORKING_OUTPUT, (-10i16) as u16),
        Err(IllegalDataValue)
    );
    m.advance_to(60.0);
    assert_eq!(read1(&m, reg::OUTPUT), 425, "manual output holds");
    assert!(m.snapshot().true_temp_c > 30.0, "manual output heats");
    m.write_register(reg::AUTO_MANUAL, 0).unwrap();
    assert_eq!(
        m.write_register(reg::WORKING_OUTPUT, 0),
        Err(IllegalDataValue)
    );
}

#[test]
fn decimal_places_scale_temperatures_only() {
    let cfg = FurnaceConfig {
        decimal_places: 2,
        ..FurnaceConfig::default()
    };
    let mut m = FurnaceModel::new(cfg, 0.0);
    assert_eq!(read1(&m, reg::PV), 2500);
    m.write_register(reg::TARGET_SP, 12345).unwrap();
    assert_eq!(m.snapshot().target_sp_c, 123.45);
    m.write_register(reg::RATE_LIMIT, 250).unwrap();
    assert_eq!(m.snapshot().rate_limit_c_per_min, 2.5);
    assert_eq!(read1(&m, reg::XP), 13, "percentages keep one decimal");

    let cfg = FurnaceConfig {
        decimal_places: 0,
        ..FurnaceConfig::default()
    };
    let mut m = FurnaceModel::new(cfg, 0.0);
    assert_eq!(read1(&m, reg::PV), 25);
    m.write_register(reg::TARGET_SP, 300).unwrap();
    assert_eq!(m.snapshot().target_sp_c, 300.0);
}

#[test]
fn float_region_mirrors_parameters() {
    let mut m = model();
    let pv = m.read_registers(reg::FLOAT_BASE + 2 * reg::PV, 2).unwrap();
    assert_eq!(pv, float_words(25.0));
    // Integer-scaled Ti is milliseconds in the float region.
    let ti = m.read_registers(reg::FLOAT_BASE + 2 * reg::TI, 2).unwrap();
    assert_eq!((u32::from(ti[0]) << 16) | u32::from(ti[1]), 150_000);

    let sp = float_words(432.5);
    m.write_registers(reg::FLOAT_BASE + 2 * reg::TARGET_SP, &sp)
        .unwrap();
    assert_eq!(read1(&m, reg::TARGET_SP), 4325);
    assert_eq!(
        m.read_registers(reg::FLOAT_BASE + 2 * reg::TARGET_SP, 4)
            .unwrap(),
        [float_words(432.5), float_words(0.0)].concat(),
        "SP then output"
    );
    // Half a float cannot be written.
    assert_eq!(
        m.write_register(reg::FLOAT_BASE + 2 * reg::TARGET_SP, sp[0]),
        Err(IllegalDataValue)
    );
    assert_eq!(
        m.write_registers(reg::FLOAT_BASE + 2 * reg::TARGET_SP + 1, &sp),
        Err(IllegalDataValue)
    );
    assert_eq!(
        m.write_registers(reg::FLOAT_BASE + 2 * reg::TARGET_SP, &sp[..1]),
        Err(IllegalDataValue)
    );
    // Range checks apply, and NaN is refused.
    assert_eq!(
        m.write_registers(reg::FLOAT_BASE + 2 * reg::TARGET_SP, &float_words(1300.0)),
        Err(IllegalDataValue)
    );
    assert_eq!(
        m.write_registers(reg::FLOAT_BASE + 2 * reg::TARGET_SP, &float_words(f32::NAN)),
        Err(IllegalDataValue)
    );
    assert_eq!(read1(&m, reg::TARGET_SP), 4325);
}

#[test]
fn multi_register_writes_are_all_or_nothing() {
    let mut m = model();
    // 24 = SP1 (ok), 25 = SP2 (out of range).
    assert_eq!(
        m.write_registers(reg::SP1, &[t(300.0), t(5000.0)]),
        Err(IllegalDataValue)
    );
    assert_eq!(read1(&m, reg::TARGET_SP), 250);
    m.write_registers(reg::SP1, &[t(300.0), t(400.0), t(150.0)])
        .unwrap();
    assert_eq!(
        m.read_registers(reg::SP1, 3).unwrap(),
        vec![3000, 4000, 1500]
    );
    // Manual mode and a manual output in one request, in order.
    m.write_registers(reg::AUTO_MANUAL, &[1]).unwrap();
    m.write_registers(reg::WORKING_OUTPUT, &[t(33.3)]).unwrap();
    assert_eq!(read1(&m, reg::OUTPUT), 333);
}

// ---------------------------------------------------------------------------------------------
// Setpoint rate limit

#[test]
fn rate_limit_servos_to_pv_then_ramps() {
    let mut m = model();
    m.write_register(reg::TARGET_SP, t(200.0)).unwrap();
    m.advance_to(1800.0);
    let pv0 = m.snapshot().pv_c;
    assert!((pv0 - 200.0).abs() < 0.5, "pv0 = {pv0}");

    m.write_register(reg::RATE_LIMIT, t(5.0)).unwrap();
    assert_eq!(read1(&m, reg::STATUS) & status::RAMP_RUNNING, 0);
    m.write_register(reg::TARGET_SP, t(300.0)).unwrap();
    let s = m.snapshot();
    assert_eq!(s.working_sp_c, pv0, "working SP restarts from PV");
    assert_eq!(s.target_sp_c, 300.0);
    assert_ne!(s.status_bits & status::RAMP_RUNNING, 0);

    m.advance_to(1800.0 + 60.0);
    let s = m.snapshot();
    assert!((s.working_sp_c - (pv0 + 5.0)).abs() < 0.01, "{s:?}");

    // Re-writing the same target does not restart the ramp.
    m.write_register(reg::TARGET_SP, t(300.0)).unwrap();
    assert_eq!(m.snapshot().working_sp_c, s.working_sp_c);

    m.advance_to(1800.0 + 21.0 * 60.0);
    let s = m.snapshot();
    assert_eq!(s.working_sp_c, 300.0);
    assert_eq!(s.status_bits & status::RAMP_RUNNING, 0);

    // Ramping down, then switching the rate limit off mid-ramp jumps to the target.
    m.write_register(reg::TARGET_SP, t(100.0)).unwrap();
    m.advance_to(m.time_s() + 60.0);
    assert_ne!(read1(&m, reg::STATUS) & status::RAMP_RUNNING, 0);
    assert!(m.snapshot().working_sp_c > 280.0);
    m.write_register(reg::RATE_LIMIT, 0).unwrap();
    assert_eq!(read1(&m, reg::WORKING_SP), 1000);
    assert_eq!(read1(&m, reg::STATUS) & status::RAMP_RUNNING, 0);
}

// ---------------------------------------------------------------------------------------------
// Plant + PID

struct RampRun {
    max_ramp_dev: f64,
    overshoot: f64,
    /// Seconds after the working SP arrived at which PV was last more than 1 °C off target.
    settled_after_s: f64,
}

fn run_ramp(rate: f64, target: f64, hold_s: f64) -> RampRun {
    let mut m = model();
    m.write_register(reg::RATE_LIMIT, t(rate)).unwrap();
    m.write_register(reg::TARGET_SP, t(target)).unwrap();
    let mut max_ramp_dev: f64 = 0.0;
    let mut arrival = None;
    let mut overshoot = f64::NEG_INFINITY;
    let mut settled_after_s = 0.0;
    let expected_arrival = (target - 25.0) / rate * 60.0;
    run_until(
        &mut m,
        expected_arrival + 10.0 + hold_s,
        |s| match arrival {
            None if s.working_sp_c == s.target_sp_c => arrival = Some(s.t_s),
            None if s.t_s > 120.0 => {
                max_ramp_dev = max_ramp_dev.max((s.pv_c - s.working_sp_c).abs());
            }
            None => {}
            Some(a) => {
                overshoot = overshoot.max(s.pv_c - target);
                if (s.pv_c - target).abs() > 1.0 {
                    settled_after_s = s.t_s - a;
                }
            }
        },
    );
    let arrival = arrival.unwrap();
    assert!(
        (arrival - expected_arrival).abs() <= 2.0,
        "arrival {arrival}"
    );
    RampRun {
        max_ramp_dev,
        overshoot,
        settled_after_s,
    }
}

#[test]
fn ramp_10_per_min_to_500_tracks_and_settles() {
    let r = run_ramp(10.0, 500.0, 1800.0);
    assert!(r.max_ramp_dev <= 3.0, "ramp deviation {}", r.max_ramp_dev);
    assert!(r.overshoot < 5.0, "overshoot {}", r.overshoot);
    assert!(
        r.settled_after_s <= 600.0,
        "settled after {} s",
        r.settled_after_s
    );
}

#[test]
fn ramps_from_1_to_20_per_min_overshoot_little() {
    for (rate, target, max_dev) in [(1.0, 150.0, 0.5), (5.0, 800.0, 1.5), (20.0, 1000.0, 4.0)] {
        let r = run_ramp(rate, target, 1200.0);
        assert!(
            r.max_ramp_dev <= max_dev,
            "{rate}/min: dev {}",
            r.max_ramp_dev
        );
        assert!(r.overshoot < 5.0, "{rate}/min: overshoot {}", r.overshoot);
        assert!(
            r.settled_after_s <= 600.0,
            "{rate}/min: {}",
            r.settled_after_s
        );
    }
}

#[test]
fn step_to_300_settles_within_40_min() {
    let mut m = model();
    m.write_register(reg::TARGET_SP, t(300.0)).unwrap();
    let mut max_pv: f64 = 0.0;
    let mut last_outside = 0.0;
    run_until(&mut m, 3600.0, |s| {
        max_pv = max_pv.max(s.pv_c);
        if (s.pv_c - 300.0).abs() > 2.0 {
            last_outside = s.t_s;
        }
    });
    assert!(
        last_outside <= 40.0 * 60.0,
        "left ±2 °C at {last_outside} s"
    );
    assert!(max_pv < 310.0, "max PV {max_pv}");
    assert!((read_c(&m, reg::PV) - 300.0).abs() <= 0.2);
    assert!((read_c(&m, reg::ERROR)).abs() <= 0.2);
    // Holding 300 °C takes about (275 W conduction + radiation) / 3 kW ≈ 10 %.
    let out = f64::from(read1(&m, reg::OUTPUT)) / 10.0;
    assert!((8.0..12.0).contains(&out), "output {out} %");
    let mv = f64::from(read1(&m, reg::INPUT_MV) as i16) / 100.0;
    assert!((10.0..13.0).contains(&mv), "input {mv} mV");
}

#[test]
fn cooling_is_passive_and_bounded_by_ambient() {
    let mut m = model();
    m.write_register(reg::TARGET_SP, t(500.0)).unwrap();
    m.advance_to(1800.0);
    m.write_register(reg::TARGET_SP, t(0.0)).unwrap();
    let mut prev = m.snapshot().true_temp_c;
    let mut at_10_min = 0.0;
    run_until(&mut m, 1800.0 + 6.0 * 3600.0, |s| {
        assert_eq!(s.output_pct, 0.0);
        assert!(s.true_temp_c <= prev + 1e-9);
        assert!(s.true_temp_c >= 25.0);
        prev = s.true_temp_c;
        if s.t_s == 2400.0 {
            at_10_min = s.pv_c;
        }
    });
    // Falls, but not instantly, and approaches ambient after hours.
    assert!((150.0..400.0).contains(&at_10_min), "{at_10_min}");
    assert!(prev < 26.0, "{prev}");
}

#[test]
fn sensor_break_sets_bit_5_and_output_0() {
    let mut m = model();
    m.write_register(reg::TARGET_SP, t(300.0)).unwrap();
    m.advance_to(1800.0);
    assert!(m.snapshot().output_pct > 5.0);
    let pv_before = read1(&m, reg::PV);

    m.set_sensor_break(true);
    let status = read1(&m, reg::STATUS);
    assert_ne!(status & status::SENSOR_BREAK, 0);
    assert_ne!(status & status::NEW_ALARM, 0);
    assert_ne!(read1(&m, reg::FAST_STATUS) & status::SENSOR_BREAK, 0);
    assert_eq!(read1(&m, reg::OUTPUT), 0);
    m.advance_to(2400.0);
    assert_eq!(read1(&m, reg::OUTPUT), 0);
    assert_eq!(
        read1(&m, reg::PV),
        pv_before,
        "PV holds its last good value"
    );
    assert!(m.snapshot().true_temp_c < 200.0, "the furnace cools");

    m.set_sensor_break(false);
    let status = read1(&m, reg::STATUS);
    assert_eq!(status & status::SENSOR_BREAK, 0);
    assert_ne!(status & status::NEW_ALARM, 0, "new alarm stays latched");
    m.write_register(reg::ACK_ALARMS, 1).unwrap();
    assert_eq!(read1(&m, reg::STATUS) & status::NEW_ALARM, 0);
    m.advance_to(2410.0);
    assert!(m.snapshot().output_pct > 50.0, "control resumes");
}

#[test]
fn heater_failure_sets_bit_7_and_pv_does_not_rise() {
    let mut m = model();
    m.set_heater_fail(true);
    assert_ne!(read1(&m, reg::STATUS) & status::HEATER_FAIL, 0);
    assert_ne!(read1(&m, reg::STATUS) & status::NEW_ALARM, 0);
    m.write_register(reg::TARGET_SP, t(300.0)).unwrap();
    run_until(&mut m, 1200.0, |s| {
        assert!(s.pv_c <= 25.0 + 1e-9, "PV rose: {s:?}");
        assert!(s.true_temp_c <= 25.0 + 1e-9);
    });
    let s = m.snapshot();
    assert_eq!(s.output_pct, 100.0, "the loop asks for full power");
    // Output saturated for the loop-break time with PV not moving: loop break.
    assert_ne!(s.status_bits & status::LOOP_BREAK, 0);
    assert_ne!(s.status_bits & status::HEATER_FAIL, 0);

    m.set_heater_fail(false);
    m.advance_to(1500.0);
    let s = m.snapshot();
    assert!(s.pv_c > 100.0, "{s:?}");
    assert_eq!(
        s.status_bits & (status::HEATER_FAIL | status::LOOP_BREAK),
        0
    );
}

#[test]
fn heater_failure_during_a_hold_cools_the_furnace() {
    let mut m = model();
    m.write_register(reg::TARGET_SP, t(400.0)).unwrap();
    m.advance_to(1800.0);
    m.set_heater_fail(true);
    m.advance_to(2400.0);
    let s = m.snapshot();
    assert!(s.pv_c < 300.0, "{s:?}");
    assert_ne!(s.status_bits & status::HEATER_FAIL, 0);
}

#[test]
fn alarm_1_is_a_latching_high_alarm() {
    let cfg = FurnaceConfig {
        alarm1_high_c: 100.0,
        ..FurnaceConfig::default()
    };
    let mut m = FurnaceModel::new(cfg, 0.0);
    m.write_register(reg::TARGET_SP, t(150.0)).unwrap();
    m.advance_to(1200.0);
    let st = read1(&m, reg::STATUS);
    assert_ne!(st & status::ALARM1, 0);
    assert_ne!(st & status::NEW_ALARM, 0);
    assert_ne!(read1(&m, reg::FAST_STATUS) & status::ALARM1, 0);

    // Acknowledged while active: "new" clears, the alarm stays.
    m.write_register(reg::ACK_ALARMS, 1).unwrap();
    let st = read1(&m, reg::STATUS);
    assert_eq!(st & status::NEW_ALARM, 0);
    assert_ne!(st & status::ALARM1, 0);

    // Condition clears: still latched until acknowledged.
    m.write_register(reg::TARGET_SP, t(50.0)).unwrap();
    m.advance_to(4800.0);
    assert!(m.snapshot().pv_c < 90.0);
    assert_ne!(read1(&m, reg::STATUS) & status::ALARM1, 0);
    m.write_register(reg::ACK_ALARMS, 1).unwrap();
    assert_eq!(read1(&m, reg::STATUS) & status::ALARM1, 0);
}

#[test]
fn pv_out_of_range_bit() {
    let cfg = FurnaceConfig {
        range_hi_c: 100.0,
        sp_max_c: 200.0,
        ..FurnaceConfig::default()
    };
    let mut m = FurnaceModel::new(cfg, 0.0);
    m.write_register(reg::TARGET_SP, t(150.0)).unwrap();
    m.advance_to(1200.0);
    assert_ne!(read1(&m, reg::STATUS) & status::PV_OUT_OF_RANGE, 0);
}

#[test]
fn manual_mode_is_bumpless() {
    let mut m = model();
    m.write_register(reg::TARGET_SP, t(300.0)).unwrap();
    m.advance_to(1800.0);
    let out = m.snapshot().output_pct;
    m.write_register(reg::AUTO_MANUAL, 1).unwrap();
    m.advance_to(1801.0);
    assert_eq!(m.snapshot().output_pct, out);
    m.advance_to(2400.0);
    let pv = m.snapshot().pv_c;
    assert!((pv - 300.0).abs() < 3.0, "{pv}");
    m.write_register(reg::AUTO_MANUAL, 0).unwrap();
    m.advance_to(2401.0);
    let s = m.snapshot();
    assert!(
        (s.output_pct - out).abs() < 5.0,
        "{} vs {out}",
        s.output_pct
    );
    m.advance_to(3600.0);
    assert!((m.snapshot().pv_c - 300.0).abs() < 0.5);
}

#[test]
fn trajectory_does_not_depend_on_polling() {
    let cfg = FurnaceConfig {
        pv_noise_c: 0.2,
        ..FurnaceConfig::default()
    };
    let mut a = FurnaceModel::new(cfg.clone(), 10.0);
    let mut b = FurnaceModel::new(cfg.clone(), 10.0);
    for m in [&mut a, &mut b] {
        m.write_register(reg::RATE_LIMIT, t(10.0)).unwrap();
        m.write_register(reg::TARGET_SP, t(400.0)).unwrap();
    }
    // `a` is polled every 0.1 s, `b` only at the end.
    let mut now = 10.0;
    while now < 1000.0 {
        now += 0.1;
        a.advance_to(now);
        let _ = a.read_registers(reg::PV, 5).unwrap();
    }
    b.advance_to(now);
    assert_eq!(a.snapshot(), b.snapshot());
    assert_eq!(a.read_registers(reg::PV, 5), b.read_registers(reg::PV, 5));

    // Same seed, same noise; another seed, other noise.
    let c = {
        let mut c = FurnaceModel::new(
            FurnaceConfig {
                seed: 7,
                ..cfg.clone()
            },
            10.0,
        );
        c.write_register(reg::RATE_LIMIT, t(10.0)).unwrap();
        c.write_register(reg::TARGET_SP, t(400.0)).unwrap();
        c.advance_to(now);
        c
    };
    assert_ne!(a.snapshot().pv_c, c.snapshot().pv_c);
}

#[test]
fn catching_up_hours_is_cheap_and_time_never_runs_backwards() {
    let mut m = model();
    m.write_register(reg::TARGET_SP, t(600.0)).unwrap();
    let started = Instant::now();
    m.advance_to(6.0 * 3600.0);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(m.time_s(), 6.0 * 3600.0);
    let s = m.snapshot();
    assert!((s.pv_c - 600.0).abs() < 0.5, "{s:?}");
    m.advance_to(10.0);
    m.advance_to(f64::NAN);
    assert_eq!(m.snapshot(), s);

    // A month idle: the catch-up is capped, the clock still lands on the requested time.
    let started = Instant::now();
    m.advance_to(30.0 * 86400.0);
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(m.time_s(), 30.0 * 86400.0);
    assert!((m.snapshot().pv_c - 600.0).abs() < 0.5);
}

#[test]
fn sim_furnace_follows_the_scaled_clock() {
    // 10^4 physical seconds per real second: the step settles in well under a real second.
    let f = SimFurnace::new(FurnaceConfig::default(), Clock::new(1e4));
    assert_eq!(f.unit_id(), 1);
    f.write_register(reg::TARGET_SP, t(300.0)).unwrap();
    let clone = f.clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = clone.snapshot();
        if s.t_s > 1800.0 {
            assert!((s.pv_c - 300.0).abs() < 1.0, "{s:?}");
            break;
        }
        assert!(Instant::now() < deadline, "clock did not advance: {s:?}");
        std::thread::yield_now();
    }
    assert_eq!(f.read_registers(reg::TARGET_SP, 1).unwrap(), vec![3000]);
    f.set_sensor_break(true);
    assert_ne!(f.snapshot().status_bits & status::SENSOR_BREAK, 0);
    f.set_heater_fail(true);
    assert_ne!(f.snapshot().status_bits & status::HEATER_FAIL, 0);
    assert!(!f.is_silent());
    f.set_silent(true);
    assert!(clone.is_silent());
}

// ---------------------------------------------------------------------------------------------
// Setpoint programmer (registers 22, 23, 29, 36, 56, 58 and the program data region)

/// First register of segment `s` (1-based) of program `p` (1-based).
fn seg(p: u16, s: u16) -> u16 {
    reg::PROGRAM_DATA + 136 * p + 8 * s
}

/// Program 1: ramp to 100 °C at 10 °C/min, dwell 2 min, step to 50 °C, end.
fn write_program(m: &mut FurnaceModel) {
    m.write_registers(seg(1, 1), &[1, t(100.0), t(10.0)])
        .unwrap();
    m.write_registers(seg(1, 2), &[3, t(0.0), 2]).unwrap();
    m.write_registers(seg(1, 3), &[4, t(50.0)]).unwrap();
    m.write_register(seg(1, 4), 0).unwrap();
}

#[test]
fn programmer_registers_power_up_reset() {
    let m = model();
    assert_eq!(read1(&m, reg::PROGRAM_NUMBER), 1);
    assert_eq!(read1(&m, reg::PROGRAM_STATE), 1);
    for r in [
        reg::PROGRAM_SEGMENT,
        reg::SEGMENT_TYPE,
        reg::SEGMENT_TIME_LEFT,
        reg::PROGRAM_TIME_LEFT,
    ] {
        assert_eq!(read1(&m, r), 0, "register {r}");
    }
    // Program data reads back as stored: empty programs are all "end" segments.
    assert_eq!(m.read_registers(seg(1, 1), 3).unwrap(), vec![0, 0, 0]);
}

#[test]
fn program_data_reads_back_with_its_own_scaling() {
    let mut m = model();
    write_program(&mut m);
    assert_eq!(
        m.read_registers(seg(1, 1), 3).unwrap(),
        vec![1, t(100.0), t(10.0)]
    );
    // A dwell's duration is in programmer time units (minutes by default).
    assert_eq!(m.read_registers(seg(1, 2), 3).unwrap(), vec![3, 0, 2]);
    // The float region serves program data too: target 100 °C, dwell 120 000 ms.
    let target = reg::FLOAT_BASE + 2 * (seg(1, 1) + 1);
    assert_eq!(
        m.read_registers(target, 2).unwrap(),
        float_words(100.0).to_vec()
    );
    let dwell = reg::FLOAT_BASE + 2 * (seg(1, 2) + 2);
    assert_eq!(m.read_registers(dwell, 2).unwrap(), vec![0x0001, 0xD4C0]);
}

#[test]
fn a_written_program_runs_holds_completes_and_resets() {
    let mut m = model();
    write_program(&mut m);
    m.write_register(reg::PROGRAM_STATE, 2).unwrap();
    assert_eq!(read1(&m, reg::PROGRAM_STATE), 2);
    assert_eq!(read1(&m, reg::PROGRAM_SEGMENT), 1);
    assert_eq!(read1(&m, reg::SEGMENT_TYPE), 1);
    // 75 °C at 10 °C/min: 7.5 min left in the ramp, 9.5 min in the program (whole minutes).
    assert_eq!(read1(&m, reg::SEGMENT_TIME_LEFT), 8);
    assert_eq!(read1(&m, reg::PROGRAM_TIME_LEFT), 10);

    m.advance_to(300.0);
    assert_eq!(read_c(&m, reg::WORKING_SP), 75.0);
    assert_ne!(read1(&m, reg::STATUS) & status::RAMP_RUNNING, 0);

    // Hold freezes the programmer setpoint.
    m.write_register(reg::PROGRAM_STATE, 4).unwrap();
    m.advance_to(360.0);
    assert_eq!(read1(&m, reg::PROGRAM_STATE), 4);
    assert_eq!(read_c(&m, reg::WORKING_SP), 75.0);
    m.write_register(reg::PROGRAM_STATE, 2).unwrap();

    // 2.5 min more of ramp, then the 2 min dwell at 100 °C.
    m.advance_to(360.0 + 150.0 + 60.0);
    assert_eq!(read1(&m, reg::PROGRAM_SEGMENT), 2);
    assert_eq!(read1(&m, reg::SEGMENT_TYPE), 3);
    assert_eq!(read_c(&m, reg::WORKING_SP), 100.0);
    assert_eq!(read1(&m, reg::SEGMENT_TIME_LEFT), 1);

    // The step and the end: complete, at the last setpoint, "program end" in the status.
    m.advance_to(360.0 + 150.0 + 121.0);
    assert_eq!(read1(&m, reg::PROGRAM_STATE), 16);
    assert_eq!(read_c(&m, reg::WORKING_SP), 50.0);
    assert_ne!(read1(&m, reg::STATUS) & status::PROGRAM_END, 0);
    assert_eq!(read1(&m, reg::PROGRAM_TIME_LEFT), 0);

    // Reset: back to the controller's own setpoint.
    m.write_register(reg::PROGRAM_STATE, 1).unwrap();
    m.advance_to(700.0);
    assert_eq!(read1(&m, reg::PROGRAM_STATE), 1);
    assert_eq!(read1(&m, reg::PROGRAM_SEGMENT), 0);
    assert_eq!(read_c(&m, reg::WORKING_SP), 25.0);
    assert_eq!(read1(&m, reg::STATUS) & status::PROGRAM_END, 0);
}

#[test]
fn programmer_refuses_what_a_2400_refuses() {
    let mut m = model();
    write_program(&mut m);
    // Segment types 0–4 only; targets within the setpoint range; states 1, 2, 4 only.
    assert_eq!(m.write_register(seg(1, 5), 5), Err(IllegalDataValue));
    assert_eq!(
        m.write_register(seg(1, 5) + 1, t(1500.0)),
        Err(IllegalDataValue)
    );
    assert_eq!(
        m.write_register(reg::PROGRAM_STATE, 3),
        Err(IllegalDataValue)
    );
    assert_eq!(
        m.write_register(reg::PROGRAM_STATE, 16),
        Err(IllegalDataValue)
    );
    assert_eq!(
        m.write_register(reg::PROGRAM_STATE, 4),
        Err(IllegalDataValue)
    );
    // Four programs are stored: a fifth does not exist.
    assert_eq!(
        m.write_register(reg::PROGRAM_NUMBER, 5),
        Err(IllegalDataValue)
    );
    assert_eq!(m.read_registers(seg(5, 1), 1), Err(IllegalDataAddress));
    assert_eq!(
        m.read_registers(reg::PROGRAM_DATA, 1),
        Err(IllegalDataAddress)
    );
    // Status registers are read-only.
    for r in [
        reg::PROGRAM_SEGMENT,
        reg::SEGMENT_TYPE,
        reg::SEGMENT_TIME_LEFT,
        reg::PROGRAM_TIME_LEFT,
    ] {
        assert_eq!(
            m.write_register(r, 1),
            Err(IllegalDataValue),
            "register {r}"
        );
    }
    // While it runs, the program cannot be swapped or edited; others can.
    m.write_register(reg::PROGRAM_STATE, 2).unwrap();
    assert_eq!(
        m.write_register(reg::PROGRAM_NUMBER, 2),
        Err(IllegalDataValue)
    );
    assert_eq!(m.write_register(seg(1, 1), 4), Err(IllegalDataValue));
    assert_eq!(m.write_register(seg(2, 1), 4), Ok(()));
}

#[test]
fn a_power_cycle_restores_the_power_up_setpoint_and_mode_and_keeps_the_heat() {
    let mut m = model();
    m.write_register(reg::RATE_LIMIT, t(0.0)).unwrap();
    m.write_register(reg::TARGET_SP, t(150.0)).unwrap();
    m.advance_to(3600.0);
    let hot = m.snapshot().pv_c;
    assert!(hot > 100.0, "heated to {hot}");
    m.write_register(reg::AUTO_MANUAL, 1).unwrap();
    write_program(&mut m);

    m.power_cycle();
    assert_eq!(read_c(&m, reg::TARGET_SP), 25.0);
    assert_eq!(read1(&m, reg::AUTO_MANUAL), 0, "automatic after power-up");
    assert!(
        (m.snapshot().pv_c - hot).abs() < 1.0,
        "the plant keeps its heat"
    );
    // It keeps regulating at the power-up setpoint: the heater stays off while hot.
    m.advance_to(3700.0);
    assert_eq!(m.snapshot().output_pct, 0.0);
    // The stored programs survive: they live in the controller's non-volatile memory.
    assert_eq!(
        m.read_registers(seg(1, 1), 3).unwrap(),
        vec![1, t(100.0), t(10.0)]
    );
}

/// The thermal history a furnace files for its sample is sampled on the physics' own grid,
/// not at the instants the controller happens to be read: a furnace polled every physical
/// second and one read only once at the end (what a 100,000× clock does to a 20 ms poll)
/// record the same history, so the material the sample becomes does not depend on the time
/// scale.
#[tokio::test(start_paused = true)]
async fn the_thermal_history_does_not_depend_on_polling() {
    let clock = Clock::new(1000.0);
    let furnaces = [(); 2].map(|_| {
        let world = crate::world::World::new(7);
        let f = SimFurnace::new(FurnaceConfig::default(), clock);
        f.set_observer(Some(world.furnace_observer("furnace-1")));
        world.place("S", "furnace-1");
        f.write_register(reg::TARGET_SP, t(350.0)).unwrap();
        (world, f)
    });
    // 3600 physical seconds: the first furnace read every second, the other never.
    for _ in 0..3600 {
        tokio::time::advance(Duration::from_millis(1)).await;
        furnaces[0].1.read_registers(reg::PV, 1).unwrap();
    }
    furnaces[1].1.read_registers(reg::PV, 1).unwrap();
    let [polled, once] = furnaces.map(|(w, _)| w.history("S").expect("a history"));
    assert!(polled.peak_c().is_some_and(|p| p > 340.0), "{polled:?}");
    assert!(polled.thermal.len() > 10, "{polled:?}");
    assert_eq!(polled, once);
}
