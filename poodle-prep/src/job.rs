//! One prep job part: its plan, its lock, which shards are done, and its summary.
//!
//! State lives beside the Zarr data in `STORE/.poodle/`: `plan.json` (what this store is a
//! part of; a rerun with another plan is refused), `lock` (held with an exclusive file lock
//! while a job writes; the OS drops it when the process dies, even by SIGKILL) and
//! `done/shard-NNNNNN.json` (written atomically after a shard's arrays are written).

use crate::{PrepError, Result};
use poodle_common::atomic::{read_json, write_json_atomic};
use poodle_common::manifest::Pair;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub schema_version: u32,
    pub dataset: poodle_common::config::DatasetConfig,
    pub root: String,
    pub manifest_sha256: String,
    pub part_index: usize,
    pub num_parts: usize,
    pub first_pair: usize,
    pub pairs: Vec<Pair>,
    pub videos: Vec<String>,
    pub flow_group: String,
    pub model_sha256: String,
    /// The model card as read: its value range, layout and size multiple change the flow as
    /// much as the ONNX file does, so a changed card is a changed plan.
    pub model_card: serde_json::Value,
    pub store_backward: bool,
}

/// A skipped pair, by index in the store, with its video and the reason.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SkippedPair {
    pub pair: usize,
    pub video: String,
    pub t: u64,
    pub dt: u64,
    pub reason: String,
}

/// What one finished shard recorded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ShardDone {
    pub shard: usize,
    pub pairs_written: usize,
    pub skipped: Vec<SkippedPair>,
}

pub struct JobDir {
    pub store: PathBuf,
    state: PathBuf,
    _lock: std::fs::File,
}

/// Names a plan field for the "started with another ..." message.
fn plan_field_name(key: &str) -> &str {
    match key {
        "dataset" => "dataset config",
        "pairs" | "videos" | "manifest_sha256" | "root" => "pair manifest",
        "model_sha256" | "flow_group" => "flow model",
        "model_card" => "flow model card",
        _ => "part split or options",
    }
}

impl JobDir {
    /// Opens (or creates) the job state of `store` (the prep job's) and takes its lock;
    /// refuses when another job holds it.
    pub fn open(store: &Path) -> Result<Self> {
        Self::open_in(store, &store.join(".poodle"))
    }

    /// Job state in another folder (a `flow` job keeps its own per flow group).
    pub fn open_in(store: &Path, state: &Path) -> Result<Self> {
        std::fs::create_dir_all(state.join("done"))
            .map_err(|e| poodle_common::Error::io(state, e))?;
        let lock_path = state.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| poodle_common::Error::io(&lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(PrepError::Job {
                    path: store.to_path_buf(),
                    reason: "another job is writing this part (its lock is held); refusing to write it twice".into(),
                })
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(poodle_common::Error::io(&lock_path, e).into())
            }
        }
        Ok(JobDir {
            store: store.to_path_buf(),
            state: state.to_path_buf(),
            _lock: lock,
        })
    }

    /// Records the plan, or checks it against the one already recorded.
    pub fn check_plan<T: Serialize + serde::de::DeserializeOwned>(&self, plan: &T) -> Result<()> {
        let p = self.state.join("plan.json");
        let new = serde_json::to_value(plan).expect("plan serialises");
        if p.exists() {
            let old: serde_json::Value = read_json(&p)?;
            if old != new {
                let key = new
                    .as_object()
                    .and_then(|n| n.iter().find(|(k, v)| old.get(k.as_str()) != Some(v)))
                    .map_or("options", |(k, _)| k.as_str());
                return Err(PrepError::Job {
                    path: self.store.clone(),
                    reason: format!(
                        "this store was started with another {}; use another --out, or delete the store to start over",
                        plan_field_name(key)
                    ),
                });
            }
            return Ok(());
        }
        write_json_atomic(&p, plan)?;
        Ok(())
    }

    fn done_path(&self, shard: usize) -> PathBuf {
        self.state
            .join("done")
            .join(format!("shard-{shard:06}.json"))
    }

    pub fn done(&self, shard: usize) -> Option<ShardDone> {
        read_json(&self.done_path(shard)).ok()
    }

    pub fn mark_done(&self, d: &ShardDone) -> Result<()> {
        write_json_atomic(&self.done_path(d.shard), d)?;
        Ok(())
    }
}

/// Throughput of one pipeline stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    pub items: usize,
    pub busy_s: f64,
    pub per_s: f64,
}

impl StageStats {
    /// `items` done in `busy_s` seconds.
    pub fn of(items: usize, busy_s: f64) -> Self {
        StageStats {
            items,
            busy_s,
            per_s: items as f64 / busy_s.max(1e-9),
        }
    }
}

/// The job's machine-readable summary (also printed).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub store: String,
    pub part_index: usize,
    pub num_parts: usize,
    pub pairs_total: usize,
    pub pairs_written: usize,
    pub pairs_skipped: usize,
    pub shards_total: usize,
    pub shards_resumed: usize,
    pub shards_written_now: usize,
    pub skipped_pairs: Vec<SkippedPair>,
    pub skipped_videos: Vec<poodle_common::manifest::Skipped>,
    /// Skipped pairs counted by kind: decode, near_static, black, frozen.
    pub skipped_by_kind: std::collections::BTreeMap<String, usize>,
    pub store_bytes: u64,
    pub bytes_per_pair: f64,
    pub raw_bytes_per_pair: f64,
    pub wall_s: f64,
    pub decode: StageStats,
    pub flow: StageStats,
    pub write: StageStats,
    /// Occlusion, statistics and quantisation (beside inference).
    pub occlusion: StageStats,
    /// Occluded fraction, forward-backward and photometric error per store and per video.
    pub flow_quality: crate::quality::GroupQuality,
}

impl SkippedPair {
    /// The kind of skip, for the summary's counts.
    pub fn kind(&self) -> &'static str {
        if self.reason.starts_with("near-static") {
            "near_static"
        } else if self.reason.starts_with("black frame") {
            "black"
        } else if self.reason.starts_with("frozen frames") {
            "frozen"
        } else {
            "decode"
        }
    }
}
