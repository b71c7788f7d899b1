//! Submission: a batch is validated (safety, maintenance), made idempotent by its key and
//! content hash, stored with its events in one commit, then enqueued.

use prost::Message;
use sha2::{Digest, Sha256};

use pb::event::Kind;
use ppu_proto::v1 as pb;
use tracing::info;

use crate::error::{Error, Rejection, RejectionKind};
use crate::safety;
use crate::state::State;
use crate::store::now_timestamp;

use super::Scheduler;

impl Scheduler {
    /// Validates, stores and enqueues a batch; see `SubmitBatch` in the API.
    pub async fn submit(&self, req: pb::SubmitBatchRequest) -> Result<(pb::Batch, bool), Error> {
        self.submit_as(req, "").await
    }

    /// [`Scheduler::submit`] on behalf of `principal`, stored as the batch's `submitted_by`.
    pub async fn submit_as(
        &self,
        req: pb::SubmitBatchRequest,
        principal: &str,
    ) -> Result<(pb::Batch, bool), Error> {
        self.submit_inner(req, principal, None).await
    }

    /// [`Scheduler::submit_as`] with every new experiment HELD from its first commit (an
    /// `ExperimentHeld` event with `hold_reason` follows its QUEUED one), so it cannot start
    /// until released ([`Scheduler::set_held`]): the fleet commits work before it may claim it.
    /// A repeated key returns the existing batch as it is.
    pub async fn submit_held_as(
        &self,
        req: pb::SubmitBatchRequest,
        principal: &str,
        hold_reason: &str,
    ) -> Result<(pb::Batch, bool), Error> {
        self.submit_inner(req, principal, Some(hold_reason.to_owned()))
            .await
    }

    async fn submit_inner(
        &self,
        req: pb::SubmitBatchRequest,
        principal: &str,
        hold: Option<String>,
    ) -> Result<(pb::Batch, bool), Error> {
        // Checked once here; each experiment's first command is carried to the queue.
        let commands = safety::check_batch(&req, &self.inner.devices)?;
        let hash = content_hash(&req.experiments);
        if let Some(found) = self.existing_batch(&req.idempotency_key, &hash)? {
            return Ok((found, true));
        }
        self.check_maintenance(&req)?;
        let batch_id = self.next_id()?;
        let mut experiments = Vec::with_capacity(req.experiments.len());
        let now = now_timestamp();
        for spec in req.experiments {
            experiments.push(pb::Experiment {
                id: self.next_id()?,
                batch_id: batch_id.clone(),
                spec: Some(spec),
                state: State::Queued.to_proto() as i32,
                held: hold.is_some(),
                created_at: Some(now),
                updated_at: Some(now),
                ..Default::default()
            });
        }
        let ranks: Vec<i64> = {
            let mut b = self.lock();
            experiments.iter().map(|_| b.queue.alloc_rank()).collect()
        };
        let batch = pb::Batch {
            id: batch_id,
            idempotency_key: req.idempotency_key.clone(),
            experiment_ids: experiments.iter().map(|e| e.id.clone()).collect(),
            created_at: Some(now),
            submitted_by: principal.to_owned(),
        };
        let key = req.idempotency_key;
        let (stored, _) = self
            .inner
            .store
            .write_async(move |w| {
                // A concurrent submission with the same key may have won the race.
                if let Some((id, _)) = w.find_idempotency_key(&key)? {
                    return Ok(Err(id));
                }
                for (e, rank) in experiments.iter().zip(&ranks) {
                    w.put_experiment(e)?;
                    w.set_rank(&e.id, *rank)?;
                    w.emit(
                        &e.id,
                        &e.batch_id,
                        "",
                        Kind::ExperimentStateChanged(pb::ExperimentStateChanged {
                            from: pb::ExperimentState::Unspecified as i32,
                            to: pb::ExperimentState::Queued as i32,
                            reason: String::new(),
                        }),
                    );
                    if let Some(reason) = &hold {
                        w.emit(
                            &e.id,
                            &e.batch_id,
                            "",
                            Kind::ExperimentHeld(pb::ExperimentHeld {
                                held: true,
                                reason: reason.clone(),
                            }),
                        );
                    }
                }
                w.put_batch(&batch, &hash)?;
                Ok(Ok((batch, experiments, ranks)))
            })
            .await?;
        match stored {
            Ok((batch, experiments, ranks)) => {
                {
                    let mut b = self.lock();
                    for ((e, rank), first) in experiments.iter().zip(ranks).zip(commands) {
                        b.enqueue_with(e, rank, Some(first));
                    }
                }
                info!(batch = %batch.id, experiments = experiments.len(), "batch accepted");
                self.wake();
                Ok((batch, false))
            }
            Err(id) => {
                let b = self
                    .inner
                    .store
                    .get_batch(&id)?
                    .ok_or_else(|| Error::Internal("batch vanished".into()))?;
                Ok((b, true))
            }
        }
    }

    fn existing_batch(&self, key: &str, hash: &str) -> Result<Option<pb::Batch>, Error> {
        let Some((id, stored_hash)) = self.inner.store.find_idempotency_key(key)? else {
            return Ok(None);
        };
        if stored_hash != hash {
            return Err(Error::Conflict(format!(
                "idempotency_key: \"{key}\" was already used for a batch with different content (batch {id})"
            )));
        }
        Ok(self.inner.store.get_batch(&id)?)
    }

    /// A step pinned to a device in maintenance could never be reserved: refuse it now.
    fn check_maintenance(&self, req: &pb::SubmitBatchRequest) -> Result<(), Rejection> {
        for (i, e) in req.experiments.iter().enumerate() {
            for (j, s) in e.steps.iter().enumerate() {
                if s.device_id.is_empty() {
                    continue;
                }
                if let Some(reason) = self
                    .inner
                    .devices
                    .get(&s.device_id)
                    .and_then(|d| d.maintenance())
                {
                    return Err(Rejection {
                        kind: RejectionKind::Precondition,
                        field: format!("experiments[{i}].steps[{j}].device_id"),
                        reason: format!(
                            "device \"{}\" is in maintenance ({reason}) and takes no new reservations",
                            s.device_id
                        ),
                    });
                }
            }
        }
        Ok(())
    }
}

/// The hash an idempotency key is bound to: the same key with other content is a conflict.
fn content_hash(experiments: &[pb::ExperimentSpec]) -> String {
    let mut h = Sha256::new();
    for e in experiments {
        h.update(e.encode_length_delimited_to_vec());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
