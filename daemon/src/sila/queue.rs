//! ExperimentQueue (`ppu/queue/ExperimentQueue/v1`, `ExperimentQueue.sila.xml`): an
//! orchestrator submits whole experiments (ppu.v1's ExperimentSpec in protobuf JSON), reads
//! their state, cancels them and follows them to their end, through the same scheduler calls
//! as ppu.v1.

use std::sync::Arc;

use ppu_proto::v1 as pb;
use ppu_schema::prost_reflect::DynamicMessage;
use ppu_sila::error::{FrameworkErrorKind, SilaError};
use prost::Message;
use tokio::sync::broadcast::error::RecvError;
use tonic::Status;

use super::endpoint::{Ctx, Replies, execution_uuid};
use super::errors::{Submitted, defined, framework, status, undefined};
use super::execution;
use super::features::{Member, Method};
use super::values::{Basic, Field, encode, string};
use crate::auth::{Caller, Role};
use crate::error::Error;
use crate::state::State;

impl Ctx {
    fn queue_fqi(&self, method: &Method) -> String {
        self.features.served[method.feature]
            .feature
            .fully_qualified_identifier()
    }

    pub(crate) async fn queue_unary(
        &self,
        method: &Method,
        caller: &Caller,
        msg: &DynamicMessage,
    ) -> Result<Vec<u8>, Status> {
        let fqi = self.queue_fqi(method);
        let out = &method.output;
        let text = |v: String| Field::One(Basic::String(v));
        match &method.member {
            Member::Command(c) if c == "SubmitExperiment" => {
                let parameter = format!("{fqi}/Command/SubmitExperiment/Parameter/Experiment");
                let json = string(msg, "Experiment").unwrap_or_default();
                let spec = self.parse_spec(&json).map_err(|why| {
                    status(SilaError::Validation {
                        parameter: parameter.clone(),
                        message: format!("Experiment: {why}"),
                    })
                })?;
                let at = Submitted {
                    command: format!("{fqi}/Command/SubmitExperiment"),
                    feature: fqi.clone(),
                    whole: Some("Experiment"),
                    step_name: "",
                    parameters: vec!["Experiment".to_owned()],
                };
                let id = self.submit(spec, caller, &at).await?;
                Ok(encode(out, vec![("ExperimentId", text(id))]))
            }
            Member::Command(c) if c == "GetExperiment" => {
                let e = self.experiment(&fqi, msg)?;
                let steps = e.spec.as_ref().map_or(0, |s| s.steps.len());
                Ok(encode(
                    out,
                    vec![
                        ("State", text(execution::state_name(&e))),
                        (
                            "CurrentStep",
                            Field::One(Basic::Integer(i64::from(e.current_step))),
                        ),
                        ("StepCount", Field::One(Basic::Integer(steps as i64))),
                        ("Error", text(e.message.clone())),
                    ],
                ))
            }
            Member::Command(c) if c == "CancelExperiment" => {
                let e = self.experiment(&fqi, msg)?;
                caller.set_target(e.id.clone());
                if caller.role == Role::Planner {
                    self.check_own(caller, &e)?;
                }
                let reason = string(msg, "Reason").unwrap_or_default();
                let done = self
                    .scheduler
                    .cancel(&e.id, reason, false)
                    .await
                    .map_err(|err| match err {
                        Error::Refused(r) => defined(&fqi, "Refused", r.message()),
                        Error::NotFound(m) => defined(&fqi, "UnknownExperiment", m),
                        other => undefined(other.to_string()),
                    })?;
                Ok(encode(
                    out,
                    vec![("State", text(execution::state_name(&done)))],
                ))
            }
            Member::Command(c) if c == "FollowExperiment" => {
                let e = self.experiment(&fqi, msg)?;
                let uuid = execution::uuid_of(&e.id)
                    .ok_or_else(|| undefined("experiment id is not a ULID"))?;
                Ok(ppu_sila::framework::CommandConfirmation {
                    command_execution_uuid: Some(ppu_sila::framework::CommandExecutionUuid {
                        value: uuid,
                    }),
                    lifetime_of_execution: None,
                }
                .encode_to_vec())
            }
            Member::Result(c) if c == "FollowExperiment" => {
                let e = self.followed(msg)?;
                if !execution::state_of(&e).is_some_and(State::is_terminal) {
                    return Err(framework(
                        FrameworkErrorKind::CommandExecutionNotFinished,
                        format!("experiment {} is {}", e.id, execution::state_name(&e)),
                    ));
                }
                Ok(encode(
                    out,
                    vec![
                        ("State", text(execution::state_name(&e))),
                        ("Error", text(e.message.clone())),
                    ],
                ))
            }
            other => Err(Status::unimplemented(format!("ExperimentQueue {other:?}"))),
        }
    }

    pub(crate) fn queue_stream(
        self: Arc<Self>,
        method: &Method,
        msg: &DynamicMessage,
    ) -> Result<Replies, Status> {
        match &method.member {
            Member::Info(c) if c == "FollowExperiment" => {
                let e = self.followed(msg)?;
                // The following succeeds whatever the experiment came to; its responses say.
                self.info_stream(e.id, |_| true)
            }
            Member::Subscribe(p) if p == "QueueLength" => self.queue_length(method),
            other => Err(Status::unimplemented(format!("ExperimentQueue {other:?}"))),
        }
    }

    /// ppu.v1's ExperimentSpec from its protobuf JSON; `@type` of `command` steps resolves in
    /// the daemon's schema (every family's messages).
    fn parse_spec(&self, json: &str) -> Result<pb::ExperimentSpec, String> {
        let desc = self
            .schema
            .pool()
            .get_message_by_name("ppu.v1.ExperimentSpec")
            .ok_or("ppu.v1.ExperimentSpec is not in the schema")?;
        let mut de = serde_json::Deserializer::from_str(json);
        let dynamic = DynamicMessage::deserialize(desc, &mut de).map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())?;
        dynamic
            .transcode_to::<pb::ExperimentSpec>()
            .map_err(|e| e.to_string())
    }

    /// The experiment the `ExperimentId` parameter names.
    fn experiment(&self, fqi: &str, msg: &DynamicMessage) -> Result<pb::Experiment, Status> {
        let id = string(msg, "ExperimentId").unwrap_or_default();
        self.scheduler
            .store()
            .get_experiment(id.trim())
            .map_err(|e| undefined(e.to_string()))?
            .ok_or_else(|| defined(fqi, "UnknownExperiment", format!("no experiment {id:?}")))
    }

    /// The experiment a FollowExperiment execution UUID names.
    fn followed(&self, msg: &DynamicMessage) -> Result<pb::Experiment, Status> {
        let invalid = |why: String| framework(FrameworkErrorKind::InvalidCommandExecutionUuid, why);
        let uuid = execution_uuid(msg).unwrap_or_default();
        let id = execution::experiment_of(&uuid)
            .ok_or_else(|| invalid(format!("{uuid:?} is not a UUID")))?;
        self.scheduler
            .store()
            .get_experiment(&id)
            .map_err(|e| undefined(e.to_string()))?
            .ok_or_else(|| invalid(format!("no command execution {uuid}")))
    }

    /// ppu.v1's rule: a planner cancels only experiments of batches it submitted.
    fn check_own(&self, caller: &Caller, e: &pb::Experiment) -> Result<(), Status> {
        let owner = self
            .scheduler
            .store()
            .get_batch(&e.batch_id)
            .map_err(|err| undefined(err.to_string()))?
            .map(|b| b.submitted_by)
            .unwrap_or_default();
        if owner == caller.principal {
            return Ok(());
        }
        // An authorisation failure, as on ppu.v1 (and as the auth layer's own refusals).
        Err(Status::permission_denied(format!(
            "a planner may cancel only experiments of its own batches; {} was submitted by {}",
            e.id,
            if owner.is_empty() {
                "another principal"
            } else {
                owner.as_str()
            }
        )))
    }

    /// The number of queued experiments, first and on every change.
    fn queue_length(self: &Arc<Self>, method: &Method) -> Result<Replies, Status> {
        let ctx = self.clone();
        let output = method.output.clone();
        self.spawn_stream(move |tx| async move {
            let mut live = ctx.scheduler.store().subscribe();
            let mut sent = None;
            loop {
                let n = ctx.scheduler.queue_depth() as i64;
                if sent != Some(n) {
                    sent = Some(n);
                    let reply = encode(
                        &output,
                        vec![("QueueLength", Field::One(Basic::Integer(n)))],
                    );
                    if tx.send(Ok(reply)).await.is_err() {
                        return;
                    }
                }
                // Wait for a change of some experiment's state.
                loop {
                    match live.recv().await {
                        Ok(e)
                            if matches!(
                                e.kind,
                                Some(
                                    pb::event::Kind::ExperimentStateChanged(_)
                                        | pb::event::Kind::ExperimentHeld(_)
                                )
                            ) =>
                        {
                            break;
                        }
                        Ok(_) => continue,
                        Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return,
                    }
                }
            }
        })
    }
}
