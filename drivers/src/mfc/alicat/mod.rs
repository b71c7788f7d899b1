//! Alicat mass-flow controllers over serial ASCII (RS-232/RS-485, `<CR>` lines): the `alicat`
//! driver.
//!
//! [`AlicatMfc`] is the client the family's `Device` implementation wraps: [`poll`](AlicatMfc::poll),
//! [`select_gas`](AlicatMfc::select_gas), [`set_flow`](AlicatMfc::set_flow), the
//! [`run_gas_flow`](AlicatMfc::run_gas_flow) step, and the safe state (setpoint 0, confirmed by
//! reading the setpoint back). The protocol itself is [`protocol`], read from Alicat's manuals.
//!
//! Every command is answered with a data frame, so each write is verified by its own reply:
//! a setpoint is accepted when the frame's setpoint column shows it, a gas when the frame's
//! gas column names it (MC-Series manual, "Sending a Setpoint": "once a setpoint is accepted,
//! the data frame will be returned with the setpoint column changed accordingly"). Flows cross
//! this API in SCCM and are converted to the device's engineering unit on the wire.
//!
//! Out-of-range values are refused before anything is sent ([`DeviceError::Limit`] naming the
//! field). Link faults (timeouts, a vanished port) are the transport's: bounded retries, then
//! a reconnect on the next request. A corrupt reply from this unit is re-asked (every command
//! here is idempotent) and, if it stays corrupt, reported as [`DeviceError::Corrupt`].

pub mod config;
mod device;
pub mod protocol;

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::clock::Clock;
use crate::device::{DeviceError, SafeCheck};
use crate::transport::serial::{Frame, Framing, SerialConfig, SerialTransport};
use protocol::{Command, DataFrame, Reply, UnitId};

/// The engineering unit of a controller's flow columns, fixed when it was ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlowUnit {
    /// Standard cubic centimetres per minute.
    #[default]
    Sccm,
    /// Standard litres per minute.
    Slpm,
}

impl FlowUnit {
    /// SCCM per device unit.
    pub fn sccm_per_unit(self) -> f64 {
        match self {
            FlowUnit::Sccm => 1.0,
            FlowUnit::Slpm => 1000.0,
        }
    }
}

/// Configuration of one controller.
#[derive(Debug, Clone, PartialEq)]
pub struct AlicatConfig {
    pub id: String,
    /// Framing must be [`Framing::Cr`](crate::transport::serial::Framing::Cr).
    pub serial: SerialConfig,
    pub unit_id: UnitId,
    /// The device's flow unit.
    pub flow_unit: FlowUnit,
    /// Full scale, SCCM: the largest setpoint the driver sends.
    pub full_scale_sccm: f64,
    /// Gases the rig is plumbed for (names as in [`protocol::GASES`]); empty = every gas in
    /// the table.
    pub gases: Vec<String>,
    /// Physical seconds between trace samples of a gas flow (at least 1/1000 of the run).
    pub sample_interval_s: f64,
    /// A run has settled when the mean of its last fifth is within this fraction of full scale
    /// of the setpoint.
    pub settle_tolerance_fs: f64,
}

impl AlicatConfig {
    /// Unit `A`, SCCM, 1 s samples, settled within 2 % of full scale.
    pub fn new(id: impl Into<String>, serial: SerialConfig, full_scale_sccm: f64) -> Self {
        Self {
            id: id.into(),
            serial,
            unit_id: UnitId::default(),
            flow_unit: FlowUnit::Sccm,
            full_scale_sccm,
            gases: Vec::new(),
            sample_interval_s: 1.0,
            settle_tolerance_fs: 0.02,
        }
    }
}

/// A controller's settings as a configuration file gives them (owned by the driver, so the
/// daemon's config keeps nothing MFC-specific). Unknown keys are refused.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlicatSettings {
    /// Serial port, e.g. `/dev/serial/by-id/usb-…`.
    pub port: String,
    /// Line speed (8N1); Alicat's factory default is 19200.
    #[serde(default = "AlicatSettings::default_baud")]
    pub baud_rate: u32,
    /// Unit id `A`–`Z`.
    #[serde(default = "AlicatSettings::default_unit")]
    pub unit_id: char,
    /// `"SCCM"` or `"SLPM"`: the flow unit the controller was ordered with.
    #[serde(default = "AlicatSettings::default_flow_unit")]
    pub flow_unit: String,
    /// Full scale, SCCM (the declared `max_flow_sccm`).
    pub full_scale_sccm: f64,
    /// Gases the rig is plumbed for; empty = the whole gas table.
    #[serde(default)]
    pub gases: Vec<String>,
    #[serde(default = "AlicatSettings::default_timeout_ms")]
    pub timeout_ms: u64,
    #[serde(default = "AlicatSettings::default_retries")]
    pub retries: u32,
    #[serde(default = "AlicatSettings::default_sample_interval_s")]
    pub sample_interval_s: f64,
    #[serde(default = "AlicatSettings::default_settle_tolerance_fs")]
    pub settle_tolerance_fs: f64,
}

impl AlicatSettings {
    fn default_baud() -> u32 {
        19_200
    }
    fn default_unit() -> char {
        'A'
    }
    fn default_flow_unit() -> String {
        "SCCM".to_owned()
    }
    fn default_timeout_ms() -> u64 {
        500
    }
    fn default_retries() -> u32 {
        2
    }
    fn default_sample_interval_s() -> f64 {
        1.0
    }
    fn default_settle_tolerance_fs() -> f64 {
        0.02
    }

    /// The driver configuration for device `id`, or the first setting that is wrong, named.
    pub fn into_config(self, id: impl Into<String>) -> Result<AlicatConfig, String> {
        let unit_id = UnitId::new(self.unit_id)
            .ok_or_else(|| format!("unit_id: {:?} is not a letter A-Z", self.unit_id))?;
        let flow_unit = match self.flow_unit.to_ascii_uppercase().as_str() {
            "SCCM" => FlowUnit::Sccm,
            "SLPM" => FlowUnit::Slpm,
            other => return Err(format!("flow_unit: {other:?} is not SCCM or SLPM")),
        };
        if !(self.full_scale_sccm.is_finite() && self.full_scale_sccm > 0.0) {
            return Err(format!(
                "full_scale_sccm: {} is not a positive number",
                self.full_scale_sccm
            ));
        }
        if let Some(g) = self
            .gases
            .iter()
            .find(|g| protocol::gas_number(g).is_none())
        {
            return Err(format!("gases: {g:?} is not in the Alicat gas table"));
        }
        if !(self.sample_interval_s.is_finite() && self.sample_interval_s > 0.0) {
            return Err("sample_interval_s: must be a positive number of seconds".to_owned());
        }
        if !(self.settle_tolerance_fs.is_finite() && self.settle_tolerance_fs >= 0.0) {
            return Err("settle_tolerance_fs: must be a non-negative fraction".to_owned());
        }
        let mut serial = SerialConfig::new(self.port, Framing::Cr);
        serial.baud_rate = self.baud_rate;
        serial.timeout = Duration::from_millis(self.timeout_ms);
        serial.retries = self.retries;
        Ok(AlicatConfig {
            id: id.into(),
            serial,
            unit_id,
            flow_unit,
            full_scale_sccm: self.full_scale_sccm,
            gases: self.gases,
            sample_interval_s: self.sample_interval_s,
            settle_tolerance_fs: self.settle_tolerance_fs,
        })
    }
}

/// What the family declares: the flow bound and the accepted gases.
#[derive(Debug, Clone, PartialEq)]
pub struct MfcLimits {
    /// `max_flow_sccm`: the device's full scale.
    pub max_flow_sccm: f64,
    /// Accepted values of the `gas` parameter.
    pub gases: Vec<String>,
}

/// One sample of a gas-flow trace.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowSample {
    /// Physical seconds since the setpoint was accepted.
    pub t_s: f64,
    pub mass_flow_sccm: f64,
    pub setpoint_sccm: f64,
    pub pressure_psia: f64,
    pub temperature_c: f64,
}

/// The result of a gas flow.
#[derive(Debug, Clone, PartialEq)]
pub struct GasFlowTrace {
    pub gas: String,
    pub setpoint_sccm: f64,
    pub duration_s: f64,
    pub samples: Vec<FlowSample>,
    /// Mean mass flow over the run, SCCM.
    pub mean_flow_sccm: f64,
    /// Mean mass flow over the last fifth of the run, SCCM.
    pub settled_flow_sccm: f64,
    /// The settled flow is within the configured tolerance of the setpoint.
    pub settled: bool,
}

/// An Alicat mass-flow controller on a serial line.
#[derive(Debug)]
pub struct AlicatMfc {
    config: AlicatConfig,
    transport: SerialTransport,
    info: crate::device::DeviceInfo,
}

impl AlicatMfc {
    /// Creates the client; nothing is sent until the first request.
    pub fn new(config: AlicatConfig) -> Self {
        let transport = SerialTransport::new(config.serial.clone());
        transport.set_metrics_device(config.id.clone());
        let info = device::info(&config, &transport);
        Self {
            config,
            transport,
            info,
        }
    }

    pub fn config(&self) -> &AlicatConfig {
        &self.config
    }

    pub fn transport(&self) -> &SerialTransport {
        &self.transport
    }

    /// The family's declared limits.
    pub fn limits(&self) -> MfcLimits {
        let gases = if self.config.gases.is_empty() {
            protocol::GASES
                .iter()
                .map(|(_, n)| (*n).to_owned())
                .collect()
        } else {
            self.config.gases.clone()
        };
        MfcLimits {
            max_flow_sccm: self.config.full_scale_sccm,
            gases,
        }
    }

    /// Sends `command` and returns the data frame that answers it. A frame from another unit
    /// on the line is not the answer (reading goes on); `A ?` (or `?`) is a refusal; a corrupt frame
    /// from this unit is asked again, then reported.
    async fn send(&self, command: Command) -> Result<DataFrame, DeviceError> {
        let unit = self.config.unit_id;
        let what = format!("{} ({})", command.text(unit), self.config.id);
        let mut last = None;
        for _ in 0..=self.config.serial.retries {
            let reply = self
                .transport
                .request(&command.encode(unit), &what, |frame: &Frame| {
                    // A line that does not start with our unit id is noise or a neighbour's,
                    // except the bare `?` that refuses a command (it names no unit).
                    let ours = frame.payload.first() == Some(&(unit.as_char() as u8))
                        && frame.payload.get(1) == Some(&b' ');
                    if !ours && frame.payload.trim_ascii() != b"?" {
                        return Err(format!(
                            "not from unit {unit}: {:?}",
                            String::from_utf8_lossy(&frame.payload)
                        ));
                    }
                    Ok(protocol::parse_reply(&frame.payload))
                })
                .await?;
            match reply {
                Ok(Reply::Data(frame)) => return Ok(frame),
                Ok(Reply::Unknown(_)) => {
                    return Err(DeviceError::Refused {
                        what,
                        reason: "the controller did not recognise the command (?)".to_owned(),
                    });
                }
                Err(e) => {
                    tracing::warn!(device = %self.config.id, command = %what, error = %e, "corrupt data frame; asking again");
                    last = Some(e.corrupt(&what));
                }
            }
        }
        Err(last.unwrap_or_else(|| DeviceError::Corrupt {
            what,
            reason: "no attempt made".to_owned(),
        }))
    }

    /// The current data frame.
    pub async fn poll(&self) -> Result<DataFrame, DeviceError> {
        self.send(Command::Poll).await
    }

    /// The gas number of `gas` if the rig accepts it; refused before the wire otherwise.
    pub fn check_gas(&self, gas: &str) -> Result<u8, DeviceError> {
        let limits = self.limits();
        let accepted = limits
            .gases
            .iter()
            .any(|g| g.trim().eq_ignore_ascii_case(gas.trim()));
        let number = protocol::gas_number(gas);
        match number {
            Some(n) if accepted => Ok(n),
            _ => Err(DeviceError::Refused {
                what: format!("gas = {gas:?}"),
                reason: format!("{} accepts {}", self.config.id, limits.gases.join(", ")),
            }),
        }
    }

    /// Checks a flow against full scale; refused before the wire otherwise.
    pub fn check_flow(&self, flow_sccm: f64) -> Result<(), DeviceError> {
        let max = self.config.full_scale_sccm;
        if !(flow_sccm.is_finite() && (0.0..=max).contains(&flow_sccm)) {
            return Err(DeviceError::Limit {
                field: "flow_sccm".to_owned(),
                value: flow_sccm,
                limit: format!("0 ≤ flow ≤ max_flow_sccm {max}"),
            });
        }
        Ok(())
    }

    /// Checks a gas-flow step's parameters without sending anything.
    pub fn check_gas_flow(
        &self,
        gas: &str,
        flow_sccm: f64,
        duration_s: f64,
    ) -> Result<(), DeviceError> {
        self.check_gas(gas)?;
        self.check_flow(flow_sccm)?;
        if !(duration_s.is_finite() && duration_s > 0.0) {
            return Err(DeviceError::Limit {
                field: "duration_s".to_owned(),
                value: duration_s,
                limit: "a finite, positive number of seconds".to_owned(),
            });
        }
        Ok(())
    }

    /// Selects `gas` (`AG<n>`) and checks the reply names it.
    pub async fn select_gas(&self, gas: &str) -> Result<DataFrame, DeviceError> {
        let n = self.check_gas(gas)?;
        let frame = self.send(Command::Gas(n)).await?;
        let want = protocol::gas_name(n).unwrap_or(gas);
        if !frame.gas.eq_ignore_ascii_case(want) {
            return Err(DeviceError::Refused {
                what: format!("gas {want} (G{n})"),
                reason: format!("the controller still reports {}", frame.gas),
            });
        }
        Ok(frame)
    }

    /// Sets the mass-flow setpoint (`AS <value>` in device units) and checks the reply shows it.
    pub async fn set_flow(&self, flow_sccm: f64) -> Result<DataFrame, DeviceError> {
        self.check_flow(flow_sccm)?;
        let per_unit = self.config.flow_unit.sccm_per_unit();
        let value = flow_sccm / per_unit;
        let frame = self.send(Command::Setpoint(value)).await?;
        // The frame prints two decimals of device units; allow for that rounding.
        let tolerance = 0.006 + 0.001 * self.config.full_scale_sccm / per_unit;
        if (frame.setpoint - value).abs() > tolerance {
            return Err(DeviceError::Refused {
                what: format!("setpoint {value}"),
                reason: format!(
                    "the controller reports setpoint {} (is its setpoint source serial?)",
                    frame.setpoint
                ),
            });
        }
        Ok(frame)
    }

    /// A frame's alarm words as a fault, if any.
    fn alarm(&self, frame: &DataFrame) -> Result<(), DeviceError> {
        let alarms = frame.alarms();
        if alarms.is_empty() {
            return Ok(());
        }
        let words: Vec<&str> = alarms.iter().map(|s| s.describe()).collect();
        Err(DeviceError::Fault(format!(
            "{} reports {}",
            self.config.id,
            words.join(", ")
        )))
    }

    /// A frame as named readings for the daemon's status (flows in SCCM), and its alarms.
    pub fn readings(&self, frame: &DataFrame) -> (Vec<(&'static str, f64)>, Vec<String>) {
        let per_unit = self.config.flow_unit.sccm_per_unit();
        let readings = vec![
            ("mass_flow_sccm", frame.mass_flow * per_unit),
            ("setpoint_sccm", frame.setpoint * per_unit),
            ("volumetric_flow_ccm", frame.volumetric_flow * per_unit),
            ("pressure_psia", frame.pressure_psia),
            ("temperature_c", frame.temperature_c),
        ];
        let alarms = frame
            .alarms()
            .iter()
            .map(|s| s.describe().to_owned())
            .collect();
        (readings, alarms)
    }

    fn sample(&self, t_s: f64, frame: &DataFrame) -> FlowSample {
        let per_unit = self.config.flow_unit.sccm_per_unit();
        FlowSample {
            t_s,
            mass_flow_sccm: frame.mass_flow * per_unit,
            setpoint_sccm: frame.setpoint * per_unit,
            pressure_psia: frame.pressure_psia,
            temperature_c: frame.temperature_c,
        }
    }

    /// The `gas_flow` step: selects `gas`, sets `flow_sccm`, samples the flow on `clock` for
    /// `duration_s` of physical time, then returns the setpoint to 0. `progress` gets the
    /// fraction done and each frame. A status alarm stops the run as a fault and cancelling
    /// it as [`DeviceError::Aborted`]; either way the setpoint is set back to 0 (best effort —
    /// the caller still confirms the safe state).
    pub async fn run_gas_flow(
        &self,
        gas: &str,
        flow_sccm: f64,
        duration_s: f64,
        clock: &Clock,
        cancel: &CancellationToken,
        mut progress: impl FnMut(f64, &DataFrame),
    ) -> Result<GasFlowTrace, DeviceError> {
        self.check_gas_flow(gas, flow_sccm, duration_s)?;
        let run = async {
            self.select_gas(gas).await?;
            let first = self.set_flow(flow_sccm).await?;
            let t0 = clock.now_s();
            let interval = self.config.sample_interval_s.max(duration_s / 1000.0);
            let mut samples = vec![self.sample(0.0, &first)];
            progress(0.0, &first);
            self.alarm(&first)?;
            let mut k = 1u64;
            loop {
                let next = (k as f64 * interval).min(duration_s);
                clock.sleep_until(t0 + next).await;
                let frame = self.poll().await?;
                let t = (clock.now_s() - t0).min(duration_s);
                samples.push(self.sample(t, &frame));
                progress(t / duration_s, &frame);
                self.alarm(&frame)?;
                if next >= duration_s {
                    break;
                }
                k += 1;
            }
            Ok::<_, DeviceError>(samples)
        };
        let outcome = tokio::select! {
            biased;
            _ = cancel.cancelled() => Err(DeviceError::Aborted),
            r = run => r,
        };
        // The flow stops at the end of the step, and after a fault or an abort.
        let stopped = self.safe_state().await;
        let samples = outcome?;
        stopped?;
        Ok(self.summarise(gas, flow_sccm, duration_s, samples))
    }

    fn summarise(
        &self,
        gas: &str,
        setpoint_sccm: f64,
        duration_s: f64,
        samples: Vec<FlowSample>,
    ) -> GasFlowTrace {
        let mean = |xs: &[FlowSample]| {
            if xs.is_empty() {
                0.0
            } else {
                xs.iter().map(|s| s.mass_flow_sccm).sum::<f64>() / xs.len() as f64
            }
        };
        let tail_from = duration_s * 0.8;
        let tail: Vec<FlowSample> = samples
            .iter()
            .copied()
            .filter(|s| s.t_s >= tail_from)
            .collect();
        let settled_flow_sccm = mean(&tail);
        let tolerance = self.config.settle_tolerance_fs * self.config.full_scale_sccm;
        GasFlowTrace {
            gas: protocol::gas_number(gas)
                .and_then(protocol::gas_name)
                .unwrap_or(gas)
                .to_owned(),
            setpoint_sccm,
            duration_s,
            mean_flow_sccm: mean(&samples),
            settled: !tail.is_empty() && (settled_flow_sccm - setpoint_sccm).abs() <= tolerance,
            settled_flow_sccm,
            samples,
        }
    }

    /// The safe state: setpoint 0 (the valve closes).
    pub async fn safe_state(&self) -> Result<(), DeviceError> {
        self.set_flow(0.0).await.map(|_| ())
    }

    /// Reads the setpoint back: safe when it is 0.
    pub async fn confirm_safe(&self) -> Result<SafeCheck, DeviceError> {
        let frame = self.poll().await?;
        let mut deviations = Vec::new();
        if frame.setpoint != 0.0 {
            deviations.push(format!(
                "setpoint {} {:?} is not the safe 0",
                frame.setpoint, self.config.flow_unit
            ));
        }
        Ok(SafeCheck::from_deviations(deviations))
    }

    /// Real time one exchange may take, for callers that bound a whole step.
    pub fn exchange_timeout(&self) -> Duration {
        self.config.serial.timeout * (self.config.serial.retries + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_have_defaults_and_name_bad_keys() {
        let s: AlicatSettings =
            serde_json::from_str(r#"{"port": "/dev/ttyUSB0", "full_scale_sccm": 500}"#).unwrap();
        let c = s.into_config("mfc-1").unwrap();
        assert_eq!(c.serial.baud_rate, 19_200);
        assert_eq!(c.serial.framing, Framing::Cr);
        assert_eq!(c.unit_id, UnitId::default());
        assert_eq!(c.flow_unit, FlowUnit::Sccm);
        let typo = serde_json::from_str::<AlicatSettings>(
            r#"{"port": "/dev/ttyUSB0", "full_scale_sccm": 500, "full_scale": 1}"#,
        )
        .unwrap_err();
        assert!(typo.to_string().contains("full_scale"), "{typo}");
        for (json, field) in [
            (r#""unit_id": "1""#, "unit_id"),
            (r#""flow_unit": "CCM""#, "flow_unit"),
            (r#""gases": ["N2", "Unobtainium"]"#, "gases"),
        ] {
            let s: AlicatSettings = serde_json::from_str(&format!(
                r#"{{"port": "/dev/ttyUSB0", "full_scale_sccm": 500, {json}}}"#
            ))
            .unwrap();
            let err = s.into_config("mfc-1").unwrap_err();
            assert!(err.starts_with(field), "{err}");
        }
        let s: AlicatSettings =
            serde_json::from_str(r#"{"port": "p", "full_scale_sccm": 5000, "flow_unit": "slpm"}"#)
                .unwrap();
        assert_eq!(
            s.into_config("m").unwrap().flow_unit.sccm_per_unit(),
            1000.0
        );
    }
}
