//! The fleet queue: experiments from `PPU_WORK` into this lab, exactly once.
//!
//! A message is taken in four steps, each safe to repeat after a crash: (1) committed locally
//! HELD, with its `Nats-Msg-Id` as idempotency key and label `fleet.msg_id` (a redelivery to
//! this lab finds the same batch); (2) claimed in `PPU_CLAIMS` with a create-only put of the
//! lab id; (3) released (or, when another lab holds the claim, cancelled "taken by lab X");
//! (4) acknowledged (a double ack: the server confirms it). A crash between any two leaves the
//! experiment held and unclaimed here and the message unacknowledged: on restart the held
//! experiment is claimed before it may start, and the message, redelivered after its ack wait
//! to whichever lab, meets the claim.
//!
//! The store setting `fleet.claimed.<experiment id>` marks a claim settled, so a hold a
//! technician puts on a claimed fleet experiment is never taken for a pending claim.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{self, PullConsumer};
use async_nats::jetstream::kv::CreateErrorKind;
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::{self, Message};
use futures_util::{FutureExt, StreamExt};
use ppu_proto::v1 as pb;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::jetstream::{Objects, WORK_PREFIX, WORK_SUBJECTS};
use super::registry::{capacity, lab_capabilities};
use super::{BATCH_LABEL, Backoff, FleetSettings, MSG_ID_LABEL, PRINCIPAL};
use crate::error::{Error, RejectionKind};
use crate::scheduler::Scheduler;
use crate::state::State;

/// The reason a fleet experiment is held until its claim is settled.
pub const CLAIM_HOLD_REASON: &str = "fleet: waiting for this lab's claim";
/// Store setting prefix marking an experiment's claim settled.
const CLAIMED_PREFIX: &str = "fleet.claimed.";
/// How often the subjects in use are looked up again.
const REFRESH: Duration = Duration::from_millis(500);
/// Idle wait between rounds that found no work.
const IDLE: Duration = Duration::from_millis(250);
/// Longest wait for the answer to a no-wait fetch (normally a few ms).
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a consumer waits for an unacknowledged message before redelivering it.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Most unacknowledged messages per consumer (all labs together).
const MAX_ACK_PENDING: i64 = 1024;
/// Deliveries before a refusal only this lab's state explains (a device in maintenance) is
/// final: until then the message is left to other labs.
const PRECONDITION_DELIVERIES: i64 = 3;

/// A fleet experiment this lab committed, with its work message id.
#[derive(Debug, Clone)]
struct Local {
    experiment: String,
    msg_id: String,
}

struct Work {
    js: jetstream::Context,
    objects: Objects,
    settings: Arc<FleetSettings>,
    scheduler: Scheduler,
    /// Fleet experiments committed here, by id (terminal ones pruned as seen).
    known: HashMap<String, String>,
    /// Committed experiments whose claim is not settled yet.
    pending: Vec<Local>,
    /// Bound consumers by subject.
    consumers: BTreeMap<String, PullConsumer>,
    /// Subjects with messages waiting, as last looked up.
    waiting: Vec<String>,
    /// Where the next round starts in `waiting`, so every subject gets its turn.
    next_subject: usize,
    refreshed: Option<Instant>,
    /// A plain subscription to the work subjects: each publish rings it, so an idle lab looks
    /// at once instead of at its next poll. Only a hint (it may be refused by the account's
    /// permissions, or miss a message while reconnecting): the polls stay the ground truth.
    doorbell: Option<async_nats::Subscriber>,
}

pub(super) async fn run(
    js: jetstream::Context,
    objects: Objects,
    settings: Arc<FleetSettings>,
    scheduler: Scheduler,
    stop: CancellationToken,
) {
    let mut work = Work {
        js,
        objects,
        settings,
        scheduler,
        known: HashMap::new(),
        pending: Vec::new(),
        consumers: BTreeMap::new(),
        waiting: Vec::new(),
        next_subject: 0,
        refreshed: None,
        doorbell: None,
    };
    match work.js.client().subscribe(WORK_SUBJECTS).await {
        Ok(sub) => work.doorbell = Some(sub),
        Err(e) => info!(error = %e, "fleet work: no doorbell on new work; polling only"),
    }
    let mut backoff = Backoff::default();
    if let Err(e) = work.load().await {
        warn!(error = %e, "fleet work: cannot read the fleet experiments; not taking work");
        return;
    }
    while !stop.is_cancelled() {
        match work.round(&stop).await {
            Ok(true) => backoff.reset(),
            Ok(false) => {
                let rung = async {
                    match work.doorbell.as_mut() {
                        Some(d) => d.next().await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(IDLE) => {}
                    Some(_) = rung => work.refreshed = None,
                }
            }
            Err(e) => {
                warn!(error = %e, "fleet work: paused; retrying");
                if !backoff.wait(&stop).await {
                    break;
                }
            }
        }
    }
}

impl Work {
    /// Finds the fleet experiments in the store: the QUEUED/RUNNING ones count against the
    /// capacity; held ones without a settled claim are pending.
    async fn load(&mut self) -> Result<(), String> {
        let store = self.scheduler.store().clone();
        let found = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for e in store.experiments_in(&[State::Queued, State::Running])? {
                let Some(msg_id) = e
                    .spec
                    .as_ref()
                    .and_then(|s| s.labels.get(MSG_ID_LABEL))
                    .cloned()
                else {
                    continue;
                };
                let settled = store
                    .setting(&format!("{CLAIMED_PREFIX}{}", e.id))?
                    .is_some();
                out.push((e.id.clone(), msg_id, e.held, settled));
            }
            Ok::<_, crate::store::StoreError>(out)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        for (id, msg_id, held, settled) in found {
            self.known.insert(id.clone(), msg_id.clone());
            if !settled {
                if held {
                    self.pending.push(Local {
                        experiment: id,
                        msg_id,
                    });
                } else {
                    // Released before the marker was written: the claim was ours.
                    self.mark_settled(&id).await?;
                }
            }
        }
        if !self.pending.is_empty() {
            info!(
                count = self.pending.len(),
                "fleet work: committed experiments wait for their claim"
            );
        }
        Ok(())
    }

    /// Fleet experiments QUEUED or RUNNING here.
    fn active(&mut self) -> usize {
        let live: HashSet<String> = self
            .scheduler
            .queued_ids()
            .into_iter()
            .chain(self.scheduler.running_ids())
            .collect();
        self.known.retain(|id, _| live.contains(id));
        self.known.len()
    }

    /// One round: settle pending claims, refresh the bound consumers, take at most one
    /// message. True if it did something.
    async fn round(&mut self, stop: &CancellationToken) -> Result<bool, String> {
        // Rings that came while busy are stale: this round looks anyway. Draining them keeps
        // the subscription's buffer (whole work messages) from growing while the lab is full.
        if let Some(d) = self.doorbell.as_mut() {
            while let Some(Some(_)) = d.next().now_or_never() {}
        }
        self.settle_pending().await?;
        // While full, no look at the work stream: a burst of publishes rings the doorbell for
        // each, and each look is a stream info request. Once there is room the next round
        // looks (at once if a ring came meanwhile: `refreshed` was cleared).
        if self.active() >= capacity(&self.settings, &self.scheduler) {
            return Ok(false);
        }
        if self.refreshed.is_none_or(|t| t.elapsed() >= REFRESH) {
            self.refresh().await?;
        }
        // Round-robin over the subjects: starting from the same one each round would take
        // every message of the first before any of the last (a weighing-only subject sorted
        // after the furnace ones waited for them all).
        let subjects = self.waiting.clone();
        let n = subjects.len();
        for k in 0..n {
            let i = (self.next_subject + k) % n;
            let subject = &subjects[i];
            if stop.is_cancelled() {
                return Ok(false);
            }
            let Some(consumer) = self.consumers.get(subject).cloned() else {
                continue;
            };
            // A no-wait fetch has no client-side timer: a pull request or its answer lost in
            // the cluster (a node dying, a route not yet knowing the reply inbox) would leave
            // this lab waiting forever, taking no work. Bounded here; the next round asks again.
            let fetched = tokio::time::timeout(FETCH_TIMEOUT, async {
                let mut batch = consumer.fetch().max_messages(1).messages().await?;
                batch.next().await.transpose()
            })
            .await
            .map_err(|_| format!("fetch from {subject}: no answer in {FETCH_TIMEOUT:?}"))?
            .map_err(|e| format!("fetch from {subject}: {e}"))?;
            if let Some(msg) = fetched {
                self.next_subject = i + 1;
                self.take(msg).await?;
                // Look again at once: there may be more.
                return Ok(true);
            }
        }
        // Nothing found where messages were seen (another lab took them): look again next
        // round. With none seen, the next look is after REFRESH.
        if !self.waiting.is_empty() {
            self.refreshed = None;
        }
        Ok(false)
    }

    /// Looks up the work subjects with messages waiting and binds the consumer of each one
    /// this lab has every capability for.
    async fn refresh(&mut self) -> Result<(), String> {
        let mine: HashSet<String> = lab_capabilities(&self.scheduler).into_iter().collect();
        let mut info = self
            .objects
            .work
            .info_with_subjects(WORK_SUBJECTS)
            .await
            .map_err(|e| format!("work stream info: {e}"))?;
        let mut waiting = Vec::new();
        while let Some(item) = info.next().await {
            let (subject, count) = item.map_err(|e| format!("work stream subjects: {e}"))?;
            if count == 0 {
                continue;
            }
            let Some(caps) = subject.strip_prefix(WORK_PREFIX) else {
                continue;
            };
            if caps.split('-').all(|c| mine.contains(c)) {
                waiting.push(subject);
            }
        }
        waiting.sort();
        for subject in &waiting {
            if !self.consumers.contains_key(subject) {
                let consumer = self.bind(subject).await?;
                self.consumers.insert(subject.clone(), consumer);
            }
        }
        self.waiting = waiting;
        self.refreshed = Some(Instant::now());
        Ok(())
    }

    /// The shared durable consumer of `subject`, created if it does not exist yet.
    async fn bind(&self, subject: &str) -> Result<PullConsumer, String> {
        let name = consumer_name(subject);
        self.objects
            .work
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    filter_subject: subject.to_owned(),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: MAX_ACK_PENDING,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("consumer {name}: {e}"))
    }

    /// Takes one work message: validate, commit held, claim, release, ack; or refuse.
    async fn take(&mut self, msg: Message) -> Result<(), String> {
        let header = |name: &str| {
            msg.headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let batch = header("Ppu-Batch").unwrap_or_default();
        let Some(msg_id) = header("Nats-Msg-Id").filter(|m| !m.is_empty()) else {
            let id = msg
                .info()
                .map(|i| format!("{}#{}", i.stream, i.stream_sequence))
                .unwrap_or_default();
            return self
                .refuse(&msg, &id, &batch, "Nats-Msg-Id", "the work message has no Nats-Msg-Id header (the planner's unique id: the lab's idempotency key)")
                .await;
        };
        if !valid_key(&msg_id) {
            return self
                .refuse(&msg, &msg_id, &batch, "Nats-Msg-Id", "not a valid claim key (letters, digits, '-', '_', '=', '/', '.'; at most 128 characters)")
                .await;
        }
        let mut spec = match pb::ExperimentSpec::decode(msg.payload.clone()) {
            Ok(s) => s,
            Err(e) => {
                return self
                    .refuse(
                        &msg,
                        &msg_id,
                        &batch,
                        "payload",
                        &format!("not a ppu.v1.ExperimentSpec: {e}"),
                    )
                    .await;
            }
        };
        // Taken by another lab already (a redelivery after its ack was lost): nothing to do.
        if let Some(owner) = self.claim_owner(&msg_id).await?
            && owner != self.settings.lab
            && self
                .scheduler
                .store()
                .find_idempotency_key(&msg_id)
                .map_err(|e| e.to_string())?
                .is_none()
        {
            info!(msg_id, owner, "fleet work: already taken by another lab");
            return ack(&msg).await;
        }
        spec.labels.insert(MSG_ID_LABEL.to_owned(), msg_id.clone());
        if !batch.is_empty() {
            spec.labels.insert(BATCH_LABEL.to_owned(), batch.clone());
        }
        let req = pb::SubmitBatchRequest {
            idempotency_key: msg_id.clone(),
            experiments: vec![spec],
        };
        let submitted = self
            .scheduler
            .submit_held_as(req, PRINCIPAL, CLAIM_HOLD_REASON)
            .await;
        let experiment = match submitted {
            Ok((b, _)) => match b.experiment_ids.first() {
                Some(id) => id.clone(),
                None => return Err(format!("batch {} for {msg_id} has no experiment", b.id)),
            },
            Err(Error::Refused(r)) => {
                let field = r
                    .field
                    .strip_prefix("experiments[0].")
                    .or_else(|| r.field.strip_prefix("experiments[0]"))
                    .unwrap_or(&r.field)
                    .to_owned();
                if r.kind == RejectionKind::Precondition
                    && msg.info().map(|i| i.delivered).unwrap_or(1) < PRECONDITION_DELIVERIES
                {
                    // Perhaps only this lab cannot run it now: let another lab try first.
                    info!(msg_id, field, reason = %r.reason, "fleet work: cannot run it now; left to other labs");
                    return nak(&msg, Duration::from_secs(1)).await;
                }
                return self.refuse(&msg, &msg_id, &batch, &field, &r.reason).await;
            }
            Err(Error::Conflict(reason)) => {
                return self
                    .refuse(&msg, &msg_id, &batch, "Nats-Msg-Id", &reason)
                    .await;
            }
            Err(e) => {
                // The store or the daemon cannot take it now: redelivered later.
                let _ = nak(&msg, Duration::from_secs(5)).await;
                return Err(format!("committing {msg_id}: {e}"));
            }
        };
        self.known.insert(experiment.clone(), msg_id.clone());
        let local = Local { experiment, msg_id };
        if let Err(e) = self.settle(&local).await {
            // Stays held and pending; the message is redelivered after its ack wait.
            self.pending.push(local);
            return Err(e);
        }
        crate::metrics::fleet_work(true);
        ack(&msg).await
    }

    /// Retries the claims not settled yet.
    async fn settle_pending(&mut self) -> Result<(), String> {
        while let Some(local) = self.pending.pop() {
            if let Err(e) = self.settle(&local).await {
                self.pending.push(local);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Claims `local`'s message for this lab; releases the experiment if the claim is ours,
    /// cancels it if another lab's.
    async fn settle(&self, local: &Local) -> Result<(), String> {
        let lab = &self.settings.lab;
        let owner = match self
            .objects
            .claims
            .create(&local.msg_id, lab.clone().into_bytes().into())
            .await
        {
            Ok(_) => lab.clone(),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => self
                .claim_owner(&local.msg_id)
                .await?
                .ok_or_else(|| format!("claim {} exists but cannot be read", local.msg_id))?,
            Err(e) => return Err(format!("claiming {}: {e}", local.msg_id)),
        };
        let id = &local.experiment;
        if &owner == lab {
            match self
                .scheduler
                .set_held(id, false, format!("claimed by lab {lab}"))
                .await
            {
                Ok(_) => {}
                // No longer QUEUED (cancelled meanwhile): nothing to release.
                Err(Error::Refused(_)) => {}
                Err(e) => return Err(format!("releasing {id}: {e}")),
            }
            info!(experiment = %id, msg_id = %local.msg_id, "fleet work: taken");
        } else {
            match self
                .scheduler
                .cancel(id, format!("taken by lab {owner}"), false)
                .await
            {
                Ok(_) | Err(Error::Refused(_)) => {}
                Err(e) => return Err(format!("cancelling {id}: {e}")),
            }
            info!(experiment = %id, msg_id = %local.msg_id, %owner, "fleet work: taken by another lab; cancelled here");
        }
        self.mark_settled(id).await
    }

    async fn mark_settled(&self, id: &str) -> Result<(), String> {
        let key = format!("{CLAIMED_PREFIX}{id}");
        self.scheduler
            .store()
            .write_async(move |w| w.put_setting(&key, b"1"))
            .await
            .map(drop)
            .map_err(|e| format!("recording the claim of {}: {e}", id))
    }

    /// The lab holding the claim on `msg_id`, if any.
    async fn claim_owner(&self, msg_id: &str) -> Result<Option<String>, String> {
        let v: Option<bytes::Bytes> = self
            .objects
            .claims
            .get(msg_id)
            .await
            .map_err(|e| format!("reading claim {msg_id}: {e}"))?;
        Ok(v.map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// Terminates the message and publishes why to `ppu.<lab>.refused`.
    async fn refuse(
        &self,
        msg: &Message,
        msg_id: &str,
        batch: &str,
        field: &str,
        reason: &str,
    ) -> Result<(), String> {
        let lab = &self.settings.lab;
        warn!(msg_id, field, reason, "fleet work: refused");
        let body = serde_json::json!({
            "msg_id": msg_id,
            "batch_id": batch,
            "lab": lab,
            "field": field,
            "reason": reason,
        });
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("{lab}:refused:{msg_id}").as_str());
        headers.insert("Ppu-Lab", lab.as_str());
        let publish = jetstream::message::PublishMessage::build()
            .payload(body.to_string().into_bytes().into())
            .headers(headers);
        self.js
            .send_publish(format!("ppu.{lab}.refused"), publish)
            .await
            .map_err(|e| format!("publishing the refusal of {msg_id}: {e}"))?
            .await
            .map_err(|e| format!("publishing the refusal of {msg_id}: {e}"))?;
        msg.ack_with(AckKind::Term)
            .await
            .map_err(|e| format!("terminating {msg_id}: {e}"))?;
        crate::metrics::fleet_work(false);
        Ok(())
    }
}

/// The durable consumer name of a work subject: `work_<caps>`.
pub fn consumer_name(subject: &str) -> String {
    format!(
        "work_{}",
        subject.strip_prefix(WORK_PREFIX).unwrap_or(subject)
    )
}

/// Whether `key` is usable as a KV key (NATS: `[-/_=.a-zA-Z0-9]+`, not starting or ending
/// with '.').
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 128
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-/_=.".contains(c))
}

async fn ack(msg: &Message) -> Result<(), String> {
    msg.double_ack()
        .await
        .map_err(|e| format!("acknowledging: {e}"))
}

async fn nak(msg: &Message, delay: Duration) -> Result<(), String> {
    msg.ack_with(AckKind::Nak(Some(delay)))
        .await
        .map_err(|e| format!("nak: {e}"))
}
