//! The gRPC server: the four ppu.v1 services, grpc.health.v1 and server reflection.
//!
//! Handlers are thin: they translate requests into scheduler, store and device-registry calls
//! and map errors to status codes. Streams end when the client goes away or the daemon shuts
//! down, so graceful shutdown never waits on an idle subscriber.
//!
//! Authentication, authorisation and the audit trail happen before a handler runs, in
//! [`crate::auth::AuthLayer`]; handlers only name their target for the audit record and apply
//! the two rules the method table cannot express (a planner cancels only its own batches) and
//! the [`Limits`] against abuse: batch size, submission rate per principal, open streams.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::{Stream, StreamExt};
use pb::device_service_server::{DeviceService, DeviceServiceServer};
use pb::experiment_service_server::{ExperimentService, ExperimentServiceServer};
use pb::queue_service_server::{QueueService, QueueServiceServer};
use ppu_proto::v1 as pb;
use prost::bytes::Bytes;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tracing::warn;

use crate::auth::{Caller, Role};
use crate::devices::AckError;
use crate::error::{Error, Rejection, RejectionKind};
use crate::events::{self, Filter};
use crate::ids;
pub use crate::limits::Limits;
use crate::limits::SubmitRate;
use crate::metrics::{ActiveStream, StreamKind};
use crate::scheduler::Scheduler;
use crate::state::State;
use crate::store::{IdSpace, StoreError};

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
    limits: Arc<Limits>,
    streams: Arc<Semaphore>,
    rate: Arc<SubmitRate>,
}

impl Api {
    pub fn new(scheduler: Scheduler, stop: CancellationToken, limits: Limits) -> Api {
        Api {
            scheduler,
            stop,
            streams: Arc::new(Semaphore::new(limits.max_streams.max(1))),
            limits: Arc::new(limits),
            rate: Arc::default(),
        }
    }

    /// The submission buckets and the open-stream slots, for another edge (the SiLA endpoint)
    /// to count against the same `[limits]`.
    pub fn shared_limits(&self) -> (Arc<SubmitRate>, Arc<Semaphore>) {
        (self.rate.clone(), self.streams.clone())
    }

    /// A slot for one more open stream, counted in `ppu_active_streams{kind}`.
    fn stream_slot(&self, kind: StreamKind) -> Result<StreamSlot, Status> {
        let permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "too many open streams (limits.max_streams = {}); close one and retry",
                self.limits.max_streams
            ))
        })?;
        Ok(StreamSlot {
            _permit: permit,
            _counted: ActiveStream::open(kind),
        })
    }
}

/// Held by a stream's task for its lifetime: its place under `max_streams` and in the
/// `ppu_active_streams` gauge.
struct StreamSlot {
    _permit: OwnedSemaphorePermit,
    _counted: ActiveStream,
}

fn require_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        Err(Status::invalid_argument("id: required"))
    } else {
        Ok(())
    }
}

/// [`require_id`] for a call that acts on `id`: also names it in the call's audit record.
fn require_target(caller: &Caller, id: &str) -> Result<(), Status> {
    require_id(id)?;
    caller.set_target(id);
    Ok(())
}

impl Api {
    /// The full id a request's `given` id (or unique prefix, either case) names in `space`
    /// ([`ids::resolve`]); `field` names it in errors.
    fn resolve(&self, space: IdSpace, field: &str, given: &str) -> Result<String, Status> {
        Ok(ids::resolve(self.scheduler.store(), space, field, given)?)
    }

    /// [`Api::resolve`] for a call that acts on the id: the audit record names the full id
    /// (what was given, if it does not resolve).
    fn resolve_target(
        &self,
        caller: &Caller,
        space: IdSpace,
        field: &str,
        given: &str,
    ) -> Result<String, Status> {
        require_target(caller, given)?;
        let id = self.resolve(space, field, given)?;
        caller.set_target(id.clone());
        Ok(id)
    }

    /// [`Api::resolve`] for an optional filter: empty is no filter.
    fn resolve_filter(&self, space: IdSpace, field: &str, given: &str) -> Result<String, Status> {
        Ok(ids::resolve_filter(
            self.scheduler.store(),
            space,
            field,
            given,
        )?)
    }
}

/// Runs `produce` until it finishes, the client hangs up, or shutdown. The client hanging up
/// is watched directly (the receiver dropped), not only noticed by the next send: a filtered
/// stream that never sends must still give its slot back when its client goes away.
fn spawn_stream<T, F>(
    stop: CancellationToken,
    slot: StreamSlot,
    produce: impl FnOnce(mpsc::Sender<Result<T, Status>>) -> F,
) -> BoxStream<T>
where
    T: Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let gone = tx.clone();
    let fut = produce(tx);
    tokio::spawn(async move {
        let _slot = slot;
        tokio::select! {
            _ = fut => {}
            _ = gone.closed() => {}
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
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let max = self.limits.max_batch_experiments;
        if r.experiments.len() > max {
            return Err(Status::invalid_argument(format!(
                "experiments: {} in one batch, at most {max} (limits.max_batch_experiments); \
                 split it",
                r.experiments.len()
            )));
        }
        crate::safety::check_bounds(&r, &self.limits)?;
        if let Err(wait) = self
            .rate
            .take(&caller.principal, self.limits.submit_per_minute)
        {
            return Err(Status::resource_exhausted(format!(
                "submission rate limit: {} SubmitBatch calls per minute for {}; retry in {} ms",
                self.limits.submit_per_minute,
                caller.principal,
                wait.as_millis().max(1)
            )));
        }
        // Its audit record commits with the batch: one durable commit per submission.
        let audit = caller.success_audit("");
        let (batch, duplicate, audited) = self
            .scheduler
            .submit_audited(r, &caller.principal, audit)
            .await?;
        caller.set_target(batch.id.clone());
        if audited {
            caller.mark_audited();
        }
        Ok(Response::new(pb::SubmitBatchResponse {
            batch: Some(batch),
            duplicate,
        }))
    }

    async fn get_batch(
        &self,
        req: Request<pb::GetBatchRequest>,
    ) -> Result<Response<pb::Batch>, Status> {
        let id = self.resolve(IdSpace::Batch, "id", &req.into_inner().id)?;
        let b = self.scheduler.store().get_batch(&id)?;
        b.map(Response::new)
            .ok_or_else(|| Status::not_found(format!("id: no batch \"{id}\"")))
    }

    async fn get_experiment(
        &self,
        req: Request<pb::GetExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let id = self.resolve(IdSpace::Experiment, "id", &req.into_inner().id)?;
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
        let batch_id = self.resolve_filter(IdSpace::Batch, "batch_id", &r.batch_id)?;
        let since = r.created_since;
        let store = self.scheduler.store().clone();
        let page = tokio::task::spawn_blocking(move || {
            store.list_experiments_in_order(after.as_deref(), limit, r.newest_first, |e| {
                state.is_none_or(|s| e.state == s.to_proto() as i32)
                    && (batch_id.is_empty() || e.batch_id == batch_id)
                    && since.is_none_or(|t| {
                        e.created_at
                            .is_some_and(|c| (c.seconds, c.nanos) >= (t.seconds, t.nanos))
                    })
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
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let id = self.resolve_target(&caller, IdSpace::Experiment, "id", &r.id)?;
        if caller.role == Role::Planner {
            self.check_own(&caller, &id)?;
        }
        Ok(Response::new(
            self.scheduler
                .cancel(&id, r.reason, r.after_current_step)
                .await?,
        ))
    }
}

impl Api {
    fn queue(&self) -> Result<pb::Queue, Status> {
        Ok(self.scheduler.queue()?)
    }

    /// A planner may cancel only experiments of batches it submitted. An unknown experiment
    /// is NOT_FOUND for everyone, so the check reveals nothing a viewer could not read.
    fn check_own(&self, caller: &Caller, experiment_id: &str) -> Result<(), Status> {
        let store = self.scheduler.store();
        let e = store
            .get_experiment(experiment_id)?
            .ok_or_else(|| Status::not_found(format!("id: no experiment \"{experiment_id}\"")))?;
        let owner = store
            .get_batch(&e.batch_id)?
            .map(|b| b.submitted_by)
            .unwrap_or_default();
        if owner == caller.principal {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "a planner may cancel only experiments of its own batches; {experiment_id} was \
                 submitted by {}",
                if owner.is_empty() {
                    "another principal"
                } else {
                    owner.as_str()
                }
            )))
        }
    }
}

/// Response header of StreamEvents: the sequence the stream starts after.
pub const STREAM_AFTER_METADATA: &str = "ppu-stream-after";

/// Metadata key carrying the offending field path in an error status.
pub const FIELD_PATH_METADATA: &str = "ppu-field-path";

// ---------------------------------------------------------------------------------------------
// The one mapping of the core's domain errors to gRPC statuses
// ---------------------------------------------------------------------------------------------

/// A refusal is `field: reason` with the field path also in the `ppu-field-path` metadata.
impl From<Rejection> for Status {
    fn from(r: Rejection) -> Status {
        let code = match r.kind {
            RejectionKind::Invalid => tonic::Code::InvalidArgument,
            RejectionKind::NotFound => tonic::Code::NotFound,
            RejectionKind::Precondition => tonic::Code::FailedPrecondition,
            RejectionKind::Inconsistent => tonic::Code::Internal,
        };
        let mut s = Status::new(code, r.message());
        if let Ok(v) = r.field.parse() {
            s.metadata_mut().insert(FIELD_PATH_METADATA, v);
        }
        s
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Refused(r) => r.into(),
            Error::Store(e) => e.into(),
            Error::NotFound(m) => Status::not_found(m),
            Error::Conflict(m) => Status::already_exists(m),
            Error::TimedOut(m) => Status::deadline_exceeded(m),
            e @ Error::ShuttingDown => Status::unavailable(e.to_string()),
            Error::IdsExhausted(m) => Status::unavailable(m),
            Error::Internal(m) => Status::internal(m),
        }
    }
}

/// The one mapping of storage failures to gRPC codes. A store that cannot write (a full disk,
/// an I/O error: see `store::Fault`) is UNAVAILABLE with the reason, so clients retry; a
/// corrupt record is DATA_LOSS; anything else INTERNAL.
impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        match &e {
            StoreError::Unavailable(_) => Status::unavailable(e.to_string()),
            StoreError::Corrupt { .. } => {
                warn!(error = %e, "store failure");
                Status::data_loss(e.to_string())
            }
            StoreError::Db(_) | StoreError::Task(_) => {
                warn!(error = %e, "store failure");
                Status::internal(e.to_string())
            }
        }
    }
}

impl From<AckError> for Status {
    fn from(e: AckError) -> Status {
        let e = match e {
            AckError::Store(store) => return store.into(),
            e => e,
        };
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
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let id = self.resolve_target(&caller, IdSpace::Experiment, "id", &r.id)?;
        Ok(Response::new(
            self.scheduler.move_experiment(&id, r.position).await?,
        ))
    }

    async fn hold_experiment(
        &self,
        req: Request<pb::HoldExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let id = self.resolve_target(&caller, IdSpace::Experiment, "id", &r.id)?;
        Ok(Response::new(
            self.scheduler.set_held(&id, true, r.reason).await?,
        ))
    }

    async fn release_experiment(
        &self,
        req: Request<pb::ReleaseExperimentRequest>,
    ) -> Result<Response<pb::Experiment>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let id = self.resolve_target(&caller, IdSpace::Experiment, "id", &r.id)?;
        Ok(Response::new(
            self.scheduler.set_held(&id, false, String::new()).await?,
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
        let caller = Caller::of(&req);
        let r = req.into_inner();
        if r.transfer_id.is_empty() {
            return Err(Status::invalid_argument("transfer_id: required"));
        }
        caller.set_target(r.transfer_id.clone());
        let id = self.resolve(IdSpace::Transfer, "transfer_id", &r.transfer_id)?;
        caller.set_target(id.clone());
        Ok(Response::new(
            self.scheduler
                .confirm_transfer(&id, &r.confirmed_by)
                .await?,
        ))
    }
}

impl Api {
    /// StreamEvents: the encoded events (see [`EventServer`]).
    async fn stream_events(
        &self,
        req: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<BoxStream<Bytes>>, Status> {
        let r = req.into_inner();
        let batch_id = self.resolve_filter(IdSpace::Batch, "batch_id", &r.batch_id)?;
        let experiment_id =
            self.resolve_filter(IdSpace::Experiment, "experiment_id", &r.experiment_id)?;
        let kinds = r
            .kinds
            .iter()
            .enumerate()
            .map(|(i, k)| {
                events::known_kind(k).ok_or_else(|| {
                    Status::invalid_argument(format!(
                        "kinds[{i}]: unknown event kind \"{k}\"; known kinds: {}",
                        events::kind_names().collect::<Vec<_>>().join(", ")
                    ))
                })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let filter = Filter {
            batch_id: (!batch_id.is_empty()).then_some(batch_id),
            experiment_id: (!experiment_id.is_empty()).then_some(experiment_id),
            device_id: (!r.device_id.is_empty()).then_some(r.device_id),
            kinds,
        };
        let store = self.scheduler.store().clone();
        let last = store.last_sequence();
        let from = if r.tail {
            if r.from_sequence != 0 {
                return Err(Status::invalid_argument(
                    "from_sequence: must be 0 with tail (a tail starts at the end of the log)",
                ));
            }
            last
        } else if r.from_sequence > last {
            return Err(Status::out_of_range(format!(
                "from_sequence: {} is past the end of the event log (the newest event is \
                 sequence {last})",
                r.from_sequence
            )));
        } else {
            r.from_sequence
        };
        let slot = self.stream_slot(StreamKind::Events)?;
        let stop = self.stop.clone();
        // Polled by the response itself: no task or channel between the bus and the socket.
        // The slot is held as long as the stream is, which ends at shutdown or when the client
        // goes away (the response is dropped).
        let stream = events::follow(store, from, filter)
            .map(move |item| {
                let _held = &slot;
                item.map_err(Status::from)
            })
            .take_until(Box::pin(async move { stop.cancelled().await }));
        let mut response = Response::new(Box::pin(stream) as BoxStream<Bytes>);
        response.metadata_mut().insert(
            STREAM_AFTER_METADATA,
            tonic::metadata::MetadataValue::from(from),
        );
        Ok(response)
    }
}

/// `ppu.v1.EventService`, served by hand rather than by the generated server so its stream can
/// carry each event's logged encoding through [`EncodedEventCodec`]: one encoding per event,
/// not one per subscriber. Clients see exactly the generated service's `ppu.v1.Event` wire.
#[derive(Clone)]
pub struct EventServer {
    api: Api,
    max_decoding_message_size: Option<usize>,
    max_encoding_message_size: Option<usize>,
}

impl EventServer {
    pub fn new(api: Api) -> Self {
        let max = api.limits.max_message_bytes;
        Self {
            api,
            max_decoding_message_size: Some(max),
            max_encoding_message_size: Some(max),
        }
    }
}

impl tonic::server::NamedService for EventServer {
    const NAME: &'static str = pb::event_service_server::SERVICE_NAME;
}

/// Path of the one method of `ppu.v1.EventService`.
const STREAM_EVENTS_PATH: &str = "/ppu.v1.EventService/StreamEvents";

impl<B> tower_service::Service<tonic::codegen::http::Request<B>> for EventServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: tonic::codegen::http::Request<B>) -> Self::Future {
        if req.uri().path() != STREAM_EVENTS_PATH {
            return Box::pin(async { Ok(Status::unimplemented("").into_http()) });
        }
        let method = StreamEventsMethod(self.api.clone());
        let (decoding, encoding) = (
            self.max_decoding_message_size,
            self.max_encoding_message_size,
        );
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(EncodedEventCodec)
                .apply_max_message_size_config(decoding, encoding);
            Ok(grpc.server_streaming(method, req).await)
        })
    }
}

struct StreamEventsMethod(Api);

impl tonic::server::ServerStreamingService<pb::StreamEventsRequest> for StreamEventsMethod {
    type Response = Bytes;
    type ResponseStream = BoxStream<Bytes>;
    type Future = tonic::codegen::BoxFuture<Response<BoxStream<Bytes>>, Status>;

    fn call(&mut self, request: Request<pb::StreamEventsRequest>) -> Self::Future {
        let api = self.0.clone();
        Box::pin(async move { api.stream_events(request).await })
    }
}

/// Decodes a `StreamEventsRequest` as prost does; encodes an event by writing its encoding.
#[derive(Debug, Clone, Copy, Default)]
struct EncodedEventCodec;

impl tonic::codec::Codec for EncodedEventCodec {
    type Encode = Bytes;
    type Decode = pb::StreamEventsRequest;
    type Encoder = EncodedEventCodec;
    type Decoder = EncodedEventCodec;

    fn encoder(&mut self) -> Self::Encoder {
        *self
    }

    fn decoder(&mut self) -> Self::Decoder {
        *self
    }
}

impl tonic::codec::Encoder for EncodedEventCodec {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut tonic::codec::EncodeBuf<'_>) -> Result<(), Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for EncodedEventCodec {
    type Item = pb::StreamEventsRequest;
    type Error = Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<pb::StreamEventsRequest>, Status> {
        use prost::Message;
        // As tonic-prost's decoder answers a body that does not decode.
        pb::StreamEventsRequest::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(e.to_string()))
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
        let slot = self.stream_slot(StreamKind::WatchDevice)?;
        Ok(Response::new(spawn_stream(
            self.stop.clone(),
            slot,
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
        let caller = Caller::of(&req);
        let r = req.into_inner();
        require_target(&caller, &r.id)?;
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
        let store = self.scheduler.store();
        let alarms = if device.is_empty() {
            devices
                .all()
                .flat_map(|d| d.alarms())
                .chain(store.alarms_now())
                .collect()
        } else if device == crate::store::DAEMON_ALARM_SOURCE {
            store.alarms_now()
        } else {
            devices
                .get(&device)
                .ok_or_else(|| Status::not_found(format!("device_id: no device \"{device}\"")))?
                .alarms()
        };
        Ok(Response::new(pb::ListAlarmsResponse { alarms }))
    }

    async fn get_schema(
        &self,
        _req: Request<pb::GetSchemaRequest>,
    ) -> Result<Response<pb::DeviceSchema>, Status> {
        Ok(Response::new(device_schema()))
    }

    async fn acknowledge_alarm(
        &self,
        req: Request<pb::AcknowledgeAlarmRequest>,
    ) -> Result<Response<pb::ActiveAlarm>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        if r.device_id.is_empty() {
            return Err(Status::invalid_argument("device_id: required"));
        }
        caller.set_target(r.device_id.clone());
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

/// Reports NOT_SERVING (overall and for every ppu service) while the store cannot write, and
/// SERVING again when it recovers. Ends when the store is dropped.
async fn follow_storage_health(
    mut storage: tokio::sync::watch::Receiver<Option<crate::store::Fault>>,
    health: tonic_health::server::HealthReporter,
) {
    use tonic::server::NamedService;
    use tonic_health::ServingStatus;
    loop {
        let status = match storage.borrow_and_update().as_ref() {
            Some(_) => ServingStatus::NotServing,
            None => ServingStatus::Serving,
        };
        for name in [
            "",
            <ExperimentServiceServer<Api> as NamedService>::NAME,
            <QueueServiceServer<Api> as NamedService>::NAME,
            <EventServer as NamedService>::NAME,
            <DeviceServiceServer<Api> as NamedService>::NAME,
        ] {
            health.set_service_status(name, status).await;
        }
        if storage.changed().await.is_err() {
            return;
        }
    }
}

/// The router type: every service behind the auth layer.
pub type Router = tonic::transport::server::Router<
    tower_layer::Stack<crate::auth::AuthLayer, tower_layer::Identity>,
>;

/// Builds the tonic router with every service, health and reflection, all behind `auth`.
/// `tls` applies to the connections it is served on (TCP); a Unix socket gets a router
/// without it.
pub async fn router(
    api: Api,
    auth: crate::auth::AuthLayer,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<Router, Box<dyn std::error::Error + Send + Sync>> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ExperimentServiceServer<Api>>().await;
    health.set_serving::<QueueServiceServer<Api>>().await;
    health.set_serving::<EventServer>().await;
    health.set_serving::<DeviceServiceServer<Api>>().await;
    tokio::spawn(follow_storage_health(
        api.scheduler.store().health(),
        health.clone(),
    ));
    // Reflection as v1 and as v1alpha: older grpcurl, grpcui, Postman and grpc-python's
    // reflection client only ask v1alpha. Both list both and serve the same descriptors.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .include_reflection_service(false)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            // Every device family's schema, so grpcurl and SDKs can decode `Step.command` and
            // `StepResult.output` of any family.
            .register_encoded_file_descriptor_set(ppu_drivers::registry::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let max = api.limits.max_message_bytes;
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    Ok(builder
        .layer(auth)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            ExperimentServiceServer::new(api.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            QueueServiceServer::new(api.clone())
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(EventServer::new(api.clone()))
        .add_service(
            DeviceServiceServer::new(api)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        ))
}

/// Every family's schema, for `GetSchema`: the whole descriptor pool and a listing.
fn device_schema() -> pb::DeviceSchema {
    let schema = crate::schema::schema();
    let families = schema
        .families()
        .iter()
        .map(|f| pb::FamilySchema {
            name: f.name().to_owned(),
            description: f.options.description.clone(),
            commands: f
                .commands
                .iter()
                .filter_map(|name| schema.command(name))
                .map(|c| pb::CommandSchema {
                    name: c.name().to_owned(),
                    capability: c.capability().to_owned(),
                    message: c.full_name().to_owned(),
                    result: c.options.result.clone(),
                    intermediate: c.options.intermediate.clone(),
                })
                .collect(),
        })
        .collect();
    pb::DeviceSchema {
        file_descriptor_set: schema.file_descriptor_set(),
        families,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_carries_its_field_path_as_metadata_and_in_the_message() {
        let mut req = pb::SubmitBatchRequest::default();
        req.experiments.push(pb::ExperimentSpec {
            name: "n".repeat(257),
            ..Default::default()
        });
        let r = crate::safety::check_bounds(&req, &Limits::default()).expect_err("too long");
        let status = Status::from(r);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert_eq!(
            status
                .metadata()
                .get(FIELD_PATH_METADATA)
                .and_then(|v| v.to_str().ok()),
            Some("experiments[0].name")
        );
        assert!(
            status.message().starts_with("experiments[0].name: "),
            "{}",
            status.message()
        );
    }

    #[test]
    fn core_errors_map_to_the_codes_clients_retry_or_fix_on() {
        let cases = [
            (
                Error::NotFound("id: no device \"x\"".into()),
                tonic::Code::NotFound,
            ),
            (
                Error::Conflict("idempotency_key: used".into()),
                tonic::Code::AlreadyExists,
            ),
            (
                Error::TimedOut("waited".into()),
                tonic::Code::DeadlineExceeded,
            ),
            (Error::ShuttingDown, tonic::Code::Unavailable),
            (
                Error::IdsExhausted("overflow".into()),
                tonic::Code::Unavailable,
            ),
            (
                Error::Internal("batch vanished".into()),
                tonic::Code::Internal,
            ),
            (
                Error::Store(StoreError::Unavailable("disk full".into())),
                tonic::Code::Unavailable,
            ),
        ];
        for (e, code) in cases {
            let message = e.to_string();
            let status = Status::from(e);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }
}
