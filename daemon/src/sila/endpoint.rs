//! The endpoint: one tower service over HTTP/2 requests that routes
//! `/sila2.<package>.<Feature>/<Method>` to the handlers of the features served, decoding and
//! encoding through the method's run-time descriptors with tonic's own gRPC machinery (framing,
//! compression, status). It sits behind the same [`crate::auth::AuthLayer`] as ppu.v1, so
//! every call is authenticated, authorised by its role and audited before a handler runs.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use ppu_proto::v1 as pb;
use ppu_schema::Schema;
use ppu_schema::prost_reflect::DynamicMessage;
use tokio::sync::{Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic::codegen::{Bytes, StdError, http};
use tonic::server::{Grpc, ServerStreamingService, UnaryService};

use super::codec::DynCodec;
use super::features::{Features, Kind, Method};
use super::server_info::Identity;
use crate::auth::Caller;
use crate::limits::{Limits, SubmitRate};
use crate::scheduler::Scheduler;

/// Replies buffered per stream before it waits on its client.
const STREAM_BUFFER: usize = 64;

pub(crate) type Replies = Pin<Box<dyn Stream<Item = Result<Vec<u8>, Status>> + Send>>;
type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Everything the handlers need.
pub(crate) struct Ctx {
    pub scheduler: Scheduler,
    /// Cancelled at shutdown: ends every open stream.
    pub stop: CancellationToken,
    pub features: Features,
    pub identity: Identity,
    pub limits: Limits,
    pub rate: Arc<SubmitRate>,
    pub streams: Arc<Semaphore>,
    pub schema: &'static Schema,
}

impl Ctx {
    async fn unary(
        self: Arc<Self>,
        method: &Method,
        caller: Caller,
        msg: DynamicMessage,
    ) -> Result<Vec<u8>, Status> {
        let kind = self.features.served[method.feature].kind;
        match kind {
            Kind::SilaService => self.sila_service(method, &caller, &msg).await,
            Kind::Authorization => self.authorization(method),
            Kind::Family(i) => self.family_unary(i, method, &caller, &msg).await,
            Kind::Queue => self.queue_unary(method, &caller, &msg).await,
        }
    }

    fn stream(self: Arc<Self>, method: &Method, msg: DynamicMessage) -> Result<Replies, Status> {
        let kind = self.features.served[method.feature].kind;
        match (kind, &method.member) {
            (Kind::Family(i), _) => self.family_stream(i, method, &msg),
            (Kind::Queue, _) => self.queue_stream(method, &msg),
            _ => Err(Status::unimplemented(format!("{:?}", method.member))),
        }
    }

    /// Runs `produce` until it finishes, the client hangs up, or shutdown; it holds one of
    /// the open-stream slots ppu.v1's streams count against (`limits.max_streams`).
    pub(crate) fn spawn_stream<F>(
        &self,
        produce: impl FnOnce(mpsc::Sender<Result<Vec<u8>, Status>>) -> F,
    ) -> Result<Replies, Status>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let slot = self.streams.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "too many open streams (limits.max_streams = {}); close one and retry",
                self.limits.max_streams
            ))
        })?;
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let gone = tx.clone();
        let stop = self.stop.clone();
        let fut = produce(tx);
        tokio::spawn(async move {
            let _slot = slot;
            tokio::select! {
                _ = fut => {}
                _ = gone.closed() => {}
                _ = stop.cancelled() => {}
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    /// A batch of one experiment, through the same path as ppu.v1's SubmitBatch: size bounds,
    /// the safety checks, durable storage, the queue; `submitted_by` is the caller. Names the
    /// experiment as the call's audit target.
    pub(crate) async fn submit(
        &self,
        spec: pb::ExperimentSpec,
        caller: &Caller,
        at: &super::errors::Submitted<'_>,
    ) -> Result<String, Status> {
        // A SiLA call has no idempotency key of its own: each call is a new batch.
        let req = pb::SubmitBatchRequest {
            idempotency_key: format!("sila-{}", ulid::Ulid::new()),
            experiments: vec![spec],
        };
        crate::safety::check_bounds(&req, &self.limits).map_err(|r| at.rejection(&r))?;
        if let Err(wait) = self
            .rate
            .take(&caller.principal, self.limits.submit_per_minute)
        {
            return Err(Status::resource_exhausted(format!(
                "submission rate limit: {} submissions per minute for {}; retry in {} ms",
                self.limits.submit_per_minute,
                caller.principal,
                wait.as_millis().max(1)
            )));
        }
        let (batch, _) = self
            .scheduler
            .submit_as(req, &caller.principal)
            .await
            .map_err(|e| at.refused(e))?;
        let id = batch
            .experiment_ids
            .first()
            .cloned()
            .ok_or_else(|| super::errors::undefined("the batch holds no experiment"))?;
        caller.set_target(id.clone());
        Ok(id)
    }
}

/// The tower service: routes by path, then tonic's gRPC server does the wire.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) ctx: Arc<Ctx>,
}

impl<B> tower_service::Service<http::Request<B>> for Endpoint
where
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError>,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let req = req.map(tonic::body::Body::new);
        let ctx = self.ctx.clone();
        Box::pin(async move {
            let path = req.uri().path().to_owned();
            let Some(method) = ctx.features.methods.get(&path).cloned() else {
                return Ok(Status::unimplemented(format!("no SiLA method {path}")).into_http());
            };
            let max = ctx.limits.max_message_bytes;
            let mut grpc = Grpc::new(DynCodec::new(method.input.clone()))
                .apply_max_message_size_config(Some(max), Some(max));
            let method = Arc::new(method);
            Ok(if method.streaming {
                grpc.server_streaming(Streaming { ctx, method }, req).await
            } else {
                grpc.unary(Unary { ctx, method }, req).await
            })
        })
    }
}

struct Unary {
    ctx: Arc<Ctx>,
    method: Arc<Method>,
}

impl UnaryService<DynamicMessage> for Unary {
    type Response = Vec<u8>;
    type Future = BoxFuture<Result<tonic::Response<Vec<u8>>, Status>>;

    fn call(&mut self, req: tonic::Request<DynamicMessage>) -> Self::Future {
        let caller = Caller::of(&req);
        let ctx = self.ctx.clone();
        let method = self.method.clone();
        Box::pin(async move {
            ctx.unary(&method, caller, req.into_inner())
                .await
                .map(tonic::Response::new)
        })
    }
}

struct Streaming {
    ctx: Arc<Ctx>,
    method: Arc<Method>,
}

impl ServerStreamingService<DynamicMessage> for Streaming {
    type Response = Vec<u8>;
    type ResponseStream = Replies;
    type Future = BoxFuture<Result<tonic::Response<Replies>, Status>>;

    fn call(&mut self, req: tonic::Request<DynamicMessage>) -> Self::Future {
        let ctx = self.ctx.clone();
        let method = self.method.clone();
        Box::pin(async move {
            ctx.stream(&method, req.into_inner())
                .map(tonic::Response::new)
        })
    }
}

/// The parameter that names a command execution: `CommandExecutionUUID { value }`.
pub(crate) fn execution_uuid(msg: &DynamicMessage) -> Option<String> {
    msg.get_field_by_name("value")
        .and_then(|v| v.as_str().map(str::to_owned))
}
