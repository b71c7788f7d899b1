//! Modbus TCP server for simulated furnaces.
//!
//! The server behaves like a Modbus TCP gateway in front of an RS-485 bus of controllers:
//!
//! - requests are routed by unit id; a request for a unit that is not on the bus gets no reply
//!   (the client times out), exactly like an RTU slave that is not there;
//! - unit id 0 is the Modbus broadcast: writes are applied to every (non-silent) furnace and
//!   nothing is answered;
//! - function codes 03 and 04 read holding registers (Eurotherm treats them alike), 06 and 16
//!   write; any other function answers exception 01;
//! - a furnace switched silent ([`SimFurnace::set_silent`]) swallows its requests without an
//!   answer; the connection stays open, and requests arriving after it is un-silenced are answered
//!   again.

use std::collections::HashSet;
use std::future::{Ready, ready};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_modbus::server::Service;
use tokio_modbus::server::tcp::Server;
use tokio_modbus::{ExceptionCode, Request, Response, SlaveRequest};

use crate::furnace::SimFurnace;

/// Largest register count of one read request (Modbus application protocol).
const MAX_READ: u16 = 125;
/// Largest register count of one write-multiple request.
const MAX_WRITE: usize = 123;

/// Serves one furnace on a real Modbus TCP socket, answering for its
/// [`unit_id`](crate::furnace::FurnaceConfig::unit_id).
pub async fn serve_tcp(addr: SocketAddr, furnace: SimFurnace) -> io::Result<ServerHandle> {
    serve_tcp_units(addr, vec![furnace]).await
}

/// Serves several furnaces on one socket (one RS-485 bus behind one gateway), routed by unit
/// id. Unit ids must be distinct, 1–247.
pub async fn serve_tcp_units(
    addr: SocketAddr,
    furnaces: Vec<SimFurnace>,
) -> io::Result<ServerHandle> {
    let mut seen = HashSet::new();
    for f in &furnaces {
        let unit = f.unit_id();
        if !(1..=247).contains(&unit) || !seen.insert(unit) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unit id {unit} is invalid or used twice"),
            ));
        }
    }

    let listener = bind(addr)?;
    let local_addr = listener.local_addr()?;
    let service = Arc::new(FurnaceService {
        furnaces: furnaces.into(),
    });
    let (stop_tx, stop_rx) = oneshot::channel();
    let (conn_tx, conn_rx) = mpsc::channel(1);
    let task = tokio::spawn(accept_loop(listener, service, conn_tx, stop_rx));
    tracing::info!(%local_addr, "modbus tcp server listening");
    Ok(ServerHandle {
        local_addr,
        stop: Some(stop_tx),
        task: Some(task),
        connections: conn_rx,
    })
}

/// A running server. Dropping it stops the server too (without waiting).
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    /// Closed once every connection's guard has been dropped.
    connections: mpsc::Receiver<()>,
}

impl ServerHandle {
    /// The address the server listens on (with the real port when bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting, closes every open connection, and returns once the listening socket is
    /// closed and all connections are gone. A new server can then bind the same address.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take()
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "modbus accept task ended abnormally");
        }
        // Every connection holds a sender; recv() returns None once all are dropped.
        while self.connections.recv().await.is_some() {}
        tracing::info!(local_addr = %self.local_addr, "modbus tcp server stopped");
    }
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

async fn accept_loop(
    listener: TcpListener,
    service: Arc<FurnaceService>,
    conn_tx: mpsc::Sender<()>,
    mut stop: oneshot::Receiver<()>,
) {
    let server = Server::new(listener);
    let on_connected = move |stream: TcpStream, peer: SocketAddr| {
        let service = Arc::clone(&service);
        let guard = conn_tx.clone();
        async move {
            tracing::debug!(%peer, "modbus client connected");
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "set_nodelay failed");
            }
            Ok(Some((
                service,
                TrackedStream {
                    inner: stream,
                    _guard: guard,
                },
            )))
        }
    };
    let on_process_error = |e: io::Error| tracing::debug!(error = %e, "modbus connection ended");
    loop {
        // Dropping `serve` (on stop) cancels and closes every connection it spawned.
        tokio::select! {
            res = server.serve(&on_connected, on_process_error) => {
                if let Err(e) = res {
                    // Accept errors (e.g. out of file descriptors) end `serve`; retry shortly.
                    tracing::warn!(error = %e, "modbus accept failed; retrying");
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = &mut stop => break,
                }
            }
            _ = &mut stop => break,
        }
    }
}

/// A connection's stream plus a guard that tells [`ServerHandle::shutdown`] when it is closed.
struct TrackedStream {
    inner: TcpStream,
    _guard: mpsc::Sender<()>,
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

struct FurnaceService {
    furnaces: Arc<[SimFurnace]>,
}

impl Service for FurnaceService {
    type Request = SlaveRequest<'static>;
    type Response = Option<Response>;
    type Exception = ExceptionCode;
    type Future = Ready<Result<Option<Response>, ExceptionCode>>;

    fn call(&self, req: Self::Request) -> Self::Future {
        ready(self.handle(req))
    }
}

impl FurnaceService {
    fn handle(&self, req: SlaveRequest<'static>) -> Result<Option<Response>, ExceptionCode> {
        let SlaveRequest { slave, request } = req;
        if slave == 0 {
            for f in self.furnaces.iter().filter(|f| !f.is_silent()) {
                let result = match &request {
                    Request::WriteSingleRegister(addr, value) => f.write_register(*addr, *value),
                    Request::WriteMultipleRegisters(addr, values) => {
                        f.write_registers(*addr, values)
                    }
                    _ => Ok(()),
                };
                tracing::debug!(unit = f.unit_id(), ?request, ?result, "broadcast");
            }
            return Ok(None);
        }
        let Some(furnace) = self.furnaces.iter().find(|f| f.unit_id() == slave) else {
            tracing::trace!(unit = slave, "no such unit; not answering");
            return Ok(None);
        };
        if furnace.is_silent() {
            tracing::trace!(unit = slave, ?request, "silent; not answering");
            return Ok(None);
        }
        let result = dispatch(furnace, request);
        if let Err(e) = &result {
            tracing::debug!(unit = slave, exception = ?e, "modbus exception");
        }
        result.map(Some)
    }
}

pub(crate) fn dispatch(
    furnace: &SimFurnace,
    request: Request<'static>,
) -> Result<Response, ExceptionCode> {
    match request {
        Request::ReadHoldingRegisters(addr, count) => {
            check_read_count(count)?;
            furnace
                .read_registers(addr, count)
                .map(Response::ReadHoldingRegisters)
        }
        Request::ReadInputRegisters(addr, count) => {
            check_read_count(count)?;
            furnace
                .read_registers(addr, count)
                .map(Response::ReadInputRegisters)
        }
        Request::WriteSingleRegister(addr, value) => {
            tracing::debug!(unit = furnace.unit_id(), addr, value, "write");
            furnace
                .write_register(addr, value)
                .map(|()| Response::WriteSingleRegister(addr, value))
        }
        Request::WriteMultipleRegisters(addr, values) => {
            if values.is_empty() || values.len() > MAX_WRITE {
                return Err(ExceptionCode::IllegalDataValue);
            }
            tracing::debug!(unit = furnace.unit_id(), addr, ?values, "write multiple");
            furnace.write_registers(addr, &values)?;
            // Bounded by MAX_WRITE above.
            Ok(Response::WriteMultipleRegisters(addr, values.len() as u16))
        }
        _ => Err(ExceptionCode::IllegalFunction),
    }
}

fn check_read_count(count: u16) -> Result<(), ExceptionCode> {
    if (1..=MAX_READ).contains(&count) {
        Ok(())
    } else {
        Err(ExceptionCode::IllegalDataValue)
    }
}
