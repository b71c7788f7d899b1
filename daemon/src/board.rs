//! The scheduler's board: the in-memory picture of who waits for what and who holds which
//! device, and the dispatch decision that matches waiting steps to free devices.
//!
//! It holds the queue (QUEUED experiments in start order, held ones included), every RUNNING
//! experiment with the phase of its current step ([`StepPhase`]), device reservations, and
//! sample custody (which device holds which sample). The store is the truth: the board is
//! rebuilt from it at start-up and changed only after the transaction that records a change
//! has committed — except a grant, which the board records first so that no device is handed
//! out twice while its holder commits the reservation.
//!
//! [`Board::decide`] is greedy list scheduling over one order: every candidate — a RUNNING
//! experiment waiting for its next step's device, or a QUEUED experiment that is not held —
//! in start order (priority, rank, id), each taking the first free device that fits its step.
//! So higher priority goes first, equal priorities go first come first served, and a candidate
//! whose device is busy does not block the ones behind it from using other devices (which is
//! what pipelines a lab). Nothing is granted while the queue is paused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use ppu_proto::v1 as pb;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::command::{self, Resolved};
use crate::devices::{DeviceHandle, Devices};
use crate::queue::{OrderKey, QueueIndex};
use crate::safety::FirstStep;
use crate::state::{IllegalPhase, StepPhase};

/// What device a step needs.
#[derive(Debug, Clone, PartialEq)]
pub enum Need {
    /// This device and no other (a pinned step, or a transfer's destination).
    Device(String),
    /// Any device with the capability whose driver accepts the command. Shared: queued
    /// experiments with the same step (a campaign's recipe) hold one copy.
    Any(Arc<FirstStep>),
}

impl Need {
    /// The need of `step`; `Err` names the problem if the step is not runnable at all.
    pub fn of(step: &pb::Step, path: &str) -> Result<Need, String> {
        if let Some(pb::step::Kind::Transfer(t)) = &step.kind {
            return Ok(Need::Device(t.to_device_id.clone()));
        }
        if !step.device_id.is_empty() {
            return Ok(Need::Device(step.device_id.clone()));
        }
        // Checked at submission; resolving only decodes it.
        match command::resolve(crate::schema::schema(), step, path) {
            Ok(Resolved::Command(c)) => Ok(Need::Any(Arc::new((&c).into()))),
            Ok(Resolved::Transfer(t)) => Ok(Need::Device(t.to_device_id)),
            Err(r) => Err(format!("{}: {}", r.field, r.reason)),
        }
    }

    /// The need of the step at `index` of `steps`, the next one an experiment runs; `command`
    /// is that step already resolved and checked (at submission or start-up), so it is not
    /// resolved again.
    pub fn at(
        steps: &[pb::Step],
        index: u32,
        command: Option<Arc<FirstStep>>,
    ) -> Result<Need, String> {
        match (steps.get(index as usize), command) {
            (Some(step), Some(c)) if step.device_id.is_empty() => Ok(Need::Any(c)),
            (Some(step), _) => Need::of(step, &format!("steps[{index}]")),
            (None, _) => Err("the experiment has no step to run".to_owned()),
        }
    }

    /// True if `d` could run the step (ignoring whether it is free or available).
    pub fn fits(&self, d: &DeviceHandle) -> bool {
        match self {
            Need::Device(id) => d.id() == id,
            Need::Any(c) => d.has(c.capability) && d.driver.check(&c.step).is_ok(),
        }
    }
}

/// Why a running experiment is being stopped.
#[derive(Debug, Clone, PartialEq)]
pub enum StopReason {
    /// Cancelled (CancelExperiment, AbortQueue): the experiment becomes CANCELLED.
    Cancel(String),
    /// The daemon is shutting down.
    Shutdown,
}

/// A QUEUED experiment's entry: only what the dispatch decision reads (the spec, labels and
/// the rest stay in the store until the experiment starts).
#[derive(Debug)]
pub struct Queued {
    /// Its next step's need (`Err`: not runnable; left for a person to cancel).
    pub need: Result<Need, String>,
    /// Sample id; empty if it names none.
    pub sample: Box<str>,
    pub held: bool,
}

/// A RUNNING experiment's entry.
#[derive(Debug)]
pub struct Running {
    pub key: OrderKey,
    pub sample: String,
    pub phase: StepPhase,
    /// Index of the step the phase refers to.
    pub step_index: u32,
    /// What the current step needs, while `Waiting`.
    pub need: Option<Need>,
    /// Where the grant goes, while `Waiting`.
    pub grant: Option<oneshot::Sender<String>>,
    /// The device reserved, from `Reserved` until `Released`.
    pub device: Option<String>,
    /// Cancelled to stop the experiment now.
    pub token: CancellationToken,
    pub stop: Option<StopReason>,
    /// Cancel once the current step ends (CancelExperiment with `after_current_step`).
    pub cancel_after: Option<String>,
    /// Signalled when the pending transfer of the current step is confirmed.
    pub transfer: Option<oneshot::Sender<()>>,
}

/// One decision of [`Board::decide`].
#[derive(Debug, Clone, PartialEq)]
pub struct Assignment {
    pub experiment_id: String,
    pub device_id: String,
    /// True if the experiment is QUEUED and this grant starts it.
    pub starts: bool,
}

/// See the module docs.
#[derive(Debug, Default)]
pub struct Board {
    pub queue: QueueIndex,
    pub queued: HashMap<Arc<str>, Queued>,
    pub running: HashMap<String, Running>,
    /// device id → experiment id holding its reservation.
    pub holders: HashMap<String, String>,
    /// sample id → device id holding it.
    custody: HashMap<String, String>,
    /// device id → the sample most recently placed on it that is still there.
    placed: HashMap<String, String>,
    pub paused: bool,
}

impl Board {
    /// Adds a QUEUED experiment.
    pub fn enqueue(&mut self, e: &pb::Experiment, rank: i64) {
        self.enqueue_with(e, rank, None);
    }

    /// [`Board::enqueue`] with the current step's command already resolved and checked (at
    /// submission), so it is not resolved again.
    pub fn enqueue_with(&mut self, e: &pb::Experiment, rank: i64, command: Option<FirstStep>) {
        let (priority, sample, steps) = e.spec.as_ref().map_or((0, "", &[][..]), |s| {
            (s.priority, &*s.sample_id, &s.steps[..])
        });
        self.enqueue_entry(
            OrderKey::new(priority, rank, e.id.as_str()),
            Queued {
                need: Need::at(steps, e.current_step, command.map(Arc::new)),
                sample: sample.into(),
                held: e.held,
            },
        );
    }

    /// Adds a QUEUED experiment's entry under `key`.
    pub fn enqueue_entry(&mut self, key: OrderKey, entry: Queued) {
        self.queued.insert(key.id.clone(), entry);
        self.queue.insert(key);
    }

    /// Drops a QUEUED experiment (cancelled or started).
    pub fn dequeue(&mut self, id: &str) -> Option<(OrderKey, Queued)> {
        let key = self.queue.remove(id)?;
        let q = self.queued.remove(id)?;
        Some((key, q))
    }

    /// Changes the phase of a RUNNING experiment's step; every change goes through here.
    pub fn advance(&mut self, id: &str, to: StepPhase) -> Result<(), IllegalPhase> {
        let Some(r) = self.running.get_mut(id) else {
            return Ok(());
        };
        r.phase = r.phase.advance(to)?;
        Ok(())
    }

    /// Releases whatever device `id` holds and marks its step released.
    pub fn release(&mut self, id: &str) {
        if let Some(r) = self.running.get_mut(id) {
            if let Some(d) = r.device.take()
                && self.holders.get(&d).is_some_and(|h| h == id)
            {
                self.holders.remove(&d);
            }
            if r.phase != StepPhase::Released {
                r.phase = StepPhase::Released;
            }
            r.need = None;
            r.grant = None;
            r.transfer = None;
        }
        self.holders.retain(|_, h| h != id);
    }

    /// Forgets a finished experiment (after [`Board::release`]).
    pub fn finish(&mut self, id: &str) {
        self.release(id);
        self.running.remove(id);
    }

    /// Where `sample` is, as far as the daemon knows.
    pub fn custody(&self, sample: &str) -> Option<&str> {
        self.custody.get(sample).map(String::as_str)
    }

    /// The sample a device holds, if the daemon knows of one.
    pub fn sample_on(&self, device: &str) -> Option<&str> {
        self.placed.get(device).map(String::as_str)
    }

    /// Records that `sample` is now on `device` (after the store committed it).
    pub fn place(&mut self, sample: &str, device: &str) {
        if sample.is_empty() {
            return;
        }
        if let Some(old) = self.custody.insert(sample.to_owned(), device.to_owned())
            && self.placed.get(&old).is_some_and(|s| s == sample)
        {
            self.placed.remove(&old);
        }
        self.placed.insert(device.to_owned(), sample.to_owned());
    }

    /// Samples of RUNNING experiments: a sample is in one place at a time, so a second
    /// experiment on the same sample waits for the first to finish.
    fn samples_in_use(&self) -> HashSet<&str> {
        self.running
            .values()
            .map(|r| r.sample.as_str())
            .filter(|s| !s.is_empty())
            .collect()
    }

    /// Matches waiting steps to free, available devices (see the module docs). Does not change
    /// the board; apply the result with [`Board::grant`].
    pub fn decide(&self, devices: &Devices) -> Vec<Assignment> {
        if self.paused {
            return Vec::new();
        }
        let mut free: Vec<&Arc<DeviceHandle>> = devices
            .all()
            .filter(|d| !self.holders.contains_key(d.id()) && d.is_available())
            .collect();
        if free.is_empty() {
            return Vec::new();
        }
        let mut waiting: Vec<(&OrderKey, &Need)> = self
            .running
            .iter()
            .filter(|(_, r)| r.phase == StepPhase::Waiting && r.grant.is_some())
            .filter_map(|(_, r)| r.need.as_ref().map(|n| (&r.key, n)))
            .collect();
        waiting.sort_by(|a, b| a.0.cmp(b.0));
        let mut samples = self.samples_in_use();
        let mut queued = self.queue.keys().filter_map(|k| {
            let q = self.queued.get(&k.id)?;
            if q.held {
                return None;
            }
            q.need.as_ref().ok().map(|n| (k, n, &*q.sample))
        });
        let mut waiting = waiting.into_iter().peekable();
        let mut next_queued = queued.next();
        let mut out = Vec::new();
        while !free.is_empty() {
            // Merge the two ordered lists: the smaller key goes first.
            let take_running = match (waiting.peek(), &next_queued) {
                (Some((rk, _)), Some((qk, _, _))) => *rk < *qk,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            let (key, need, starts, sample) = if take_running {
                let Some((k, n)) = waiting.next() else { break };
                (k, n, false, "")
            } else {
                let Some((k, n, s)) = next_queued.take() else {
                    break;
                };
                next_queued = queued.next();
                (k, n, true, s)
            };
            if starts && !sample.is_empty() && samples.contains(sample) {
                continue;
            }
            if let Some(pos) = free.iter().position(|d| need.fits(d)) {
                let d = free.swap_remove(pos);
                if starts && !sample.is_empty() {
                    samples.insert(sample);
                }
                out.push(Assignment {
                    experiment_id: key.id.to_string(),
                    device_id: d.id().to_owned(),
                    starts,
                });
            }
        }
        out
    }

    /// Records a grant: the device is held for the experiment. A RUNNING experiment's waiting
    /// runner is told; a QUEUED one moves to `running` in phase `Reserved` and the caller
    /// starts its runner. Returns false if the grant no longer applies.
    pub fn grant(&mut self, a: &Assignment, token: impl FnOnce() -> CancellationToken) -> bool {
        if self.holders.contains_key(&a.device_id) {
            return false;
        }
        if a.starts {
            let Some((key, q)) = self.dequeue(&a.experiment_id) else {
                return false;
            };
            self.running.insert(
                a.experiment_id.clone(),
                Running {
                    key,
                    sample: q.sample.into(),
                    phase: StepPhase::Reserved,
                    step_index: 0,
                    need: None,
                    grant: None,
                    device: Some(a.device_id.clone()),
                    token: token(),
                    stop: None,
                    cancel_after: None,
                    transfer: None,
                },
            );
        } else {
            let Some(r) = self.running.get_mut(&a.experiment_id) else {
                return false;
            };
            let Some(tx) = r.grant.take() else {
                return false;
            };
            if tx.send(a.device_id.clone()).is_err()
                || r.phase.advance(StepPhase::Reserved).is_err()
            {
                return false;
            }
            r.phase = StepPhase::Reserved;
            r.need = None;
            r.device = Some(a.device_id.clone());
        }
        self.holders
            .insert(a.device_id.clone(), a.experiment_id.clone());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_trait::async_trait;
    use ppu_drivers::device::{DeviceInfo, DeviceStatus, Limits};
    use ppu_drivers::{Device, DeviceError, StepCommand, StepContext, StepOutput};

    /// A device that only describes itself: the decision never talks to a device.
    struct Idle(DeviceInfo);

    #[async_trait]
    impl Device for Idle {
        fn info(&self) -> &DeviceInfo {
            &self.0
        }
        fn check(&self, step: &StepCommand) -> Result<(), DeviceError> {
            let cap = crate::schema::capability_of(step).unwrap_or_default();
            if self.0.has(cap) {
                Ok(())
            } else {
                Err(DeviceError::Unsupported(cap.to_owned()))
            }
        }
        async fn execute(
            &self,
            _: &StepCommand,
            _: StepContext,
        ) -> Result<StepOutput, DeviceError> {
            Err(DeviceError::Unsupported("idle".into()))
        }
        async fn status(&self) -> Result<DeviceStatus, DeviceError> {
            Ok(DeviceStatus::default())
        }
        async fn safe_state(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        async fn confirm_safe(&self) -> Result<ppu_drivers::SafeCheck, DeviceError> {
            Ok(ppu_drivers::SafeCheck::Safe)
        }
    }

    fn devices(spec: &[(&str, String)]) -> Devices {
        Devices::new(
            spec.iter()
                .map(|(id, cap)| {
                    Arc::new(Idle(DeviceInfo {
                        id: (*id).into(),
                        family: "furnace".to_owned(),
                        driver: "idle".into(),
                        transport: String::new(),
                        capabilities: vec![cap.clone()],
                        limits: Limits::default(),
                    })) as Arc<dyn Device>
                })
                .collect(),
        )
    }

    fn furnace_step(pin: &str) -> pb::Step {
        pb::Step {
            device_id: pin.into(),
            kind: Some(pb::step::Kind::Furnace(pb::FurnaceProgram {
                segments: vec![pb::FurnaceSegment {
                    kind: Some(pb::furnace_segment::Kind::Hold(pb::Hold {
                        duration_s: 1.0,
                    })),
                }],
            })),
        }
    }

    fn exp(id: &str, priority: i32, sample: &str, step: pb::Step) -> pb::Experiment {
        pb::Experiment {
            id: id.into(),
            spec: Some(pb::ExperimentSpec {
                priority,
                sample_id: sample.into(),
                steps: vec![step],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn grant_all(b: &mut Board, d: &Devices) -> Vec<(String, String)> {
        let a = b.decide(d);
        for x in &a {
            assert!(b.grant(x, CancellationToken::new));
        }
        a.into_iter()
            .map(|x| (x.experiment_id, x.device_id))
            .collect()
    }

    fn pair(e: &str, d: &str) -> (String, String) {
        (e.to_owned(), d.to_owned())
    }

    #[test]
    fn priority_then_fifo_and_no_device_twice() {
        let d = devices(&[
            ("f1", "furnace_program".to_owned()),
            ("f2", "furnace_program".to_owned()),
        ]);
        let mut b = Board::default();
        for (i, (id, p)) in [("a", 0), ("b", 5), ("c", 0), ("d", 5)].iter().enumerate() {
            b.enqueue(&exp(id, *p, "", furnace_step("")), i as i64);
        }
        assert_eq!(grant_all(&mut b, &d), [pair("b", "f1"), pair("d", "f2")]);
        // Both furnaces held: nothing more.
        assert!(b.decide(&d).is_empty());
        b.finish("b");
        assert_eq!(grant_all(&mut b, &d), [pair("a", "f1")]);
    }

    #[test]
    fn a_busy_pinned_device_does_not_block_the_ones_behind() {
        let d = devices(&[
            ("f1", "furnace_program".to_owned()),
            ("f2", "furnace_program".to_owned()),
        ]);
        let mut b = Board::default();
        b.enqueue(&exp("a", 0, "", furnace_step("f1")), 1);
        b.enqueue(&exp("b", 0, "", furnace_step("f1")), 2);
        b.enqueue(&exp("c", 0, "", furnace_step("")), 3);
        assert_eq!(grant_all(&mut b, &d), [pair("a", "f1"), pair("c", "f2")]);
    }

    #[test]
    fn paused_held_maintenance_and_shared_samples_grant_nothing() {
        let d = devices(&[
            ("f1", "furnace_program".to_owned()),
            ("f2", "furnace_program".to_owned()),
        ]);
        let mut b = Board::default();
        let mut held = exp("a", 9, "", furnace_step(""));
        held.held = true;
        b.enqueue(&held, 1);
        b.enqueue(&exp("b", 0, "S1", furnace_step("")), 2);
        b.enqueue(&exp("c", 0, "S1", furnace_step("")), 3);
        b.paused = true;
        assert!(b.decide(&d).is_empty());
        b.paused = false;
        d.get("f2")
            .unwrap()
            .set_maintenance(Some("calibration".into()));
        // a is held; c shares b's sample; f2 is in maintenance.
        assert_eq!(grant_all(&mut b, &d), [pair("b", "f1")]);
        d.get("f2").unwrap().set_maintenance(None);
        assert!(b.decide(&d).is_empty(), "c waits for b's sample");
        b.finish("b");
        assert_eq!(grant_all(&mut b, &d), [pair("c", "f1")]);
    }

    #[test]
    fn a_waiting_running_experiment_competes_in_priority_order() {
        let d = devices(&[("f1", "furnace_program".to_owned())]);
        let mut b = Board::default();
        b.enqueue(&exp("q-low", -1, "", furnace_step("")), 1);
        b.enqueue(&exp("q-high", 3, "", furnace_step("")), 2);
        let (tx, mut rx) = oneshot::channel();
        b.running.insert(
            "r".into(),
            Running {
                key: OrderKey::new(0, 0, "r"),
                sample: String::new(),
                phase: StepPhase::Waiting,
                step_index: 1,
                need: Some(Need::Device("f1".into())),
                grant: Some(tx),
                device: None,
                token: CancellationToken::new(),
                stop: None,
                cancel_after: None,
                transfer: None,
            },
        );
        assert_eq!(grant_all(&mut b, &d), [pair("q-high", "f1")]);
        b.finish("q-high");
        assert_eq!(grant_all(&mut b, &d), [pair("r", "f1")]);
        assert_eq!(rx.try_recv().unwrap(), "f1");
        assert_eq!(b.running["r"].phase, StepPhase::Reserved);
    }

    #[test]
    fn custody_tracks_the_latest_placement() {
        let mut b = Board::default();
        b.place("S1", "f1");
        assert_eq!(b.custody("S1"), Some("f1"));
        assert_eq!(b.sample_on("f1"), Some("S1"));
        b.place("S1", "a1");
        assert_eq!(b.sample_on("f1"), None);
        assert_eq!(b.sample_on("a1"), Some("S1"));
        b.place("", "a1");
        assert_eq!(b.sample_on("a1"), Some("S1"));
    }
}
