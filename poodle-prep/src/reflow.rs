//! `flow STORE --model M`: recompute flow and occlusion over a finished store with another
//! model, without decoding any video, into its own flow group `flow/<name>`.
//!
//! Resumable and crash-safe like `prep`: its state is `STORE/.poodle/flow-<name>/` (lock,
//! plan, done shards), and the group's metadata is written last, so the store stays valid
//! (without the new group) until the group is complete.

use crate::flowmodel::FlowModel;
use crate::flowstage::{flow_attrs, flow_batch, FlowModelOptions, ShardFlow};
use crate::job::{JobDir, ShardDone, StageStats};
use crate::pipeline::{bar, progress};
use crate::quality::{group_quality, GroupQuality};
use crate::{PrepError, Result};
use crossbeam_channel::bounded;
use indicatif::ProgressBar;
use poodle_common::flowmath::Map;
use poodle_common::store::{Codecs, FlowArrays, PoodleStore, StoreArrays};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct ReflowOptions {
    pub store: PathBuf,
    /// The flow model and the group it writes.
    pub model: FlowModelOptions,
    pub store_backward: bool,
    pub batch_size: usize,
    pub show_progress: bool,
    /// Warn when the group's median occluded fraction is above this.
    pub max_occluded_median: f32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct ReflowPlan {
    manifest_sha256: String,
    num_pairs: usize,
    flow_group: String,
    model_sha256: String,
    /// The card as read (see `job::Plan::model_card`).
    model_card: serde_json::Value,
    store_backward: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ReflowSummary {
    pub store: String,
    pub flow_group: String,
    pub model_sha256: String,
    pub pairs_flowed: usize,
    pub pairs_invalid_in_store: usize,
    pub shards_total: usize,
    pub shards_resumed: usize,
    pub group_bytes: u64,
    pub wall_s: f64,
    pub flow: StageStats,
    /// Occluded fraction, forward-backward and photometric error per store and per video.
    pub flow_quality: GroupQuality,
}

/// One shard's pairs as read from the store: (slot, frames (2,3,H,W)) of valid pairs.
type ShardFrames = (usize, Vec<(usize, Vec<u8>)>);

/// Recomputes flow over the store `opts.store` into its flow group (the model card's name
/// unless given), resuming the shards already done; the group's metadata last.
pub fn run_reflow(opts: &ReflowOptions) -> Result<ReflowSummary> {
    let start = Instant::now();
    if opts.batch_size == 0 {
        return Err(PrepError::Usage("--batch-size must be positive".into()));
    }
    let (mut model, group) = opts.model.open()?;
    let store = PoodleStore::open(&opts.store)?;
    if let Some(done) = finished_group(opts, &store, &model, &group, start)? {
        return Ok(done);
    }
    let geometry = store.attrs.geometry;
    let job = JobDir::open_in(
        &opts.store,
        &opts.store.join(".poodle").join(format!("flow-{group}")),
    )?;
    job.check_plan(&ReflowPlan {
        manifest_sha256: store.attrs.manifest_sha256.clone(),
        num_pairs: geometry.num_pairs,
        flow_group: group.clone(),
        model_sha256: model.model_sha256.clone(),
        model_card: model.card_json.clone(),
        store_backward: opts.store_backward,
    })?;
    let codecs = Codecs::default();
    let arrays = StoreArrays::new(&opts.store, geometry, codecs)?;
    let fa = arrays.flow_arrays(&group, opts.store_backward, codecs)?;
    let shards_total = geometry.num_shards();
    let todo: Vec<usize> = (0..shards_total)
        .filter(|&k| job.done(k).is_none())
        .collect();
    let shards_resumed = shards_total - todo.len();
    let valid = store.read_all_valid()?;

    let mp = progress(opts.show_progress);
    let pairs_todo: usize = todo.iter().map(|&k| geometry.shard_pairs(k).len()).sum();
    let pb = bar(&mp, pairs_todo as u64, "flow");
    let shards = Reflow {
        opts,
        store: &store,
        valid: &valid,
        arrays: &arrays,
        fa: &fa,
        job: &job,
    };
    let (flowed, busy) = shards.run(&todo, &mut model, &pb)?;
    pb.finish_and_clear();
    arrays.finalize_flow(&fa, &flow_attrs(&model, opts.store_backward))?;
    // Reopened: the group's metadata exists only now.
    let flow_quality = group_quality(
        &PoodleStore::open(&opts.store)?,
        &group,
        opts.max_occluded_median,
    )?;
    Ok(ReflowSummary {
        flow_quality,
        store: opts.store.display().to_string(),
        flow_group: group.clone(),
        model_sha256: model.model_sha256.clone(),
        pairs_flowed: flowed,
        pairs_invalid_in_store: valid.iter().filter(|&&v| !v).count(),
        shards_total,
        shards_resumed,
        group_bytes: poodle_common::store::dir_size(&opts.store.join("flow").join(&group)),
        wall_s: start.elapsed().as_secs_f64(),
        flow: StageStats::of(flowed, busy),
    })
}

/// A group that already exists: done if the same model and card wrote it (the summary of a
/// rerun), refused otherwise; `None` for a new group.
fn finished_group(
    opts: &ReflowOptions,
    store: &PoodleStore,
    model: &FlowModel,
    group: &str,
    start: Instant,
) -> Result<Option<ReflowSummary>> {
    let Some((_, fa)) = store.flow_groups.iter().find(|(g, _)| g == group) else {
        return Ok(None);
    };
    if fa.model_sha256 == model.model_sha256 && fa.card == model.card_json {
        return Ok(Some(ReflowSummary {
            store: opts.store.display().to_string(),
            flow_quality: group_quality(store, group, opts.max_occluded_median)?,
            flow_group: group.to_string(),
            model_sha256: model.model_sha256.clone(),
            wall_s: start.elapsed().as_secs_f64(),
            ..Default::default()
        }));
    }
    Err(PrepError::Job {
        path: opts.store.clone(),
        reason: format!(
            "flow group {group:?} already holds flow of another model or model card ({}); choose another --flow-group",
            fa.model_name
        ),
    })
}

/// What the reader and the flow loop of one `flow` run share.
#[derive(Clone, Copy)]
struct Reflow<'a> {
    opts: &'a ReflowOptions,
    store: &'a PoodleStore,
    /// Of every pair of the store: invalid pairs have no frames to flow.
    valid: &'a [bool],
    arrays: &'a StoreArrays,
    fa: &'a FlowArrays,
    job: &'a JobDir,
}

impl Reflow<'_> {
    /// Flows the shards `todo`, a reader thread fetching whole shards of frames ahead of the
    /// model; each shard is written and marked done as it is finished. Returns the pairs
    /// flowed and the seconds spent in the flow stage.
    fn run(self, todo: &[usize], model: &mut FlowModel, pb: &ProgressBar) -> Result<(usize, f64)> {
        let g = self.store.attrs.geometry;
        let (tx, rx) = bounded::<Result<ShardFrames>>(2);
        let (mut flowed, mut busy) = (0usize, 0.0);
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || {
                for &k in todo {
                    if tx.send(self.read_shard(k)).is_err() {
                        return;
                    }
                }
            });
            for item in rx {
                let (k, pairs) = item?;
                let t0 = Instant::now();
                let flow = self.flow_shard(k, &pairs, model, pb)?;
                busy += t0.elapsed().as_secs_f64();
                flow.write(self.arrays, self.fa, k)?;
                self.job.mark_done(&ShardDone {
                    shard: k,
                    pairs_written: pairs.len(),
                    skipped: vec![],
                })?;
                flowed += pairs.len();
                pb.inc((g.shard_pairs(k).len() - pairs.len()) as u64);
            }
            Ok(())
        })?;
        Ok((flowed, busy))
    }

    /// The frames of shard `k`'s valid pairs.
    fn read_shard(self, k: usize) -> Result<ShardFrames> {
        let mut v = Vec::new();
        for i in self.store.attrs.geometry.shard_pairs(k) {
            if self.valid[i] {
                v.push((i, self.store.read_pair(i)?.frames));
            }
        }
        Ok((k, v))
    }

    /// Flow of shard `k`'s pairs, in fixed batches of slots as in prep, so that reruns
    /// compute the same values.
    fn flow_shard(
        self,
        k: usize,
        pairs: &[(usize, Vec<u8>)],
        model: &mut FlowModel,
        pb: &ProgressBar,
    ) -> Result<ShardFlow> {
        let g = self.store.attrs.geometry;
        let (h, w) = (g.height, g.width);
        let start = g.shard_pairs(k).start;
        let mut flow = ShardFlow::new(g, g.shard_pairs(k).len(), self.opts.store_backward);
        let to_map = |f: &[u8]| Map {
            c: 3,
            h,
            w,
            data: f.iter().map(|&v| f32::from(v)).collect(),
        };
        for chunk in pairs.chunks(self.opts.batch_size) {
            let imgs: Vec<(Map, Map)> = chunk
                .iter()
                .map(|(_, f)| (to_map(&f[..3 * h * w]), to_map(&f[3 * h * w..])))
                .collect();
            let outs = flow_batch(model, &imgs, self.opts.store_backward)?;
            for ((slot, _), o) in chunk.iter().zip(outs) {
                flow.put(slot - start, &o);
            }
            pb.inc(chunk.len() as u64);
        }
        Ok(flow)
    }
}
