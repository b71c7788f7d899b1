//! Figure 2, event fan-out: latency from an event's commit to its receipt by gRPC
//! `StreamEvents` clients, with 1, 10 and 100 concurrent subscribers, while events are committed
//! at a steady rate.
//!
//! The events are generated in-process through [`Store::write`] (the only way to commit them at
//! a controlled rate), on a dedicated thread, each commit carrying the events due by then; the
//! subscribers are real gRPC clients, each on its own connection, of the real daemon
//! (`Daemon::start`, no devices; the store is reached through its scheduler). Latency
//! is the client's wall clock at receipt minus the event's `time`, which the store stamps just
//! before the commit's fsync, so the commit itself is inside the figure (its duration is
//! reported alongside, and the latency from the commit's return as `after_commit_*`). The bare
//! baseline is an in-process receiver on the store's broadcast, measured in the same run.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use pb::event_service_client::EventServiceClient;
use ppu_daemon::app::{Daemon, Options};
use ppu_daemon::devices::PollSettings;
use ppu_daemon::store::Store;
use ppu_drivers::Clock;
use ppu_proto::v1 as pb;
use tonic::transport::Channel;

use crate::figure::{Figure, note};
use crate::latency::Summary;
use crate::workload;

#[derive(Debug, Clone)]
pub struct Sizes {
    pub subscribers: Vec<usize>,
    /// Target events per second.
    pub rate: f64,
    /// Most events one commit carries; the generator commits whatever is due (group commit),
    /// so the rate holds even when an fsync is slow.
    pub max_per_commit: usize,
    /// Generation before measuring starts (connections, caches, steady state).
    pub warmup: Duration,
    pub measure: Duration,
    /// Longest wait for every subscriber to receive the last event.
    pub drain: Duration,
}

/// Shared between the generator and the receivers.
struct Window {
    /// First sequence that counts; `u64::MAX` while warming up.
    from: AtomicU64,
    /// Last sequence that counts; `u64::MAX` until generation ends.
    to: AtomicU64,
}

impl Window {
    fn counts(&self, seq: u64) -> bool {
        seq >= self.from.load(Ordering::SeqCst) && seq <= self.to.load(Ordering::SeqCst)
    }
}

/// The daemon's counter of subscribers that fell behind the live broadcast and were served
/// from the log instead (lagged, then replayed), if this build has it.
const LOG_FALLBACKS: &str = "ppu_stream_log_fallbacks_total";

/// The goals: with 10 subscribers, p99 within 1 ms above the commit (its p99); with
/// 100, within twice the bare in-process broadcast's p99 and no subscriber falling back to
/// the log.
const GOAL_ABOVE_COMMIT_MS: f64 = 1.0;
const GOAL_VS_BARE: f64 = 2.0;

/// The sum of [`LOG_FALLBACKS`] over its labels as the daemon's `GET /metrics` serves it
/// (a scrape brings its counters up to date), or `None` when the daemon does not export it.
async fn log_fallbacks(metrics: Option<std::net::SocketAddr>) -> Option<f64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(metrics?).await.ok()?;
    conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut text))
        .await
        .ok()?
        .ok()?;
    let mut total = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(LOG_FALLBACKS) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

pub async fn run(sizes: &Sizes, work: &Path) -> Result<Vec<Figure>> {
    let mut figures = Vec::new();
    for &n in &sizes.subscribers {
        figures.extend(tier(n, sizes, work).await?);
    }
    Ok(figures)
}

/// The real daemon (`Daemon::start`, no devices) and its store, to commit events into.
struct Server {
    store: Arc<Store>,
    addr: std::net::SocketAddr,
    daemon: Daemon,
}

impl Server {
    async fn start(dir: &Path) -> Result<Server> {
        let daemon = Daemon::start(
            Options {
                listen: "127.0.0.1:0".parse()?,
                data_dir: dir.to_owned(),
                clock: Clock::real(),
                poll: PollSettings {
                    poll_interval: Duration::from_secs(1),
                    reading_log_interval: Duration::from_secs(10),
                },
                security: {
                    // Its metrics endpoint says how many subscribers fell back to the log.
                    let mut security = crate::lab::bench_security(None);
                    security.metrics_listen = Some("127.0.0.1:0".parse()?);
                    security
                },
            },
            Vec::new(),
        )
        .await?;
        Ok(Server {
            store: daemon.scheduler().store().clone(),
            addr: daemon.addr(),
            daemon,
        })
    }

    async fn stop(self) {
        self.daemon.shutdown().await;
    }
}

/// A runtime that may be dropped from async code: it shuts down without waiting.
struct ClientRuntime(Option<tokio::runtime::Runtime>);

impl ClientRuntime {
    fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            None => tokio::runtime::Handle::current(),
        }
    }
}

impl Drop for ClientRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// One event received inside the window.
#[derive(Clone, Copy)]
struct Receipt {
    seq: u64,
    /// Receipt time, µs since the tier's epoch (monotonic clock).
    at_us: f64,
    /// Receipt wall-clock time minus the event's `time` stamp, µs.
    from_stamp_us: f64,
}

/// What one receiver saw inside the window.
struct Received {
    receipts: Vec<Receipt>,
    complete: bool,
}

fn receipt(e: &pb::Event, epoch: Instant) -> Option<Receipt> {
    let at_us = epoch.elapsed().as_secs_f64() * 1e6;
    let stamped = SystemTime::try_from(e.time?).ok()?;
    let from_stamp_us = SystemTime::now()
        .duration_since(stamped)
        .unwrap_or(Duration::ZERO)
        .as_secs_f64()
        * 1e6;
    Some(Receipt {
        seq: e.sequence,
        at_us,
        from_stamp_us,
    })
}

async fn tier(subscribers: usize, sizes: &Sizes, work: &Path) -> Result<Vec<Figure>> {
    let dir = tempfile::tempdir_in(work)?;
    let server = Server::start(dir.path()).await?;
    let result = measure_tier(&server, subscribers, sizes).await;
    server.stop().await;
    result
}

async fn measure_tier(server: &Server, subscribers: usize, sizes: &Sizes) -> Result<Vec<Figure>> {
    let store = server.store.clone();
    let epoch = Instant::now();
    let window = Arc::new(Window {
        from: AtomicU64::new(u64::MAX),
        to: AtomicU64::new(u64::MAX),
    });
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(subscribers.max(1));
    let from = store.last_sequence();
    let deadline_total = sizes.warmup + sizes.measure + sizes.drain + Duration::from_secs(30);

    // The subscribers run on their own runtime (one thread), as client processes would: they
    // share the 2 cores with the daemon but not its task queues.
    let client_rt = ClientRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("bench-subscribers")
            .enable_all()
            .build()?,
    ));
    let mut clients = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        let addr = server.addr;
        let (window, ready) = (window.clone(), ready_tx.clone());
        clients.push(client_rt.handle().spawn(async move {
            let channel = Channel::from_shared(format!("http://{addr}"))?
                .connect()
                .await?;
            let mut stream = EventServiceClient::new(channel)
                .stream_events(pb::StreamEventsRequest {
                    from_sequence: from,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut out = Received {
                receipts: Vec::new(),
                complete: false,
            };
            let deadline = tokio::time::Instant::now() + deadline_total;
            let mut first = true;
            loop {
                let e = match tokio::time::timeout_at(deadline, stream.message()).await {
                    Ok(Ok(Some(e))) => e,
                    Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return Ok::<_, anyhow::Error>(out),
                };
                if window.counts(e.sequence) {
                    out.receipts.extend(receipt(&e, epoch));
                }
                if first {
                    first = false;
                    let _ = ready.send(()).await;
                }
                if e.sequence > window.to.load(Ordering::SeqCst) {
                    out.complete = true;
                    return Ok(out);
                }
            }
        }));
    }
    // The bare baseline: the store's own broadcast, no gRPC.
    let mut live = store.subscribe();
    let bare_window = window.clone();
    let bare = tokio::spawn(async move {
        let mut out = Received {
            receipts: Vec::new(),
            complete: false,
        };
        let mut lagged = 0;
        loop {
            match live.recv().await {
                Ok(e) => {
                    if bare_window.counts(e.sequence) {
                        out.receipts.extend(receipt(&e, epoch));
                    }
                    if e.sequence > bare_window.to.load(Ordering::SeqCst) {
                        out.complete = lagged == 0;
                        return out;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => lagged += n,
                Err(_) => return out,
            }
        }
    });

    let metrics = server.daemon.metrics_addr();
    let fallbacks_before = log_fallbacks(metrics).await;
    // Every stream is live once it has received the first marker.
    let marker = |store: &Arc<Store>| {
        store.write(|w| {
            w.append(workload::progress_event("marker", "", 0));
            Ok(())
        })
    };
    let s = store.clone();
    tokio::task::spawn_blocking(move || marker(&s)).await??;
    drop(ready_tx);
    let ready_by = tokio::time::Instant::now() + Duration::from_secs(30);
    for started in 0..subscribers {
        match tokio::time::timeout_at(ready_by, ready_rx.recv()).await {
            Ok(Some(())) => {}
            _ => anyhow::bail!("only {started} of {subscribers} event streams started"),
        }
    }

    let generated = {
        let (store, window, sizes) = (store.clone(), window.clone(), sizes.clone());
        tokio::task::spawn_blocking(move || generate(&store, &window, &sizes, epoch))
            .await
            .context("event generator")??
    };
    // One more event after the window closes, so every receiver sees the end.
    let s = store.clone();
    tokio::task::spawn_blocking(move || marker(&s)).await??;

    let mut from_stamp = Vec::new();
    let mut after_commit = Vec::new();
    let mut complete = 0;
    for c in clients {
        let r = c.await??;
        complete += usize::from(r.complete);
        for x in &r.receipts {
            from_stamp.push(x.from_stamp_us);
            after_commit.push(generated.after_commit_us(x));
        }
    }
    let bare = bare.await?;
    let fallbacks = match (fallbacks_before, log_fallbacks(metrics).await) {
        (Some(a), Some(b)) => Some(b - a),
        (None, Some(b)) => Some(b),
        _ => None,
    };
    let mut bare_stamp: Vec<f64> = bare.receipts.iter().map(|x| x.from_stamp_us).collect();
    let expected = generated.events * subscribers as u64;
    let received = from_stamp.len() as u64;
    let lat = Summary::of(&mut from_stamp);
    let post = Summary::of(&mut after_commit);
    let bare_s = Summary::of(&mut bare_stamp);
    if complete < subscribers || received < expected {
        note(format!(
            "events: {subscribers} subscribers: only {complete} complete, {received} of {expected} events received before the deadline"
        ));
    }
    let common = |f: Figure| {
        f.param("subscribers", subscribers)
            .num("rate_target", sizes.rate)
            .num("rate_achieved", generated.rate)
            .num("events_per_commit", generated.per_commit)
            .num("commit_p50_ms", generated.commit.p50 / 1e3)
            .num("commit_p99_ms", generated.commit.p99 / 1e3)
            .num("measured_s", sizes.measure.as_secs_f64())
            .param("received", format!("{received}/{expected}"))
            .param(
                "log_fallbacks",
                fallbacks.map_or_else(|| "n/a".to_owned(), |n| format!("{n}")),
            )
    };
    let p50 = common(Figure::new("events.latency_p50", lat.p50 / 1e3, "ms"))
        .num("after_commit_p50_ms", post.p50 / 1e3)
        .num("bare_p50_ms", bare_s.p50 / 1e3)
        .param("bare_complete", bare.complete);
    let mut p99 = common(Figure::new("events.latency_p99", lat.p99 / 1e3, "ms"))
        .num("after_commit_p99_ms", post.p99 / 1e3)
        .num("max_ms", lat.max / 1e3)
        .num("bare_p99_ms", bare_s.p99 / 1e3);
    let (p99_ms, commit_p99_ms, bare_p99_ms) =
        (lat.p99 / 1e3, generated.commit.p99 / 1e3, bare_s.p99 / 1e3);
    if subscribers == 10 {
        // The latency counts from the stamp before the commit's fsync: the commit is inside.
        p99 = p99
            .param("target_is", "commit_p99+1ms")
            .target(true, commit_p99_ms + GOAL_ABOVE_COMMIT_MS);
    } else if subscribers == 100 {
        let limit = GOAL_VS_BARE * bare_p99_ms;
        p99 = p99
            .param("target_is", "2x_bare_p99_and_no_log_fallback")
            .goal(
                format!("<={}", crate::figure::num(limit)),
                p99_ms <= limit && fallbacks.is_none_or(|n| n == 0.0),
            );
    }
    p50.emit();
    p99.emit();
    Ok(vec![p50, p99])
}

struct Generated {
    events: u64,
    rate: f64,
    per_commit: f64,
    /// Commit durations, µs.
    commit: Summary,
    /// (last sequence of a commit, µs since the epoch when `Store::write` returned), in order.
    done: Vec<(u64, f64)>,
}

impl Generated {
    /// Receipt time minus the return of the commit that carried the event, µs (0 if the
    /// receiver was woken before the writer returned).
    fn after_commit_us(&self, r: &Receipt) -> f64 {
        let i = self.done.partition_point(|(last, _)| *last < r.seq);
        self.done
            .get(i)
            .map_or(f64::NAN, |(_, at)| (r.at_us - at).max(0.0))
    }
}

/// Commits events at `rate` per second on this (blocking) thread, each commit carrying every
/// event due by then (up to `max_per_commit`), and opens the window once the warm-up has
/// passed.
fn generate(
    store: &Arc<Store>,
    window: &Window,
    sizes: &Sizes,
    epoch: Instant,
) -> Result<Generated> {
    let template = workload::progress_event(
        "01J0BENCH00000000000000000",
        "01J0BENCHBATCH0000000000000",
        1,
    );
    let total = sizes.warmup + sizes.measure;
    let start = Instant::now();
    let mut sent: u64 = 0;
    let mut commits = Vec::new();
    let mut done = Vec::new();
    let mut measure_start: Option<(Instant, u64)> = None;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= total {
            break;
        }
        if measure_start.is_none() && elapsed >= sizes.warmup {
            window
                .from
                .store(store.last_sequence() + 1, Ordering::SeqCst);
            measure_start = Some((Instant::now(), sent));
        }
        let due = (elapsed.as_secs_f64() * sizes.rate) as u64;
        if due <= sent {
            // Sleep until the next event is due.
            let next = Duration::from_secs_f64((sent + 1) as f64 / sizes.rate);
            std::thread::sleep(next.saturating_sub(elapsed));
            continue;
        }
        let k = (due - sent).min(sizes.max_per_commit.max(1) as u64);
        let batch = template.clone();
        let t0 = Instant::now();
        store.write(move |w| {
            for _ in 0..k {
                w.append(batch.clone());
            }
            Ok(())
        })?;
        if measure_start.is_some() {
            commits.push(t0.elapsed().as_secs_f64() * 1e6);
            done.push((store.last_sequence(), epoch.elapsed().as_secs_f64() * 1e6));
        }
        sent += k;
    }
    let last = store.last_sequence();
    window.to.store(last, Ordering::SeqCst);
    let first = window.from.load(Ordering::SeqCst);
    let events = (last + 1).saturating_sub(first);
    let took = measure_start.map_or(Duration::ZERO, |(s, _)| s.elapsed());
    let n_commits = commits.len().max(1);
    Ok(Generated {
        events,
        rate: events as f64 / took.as_secs_f64(),
        per_commit: events as f64 / n_commits as f64,
        commit: Summary::of(&mut commits),
        done,
    })
}
