//! Sample transfers between devices: listing and confirming them (the API side), and the
//! runner's wait for a confirmation.

use pb::event::Kind;
use ppu_proto::v1 as pb;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::error::{Error, Rejection, RejectionKind};
use crate::state::StepPhase;
use crate::store::{StoreError, now_timestamp};

use super::{Outcome, Scheduler};

impl Scheduler {
    /// Transfers waiting for confirmation.
    pub fn list_transfers(&self) -> Result<Vec<pb::PendingTransfer>, Error> {
        Ok(self.inner.store.transfers()?)
    }

    /// Confirms a transfer: the sample is now on its destination device and the experiment's
    /// TRANSFER step completes. The one path for operators, robots and the simulated lab.
    pub async fn confirm_transfer(
        &self,
        transfer_id: &str,
        confirmed_by: &str,
    ) -> Result<pb::PendingTransfer, Error> {
        let (tid, by) = (transfer_id.to_owned(), confirmed_by.to_owned());
        let (outcome, _) = self
            .inner
            .store
            .write_async(move |w| {
                let Some(p) = w.take_transfer(&tid)? else {
                    return Ok(Outcome::Refused(Rejection {
                        kind: RejectionKind::NotFound,
                        field: "transfer_id".into(),
                        reason: format!("no pending transfer \"{tid}\""),
                    }));
                };
                let Some(mut e) = w.get_experiment(&p.experiment_id)? else {
                    return Err(StoreError::Corrupt {
                        table: "transfers",
                        reason: format!("transfer {tid} names unknown experiment"),
                    });
                };
                let now = now_timestamp();
                let result = pb::StepResult {
                    step_index: p.step_index,
                    device_id: p.to_device_id.clone(),
                    outcome: pb::StepOutcome::Succeeded as i32,
                    started_at: p.requested_at,
                    finished_at: Some(now),
                    result: Some(pb::step_result::Result::Transfer(pb::TransferResult {
                        confirmed_by: by.clone(),
                    })),
                    ..Default::default()
                };
                e.results.push(result.clone());
                e.current_step = p.step_index + 1;
                e.updated_at = Some(now);
                w.put_experiment(&e)?;
                w.set_custody(&p.sample_id, Some(&p.to_device_id))?;
                w.emit(
                    &e.id,
                    &e.batch_id,
                    &p.to_device_id,
                    Kind::TransferConfirmed(pb::TransferConfirmed {
                        transfer: Some(p.clone()),
                        confirmed_by: by,
                    }),
                );
                w.emit(
                    &e.id,
                    &e.batch_id,
                    &p.to_device_id,
                    Kind::StepFinished(pb::StepFinished {
                        result: Some(result),
                    }),
                );
                Ok(Outcome::Done(p))
            })
            .await?;
        match outcome {
            Outcome::Refused(r) => Err(r.into()),
            Outcome::Done(p) => {
                let mut b = self.lock();
                b.place(&p.sample_id, &p.to_device_id);
                if let Some(signal) = b
                    .running
                    .get_mut(&p.experiment_id)
                    .and_then(|r| r.transfer.take())
                {
                    let _ = signal.send(());
                }
                info!(transfer = %p.id, sample = %p.sample_id, to = %p.to_device_id, "transfer confirmed");
                Ok(p)
            }
        }
    }

    /// Registers where a confirmation of this experiment's next transfer is signalled. Done
    /// before the transfer is committed, so a confirmation can never arrive unheard.
    pub(super) fn arm_transfer(&self, id: &str) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if let Some(r) = self.lock().running.get_mut(id) {
            r.transfer = Some(tx);
        }
        rx
    }

    /// Waits for the pending transfer's confirmation; false if stopped first.
    pub(super) async fn wait_transfer(
        &self,
        id: &str,
        signal: oneshot::Receiver<()>,
        token: &CancellationToken,
    ) -> bool {
        self.advance(id, StepPhase::Transferring);
        let confirmed = tokio::select! {
            r = signal => r.is_ok(),
            _ = token.cancelled() => false,
        };
        if confirmed {
            self.advance(id, StepPhase::Reserved);
        }
        confirmed
    }
}
