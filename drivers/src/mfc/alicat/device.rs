//! The `Device` implementation of an Alicat controller: the `gas_flow` command of the family's
//! schema on top of [`AlicatMfc`]'s client calls.

use async_trait::async_trait;

use super::{AlicatConfig, AlicatMfc, GasFlowTrace, protocol};
use crate::device::{
    Device, DeviceError, DeviceInfo, DeviceStatus, Limits, Reading, SafeCheck, StepCommand,
    StepContext, StepOutput, StepUpdate,
};
use crate::mfc::schema::{FlowSample, GasFlow, GasFlowResult};
use crate::transport::serial::SerialTransport;

/// The device's description: family `mfc`, capability `gas_flow`, its full scale as
/// `max_flow_sccm` and the gases the rig is plumbed for as the accepted `gas` values.
pub(super) fn info(config: &AlicatConfig, transport: &SerialTransport) -> DeviceInfo {
    let gases: Vec<String> = if config.gases.is_empty() {
        protocol::GASES.iter().map(|(_, n)| (*n).to_owned()).collect()
    } else {
        config.gases.clone()
    };
    DeviceInfo {
        id: config.id.clone(),
        family: "mfc".to_owned(),
        driver: "alicat".to_owned(),
        transport: format!("{} unit {}", transport.describe(), config.unit_id),
        capabilities: vec!["gas_flow".to_owned()],
        limits: Limits::default()
            .with("max_flow_sccm", config.full_scale_sccm)
            .accepting("gas", gases),
    }
}

fn gas_flow(step: &StepCommand, device: &str) -> Result<GasFlow, DeviceError> {
    step.decode::<GasFlow>()
        .ok_or_else(|| step.unsupported(device))?
}

fn result(trace: GasFlowTrace) -> GasFlowResult {
    GasFlowResult {
        gas: trace.gas,
        setpoint_sccm: trace.setpoint_sccm,
        duration_s: trace.duration_s,
        mean_flow_sccm: trace.mean_flow_sccm,
        settled_flow_sccm: trace.settled_flow_sccm,
        settled: trace.settled,
        trace: trace
            .samples
            .iter()
            .map(|s| FlowSample {
                t_s: s.t_s,
                mass_flow_sccm: s.mass_flow_sccm,
                setpoint_sccm: s.setpoint_sccm,
                pressure_psia: s.pressure_psia,
                temperature_c: s.temperature_c,
            })
            .collect(),
    }
}

#[async_trait]
impl Device for AlicatMfc {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn check(&self, step: &StepCommand) -> Result<(), DeviceError> {
        let g = gas_flow(step, &self.info.id)?;
        self.check_gas_flow(&g.gas, g.flow_sccm, g.duration_s)
    }

    async fn execute(
        &self,
        step: &StepCommand,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        let g = gas_flow(step, &self.info.id)?;
        let duration_s = g.duration_s;
        let trace = self
            .run_gas_flow(
                &g.gas,
                g.flow_sccm,
                duration_s,
                &ctx.clock,
                &ctx.cancel,
                |fraction, frame| {
                    let (readings, alarms) = self.readings(frame);
                    let value = |name: &str| {
                        readings
                            .iter()
                            .find(|(n, _)| *n == name)
                            .map_or(0.0, |(_, v)| *v)
                    };
                    let message = format!(
                        "{} {:.1} sccm (setpoint {:.1} sccm)",
                        frame.gas,
                        value("mass_flow_sccm"),
                        value("setpoint_sccm")
                    );
                    ctx.send(StepUpdate::Reading(DeviceStatus {
                        readings: readings
                            .into_iter()
                            .map(|(n, v)| Reading::new(n, v))
                            .collect(),
                        alarms,
                        active: true,
                    }));
                    ctx.send(StepUpdate::Progress {
                        fraction,
                        message,
                        remaining_s: Some(duration_s * (1.0 - fraction)),
                    });
                },
            )
            .await?;
        Ok(StepOutput::pack(&result(trace)))
    }

    async fn status(&self) -> Result<DeviceStatus, DeviceError> {
        let frame = self.poll().await?;
        let (readings, alarms) = self.readings(&frame);
        Ok(DeviceStatus {
            active: frame.setpoint != 0.0,
            readings: readings
                .into_iter()
                .map(|(n, v)| Reading::new(n, v))
                .collect(),
            alarms,
        })
    }

    async fn safe_state(&self) -> Result<(), DeviceError> {
        AlicatMfc::safe_state(self).await
    }

    async fn confirm_safe(&self) -> Result<SafeCheck, DeviceError> {
        AlicatMfc::confirm_safe(self).await
    }
}
