//! The dispatcher: matches waiting steps to free devices ([`Board::decide`]) and starts one
//! runner per experiment it grants.

use tracing::warn;

use super::{MAX_ROUND_SAMPLES, Scheduler, Start};

impl Scheduler {
    pub(super) async fn dispatch(self) {
        let mut storage = self.inner.store.health();
        loop {
            if self.inner.stop.is_cancelled() {
                return;
            }
            // Nothing starts while the store cannot record it: the grant would only be given
            // back. The dispatcher wakes again when the store recovers.
            let writable = storage.borrow_and_update().is_none();
            let starts = if !writable {
                Vec::new()
            } else {
                let mut b = self.lock();
                let t0 = std::time::Instant::now();
                let plan = b.decide(&self.inner.devices);
                let took = t0.elapsed();
                let mut starts = Vec::new();
                for a in &plan {
                    if b.grant(a, || self.inner.stop.child_token()) && a.starts {
                        starts.push(a.clone());
                    }
                }
                drop(b);
                if let Ok(mut s) = self.inner.stats.lock() {
                    s.rounds += 1;
                    s.grants += plan.len() as u64;
                    s.decide_total += took;
                    if !plan.is_empty() && s.granting_rounds.len() < MAX_ROUND_SAMPLES {
                        s.granting_rounds.push((took, plan.len()));
                    }
                }
                starts
            };
            for a in starts {
                self.spawn_runner(a.experiment_id, Start::Granted(a.device_id));
            }
            tokio::select! {
                _ = self.inner.wake.notified() => {}
                _ = self.inner.devices.changed().notified() => {}
                r = storage.changed() => if r.is_err() { return },
                _ = self.inner.stop.cancelled() => return,
            }
        }
    }

    pub(super) fn spawn_runner(&self, id: String, start: Start) {
        let this = self.clone();
        self.inner.runners.spawn(async move {
            let token = this.lock().running.get(&id).map(|r| r.token.clone());
            if let Some(token) = token
                && let Err(e) = this.drive(&id, start, &token).await
            {
                warn!(experiment = %id, error = %e, "experiment bookkeeping failed");
            }
            this.lock().finish(&id);
            this.wake();
        });
    }
}
