//! The device-family features: a command becomes a one-step experiment in the queue (its
//! execution UUID is the experiment's id); `_Info`, `_Intermediate` and `_Result` follow that
//! experiment; a reading is an observable property listing each of the family's devices with
//! its latest value.

use std::collections::BTreeMap;
use std::sync::Arc;

use ppu_proto::v1 as pb;
use ppu_schema::prost_reflect::{DynamicMessage, Kind as FieldKind, Value};
use ppu_sila::error::FrameworkErrorKind;
use ppu_sila::family::{FamilyCommand, FamilyFeature};
use prost::Message;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use super::endpoint::{Ctx, Replies, execution_uuid};
use super::errors::{self, Submitted, framework, undefined};
use super::execution::{self, Follower, Seen};
use super::features::{Member, Method};
use super::values::{self, Basic, Field};
use crate::auth::Caller;
use crate::command::{Resolved, resolve};
use crate::state::State;

/// Label an experiment started through SiLA carries: the command's fully qualified identifier.
pub const SILA_COMMAND_LABEL: &str = "sila_command";

impl Ctx {
    fn family(&self, i: usize) -> Result<(&FamilyFeature, String), Status> {
        let ff = self
            .features
            .families
            .get(i)
            .ok_or_else(|| Status::internal("family index"))?;
        Ok((ff, ff.feature.fully_qualified_identifier()))
    }

    fn family_command<'a>(
        &self,
        ff: &'a FamilyFeature,
        id: &str,
    ) -> Result<&'a FamilyCommand, Status> {
        ff.command(id)
            .ok_or_else(|| Status::unimplemented(format!("no command {id}")))
    }

    pub(crate) async fn family_unary(
        &self,
        i: usize,
        method: &Method,
        caller: &Caller,
        msg: &DynamicMessage,
    ) -> Result<Vec<u8>, Status> {
        let (ff, fqi) = self.family(i)?;
        match &method.member {
            Member::Command(id) => {
                let fc = self.family_command(ff, id)?;
                let experiment = self.start(ff, &fqi, fc, caller, msg).await?;
                let observable = ff.feature.command(id).is_some_and(|c| c.observable);
                if observable {
                    let uuid = execution::uuid_of(&experiment)
                        .ok_or_else(|| undefined("experiment id is not a ULID"))?;
                    return Ok(ppu_sila::framework::CommandConfirmation {
                        command_execution_uuid: Some(ppu_sila::framework::CommandExecutionUuid {
                            value: uuid,
                        }),
                        lifetime_of_execution: None,
                    }
                    .encode_to_vec());
                }
                let e = self.wait_end(&experiment).await?;
                self.family_result(ff, &fqi, fc, &e)
            }
            Member::Result(id) => {
                let fc = self.family_command(ff, id)?;
                let e = self.execution(fc, msg)?;
                self.family_result(ff, &fqi, fc, &e)
            }
            other => Err(Status::unimplemented(format!("{other:?}"))),
        }
    }

    /// Submits the command's parameters as a one-step experiment; its id.
    async fn start(
        &self,
        ff: &FamilyFeature,
        fqi: &str,
        fc: &FamilyCommand,
        caller: &Caller,
        msg: &DynamicMessage,
    ) -> Result<String, Status> {
        let call = ff.call(&fc.identifier, msg).map_err(errors::status)?;
        let command_fqi = format!("{fqi}/Command/{}", fc.identifier);
        let step_name = self
            .schema
            .command(&fc.message)
            .map(|c| c.name().to_owned())
            .unwrap_or_default();
        let spec = pb::ExperimentSpec {
            name: format!("SiLA {}.{}", ff.feature.identifier, fc.identifier),
            labels: [(SILA_COMMAND_LABEL.to_owned(), command_fqi.clone())].into(),
            steps: vec![pb::Step {
                device_id: call.device.clone(),
                kind: Some(pb::step::Kind::Command(prost_types::Any {
                    type_url: ppu_schema::type_url(&fc.message),
                    value: call.command.encode_to_vec(),
                })),
            }],
            ..Default::default()
        };
        let parameters = ff
            .feature
            .command(&fc.identifier)
            .map(|c| c.parameters.iter().map(|p| p.identifier.clone()).collect())
            .unwrap_or_default();
        let at = Submitted {
            command: command_fqi,
            feature: fqi.to_owned(),
            whole: None,
            step_name: &step_name,
            parameters,
        };
        self.submit(spec, caller, &at).await
    }

    /// Waits until the experiment has ended; its final record.
    pub(crate) async fn wait_end(&self, id: &str) -> Result<pb::Experiment, Status> {
        let mut follower = Follower::new(self.scheduler.store().clone(), id.to_owned());
        let mut last = None;
        loop {
            let next = tokio::select! {
                n = follower.next() => n.map_err(|e| undefined(e.to_string()))?,
                _ = self.stop.cancelled() => None,
            };
            match next {
                Some(Seen::Record(e)) => last = Some(*e),
                Some(_) => {}
                None => break,
            }
        }
        match last {
            Some(e) if execution::state_of(&e).is_some_and(State::is_terminal) => Ok(e),
            _ => Err(Status::unavailable(format!(
                "ppud is stopping; experiment {id} stays in the queue (ExperimentQueue.GetExperiment)"
            ))),
        }
    }

    /// The experiment a CommandExecutionUUID names, if it runs `fc`.
    fn execution(
        &self,
        fc: &FamilyCommand,
        msg: &DynamicMessage,
    ) -> Result<pb::Experiment, Status> {
        let invalid = |why: String| framework(FrameworkErrorKind::InvalidCommandExecutionUuid, why);
        let uuid = execution_uuid(msg).unwrap_or_default();
        let id = execution::experiment_of(&uuid)
            .ok_or_else(|| invalid(format!("{uuid:?} is not a UUID")))?;
        let e = self
            .scheduler
            .store()
            .get_experiment(&id)
            .map_err(|e| undefined(e.to_string()))?
            .ok_or_else(|| invalid(format!("no command execution {uuid}")))?;
        if self.step_of(&e, &fc.message).is_none() {
            return Err(invalid(format!(
                "command execution {uuid} is not a {} execution",
                fc.identifier
            )));
        }
        Ok(e)
    }

    /// The last step of `e` that runs the command message `message`.
    fn step_of(&self, e: &pb::Experiment, message: &str) -> Option<u32> {
        let steps = &e.spec.as_ref()?.steps;
        steps
            .iter()
            .enumerate()
            .rev()
            .find_map(|(i, s)| match resolve(self.schema, s, "") {
                Ok(Resolved::Command(c))
                    if ppu_schema::type_name(&c.step.0.type_url) == message =>
                {
                    u32::try_from(i).ok()
                }
                _ => None,
            })
    }

    fn family_result(
        &self,
        ff: &FamilyFeature,
        fqi: &str,
        fc: &FamilyCommand,
        e: &pb::Experiment,
    ) -> Result<Vec<u8>, Status> {
        match execution::state_of(e) {
            Some(State::Succeeded) => {
                let step = self.step_of(e, &fc.message);
                let output = e
                    .results
                    .iter()
                    .rev()
                    .find(|r| Some(r.step_index) == step)
                    .and_then(|r| execution::output_of(self.schema, r));
                ff.responses(&self.features.pool, &fc.identifier, output.as_ref(), &e.id)
                    .map(|m| m.encode_to_vec())
                    .map_err(errors::status)
            }
            Some(s) if s.is_terminal() => Err(errors::ended(fqi, e)),
            _ => Err(framework(
                FrameworkErrorKind::CommandExecutionNotFinished,
                format!(
                    "experiment {} is {}; follow {}_Info until it finishes",
                    e.id,
                    execution::state_name(e),
                    fc.identifier
                ),
            )),
        }
    }

    pub(crate) fn family_stream(
        self: Arc<Self>,
        i: usize,
        method: &Method,
        msg: &DynamicMessage,
    ) -> Result<Replies, Status> {
        let (ff, _) = self.family(i)?;
        match &method.member {
            Member::Info(id) => {
                let fc = self.family_command(ff, id)?;
                let e = self.execution(fc, msg)?;
                self.info_stream(e.id, |s| s == State::Succeeded)
            }
            Member::Intermediate(id) => {
                let fc = self.family_command(ff, id)?.clone();
                let e = self.execution(&fc, msg)?;
                self.intermediate_stream(i, fc, e.id)
            }
            Member::Subscribe(property) => self.readings_stream(i, method, property),
            other => Err(Status::unimplemented(format!("{other:?}"))),
        }
    }

    /// ExecutionInfo of experiment `id` on every change, until it has ended.
    pub(crate) fn info_stream(
        self: &Arc<Self>,
        id: String,
        ended_ok: fn(State) -> bool,
    ) -> Result<Replies, Status> {
        let store = self.scheduler.store().clone();
        let scale = self.scheduler.clock().scale();
        self.spawn_stream(move |tx| async move {
            let mut follower = Follower::new(store, id);
            let mut record = None;
            let mut progress = None;
            let mut sent: Option<Vec<u8>> = None;
            loop {
                match follower.next().await {
                    Ok(Some(Seen::Record(e))) => record = Some(*e),
                    Ok(Some(Seen::Progress(p))) => progress = Some(p),
                    Ok(Some(Seen::Event(_))) => continue,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(undefined(e.to_string()))).await;
                        return;
                    }
                }
                let Some(e) = &record else { continue };
                let info = execution::info(e, progress.as_ref(), scale, ended_ok).encode_to_vec();
                if sent.as_ref() == Some(&info) {
                    continue;
                }
                sent = Some(info.clone());
                if tx.send(Ok(info)).await.is_err() {
                    return;
                }
            }
        })
    }

    /// The command's intermediate responses from now on, until the experiment has ended.
    fn intermediate_stream(
        self: &Arc<Self>,
        i: usize,
        fc: FamilyCommand,
        id: String,
    ) -> Result<Replies, Status> {
        let ctx = self.clone();
        self.spawn_stream(move |tx| async move {
            let Some(ff) = ctx.features.families.get(i) else {
                return;
            };
            let mut follower = Follower::new(ctx.scheduler.store().clone(), id);
            loop {
                let event = match follower.next().await {
                    Ok(Some(Seen::Event(ev))) => ev,
                    Ok(Some(_)) => continue,
                    Ok(None) => return,
                    Err(e) => {
                        let _ = tx.send(Err(undefined(e.to_string()))).await;
                        return;
                    }
                };
                let Some(value) = execution::intermediate_of(ctx.schema, &event) else {
                    continue;
                };
                if fc.intermediate.as_deref() != Some(ppu_schema::type_name(&value.type_url)) {
                    continue;
                }
                let reply = ff
                    .intermediate(&ctx.features.pool, &fc.identifier, &value)
                    .map(|m| m.encode_to_vec())
                    .map_err(errors::status);
                if tx.send(reply).await.is_err() {
                    return;
                }
            }
        })
    }

    /// A reading as an observable property: the family's devices with their latest value of
    /// it, sent first and again whenever one changes.
    fn readings_stream(
        self: &Arc<Self>,
        i: usize,
        method: &Method,
        property: &str,
    ) -> Result<Replies, Status> {
        let (ff, _) = self.family(i)?;
        let family = self
            .schema
            .family(&ff.family)
            .ok_or_else(|| Status::internal("family not in the schema"))?;
        let reading = family
            .options
            .readings
            .iter()
            .find(|r| same_name(&r.name, property))
            .map(|r| r.name.clone())
            .ok_or_else(|| Status::unimplemented(format!("no reading for {property}")))?;
        let field = method
            .output
            .get_field_by_name(property)
            .ok_or_else(|| Status::internal(format!("no field {property}")))?;
        let FieldKind::Message(item) = field.kind() else {
            return Err(Status::internal(format!(
                "{property}: not a structure list"
            )));
        };
        let devices: Vec<_> = self
            .scheduler
            .devices()
            .all()
            .filter(|d| d.family() == ff.family)
            .cloned()
            .collect();
        let output = method.output.clone();
        let property = property.to_owned();
        self.spawn_stream(move |tx| async move {
            let (merged_tx, mut merged) = tokio::sync::mpsc::channel::<pb::DeviceReading>(64);
            let mut values: BTreeMap<String, f64> = BTreeMap::new();
            for d in &devices {
                let value = d.latest().and_then(|r| value_of(&r, &reading));
                if let Some(v) = value {
                    values.insert(d.id().to_owned(), v);
                }
                let mut rx = d.watch();
                let tx = merged_tx.clone();
                tokio::spawn(async move {
                    loop {
                        match rx.recv().await {
                            Ok(r) => {
                                if tx.send(r).await.is_err() {
                                    return;
                                }
                            }
                            Err(RecvError::Lagged(_)) => continue,
                            Err(RecvError::Closed) => return,
                        }
                    }
                });
            }
            drop(merged_tx);
            let reply = |values: &BTreeMap<String, f64>| {
                let items = values
                    .iter()
                    .map(|(device, v)| {
                        Value::Message(values::message(
                            &item,
                            vec![
                                ("Device", Field::One(Basic::String(device.clone()))),
                                ("Value", Field::One(Basic::Real(*v))),
                            ],
                        ))
                    })
                    .collect();
                values::encode(&output, vec![(&property, Field::Raw(Value::List(items)))])
            };
            if tx.send(Ok(reply(&values))).await.is_err() {
                return;
            }
            while let Some(r) = merged.recv().await {
                let Some(v) = value_of(&r, &reading) else {
                    continue;
                };
                if values.insert(r.device_id.clone(), v) == Some(v) {
                    continue;
                }
                if tx.send(Ok(reply(&values))).await.is_err() {
                    return;
                }
            }
        })
    }
}

fn value_of(r: &pb::DeviceReading, name: &str) -> Option<f64> {
    r.values.iter().find(|v| v.name == name).map(|v| v.value)
}

/// A reading's name (`pv_c`) and the property identifier made of it (`PvC`).
fn same_name(reading: &str, identifier: &str) -> bool {
    reading.replace('_', "").eq_ignore_ascii_case(identifier)
}
