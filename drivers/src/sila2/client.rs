//! The wire: gRPC calls to a SiLA 2 server with a raw codec (messages are encoded and decoded
//! by the caller from descriptors built at run time), real-time timeouts, and the mapping of
//! gRPC statuses and SiLA errors to [`DeviceError`].
//!
//! The channel is tonic's lazy one: it connects on the first call and again after the link
//! drops, so every call after an outage is also a reconnect attempt; HTTP/2 keep-alive finds
//! a dead link under a long-running command's streams.

use std::time::Duration;

use futures_util::StreamExt;
use ppu_sila::error::SilaError;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::Tls;
use crate::device::DeviceError;

/// Passes message bytes through unchanged.
#[derive(Debug, Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, tonic::Status> {
        let n = src.remaining();
        Ok(Some(src.copy_to_bytes(n).to_vec()))
    }
}

/// Why a call failed.
#[derive(Debug, Clone, PartialEq)]
pub enum CallError {
    /// The server answered with a SiLA error.
    Sila(SilaError),
    /// The link or the server failed (no SiLA error): transport, timeout, gRPC status.
    Device(DeviceError),
}

impl CallError {
    /// As a device error; `what` names the call.
    pub fn into_device(self, what: &str) -> DeviceError {
        match self {
            CallError::Device(e) => e,
            CallError::Sila(SilaError::Validation { parameter, message }) => DeviceError::Refused {
                what: format!("{what}: parameter {}", short(&parameter)),
                reason: message,
            },
            CallError::Sila(SilaError::DefinedExecution {
                identifier,
                message,
            }) => DeviceError::Fault(format!("{what}: {}: {message}", short(&identifier))),
            CallError::Sila(SilaError::UndefinedExecution { message }) => {
                DeviceError::Fault(format!("{what}: {message}"))
            }
            CallError::Sila(e @ SilaError::Framework { .. }) => DeviceError::Refused {
                what: what.to_owned(),
                reason: e.to_string(),
            },
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, CallError::Device(e) if e.is_transient())
    }
}

/// The last part of a fully qualified identifier (`…/Parameter/Speed` → `Speed`).
fn short(fqi: &str) -> &str {
    fqi.rsplit('/').next().unwrap_or(fqi)
}

/// A gRPC status as a call error: an `ABORTED` status carrying a SiLA error is that error.
fn from_status(status: tonic::Status, what: &str, timeout: Duration) -> CallError {
    if status.code() == tonic::Code::Aborted {
        for details in [status.message().as_bytes(), status.details()] {
            if let Ok(e) = SilaError::from_details(details) {
                return CallError::Sila(e);
            }
        }
    }
    let e = match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled | tonic::Code::Unknown
            if is_link(&status) =>
        {
            DeviceError::Disconnected(format!("{what}: {}", status.message()))
        }
        tonic::Code::Unavailable => {
            DeviceError::Disconnected(format!("{what}: {}", status.message()))
        }
        tonic::Code::DeadlineExceeded => DeviceError::Timeout {
            what: what.to_owned(),
            timeout_ms: timeout.as_millis() as u64,
        },
        tonic::Code::Unimplemented => DeviceError::Unsupported(format!(
            "{what}: the server does not implement it ({})",
            status.message()
        )),
        code => DeviceError::Refused {
            what: what.to_owned(),
            reason: format!("{code:?}: {}", status.message()),
        },
    };
    CallError::Device(e)
}

/// A status that tonic made up for a broken link rather than one the server sent.
fn is_link(status: &tonic::Status) -> bool {
    let m = status.message();
    m.contains("transport") || m.contains("connect") || m.contains("broken pipe")
}

/// A SiLA 2 server's gRPC endpoint.
#[derive(Debug)]
pub struct Client {
    endpoint: Endpoint,
    tls: Tls,
    /// Made at the first call (reading the CA file then, so a missing file is the device's
    /// connection error, not a start-up failure), then reused: it reconnects by itself.
    channel: std::sync::Mutex<Option<Channel>>,
    timeout: Duration,
    /// `address`, for messages.
    describe: String,
}

impl Client {
    /// The client; nothing is sent (or read) until the first call.
    pub fn new(address: &str, tls: &Tls, timeout: Duration) -> Result<Self, String> {
        let scheme = match tls {
            Tls::Plaintext => "http",
            Tls::Ca { .. } => "https",
        };
        let endpoint = Endpoint::from_shared(format!("{scheme}://{address}"))
            .map_err(|e| format!("address: {address:?}: {e}"))?
            .connect_timeout(timeout)
            .http2_keep_alive_interval(Duration::from_secs(2).min(timeout))
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true);
        Ok(Self {
            endpoint,
            tls: tls.clone(),
            channel: std::sync::Mutex::new(None),
            timeout,
            describe: format!(
                "sila2://{address}{}",
                match tls {
                    Tls::Plaintext => " (plaintext)",
                    Tls::Ca { .. } => "",
                }
            ),
        })
    }

    pub fn describe(&self) -> &str {
        &self.describe
    }

    /// The channel, made on first use.
    fn channel(&self) -> Result<Channel, CallError> {
        let mut slot = self
            .channel
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let endpoint = match &self.tls {
            Tls::Plaintext => self.endpoint.clone(),
            Tls::Ca { ca_file, domain } => {
                let bad = |e: String| {
                    CallError::Device(DeviceError::Disconnected(format!(
                        "ca_file {ca_file}: {e}"
                    )))
                };
                let pem = std::fs::read(ca_file).map_err(|e| bad(e.to_string()))?;
                self.endpoint
                    .clone()
                    .tls_config(
                        ClientTlsConfig::new()
                            .ca_certificate(Certificate::from_pem(pem))
                            .domain_name(domain.clone()),
                    )
                    .map_err(|e| bad(e.to_string()))?
            }
        };
        let channel = endpoint.connect_lazy();
        *slot = Some(channel.clone());
        Ok(channel)
    }

    fn path(service: &str, method: &str) -> Result<PathAndQuery, CallError> {
        PathAndQuery::try_from(format!("/{service}/{method}")).map_err(|e| {
            CallError::Device(DeviceError::Unsupported(format!(
                "/{service}/{method} is not a gRPC path: {e}"
            )))
        })
    }

    async fn ready(&self, what: &str) -> Result<tonic::client::Grpc<Channel>, CallError> {
        let mut grpc = tonic::client::Grpc::new(self.channel()?);
        match tokio::time::timeout(self.timeout, grpc.ready()).await {
            Ok(Ok(())) => Ok(grpc),
            Ok(Err(e)) => Err(CallError::Device(DeviceError::Disconnected(format!(
                "{what}: {} unreachable: {e}",
                self.describe
            )))),
            Err(_) => Err(CallError::Device(DeviceError::Timeout {
                what: format!("{what} (connecting to {})", self.describe),
                timeout_ms: self.timeout.as_millis() as u64,
            })),
        }
    }

    /// A unary call, bounded by the timeout in real time.
    pub async fn unary(
        &self,
        service: &str,
        method: &str,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, CallError> {
        let what = format!("{service}/{method}");
        let path = Self::path(service, method)?;
        let call = async {
            let mut grpc = self.ready(&what).await?;
            grpc.unary(tonic::Request::new(request), path, RawCodec)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| from_status(s, &what, self.timeout))
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Device(DeviceError::Timeout {
                what,
                timeout_ms: self.timeout.as_millis() as u64,
            })),
        }
    }

    /// A server-streaming call; opening it is bounded by the timeout, the stream's messages
    /// are not (the caller bounds the gaps between them).
    pub async fn stream(
        &self,
        service: &str,
        method: &str,
        request: Vec<u8>,
    ) -> Result<Stream, CallError> {
        let what = format!("{service}/{method}");
        let path = Self::path(service, method)?;
        let timeout = self.timeout;
        let open = async {
            let mut grpc = self.ready(&what).await?;
            grpc.server_streaming(tonic::Request::new(request), path, RawCodec)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| from_status(s, &what, timeout))
        };
        match tokio::time::timeout(timeout, open).await {
            Ok(r) => r.map(|inner| Stream {
                inner,
                what,
                timeout,
            }),
            Err(_) => Err(CallError::Device(DeviceError::Timeout {
                what,
                timeout_ms: timeout.as_millis() as u64,
            })),
        }
    }

    /// The first message of a server stream (an observable property's current value).
    pub async fn first(
        &self,
        service: &str,
        method: &str,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, CallError> {
        let what = format!("{service}/{method}");
        let timeout = self.timeout;
        let mut s = self.stream(service, method, request).await?;
        match tokio::time::timeout(timeout, s.next()).await {
            Ok(Some(r)) => r,
            Ok(None) => Err(CallError::Device(DeviceError::Corrupt {
                what,
                reason: "the stream ended without a value".to_owned(),
            })),
            Err(_) => Err(CallError::Device(DeviceError::Timeout {
                what,
                timeout_ms: timeout.as_millis() as u64,
            })),
        }
    }
}

/// An open server stream.
pub struct Stream {
    inner: tonic::Streaming<Vec<u8>>,
    what: String,
    timeout: Duration,
}

impl Stream {
    /// The next message; `None` when the server ended the stream.
    pub async fn next(&mut self) -> Option<Result<Vec<u8>, CallError>> {
        self.inner
            .next()
            .await
            .map(|r| r.map_err(|s| from_status(s, &self.what, self.timeout)))
    }
}
