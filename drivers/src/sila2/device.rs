//! The `Device` implementation of a SiLA 2 server (see the family's module doc).

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use ppu_schema::prost_reflect::DynamicMessage;
use ppu_sila::fdl::{Basic, DataType, Feature};
use ppu_sila::framework::{self as fw, execution_info::CommandStatus};
use prost::Message;
use tokio::time::Instant;

use super::client::{CallError, Client};
use super::schema::{Call, CallIntermediate, CallResult};
use super::{Model, OneInteger, OneReal, SharedModel, Sila2Config, json, load_model};
use crate::device::{
    Device, DeviceError, DeviceInfo, DeviceStatus, Reading, SafeCheck, StepCommand, StepContext,
    StepOutput, StepUpdate, pack,
};

/// Longest wait between two reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The execution of an observable command ppu started and has not seen end.
#[derive(Debug, Clone)]
struct Running {
    service: String,
    command: String,
    uuid: String,
}

/// When the next (re)connect may be tried.
#[derive(Debug)]
struct Backoff {
    next: Option<Instant>,
    delay: Duration,
}

/// A SiLA 2 server as a device.
pub struct Sila2Device {
    config: Sila2Config,
    client: Client,
    info: DeviceInfo,
    /// The server's features, once read; kept across outages (for `check`), replaced when
    /// read again after one.
    model: SharedModel,
    /// Set by a failed exchange: the next use reads the features again (the server may have
    /// restarted with others).
    stale: std::sync::atomic::AtomicBool,
    backoff: Mutex<Backoff>,
    running: Mutex<Option<Running>>,
    /// One model load at a time.
    loading: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Sila2Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sila2Device")
            .field("id", &self.config.id)
            .field("address", &self.config.address)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn call_of(step: &StepCommand, device: &str) -> Result<Call, DeviceError> {
    step.decode::<Call>()
        .ok_or_else(|| step.unsupported(device))?
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> DeviceError {
    DeviceError::Corrupt {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

impl Sila2Device {
    /// The device; nothing is sent until the first call.
    pub fn new(config: Sila2Config) -> Result<Self, String> {
        let client = Client::new(&config.address, &config.tls, config.timeout)?;
        let info = DeviceInfo {
            id: config.id.clone(),
            family: super::FAMILY.to_owned(),
            driver: "sila2".to_owned(),
            transport: client.describe().to_owned(),
            capabilities: vec!["sila_call".to_owned()],
            limits: config.limits.clone(),
        };
        Ok(Self {
            config,
            client,
            info,
            model: RwLock::new(None),
            stale: std::sync::atomic::AtomicBool::new(true),
            backoff: Mutex::new(Backoff {
                next: None,
                delay: Duration::from_millis(100),
            }),
            running: Mutex::new(None),
            loading: tokio::sync::Mutex::new(()),
        })
    }

    pub fn config(&self) -> &Sila2Config {
        &self.config
    }

    /// The features as last read, if ever.
    pub fn cached_model(&self) -> Option<Arc<Model>> {
        self.model
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Notes a failed exchange: a link failure makes the model stale.
    fn failed(&self, e: CallError, what: &str) -> DeviceError {
        if e.is_transient() {
            self.stale.store(true, std::sync::atomic::Ordering::SeqCst);
        }
        e.into_device(what)
    }

    /// The server's features, read again after an outage (with a doubling backoff between
    /// failed attempts, in real time).
    async fn model(&self) -> Result<Arc<Model>, DeviceError> {
        use std::sync::atomic::Ordering;
        if !self.stale.load(Ordering::SeqCst)
            && let Some(m) = self.cached_model()
        {
            return Ok(m);
        }
        let _one = self.loading.lock().await;
        if !self.stale.load(Ordering::SeqCst)
            && let Some(m) = self.cached_model()
        {
            return Ok(m);
        }
        if let Some(next) = lock(&self.backoff).next
            && Instant::now() < next
        {
            return Err(DeviceError::Disconnected(format!(
                "{}: reconnecting to {}",
                self.config.id,
                self.client.describe()
            )));
        }
        match load_model(&self.client).await {
            Ok(m) => {
                let m = Arc::new(m);
                *self
                    .model
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::clone(&m));
                self.stale.store(false, Ordering::SeqCst);
                let mut b = lock(&self.backoff);
                b.next = None;
                b.delay = Duration::from_millis(100);
                tracing::info!(device = %self.config.id, features = m.features.len(), "SiLA 2 server connected");
                Ok(m)
            }
            Err(e) => {
                let mut b = lock(&self.backoff);
                b.next = Some(Instant::now() + b.delay);
                b.delay = (b.delay * 2).min(MAX_BACKOFF);
                Err(e)
            }
        }
    }

    fn message(
        model: &Model,
        feature: &Feature,
        name: &str,
    ) -> Result<ppu_schema::prost_reflect::MessageDescriptor, DeviceError> {
        let full = format!("{}.{name}", ppu_sila::descriptor::package(feature));
        model
            .pool
            .get_message_by_name(&full)
            .ok_or_else(|| corrupt(&full, "no such message in the feature's descriptors"))
    }

    /// Decodes a responses message into a JSON object.
    fn responses_json(
        model: &Model,
        feature: &Feature,
        name: &str,
        bytes: &[u8],
    ) -> Result<String, DeviceError> {
        let desc = Self::message(model, feature, name)?;
        let msg = DynamicMessage::decode(desc, bytes).map_err(|e| corrupt(name, e))?;
        let values = ppu_sila::value::from_message(&msg).map_err(|e| corrupt(name, e))?;
        Ok(json::elements_to_json(&values).to_string())
    }

    /// Reads a numeric property; `None` if it is not a number.
    async fn read_number(
        &self,
        feature: &Feature,
        property: &ppu_sila::fdl::Property,
    ) -> Result<Option<f64>, DeviceError> {
        let basic = match json::resolve(feature, &property.data_type) {
            DataType::Basic(b @ (Basic::Real | Basic::Integer)) => *b,
            _ => return Ok(None),
        };
        let service = ppu_sila::descriptor::service_name(feature);
        let what = format!("{}/{}", feature.identifier, property.identifier);
        let bytes = if property.observable {
            let method = ppu_sila::descriptor::rpc::subscribe_property(&property.identifier);
            self.client.first(&service, &method, Vec::new()).await
        } else {
            let method = ppu_sila::descriptor::rpc::get_property(&property.identifier);
            self.client.unary(&service, &method, Vec::new()).await
        }
        .map_err(|e| self.failed(e, &what))?;
        let v = match basic {
            Basic::Real => OneReal::decode(bytes.as_slice())
                .map_err(|e| corrupt(&what, e))?
                .value
                .map(|r| r.value),
            _ => OneInteger::decode(bytes.as_slice())
                .map_err(|e| corrupt(&what, e))?
                .value
                .map(|i| i.value as f64),
        };
        Ok(Some(v.unwrap_or(0.0)))
    }

    /// Every numeric property, by identifier (`Feature.Property` where two features share
    /// one).
    async fn readings(&self, model: &Model) -> Result<Vec<Reading>, DeviceError> {
        let mut out = Vec::new();
        for f in &model.features {
            for p in &f.properties {
                if let Some(v) = self.read_number(f, p).await? {
                    let shared = model
                        .features
                        .iter()
                        .filter(|g| g.property(&p.identifier).is_some())
                        .count()
                        > 1;
                    let name = if shared {
                        format!("{}.{}", f.identifier, p.identifier)
                    } else {
                        p.identifier.clone()
                    };
                    out.push(Reading::new(name, v));
                }
            }
        }
        Ok(out)
    }

    /// Runs one Call.
    async fn run(&self, call: &Call, ctx: &StepContext) -> Result<CallResult, DeviceError> {
        let model = self.model().await?;
        let checked = model.check(call, &self.config.id)?;
        let feature = checked.feature;
        let command = checked.command;
        let service = ppu_sila::descriptor::service_name(feature);
        let what = format!("{}/{}", feature.identifier, command.identifier);
        let params = Self::message(&model, feature, &format!("{}_Parameters", command.identifier))?;
        let request = ppu_sila::value::to_message(&params, &checked.values)
            .map_err(|e| DeviceError::Refused {
                what: format!("parameters.{}", e.path),
                reason: e.reason,
            })?
            .encode_to_vec();
        let responses = format!("{}_Responses", command.identifier);
        let mut result = CallResult {
            feature: feature.fully_qualified_identifier(),
            command: command.identifier.clone(),
            ..Default::default()
        };
        if !command.observable {
            let bytes = self
                .client
                .unary(&service, &command.identifier, request)
                .await
                .map_err(|e| self.failed(e, &what))?;
            result.responses = Self::responses_json(&model, feature, &responses, &bytes)?;
            return Ok(result);
        }
        let bytes = self
            .client
            .unary(&service, &command.identifier, request)
            .await
            .map_err(|e| self.failed(e, &what))?;
        let uuid = fw::CommandConfirmation::decode(bytes.as_slice())
            .map_err(|e| corrupt(&what, e))?
            .command_execution_uuid
            .map(|u| u.value)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| corrupt(&what, "the confirmation has no execution UUID"))?;
        result.execution_uuid = uuid.clone();
        *lock(&self.running) = Some(Running {
            service: service.clone(),
            command: command.identifier.clone(),
            uuid: uuid.clone(),
        });
        tracing::info!(device = %self.config.id, command = %what, %uuid, "SiLA command started");
        let intermediate = (!command.intermediate_responses.is_empty())
            .then(|| format!("{}_IntermediateResponses", command.identifier));
        self.follow(&model, feature, &service, &command.identifier, &uuid, intermediate, ctx)
            .await?;
        let method = ppu_sila::descriptor::rpc::result(&command.identifier);
        let bytes = self
            .client
            .unary(&service, &method, uuid_message(&uuid))
            .await
            .map_err(|e| self.failed(e, &what))?;
        *lock(&self.running) = None;
        result.responses = Self::responses_json(&model, feature, &responses, &bytes)?;
        Ok(result)
    }

    /// Follows an observable command's ExecutionInfo (and intermediate responses) to its end;
    /// re-subscribes after a link failure, within the outage grace.
    #[allow(clippy::too_many_arguments)]
    async fn follow(
        &self,
        model: &Model,
        feature: &Feature,
        service: &str,
        command: &str,
        uuid: &str,
        intermediate: Option<String>,
        ctx: &StepContext,
    ) -> Result<(), DeviceError> {
        let what = format!("{}/{command}", feature.identifier);
        let info_method = ppu_sila::descriptor::rpc::info(command);
        let inter_method = ppu_sila::descriptor::rpc::intermediate(command);
        let mut index = 0u32;
        let mut last_heard = Instant::now();
        let mut poll = tokio::time::interval(self.config.poll_interval);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        'subscribe: loop {
            if ctx.cancel.is_cancelled() {
                return Err(DeviceError::Aborted);
            }
            let opened = async {
                let info = self
                    .client
                    .stream(service, &info_method, uuid_message(uuid))
                    .await?;
                let inter = match &intermediate {
                    Some(_) => Some(
                        self.client
                            .stream(service, &inter_method, uuid_message(uuid))
                            .await?,
                    ),
                    None => None,
                };
                Ok::<_, CallError>((info, inter))
            };
            let (mut info, mut inter) = match opened.await {
                Ok(s) => s,
                Err(e) if e.is_transient() => {
                    let e = self.failed(e, &what);
                    self.wait_out(&e, last_heard, ctx).await?;
                    continue 'subscribe;
                }
                Err(e) => return Err(self.failed(e, &what)),
            };
            last_heard = Instant::now();
            loop {
                tokio::select! {
                    biased;
                    _ = ctx.cancel.cancelled() => return Err(DeviceError::Aborted),
                    m = info.next() => match m {
                        Some(Ok(bytes)) => {
                            last_heard = Instant::now();
                            let i = fw::ExecutionInfo::decode(bytes.as_slice())
                                .map_err(|e| corrupt(&info_method, e))?;
                            let status = CommandStatus::try_from(i.command_status)
                                .unwrap_or(CommandStatus::Running);
                            let remaining_s = i
                                .estimated_remaining_time
                                .map(|d| d.seconds as f64 + f64::from(d.nanos) * 1e-9);
                            let fraction = i.progress_info.map_or(0.0, |p| p.value.clamp(0.0, 1.0));
                            ctx.send(StepUpdate::Progress {
                                fraction,
                                message: format!("{what} {}", status_text(status)),
                                remaining_s,
                            });
                            match status {
                                CommandStatus::FinishedSuccessfully
                                | CommandStatus::FinishedWithError => return Ok(()),
                                _ => {}
                            }
                        }
                        Some(Err(e)) if e.is_transient() => {
                            let e = self.failed(e, &what);
                            self.wait_out(&e, last_heard, ctx).await?;
                            continue 'subscribe;
                        }
                        Some(Err(e)) => return Err(self.failed(e, &what)),
                        // The server ended the stream without a final status: follow again.
                        None => {
                            self.stale.store(true, std::sync::atomic::Ordering::SeqCst);
                            let e = DeviceError::Disconnected(format!("{what}: ExecutionInfo ended early"));
                            self.wait_out(&e, last_heard, ctx).await?;
                            continue 'subscribe;
                        }
                    },
                    m = next_or_pending(&mut inter) => match (m, &intermediate) {
                        (Some(Ok(bytes)), Some(name)) => {
                            last_heard = Instant::now();
                            let responses = Self::responses_json(model, feature, name, &bytes)?;
                            ctx.send(StepUpdate::Intermediate {
                                index,
                                value: pack(&CallIntermediate { responses }),
                            });
                            index += 1;
                        }
                        // The intermediate stream ends with the command; ExecutionInfo says how.
                        _ => inter = None,
                    },
                    _ = poll.tick() => {
                        if let Ok(readings) = self.readings(model).await {
                            ctx.send(StepUpdate::Reading(DeviceStatus {
                                readings,
                                alarms: Vec::new(),
                                active: true,
                            }));
                        }
                    }
                }
            }
        }
    }

    /// After a link failure during a command: waits (real time) to try again, or fails the
    /// step once the server has been silent longer than the grace.
    async fn wait_out(
        &self,
        e: &DeviceError,
        last_heard: Instant,
        ctx: &StepContext,
    ) -> Result<(), DeviceError> {
        if last_heard.elapsed() >= self.config.outage_grace {
            return Err(e.clone());
        }
        tracing::warn!(device = %self.config.id, error = %e, "link lost while a command runs; following it again");
        tokio::select! {
            _ = ctx.cancel.cancelled() => Err(DeviceError::Aborted),
            _ = tokio::time::sleep(Duration::from_millis(200)) => Ok(()),
        }
    }

    /// Cancels ppu's running command through the server's CancelController.
    async fn cancel_running(&self, model: &Model, running: &Running) -> Result<(), DeviceError> {
        let Some(cancel) = model.cancel_controller() else {
            return Err(DeviceError::Unsupported(format!(
                "{}: no safe_command is configured and the server has no CancelController, so \
                 the running {} ({}) cannot be stopped",
                self.config.id, running.command, running.uuid
            )));
        };
        let command = cancel
            .command("CancelCommand")
            .ok_or_else(|| corrupt(&cancel.identifier, "no CancelCommand command"))?;
        let params = Self::message(model, cancel, "CancelCommand_Parameters")?;
        let values: Vec<(String, ppu_sila::value::Value)> = command
            .parameters
            .iter()
            .take(1)
            .map(|p| {
                (
                    p.identifier.clone(),
                    ppu_sila::value::Value::String(running.uuid.clone()),
                )
            })
            .collect();
        let request = ppu_sila::value::to_message(&params, &values)
            .map_err(|e| corrupt("CancelCommand_Parameters", e))?
            .encode_to_vec();
        let what = "CancelController/CancelCommand";
        self.client
            .unary(
                &ppu_sila::descriptor::service_name(cancel),
                "CancelCommand",
                request,
            )
            .await
            .map(drop)
            .map_err(|e| self.failed(e, what))
    }

    /// Whether ppu's command has ended, asked of its `_Info`.
    async fn running_ended(&self, running: &Running) -> Result<bool, DeviceError> {
        let method = ppu_sila::descriptor::rpc::info(&running.command);
        match self
            .client
            .first(&running.service, &method, uuid_message(&running.uuid))
            .await
        {
            Ok(bytes) => {
                let i = fw::ExecutionInfo::decode(bytes.as_slice()).map_err(|e| corrupt(&method, e))?;
                Ok(matches!(
                    CommandStatus::try_from(i.command_status),
                    Ok(CommandStatus::FinishedSuccessfully | CommandStatus::FinishedWithError)
                ))
            }
            // The server no longer knows the execution (it ended and expired, or restarted).
            Err(CallError::Sila(ppu_sila::error::SilaError::Framework { .. })) => Ok(true),
            Err(e) => Err(self.failed(e, &method)),
        }
    }
}

fn status_text(s: CommandStatus) -> &'static str {
    match s {
        CommandStatus::Waiting => "waiting",
        CommandStatus::Running => "running",
        CommandStatus::FinishedSuccessfully => "finished",
        CommandStatus::FinishedWithError => "finished with an error",
    }
}

fn uuid_message(uuid: &str) -> Vec<u8> {
    fw::CommandExecutionUuid {
        value: uuid.to_owned(),
    }
    .encode_to_vec()
}

async fn next_or_pending(
    s: &mut Option<super::client::Stream>,
) -> Option<Result<Vec<u8>, CallError>> {
    match s {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

#[async_trait]
impl Device for Sila2Device {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn check(&self, step: &StepCommand) -> Result<(), DeviceError> {
        let call = call_of(step, &self.info.id)?;
        match self.cached_model() {
            Some(model) => model.check(&call, &self.info.id).map(drop),
            // Never connected: no FDL to judge by; `execute` checks against the live one.
            None => Ok(()),
        }
    }

    async fn execute(
        &self,
        step: &StepCommand,
        ctx: StepContext,
    ) -> Result<StepOutput, DeviceError> {
        let call = call_of(step, &self.info.id)?;
        let result = self.run(&call, &ctx).await?;
        Ok(StepOutput::pack(&result))
    }

    async fn status(&self) -> Result<DeviceStatus, DeviceError> {
        let model = self.model().await?;
        let readings = self.readings(&model).await?;
        Ok(DeviceStatus {
            readings,
            alarms: Vec::new(),
            active: lock(&self.running).is_some(),
        })
    }

    async fn safe_state(&self) -> Result<(), DeviceError> {
        let model = self.model().await?;
        if let Some((feature, command)) = &self.config.safe_command {
            let f = model.feature(feature).ok_or_else(|| DeviceError::Unsupported(format!(
                "safe_command: {} does not implement feature {feature}",
                self.config.id
            )))?;
            let what = format!("{feature}/{command}");
            return self
                .client
                .unary(&ppu_sila::descriptor::service_name(f), command, Vec::new())
                .await
                .map(drop)
                .map_err(|e| self.failed(e, &what));
        }
        let running = lock(&self.running).clone();
        match running {
            Some(r) => self.cancel_running(&model, &r).await,
            None => Ok(()),
        }
    }

    async fn confirm_safe(&self) -> Result<SafeCheck, DeviceError> {
        let model = self.model().await?;
        let mut deviations = Vec::new();
        if let Some((feature, property)) = &self.config.safe_property {
            let f = model.feature(feature).ok_or_else(|| DeviceError::Unsupported(format!(
                "safe_property: {} does not implement feature {feature}",
                self.config.id
            )))?;
            let p = f.property(property).ok_or_else(|| DeviceError::Unsupported(format!(
                "safe_property: feature {feature} has no property {property}"
            )))?;
            let v = self.read_number(f, p).await?.ok_or_else(|| {
                DeviceError::Unsupported(format!("safe_property: {feature}/{property} is not a number"))
            })?;
            if v.abs() > self.config.safe_max {
                deviations.push(format!(
                    "{feature}/{property} reads {v}, above the safe {}",
                    self.config.safe_max
                ));
            }
        }
        let running = lock(&self.running).clone();
        if let Some(r) = running {
            if self.running_ended(&r).await? {
                *lock(&self.running) = None;
            } else {
                deviations.push(format!("{} ({}) is still running", r.command, r.uuid));
            }
        }
        Ok(SafeCheck::from_deviations(deviations))
    }
}
