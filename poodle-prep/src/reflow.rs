//! `flow STORE --model M`: recompute flow and occlusion over a finished store with another
//! model, without decoding any video, into its own flow group `flow/<name>`.
//!
//! Resumable and crash-safe like `prep`: its state is `STORE/.poodle/flow-<name>/` (lock,
//! plan, done shards), and the group's metadata is written last, so the store stays valid
//! (without the new group) until the group is complete.

use crate::flowmodel::Device;
use crate::flowstage::{flow_attrs, flow_batch, open_flow_model, ShardFlow};
use crate::job::{JobDir, ShardDone, StageStats};
use crate::quality::{group_quality, GroupQuality};
use crate::{PrepError, Result};
use crossbeam_channel::bounded;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use poodle_common::flowmath::Map;
use poodle_common::store::{Codecs, PoodleStore, StoreArrays};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct ReflowOptions {
    pub store: PathBuf,
    pub model_card: PathBuf,
    pub device: Device,
    pub ort_lib: Option<PathBuf>,
    pub flow_group: Option<String>,
    pub store_backward: bool,
    pub batch_size: usize,
    /// Run the model through an ort I/O binding (see `FlowModel::set_io_binding`).
    pub io_binding: bool,
    pub flow_threads: usize,
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

pub fn run_reflow(opts: &ReflowOptions) -> Result<ReflowSummary> {
    let start = Instant::now();
    if opts.batch_size == 0 {
        return Err(PrepError::Usage("--batch-size must be positive".into()));
    }
    let (mut model, group) = open_flow_model(
        &opts.model_card,
        opts.device,
        opts.ort_lib.as_deref(),
        opts.flow_threads,
        opts.io_binding,
        opts.flow_group.as_deref(),
    )?;
    let store = PoodleStore::open(&opts.store)?;
    if let Some((_, fa)) = store.flow_groups.iter().find(|(g, _)| g == &group) {
        if fa.model_sha256 == model.model_sha256 && fa.card == model.card_json {
            return Ok(ReflowSummary {
                store: opts.store.display().to_string(),
                flow_quality: group_quality(&store, &group, opts.max_occluded_median)?,
                flow_group: group,
                model_sha256: model.model_sha256,
                wall_s: start.elapsed().as_secs_f64(),
                ..Default::default()
            });
        }
        return Err(PrepError::Job {
            path: opts.store.clone(),
            reason: format!(
                "flow group {group:?} already holds flow of another model or model card ({}); choose another --flow-group",
                fa.model_name
            ),
        });
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

    let pb = ProgressBar::with_draw_target(
        Some(
            todo.iter()
                .map(|&k| geometry.shard_pairs(k).len() as u64)
                .sum(),
        ),
        if opts.show_progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    pb.set_style(
        ProgressStyle::with_template("   flow {bar:30} {pos}/{len} {per_sec} eta {eta}")
            .expect("template"),
    );
    let (tx, rx) = bounded::<Result<ShardFrames>>(2);
    let (h, w) = (geometry.height, geometry.width);
    let mut flowed = 0usize;
    let mut busy = 0.0;
    std::thread::scope(|scope| -> Result<()> {
        // Reader: whole shards of frames, ahead of the flow model.
        let store = &store;
        let valid = &valid;
        let todo = &todo;
        scope.spawn(move || {
            for &k in todo {
                let read = || -> Result<ShardFrames> {
                    let mut v = Vec::new();
                    for i in geometry.shard_pairs(k) {
                        if valid[i] {
                            v.push((i, store.read_pair(i)?.frames));
                        }
                    }
                    Ok((k, v))
                };
                if tx.send(read()).is_err() {
                    return;
                }
            }
        });
        for item in rx {
            let (k, pairs) = item?;
            let n = geometry.shard_pairs(k).len();
            let start = geometry.shard_pairs(k).start;
            let mut flow = ShardFlow::new(geometry, n, opts.store_backward);
            let t0 = Instant::now();
            // Fixed batches of slots, as in prep, so reruns compute the same values.
            for chunk in pairs.chunks(opts.batch_size) {
                let to_map = |f: &[u8]| Map {
                    c: 3,
                    h,
                    w,
                    data: f.iter().map(|&v| f32::from(v)).collect(),
                };
                let imgs: Vec<(Map, Map)> = chunk
                    .iter()
                    .map(|(_, f)| (to_map(&f[..3 * h * w]), to_map(&f[3 * h * w..])))
                    .collect();
                let outs = flow_batch(&mut model, &imgs, opts.store_backward)?;
                for ((slot, _), o) in chunk.iter().zip(outs) {
                    flow.put(slot - start, &o);
                }
                pb.inc(chunk.len() as u64);
            }
            busy += t0.elapsed().as_secs_f64();
            flow.write(&arrays, &fa, k)?;
            job.mark_done(&ShardDone {
                shard: k,
                pairs_written: pairs.len(),
                skipped: vec![],
            })?;
            flowed += pairs.len();
            pb.inc((n - pairs.len()) as u64);
        }
        Ok(())
    })?;
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
