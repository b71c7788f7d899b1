//! The gRPC server: the four ppu.v1 services, grpc.health.v1 and server reflection.
//!
//! Handlers are thin: they translate requests into scheduler, store and device-registry calls
//! and map errors to status codes. Streams end when the client goes away or the daemon shuts
//! down, so graceful shutdown never waits on an idle subscriber.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use pb::device_service_server::{DeviceService, DeviceServiceServer};
use pb::event_service_server::{EventService, EventServiceServer};
use pb::experiment_service_server::{ExperimentService, ExperimentServiceServer};
use pb::queue_service_server::{QueueService, QueueServiceServer};
use ppu_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::devices::AckError;
use crate::events::{self, Filter};
use crate::scheduler::Scheduler;
use crate::state::State;

/// Largest page of ListExperiments.
const MAX_PAGE: u32 = 1000;
const DEFAULT_PAGE: u32 = 100;
/// Buffered events per subscriber before the stream waits on the client.
const STREAM_BUFFER: usize = 256;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Everything the handlers need; cheap to clone.
#[derive(Clone)]
pub struct Api {
    pub scheduler: Scheduler,
    /// Cancelled at shutdown: ends every open stream.
    pub stop: CancellationToken,
}

fn require_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        Err(Status::invalid_argument("id: required"))
    } else {
        Ok(())
    }
}

/// Runs `produce` until it finishes, the client hangs up, or shutdown.
fn spawn_stream<T, F>(
    stop: CancellationToken,
    produce: impl FnOnce(mpsc::Sender<Result<T, Status>>) -> F,
) -> BoxStream<T>
where
    T: Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let fut = produce(tx);
    tokio::spawn(async move {
        tokio::select! {
            _ = fut => {}
            _ = stop.cancelled() => {}
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl ExperimentService for Api {
    async fn submit_batch(
        &self,
        req: Request<pb::SubmitBatchRequest>,
    ) -> Result<Response<pb::SubmitBatchResponse>, Status> {
        let (batch, duplicate) = self.scheduler.submit(req.into_inner()).await?;
        Ok(Response::new(pb::SubmitBatchResponse {
            batch: Some(batch),
            duplicate,
        }))
    }

    async fn get_batch(
        &self,
        req: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let id = req.into_inner().id;
        require_id(&id)?;
        let b = self.scheduler.store().get_batch(&id)?;
        b.map(Response::new)
            .ok_or_else(|| Status::not_found(format!("id: no batch \"{id}\"")))
    }

    async fn get_experiment(
        &self,
        req: Request<pb::GetExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let id = req.into_inner().id;
        require_id(&id)?;
        let e = self.scheduler.store().get_experiment(&id)?;
        e.map(Response::new)
            .ok_or_else(|| Status::not_found(format!("id: no experiment \"{id}\"")))
    }

    async fn list_experiments(
        &self,
        req: Request<pb::ListExperimentsRequest>,
    ) -> Result<Response<pb::ListExperimentsResponse>, Status> {
        let r = req.into_inner();
        let state =
            match r.state {
                0 => None,
                raw => Some(State::from_proto(raw).ok_or_else(|| {
                    Status::invalid_argument(format!("state: unknown value {raw}"))
                })?),
            };
        let limit = match r.page_size {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        } as usize;
        let after = (!r.page_token.is_empty()).then_some(r.page_token);
        let store = self.scheduler.store().clone();
        let page = tokio::task::spawn_blocking(move || {
            store.list_experiments(after.as_deref(), limit, |e| {
                state.is_none_or(|s| e.state == s.to_proto() as i32)
                    && (r.batch_id.is_empty() || e.batch_id == r.batch_id)
                    && r.labels
                        .iter()
                        .all(|(k, v)| e.spec.as_ref().and_then(|s| s.labels.get(k)) == Some(v))
            })
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))??;
        Ok(Response::new(pb::ListExperimentsResponse {
            experiments: page.experiments,
            next_page_token: page.next.unwrap_or_default(),
        }))
    }

    async fn cancel_experiment(
        &self,
        req: Request<pb::CancelExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let r = req.into_inner();
        require_id(&r.id)?;
        Ok(Response::new(
            self.scheduler
                .cancel(&r.id, r.reason, r.after_current_step)
                .await?,
        ))
    }
}

impl Api {
    fn queue(&self) -> Result<pb::Queue, Status> {
        self.scheduler.queue()
    }
}

impl From<AckError> for Status {
    fn from(e: AckError) -> Status {
        match &e {
            AckError::UnknownDevice(_) => Status::not_found(format!("device_id: {e}")),
            AckError::UnknownAlarm { .. } => Status::not_found(format!("code: {e}")),
            AckError::Device { error, .. } if error.is_transient() => {
                Status::unavailable(e.to_string())
            }
            AckError::Device { .. } => Status::failed_precondition(e.to_string()),
            AckError::Store(_) => Status::internal(e.to_string()),
        }
    }
}

#[tonic::async_trait]
impl QueueService for Api {
    async fn get_queue(
        &self,
        _: Request<pb::GetQueueRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        Ok(Response::new(self.queue()?))
    }

    async fn pause_queue(
        &self,
        req: Request<pb::PauseQueueRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        self.scheduler
            .set_paused(true, req.into_inner().reason)
            .await?;
        Ok(Response::new(self.queue()?))
    }

    async fn resume_queue(
        &self,
        _: Request<pb::ResumeQueueRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        self.scheduler.set_paused(false, String::new()).await?;
        Ok(Response::new(self.queue()?))
    }

    async fn abort_queue(
        &self,
        req: Request<pb::AbortQueueRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.scheduler.abort_queue(r.reason).await?))
    }

    async fn move_experiment(
        &self,
        req: Request<pb::MoveExperimentRequest>,
    ) -> Result<Response<pb::Queue>, Status> {
        let r = req.into_inner();
        require_id(&r.id)?;
        Ok(Response::new(
            self.scheduler.move_experiment(&r.id, r.position).await?,
        ))
    }

    async fn hold_experiment(
        &self,
        req: Request<pb::HoldExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let r = req.into_inner();
        require_id(&r.id)?;
        Ok(Response::new(
            self.scheduler.set_held(&r.id, true, r.reason).await?,
        ))
    }

    async fn release_experiment(
        &self,
        req: Request<pb::ReleaseExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let r = req.into_inner();
        require_id(&r.id)?;
        Ok(Response::new(
            self.scheduler.set_held(&r.id, false, String::new()).await?,
        ))
    }

    async fn list_transfers(
        &self,
        _: Request<pb::ListTransfersRequest>,
    ) -> Result<Response<pb::ListTransfersResponse>, Status> {
        Ok(Response::new(pb::ListTransfersResponse {
            transfers: self.scheduler.list_transfers()?,
        }))
    }

    async fn confirm_transfer(
        &self,
        req: Request<pb::ConfirmTransferRequest>,
    ) -> Result<Response<pb::PendingTransfer>, Status> {
        let r = req.into_inner();
        if r.transfer_id.is_empty() {
            return Err(Status::invalid_argument("transfer_id: required"));
        }
        Ok(Response::new(
            self.scheduler
                .confirm_transfer(&r.transfer_id, &r.confirmed_by)
                .await?,
        ))
    }
}

#[tonic::async_trait]
impl EventService for Api {
    type StreamEventsStream = BoxStream<pb::Event>;

    async fn stream_events(
        &self,
        req: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<Self::StreamEventsStream>, Status> {
        let r = req.into_inner();
        let filter = Filter {
            batch_id: (!r.batch_id.is_empty()).then_some(r.batch_id),
            experiment_id: (!r.experiment_id.is_empty()).then_some(r.experiment_id),
        };
        let store = self.scheduler.store().clone();
        let from = r.from_sequence;
        Ok(Response::new(spawn_stream(
            self.stop.clone(),
            move |tx| async move {
                let (etx, mut erx) = mpsc::channel::<Arc<pb::Event>>(STREAM_BUFFER);
                let follow = events::follow(store, from, filter, etx);
                let forward = async {
                    while let Some(e) = erx.recv().await {
                        if tx.send(Ok((*e).clone())).await.is_err() {
                            return;
                        }
                    }
                };
                tokio::select! {
                    end = follow => {
                        if let Err(events::StreamEnd::Store(e)) = end {
                            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        }
                    }
                    _ = forward => {}
                }
            },
        )))
    }
}

#[tonic::async_trait]
impl DeviceService for Api {
    type WatchDeviceStream = BoxStream<pb::DeviceReading>;

    async fn list_devices(
        &self,
        _: Request<pb::ListDevicesRequest>,
    ) -> Result<Response<pb::ListDevicesResponse>, Status> {
        Ok(Response::new(pb::ListDevicesResponse {
            devices: self
                .scheduler
                .devices()
                .all()
                .map(|d| self.scheduler.device_proto(d))
                .collect(),
        }))
    }

    async fn get_device(
        &self,
        req: Request<pb::GetDeviceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let id = req.into_inner().id;
        require_id(&id)?;
        let d = self
            .scheduler
            .devices()
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("id: no device \"{id}\"")))?;
        Ok(Response::new(self.scheduler.device_proto(d)))
    }

    async fn watch_device(
        &self,
        req: Request<pb::WatchDeviceRequest>,
    ) -> Result<Response<Self::WatchDeviceStream>, Status> {
        let id = req.into_inner().id;
        require_id(&id)?;
        let d = self
            .scheduler
            .devices()
            .get(&id)
            .ok_or_else(|| Status::not_found(format!("id: no device \"{id}\"")))?
            .clone();
        Ok(Response::new(spawn_stream(
            self.stop.clone(),
            move |tx| async move {
                let mut rx = d.watch();
                if let Some(r) = d.latest()
                    && tx.send(Ok(r)).await.is_err()
                {
                    return;
                }
                loop {
                    match rx.recv().await {
                        Ok(r) => {
                            if tx.send(Ok(r)).await.is_err() {
                                return;
                            }
                        }
                        // Readings are live values: skipping stale ones is right for a watcher.
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return,
                    }
                }
            },
        )))
    }

    async fn set_maintenance(
        &self,
        req: Request<pb::SetMaintenanceRequest>,
    ) -> Result<Response<pb::Device>, Status> {
        let r = req.into_inner();
        require_id(&r.id)?;
        Ok(Response::new(
            self.scheduler
                .set_maintenance(&r.id, r.maintenance, r.reason)
                .await?,
        ))
    }

    async fn list_alarms(
        &self,
        req: Request<pb::ListAlarmsRequest>,
    ) -> Result<Response<pb::ListAlarmsResponse>, Status> {
        let device = req.into_inner().device_id;
        let devices = self.scheduler.devices();
        let alarms = if device.is_empty() {
            devices.all().flat_map(|d| d.alarms()).collect()
        } else {
            devices
                .get(&device)
                .ok_or_else(|| Status::not_found(format!("device_id: no device \"{device}\"")))?
                .alarms()
        };
        Ok(Response::new(pb::ListAlarmsResponse { alarms }))
    }

    async fn acknowledge_alarm(
        &self,
        req: Request<pb::AcknowledgeAlarmRequest>,
    ) -> Result<Response<pb::ActiveAlarm>, Status> {
        let r = req.into_inner();
        if r.device_id.is_empty() {
            return Err(Status::invalid_argument("device_id: required"));
        }
        if r.code.is_empty() {
            return Err(Status::invalid_argument("code: required"));
        }
        let d = self
            .scheduler
            .devices()
            .get(&r.device_id)
            .ok_or_else(|| AckError::UnknownDevice(r.device_id.clone()))?;
        Ok(Response::new(
            d.acknowledge_alarm(self.scheduler.store(), &r.code, &r.acknowledged_by)
                .await?,
        ))
    }
}

/// Builds the tonic router with every service, health and reflection.
pub async fn router(
    api: Api,
) -> Result<tonic::transport::server::Router, Box<dyn std::error::Error + Send + Sync>> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ExperimentServiceServer<Api>>().await;
    health.set_serving::<QueueServiceServer<Api>>().await;
    health.set_serving::<EventServiceServer<Api>>().await;
    health.set_serving::<DeviceServiceServer<Api>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    Ok(tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(ExperimentServiceServer::new(api.clone()))
        .add_service(QueueServiceServer::new(api.clone()))
        .add_service(EventServiceServer::new(api.clone()))
        .add_service(DeviceServiceServer::new(api)))
}
