//! The TUI's link to ppud: tasks that feed [`Update`]s to the app and run its commands.
//!
//! - The event stream follows the durable log and, whenever it ends (daemon restart, network),
//!   reopens it with backoff, resuming after the last sequence received: no gap, no duplicate.
//! - A poll every [`POLL_PERIOD`] reads the queue, devices (live readings), alarms and
//!   transfers. It doubles as the heartbeat: its RPCs time out after [`POLL_TIMEOUT`], so a
//!   lost daemon shows as disconnected within two seconds even if no stream error arrives.
//! - Commands from the app (fetch an experiment, run a confirmed action) each run in their own
//!   task, so a slow abort never holds up the feeds.
//!
//! Replies and events reach the app through one queue, in the order they were sent, but a reply
//! can be overtaken by events committed after the daemon read it. So every experiment read and
//! every poll round is tagged with the last event sequence already queued when it was sent
//! ([`Handed`]), and the app does not let it undo a later event.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use ppu_proto::v1 as pb;
use ppu_proto::v1::device_service_client::DeviceServiceClient;
use ppu_proto::v1::event_service_client::EventServiceClient;
use ppu_proto::v1::experiment_service_client::ExperimentServiceClient;
use ppu_proto::v1::queue_service_client::QueueServiceClient;
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tonic::{Code, Status};

use super::actions::Action;
use super::state::{Polled, Update};
use crate::conn::{Channel, Conn, Tuning};

/// How often the queue, devices, alarms and transfers are read.
pub const POLL_PERIOD: Duration = Duration::from_millis(500);
/// How long one poll RPC may take before the daemon counts as lost.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(1);
/// First and longest wait before reopening the event stream.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(2);

/// What the app asks of the client.
#[derive(Debug, Clone)]
pub enum Cmd {
    /// Fetch one experiment (an id seen in an event or the queue).
    Fetch(String),
    /// Run a confirmed action.
    Act(Action),
}

/// What the client tells the app.
#[derive(Debug)]
pub enum Incoming {
    Update(Update),
    /// A command finished: its description and the reply or error, one line each.
    Done {
        action: Action,
        result: Result<String, String>,
    },
}

/// A channel tuned for a live display: short connect timeout and HTTP/2 keep-alives, so a dead
/// daemon is noticed in about a second. Carries the bearer token like every ppuctl channel.
pub fn channel(conn: &Conn) -> Result<Channel, crate::InputError> {
    conn.channel(Tuning {
        connect_timeout: POLL_TIMEOUT,
        keep_alive_interval: Duration::from_secs(1),
        keep_alive_timeout: Duration::from_secs(1),
    })
}

/// The sequence of the last event queued for the app. Every event up to it is committed, so a
/// read sent after it reflects them all, and is queued behind them.
#[derive(Debug, Clone, Default)]
struct Handed(Arc<AtomicU64>);

impl Handed {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, sequence: u64) {
        self.0.store(sequence, Ordering::Release);
    }
}

/// Starts the feeds and the command runner. They stop when the app drops its receiver.
pub fn start(ch: Channel, by: String) -> (mpsc::UnboundedSender<Cmd>, mpsc::Receiver<Incoming>) {
    let (tx, rx) = mpsc::channel(1024);
    let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
    let handed = Handed::default();
    tokio::spawn(follow_events(ch.clone(), tx.clone(), handed.clone()));
    tokio::spawn(poll(ch.clone(), tx.clone(), handed.clone()));
    tokio::spawn(run_commands(ch, by, cmd_rx, tx, handed));
    (cmd_tx, rx)
}

/// `CODE: message`, as ppuctl prints errors; a refused token also says how to give one.
pub fn status_text(s: &Status) -> String {
    let message = if s.message().is_empty() {
        s.code().description()
    } else {
        s.message()
    };
    let hint = if s.code() == Code::Unauthenticated {
        " (set PPU_TOKEN or --token-file)"
    } else {
        ""
    };
    format!("{}: {message}{hint}", crate::code_name(s.code()))
}

/// Follows the event log from the start, reopening it after the last sequence received.
async fn follow_events(ch: Channel, tx: mpsc::Sender<Incoming>, handed: Handed) {
    let mut client = EventServiceClient::new(ch);
    let mut last = 0u64;
    let mut delay = RECONNECT_FIRST;
    loop {
        let session = async {
            let request = pb::StreamEventsRequest {
                from_sequence: last,
                ..Default::default()
            };
            let mut stream = client.stream_events(request).await?.into_inner();
            let up = Update::StreamUp {
                resumed_after: last,
            };
            if tx.send(Incoming::Update(up)).await.is_err() {
                return Ok(());
            }
            while let Some(event) = stream.message().await? {
                delay = RECONNECT_FIRST;
                // The server promises no duplicates; make sure of it anyway.
                if event.sequence <= last {
                    continue;
                }
                last = event.sequence;
                if tx
                    .send(Incoming::Update(Update::Event(Box::new(event))))
                    .await
                    .is_err()
                {
                    return Ok(());
                }
                handed.set(last);
            }
            Err(Status::unavailable("the daemon closed the event stream"))
        };
        let result: Result<(), Status> = session.await;
        if tx.is_closed() {
            return;
        }
        let reason = match result {
            Ok(()) => return,
            Err(s) => format!("event stream: {}", status_text(&s)),
        };
        if tx
            .send(Incoming::Update(Update::StreamDown { reason }))
            .await
            .is_err()
        {
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RECONNECT_MAX);
    }
}

/// Reads the queue, devices, alarms and transfers every [`POLL_PERIOD`]; after each
/// (re)connection also the running and queued experiments.
async fn poll(ch: Channel, tx: mpsc::Sender<Incoming>, handed: Handed) {
    let mut ticker = tokio::time::interval(POLL_PERIOD);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut up = false;
    loop {
        ticker.tick().await;
        // Taken before the reads go out: every event up to it is reflected in their replies.
        let as_of = handed.get();
        let update = match poll_once(&ch, as_of).await {
            Ok(polled) => {
                if !up && let Ok(experiments) = active_experiments(&ch).await {
                    let u = Update::Experiments { experiments, as_of };
                    if tx.send(Incoming::Update(u)).await.is_err() {
                        return;
                    }
                }
                up = true;
                Update::Polled(Box::new(polled))
            }
            Err(s) => {
                up = false;
                Update::PollFailed {
                    reason: status_text(&s),
                }
            }
        };
        if tx.send(Incoming::Update(update)).await.is_err() {
            return;
        }
    }
}

/// Awaits a poll RPC with [`POLL_TIMEOUT`].
async fn quick<T>(
    rpc: impl Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(POLL_TIMEOUT, rpc).await {
        Ok(result) => result.map(tonic::Response::into_inner),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no reply from ppud within {} s",
            POLL_TIMEOUT.as_secs_f64()
        ))),
    }
}

/// Whether a failed RPC means the daemon is unreachable (rather than refusing this request).
fn is_link_failure(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown
    )
}

/// A link failure in any read fails the round; any other error is that feature's notice.
fn part<T>(r: Result<T, Status>) -> Result<Result<T, String>, Status> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(s) if is_link_failure(s.code()) => Err(s),
        Err(s) => Ok(Err(status_text(&s))),
    }
}

async fn poll_once(ch: &Channel, as_of: u64) -> Result<Polled, Status> {
    let queue =
        quick(QueueServiceClient::new(ch.clone()).get_queue(pb::GetQueueRequest {})).await?;
    let mut devices_client = DeviceServiceClient::new(ch.clone());
    let devices = part(
        quick(devices_client.list_devices(pb::ListDevicesRequest {}))
            .await
            .map(|r| r.devices),
    )?;
    let alarms = part(
        quick(devices_client.list_alarms(pb::ListAlarmsRequest::default()))
            .await
            .map(|r| r.alarms),
    )?;
    let transfers = part(
        quick(QueueServiceClient::new(ch.clone()).list_transfers(pb::ListTransfersRequest {}))
            .await
            .map(|r| r.transfers),
    )?;
    Ok(Polled {
        as_of,
        queue,
        devices,
        alarms,
        transfers,
    })
}

/// Every RUNNING and QUEUED experiment, all pages.
async fn active_experiments(ch: &Channel) -> Result<Vec<pb::Experiment>, Status> {
    let mut client = ExperimentServiceClient::new(ch.clone());
    let mut out = Vec::new();
    for state in [pb::ExperimentState::Running, pb::ExperimentState::Queued] {
        let mut request = pb::ListExperimentsRequest {
            state: state as i32,
            page_size: 1000,
            ..Default::default()
        };
        loop {
            let page = quick(client.list_experiments(request.clone())).await?;
            out.extend(page.experiments);
            if page.next_page_token.is_empty() {
                break;
            }
            request.page_token = page.next_page_token;
        }
    }
    Ok(out)
}

async fn run_commands(
    ch: Channel,
    by: String,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    tx: mpsc::Sender<Incoming>,
    handed: Handed,
) {
    while let Some(cmd) = rx.recv().await {
        let (ch, tx, by) = (ch.clone(), tx.clone(), by.clone());
        let handed = handed.clone();
        tokio::spawn(async move {
            let incoming = match cmd {
                Cmd::Fetch(id) => {
                    let mut client = ExperimentServiceClient::new(ch);
                    let request = pb::GetExperimentRequest { id: id.clone() };
                    let as_of = handed.get();
                    match quick(client.get_experiment(request)).await {
                        Ok(e) => Incoming::Update(Update::Experiments {
                            experiments: vec![e],
                            as_of,
                        }),
                        // Gone or unreachable: asked for again on its next event or poll.
                        Err(_) => Incoming::Update(Update::NotFetched(id)),
                    }
                }
                Cmd::Act(action) => {
                    let result = action.run(ch, &by).await.map_err(|s| status_text(&s));
                    Incoming::Done { action, result }
                }
            };
            let _ = tx.send(incoming).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_token_says_how_to_give_one() {
        let text = status_text(&Status::unauthenticated("missing or invalid bearer token"));
        assert_eq!(
            text,
            "UNAUTHENTICATED: missing or invalid bearer token (set PPU_TOKEN or --token-file)"
        );
        let text = status_text(&Status::permission_denied(
            "role viewer may not call ppu.v1.QueueService/PauseQueue",
        ));
        assert_eq!(
            text,
            "PERMISSION_DENIED: role viewer may not call ppu.v1.QueueService/PauseQueue"
        );
    }
}
