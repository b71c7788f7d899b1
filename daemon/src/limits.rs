//! Limits against abuse and mistakes (config `[limits]`): read by submission-time safety
//! (recipe bounds) and by the server edge (batch size, message size, rate, streams).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::Deserialize;

/// Limits against abuse and mistakes (config `[limits]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Most experiments in one SubmitBatch; more is INVALID_ARGUMENT.
    pub max_batch_experiments: usize,
    /// Largest gRPC message either way, bytes; larger is RESOURCE_EXHAUSTED.
    pub max_message_bytes: usize,
    /// SubmitBatch calls per principal per minute (a token bucket holding a minute's worth);
    /// 0 for no limit. A limit stops abuse (a runaway planner loop), never normal use: the
    /// default, [`DEFAULT_SUBMIT_PER_MINUTE`], is far above what a real planner sends.
    pub submit_per_minute: u32,
    /// Most StreamEvents and WatchDevice streams open at once.
    pub max_streams: usize,
    /// Most steps in one experiment.
    pub max_experiment_steps: usize,
    /// Most segments in one furnace program.
    pub max_program_segments: usize,
    /// Most pressure points in one isotherm.
    pub max_isotherm_points: usize,
    /// Most labels on one experiment.
    pub max_labels: usize,
    /// Longest label key, bytes.
    pub max_label_key_bytes: usize,
    /// Longest label value, bytes.
    pub max_label_value_bytes: usize,
    /// Longest name, sample id, device id, reagent or adsorptive, bytes.
    pub max_text_bytes: usize,
    /// Largest encoded experiment spec, bytes. It bounds what every reply and event that
    /// carries a spec (or one of its steps) can weigh: a full default page of ListExperiments
    /// (100) stays under the default `max_message_bytes`.
    pub max_experiment_bytes: usize,
}

/// The default `submit_per_minute`: 60,000 calls a minute, i.e. 1,000 SubmitBatch calls a
/// second sustained, with a whole minute's worth as a burst. A closed-loop planner submits
/// after each result (seconds to hours apart); even one submitting a single experiment per
/// call as fast as it can is held by the durable commit to about 1,000 calls a second, and
/// bluesky-queueserver, the nearest peer, accepts about 500 items a second. So a real planner
/// never meets this limit, while a runaway loop still gets RESOURCE_EXHAUSTED before it fills
/// the disk (each call also carries at most `max_batch_experiments`).
pub const DEFAULT_SUBMIT_PER_MINUTE: u32 = 60_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_batch_experiments: 10_000,
            max_message_bytes: 16 * 1024 * 1024,
            submit_per_minute: DEFAULT_SUBMIT_PER_MINUTE,
            max_streams: 256,
            max_experiment_steps: 1000,
            max_program_segments: 1000,
            max_isotherm_points: 1000,
            max_labels: 64,
            max_label_key_bytes: 128,
            max_label_value_bytes: 1024,
            max_text_bytes: 256,
            max_experiment_bytes: 128 * 1024,
        }
    }
}

impl Limits {
    /// Every problem with these limits, for `ppud check-config`.
    /// The bound `name` (a `[limits]` key) that a family's schema refers to by name
    /// (`max_items_limit`), e.g. `max_program_segments`.
    pub fn get(&self, name: &str) -> Option<usize> {
        match name {
            "max_experiment_steps" => Some(self.max_experiment_steps),
            "max_program_segments" => Some(self.max_program_segments),
            "max_isotherm_points" => Some(self.max_isotherm_points),
            "max_text_bytes" => Some(self.max_text_bytes),
            "max_label_key_bytes" => Some(self.max_label_key_bytes),
            "max_label_value_bytes" => Some(self.max_label_value_bytes),
            _ => None,
        }
    }

    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_batch_experiments == 0 {
            out.push("limits.max_batch_experiments: must be at least 1".to_owned());
        }
        if self.max_message_bytes < 64 * 1024 {
            out.push("limits.max_message_bytes: must be at least 65536".to_owned());
        }
        for (key, v) in [
            ("max_streams", self.max_streams),
            ("max_experiment_steps", self.max_experiment_steps),
            ("max_program_segments", self.max_program_segments),
            ("max_isotherm_points", self.max_isotherm_points),
            ("max_label_key_bytes", self.max_label_key_bytes),
            ("max_text_bytes", self.max_text_bytes),
            ("max_experiment_bytes", self.max_experiment_bytes),
        ] {
            if v == 0 {
                out.push(format!("limits.{key}: must be at least 1"));
            }
        }
        out
    }
}

/// Per-principal token buckets for submissions (`submit_per_minute`), shared by every edge
/// that submits: ppu.v1's SubmitBatch and the SiLA endpoint's commands.
#[derive(Default)]
pub struct SubmitRate {
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl SubmitRate {
    /// Takes one submission from `principal`'s bucket, or says how long until one is free.
    pub fn take(&self, principal: &str, per_minute: u32) -> Result<(), std::time::Duration> {
        if per_minute == 0 {
            return Ok(());
        }
        let capacity = f64::from(per_minute);
        let per_s = capacity / 60.0;
        let now = Instant::now();
        let Ok(mut buckets) = self.buckets.lock() else {
            return Ok(());
        };
        let (tokens, last) = buckets
            .entry(principal.to_owned())
            .or_insert((capacity, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * per_s).min(capacity);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64((1.0 - *tokens) / per_s))
        }
    }
}
