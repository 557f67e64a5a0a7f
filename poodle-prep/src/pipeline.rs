//! The prep job: manifest -> part -> bounded stages decode -> flow -> occlusion -> write.
//!
//! Decoding runs on a rayon pool; the flow model runs on one thread in batches; occlusion and
//! statistics run on rayon beside it; one writer thread writes each shard as soon as all its
//! pairs arrived. Stages are joined by bounded crossbeam channels, so memory is bounded by
//! channel sizes (plus the few shards open at once), not by the dataset. Batches are fixed
//! groups of pair slots inside one shard, so a resumed run computes exactly the same values.

use crate::decode::{decode_image, stream_frames, Frame};
use crate::discover::probe_all;
use crate::flowmodel::FlowModel;
use crate::flowstage::{
    degenerate, finish_batch, flow_attrs, infer_batch, FlowModelOptions, FlowOut, ShardFlow,
};
use crate::job::{JobDir, Plan, ShardDone, SkippedPair, StageStats, Summary};
use crate::tools::check_ffmpeg;
use crate::{PrepError, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use poodle_common::atomic::{read_json, write_json_atomic};
use poodle_common::config::{DatasetConfig, Layout};
use poodle_common::flowmath::Map;
use poodle_common::manifest::{
    json_sha256, part_range, sample_pairs, Pair, Skipped, VideoInfo, VideoManifest,
};
use poodle_common::store::{Codecs, FlowArrays, Geometry, StoreArrays, StoreAttrs, SCHEMA_VERSION};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct PrepOptions {
    pub config: DatasetConfig,
    pub root: PathBuf,
    pub out: PathBuf,
    pub part_index: usize,
    pub num_parts: usize,
    /// The flow model and the group it writes.
    pub model: FlowModelOptions,
    pub store_backward: bool,
    pub batch_size: usize,
    pub decode_workers: usize,
    pub show_progress: bool,
    /// Use only the first N pairs of the manifest (demos, quick checks).
    pub max_pairs: Option<usize>,
    /// Skip pairs whose median forward flow is below this many pixels (a car at a red light).
    pub min_median_flow: Option<f32>,
    /// Skip pairs with a black frame or two identical (frozen) frames.
    pub drop_degenerate: bool,
    /// Warn when the store's median occluded fraction is above this.
    pub max_occluded_median: f32,
}

/// The probed manifest cached under OUT/manifest/, shared by all parts of a job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct CachedManifest {
    dataset: DatasetConfig,
    root: String,
    videos: VideoManifest,
}

pub fn store_path(out: &Path, cfg: &DatasetConfig, part: usize, parts: usize) -> PathBuf {
    out.join(format!("{}-part-{part:05}-of-{parts:05}.zarr", cfg.name))
}

/// The job's progress display: on stderr, or hidden (`--quiet`).
pub(crate) fn progress(show: bool) -> MultiProgress {
    MultiProgress::with_draw_target(if show {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    })
}

/// One stage's bar: `what` right-aligned, done/total, rate and ETA.
pub(crate) fn bar(mp: &MultiProgress, len: u64, what: &str) -> ProgressBar {
    let pb = mp.add(ProgressBar::new(len));
    pb.set_style(
        ProgressStyle::with_template(&format!(
            "{what:>7} {{bar:30}} {{pos}}/{{len}} {{per_sec}} eta {{eta}}"
        ))
        .expect("template"),
    );
    pb
}

/// Probes the dataset (or reuses the cached manifest of an identical config and root).
pub fn load_or_probe(
    cfg: &DatasetConfig,
    root: &Path,
    out: &Path,
    mp: &MultiProgress,
) -> Result<VideoManifest> {
    let path = out
        .join("manifest")
        .join(format!("{}-videos.json", cfg.name));
    let root_s = root.display().to_string();
    if let Ok(c) = read_json::<CachedManifest>(&path) {
        if &c.dataset == cfg && c.root == root_s {
            return Ok(c.videos);
        }
    }
    let pb = bar(mp, 0, "probe");
    let videos = probe_all(cfg, root, &pb)?;
    pb.finish_and_clear();
    write_json_atomic(
        &path,
        &CachedManifest {
            dataset: cfg.clone(),
            root: root_s,
            videos: videos.clone(),
        },
    )?;
    Ok(videos)
}

struct Slot {
    index: usize,
    pair: Pair,
}

/// A flow batch being filled: items received so far, and the decoded pairs among them.
type GroupBuf = (usize, Vec<(usize, Frame, Frame)>);

enum Decoded {
    Ok { slot: usize, f1: Frame, f2: Frame },
    Failed { slot: usize, reason: String },
}

struct PairOut {
    slot: usize,
    frames: Vec<u8>,
    flow: FlowOut,
}

/// A batch after inference, on its way to occlusion and statistics.
struct Inferred {
    batch: Vec<(usize, Frame, Frame)>,
    imgs: Vec<(Map, Map)>,
    flows: Vec<Map>,
}

/// Occlusion, statistics and the near-static filter for each inferred batch; returns the
/// seconds spent.
fn post_stage(
    rx: Receiver<Inferred>,
    tx: Sender<Flowed>,
    pb: &ProgressBar,
    opts: &PrepOptions,
) -> f64 {
    let mut busy = 0.0;
    for inf in rx {
        let t0 = Instant::now();
        let outs = finish_batch(&inf.imgs, &inf.flows, opts.store_backward);
        busy += t0.elapsed().as_secs_f64();
        for ((slot, f1, f2), flow) in inf.batch.into_iter().zip(outs) {
            pb.inc(1);
            if tx
                .send(flowed(slot, &f1, &f2, flow, opts.min_median_flow))
                .is_err()
            {
                return busy;
            }
        }
    }
    busy
}

/// A flowed pair for the writer, or its skip when it is near-static.
fn flowed(slot: usize, f1: &Frame, f2: &Frame, flow: FlowOut, min_median: Option<f32>) -> Flowed {
    match min_median {
        Some(min) if flow.median_mag < min => Flowed::Failed {
            slot,
            reason: format!(
                "near-static: median flow {:.2} px < {min} px",
                flow.median_mag
            ),
        },
        _ => {
            let mut frames = f1.to_planar();
            frames.extend(f2.to_planar());
            Flowed::Ok(Box::new(PairOut { slot, frames, flow }))
        }
    }
}

enum Flowed {
    Ok(Box<PairOut>),
    Failed { slot: usize, reason: String },
}

impl Decoded {
    /// Turns a black or frozen pair into a skip when asked to.
    fn filtered(self, drop_degenerate: bool) -> Decoded {
        match self {
            Decoded::Ok { slot, f1, f2 } if drop_degenerate => match degenerate(&f1.rgb, &f2.rgb) {
                Some(reason) => Decoded::Failed { slot, reason },
                None => Decoded::Ok { slot, f1, f2 },
            },
            other => other,
        }
    }
}

/// Decodes the pairs of one run of slots of one video, handing each pair to `emit` as soon
/// as both its frames are decoded: a video is decoded once, front to back, however many
/// pairs (and shards) it feeds, and only frames still needed by a pending pair are held.
fn decode_segment(
    cfg: &DatasetConfig,
    root: &Path,
    video: &VideoInfo,
    slots: &[&Slot],
    drop_degenerate: bool,
    emit: &mut dyn FnMut(Decoded) -> bool,
) {
    let (h, w) = (cfg.height, cfg.width);
    if let Layout::Frames { .. } = cfg.layout {
        let file = |n: u64| -> Option<PathBuf> {
            let i = video.frame_numbers.binary_search(&n).ok()?;
            Some(root.join(&video.frame_files[i]))
        };
        for s in slots {
            let d = match (file(s.pair.t), file(s.pair.t + s.pair.dt)) {
                (Some(a), Some(b)) => match (decode_image(&a, h, w), decode_image(&b, h, w)) {
                    (Ok(f1), Ok(f2)) => Decoded::Ok {
                        slot: s.index,
                        f1,
                        f2,
                    }
                    .filtered(drop_degenerate),
                    (Err(e), _) | (_, Err(e)) => Decoded::Failed {
                        slot: s.index,
                        reason: e.to_string(),
                    },
                },
                _ => Decoded::Failed {
                    slot: s.index,
                    reason: "frame file missing".into(),
                },
            };
            if !emit(d) {
                return;
            }
        }
        return;
    }
    // Pairs by the index of their last frame; how many pending pairs need each frame.
    let mut by_last: BTreeMap<u64, Vec<&Slot>> = BTreeMap::new();
    let mut need: BTreeMap<u64, usize> = BTreeMap::new();
    for s in slots {
        let (a, b) = (s.pair.t, s.pair.t + s.pair.dt);
        by_last.entry(a.max(b)).or_default().push(s);
        *need.entry(a).or_insert(0) += 1;
        *need.entry(b).or_insert(0) += 1;
    }
    let indices: Vec<u64> = need.keys().copied().collect();
    let mut held: BTreeMap<u64, Frame> = BTreeMap::new();
    let mut emitted = 0usize;
    let mut stopped = false;
    let result = stream_frames(&root.join(&video.path), &indices, h, w, &mut |k, frame| {
        held.insert(k, frame);
        for s in by_last.remove(&k).unwrap_or_default() {
            let (a, b) = (s.pair.t, s.pair.t + s.pair.dt);
            let d = match (held.get(&a), held.get(&b)) {
                (Some(f1), Some(f2)) => Decoded::Ok {
                    slot: s.index,
                    f1: f1.clone(),
                    f2: f2.clone(),
                }
                .filtered(drop_degenerate),
                _ => Decoded::Failed {
                    slot: s.index,
                    reason: format!("frame {a} not decoded (corrupt video)"),
                },
            };
            for f in [a, b] {
                let n = need.get_mut(&f).expect("counted");
                *n -= 1;
                if *n == 0 {
                    held.remove(&f);
                }
            }
            emitted += 1;
            if !emit(d) {
                stopped = true;
                return false;
            }
        }
        true
    });
    if stopped {
        return;
    }
    let reason = match result {
        Ok(n) => format!(
            "frames missing (truncated or corrupt video: {n} of {} wanted frames decoded)",
            indices.len()
        ),
        Err(PrepError::Video { reason, .. }) => reason,
        Err(e) => e.to_string(),
    };
    for s in by_last.into_values().flatten() {
        if !emit(Decoded::Failed {
            slot: s.index,
            reason: reason.clone(),
        }) {
            return;
        }
    }
    debug_assert!(emitted <= slots.len());
}

/// Runs one job part end to end and returns its summary: checks, the part's pairs, its store
/// (finished shards are resumed), the stages over the shards still to do, then the metadata
/// and the summary.
pub fn run_prep(opts: &PrepOptions) -> Result<Summary> {
    let start = Instant::now();
    check_part_options(opts)?;
    // Everything that can fail for the whole job fails here, before any work.
    check_ffmpeg()?;
    let (mut model, flow_group) = opts.model.open()?;
    let mp = progress(opts.show_progress);
    let part = select_part(opts, &mp)?;

    let store = store_path(&opts.out, &opts.config, opts.part_index, opts.num_parts);
    let job = JobDir::open(&store)?;
    job.check_plan(&part.job_plan(opts, &model, &flow_group))?;
    let geometry = Geometry {
        num_pairs: part.pairs.len(),
        height: opts.config.height,
        width: opts.config.width,
        pairs_per_shard: opts.config.pairs_per_shard,
    };
    let codecs = Codecs::default();
    let arrays = StoreArrays::new(&store, geometry, codecs)?;
    let flow_arrays = arrays.flow_arrays(&flow_group, opts.store_backward, codecs)?;
    let shards_total = geometry.num_shards();
    let mut done: BTreeMap<usize, ShardDone> = (0..shards_total)
        .filter_map(|k| job.done(k).map(|d| (k, d)))
        .collect();
    let shards_resumed = done.len();
    let todo: Vec<usize> = (0..shards_total)
        .filter(|k| !done.contains_key(k))
        .collect();

    let stages = Stages {
        opts,
        geometry,
        pairs: &part.pairs,
        videos: &part.videos,
        arrays: &arrays,
        flow_arrays: &flow_arrays,
        job: &job,
    };
    let (newly_done, times) = stages.run(&todo, &mut model, &mp)?;
    let shards_written_now = newly_done.len();
    done.extend(newly_done.into_iter().map(|d| (d.shard, d)));
    if done.len() != shards_total {
        return Err(PrepError::Job {
            path: store.clone(),
            reason: format!("only {} of {shards_total} shards finished", done.len()),
        });
    }
    // All shards done: metadata last, so valid metadata means complete data.
    arrays.finalize_flow(&flow_arrays, &flow_attrs(&model, opts.store_backward))?;
    arrays.finalize(&part.store_attrs(opts, geometry))?;

    let skipped_pairs: Vec<SkippedPair> = done.values().flat_map(|d| d.skipped.clone()).collect();
    let written: usize = done.values().map(|d| d.pairs_written).sum();
    let store_bytes = poodle_common::store::dir_size(&store);
    // Read back from the finished store, so resumed shards count as much as new ones.
    let flow_quality = crate::quality::group_quality(
        &poodle_common::store::PoodleStore::open(&store)?,
        &flow_group,
        opts.max_occluded_median,
    )?;
    let summary = Summary {
        store: store.display().to_string(),
        part_index: opts.part_index,
        num_parts: opts.num_parts,
        pairs_total: part.pairs.len(),
        pairs_written: written,
        pairs_skipped: skipped_pairs.len(),
        shards_total,
        shards_resumed,
        shards_written_now,
        skipped_by_kind: skipped_pairs.iter().fold(BTreeMap::new(), |mut m, p| {
            *m.entry(p.kind().to_string()).or_insert(0) += 1;
            m
        }),
        skipped_pairs,
        skipped_videos: part.skipped_videos,
        store_bytes,
        bytes_per_pair: store_bytes as f64 / written.max(1) as f64,
        raw_bytes_per_pair: raw_bytes_per_pair(&geometry, opts.store_backward),
        wall_s: start.elapsed().as_secs_f64(),
        decode: times.decode,
        flow: times.flow,
        write: times.write,
        occlusion: times.occlusion,
        flow_quality,
    };
    write_json_atomic(&store.with_extension("summary.json"), &summary)?;
    Ok(summary)
}

/// Refuses a part index outside the job and an empty flow batch.
fn check_part_options(opts: &PrepOptions) -> Result<()> {
    if opts.num_parts == 0 || opts.part_index >= opts.num_parts {
        return Err(PrepError::Usage(format!(
            "--part-index {} must be below --num-parts {}",
            opts.part_index, opts.num_parts
        )));
    }
    if opts.batch_size == 0 {
        return Err(PrepError::Usage("--batch-size must be positive".into()));
    }
    Ok(())
}

/// One job part's share of the manifest: its pairs, re-indexed into the list of the videos
/// it uses (only those go into its store).
struct PartPairs {
    /// Of the whole job's pairs and videos: every part of one job has the same.
    manifest_sha256: String,
    /// The job-wide index of the part's first pair.
    first_pair: usize,
    pairs: Vec<Pair>,
    videos: Vec<VideoInfo>,
    skipped_videos: Vec<Skipped>,
}

/// Probes (or reuses) the manifest, samples the job's pairs, records them under
/// OUT/manifest/, and keeps this part's share.
fn select_part(opts: &PrepOptions, mp: &MultiProgress) -> Result<PartPairs> {
    let cfg = &opts.config;
    let manifest = load_or_probe(cfg, &opts.root, &opts.out, mp)?;
    let (mut all_pairs, mut skipped_videos) = sample_pairs(cfg, &manifest.videos);
    skipped_videos.extend(manifest.skipped.iter().cloned());
    if let Some(m) = opts.max_pairs {
        all_pairs.truncate(m);
    }
    let manifest_sha256 = json_sha256(&(
        &all_pairs,
        &manifest.videos.iter().map(|v| &v.path).collect::<Vec<_>>(),
    ));
    write_json_atomic(
        &opts
            .out
            .join("manifest")
            .join(format!("{}-pairs.json", cfg.name)),
        &serde_json::json!({"manifest_sha256": manifest_sha256, "pairs": all_pairs}),
    )?;
    let range = part_range(all_pairs.len(), opts.part_index, opts.num_parts);
    let first_pair = range.start;
    let part_pairs = &all_pairs[range];
    if part_pairs.is_empty() {
        return Err(PrepError::Usage(format!(
            "part {} of {} has no pairs ({} pairs in the manifest, {} videos skipped)",
            opts.part_index,
            opts.num_parts,
            all_pairs.len(),
            skipped_videos.len()
        )));
    }
    let mut used: Vec<u32> = part_pairs.iter().map(|p| p.video).collect();
    used.dedup();
    let remap: BTreeMap<u32, u32> = used
        .iter()
        .enumerate()
        .map(|(i, &v)| (v, i as u32))
        .collect();
    Ok(PartPairs {
        manifest_sha256,
        first_pair,
        pairs: part_pairs
            .iter()
            .map(|p| Pair {
                video: remap[&p.video],
                ..*p
            })
            .collect(),
        videos: used
            .iter()
            .map(|&v| manifest.videos[v as usize].clone())
            .collect(),
        skipped_videos,
    })
}

impl PartPairs {
    /// The plan a resumed job must match.
    fn job_plan(&self, opts: &PrepOptions, model: &FlowModel, flow_group: &str) -> Plan {
        Plan {
            schema_version: SCHEMA_VERSION,
            dataset: opts.config.clone(),
            root: opts.root.display().to_string(),
            manifest_sha256: self.manifest_sha256.clone(),
            part_index: opts.part_index,
            num_parts: opts.num_parts,
            first_pair: self.first_pair,
            pairs: self.pairs.clone(),
            videos: self.video_paths(),
            flow_group: flow_group.to_string(),
            model_sha256: model.model_sha256.clone(),
            model_card: model.card_json.clone(),
            store_backward: opts.store_backward,
        }
    }

    /// The store's metadata, written once every shard is.
    fn store_attrs(&self, opts: &PrepOptions, geometry: Geometry) -> StoreAttrs {
        StoreAttrs {
            schema_version: SCHEMA_VERSION,
            tool_version: poodle_common::TOOL_VERSION.to_string(),
            dataset: opts.config.clone(),
            manifest_sha256: self.manifest_sha256.clone(),
            part_index: opts.part_index,
            num_parts: opts.num_parts,
            first_pair: self.first_pair,
            geometry,
            videos: self.video_paths(),
            root: opts.root.display().to_string(),
            video_fps: self.videos.iter().map(|v| v.fps).collect(),
        }
    }

    fn video_paths(&self) -> Vec<String> {
        self.videos.iter().map(|v| v.path.clone()).collect()
    }
}

/// What the stages of one part share.
#[derive(Clone, Copy)]
struct Stages<'a> {
    opts: &'a PrepOptions,
    geometry: Geometry,
    pairs: &'a [Pair],
    videos: &'a [VideoInfo],
    arrays: &'a StoreArrays,
    flow_arrays: &'a FlowArrays,
    job: &'a JobDir,
}

/// Each stage's throughput over the pairs of the shards done in this run.
struct StageTimes {
    decode: StageStats,
    flow: StageStats,
    occlusion: StageStats,
    write: StageStats,
}

impl Stages<'_> {
    /// Decode, flow, occlusion and write over the shards `todo`, joined by bounded channels;
    /// returns the shards written and each stage's busy time.
    fn run(
        self,
        todo: &[usize],
        model: &mut FlowModel,
        mp: &MultiProgress,
    ) -> Result<(Vec<ShardDone>, StageTimes)> {
        // Work list: the runs of consecutive slots of one video (one decode each).
        let slots: Vec<Slot> = todo
            .iter()
            .flat_map(|&k| self.geometry.shard_pairs(k))
            .map(|i| Slot {
                index: i,
                pair: self.pairs[i],
            })
            .collect();
        let mut segments: Vec<Vec<&Slot>> = Vec::new();
        for s in &slots {
            match segments.last_mut() {
                Some(seg) if seg[0].pair.video == s.pair.video => seg.push(s),
                _ => segments.push(vec![s]),
            }
        }
        let n_todo = slots.len();
        let pb_dec = bar(mp, n_todo as u64, "decode");
        let pb_flow = bar(mp, n_todo as u64, "flow");
        let pb_write = bar(mp, todo.len() as u64, "shards");
        let cap = 2 * self.opts.batch_size.max(2);
        let (tx_dec, rx_dec) = bounded::<Decoded>(cap);
        let (tx_flow, rx_flow) = bounded::<Flowed>(cap);
        // Occlusion and statistics run on rayon beside the next batch's inference, so that
        // the model never waits for them.
        let (tx_inf, rx_inf) = bounded::<Inferred>(2);
        let decode_pool = rayon::ThreadPoolBuilder::new()
            .num_threads(self.opts.decode_workers.max(1))
            .thread_name(|i| format!("decode-{i}"))
            .build()
            .map_err(|e| PrepError::Usage(format!("decode pool: {e}")))?;
        let (times, finished) = std::thread::scope(|scope| -> Result<_> {
            let segments = &segments;
            let (pb, pbw) = (&pb_dec, &pb_write);
            let dec = scope.spawn(move || self.decode_stage(segments, &decode_pool, tx_dec, pb));
            let write = scope.spawn(move || self.write_stage(rx_flow, pbw));
            let post = {
                let (tx, pb) = (tx_flow.clone(), &pb_flow);
                scope.spawn(move || post_stage(rx_inf, tx, pb, self.opts))
            };
            let (flow_busy, flow_err) = self.flow_stage(rx_dec, model, tx_inf, tx_flow, &pb_flow);
            let dec_s = dec.join().expect("decode thread");
            let post_busy = post.join().expect("occlusion thread");
            let (finished, write_busy) = write.join().expect("writer thread")?;
            if let Some(e) = flow_err {
                return Err(e);
            }
            let times = StageTimes {
                decode: StageStats::of(n_todo, dec_s),
                flow: StageStats::of(n_todo, flow_busy),
                occlusion: StageStats::of(n_todo, post_busy),
                write: StageStats::of(n_todo, write_busy),
            };
            Ok((times, finished))
        })?;
        pb_dec.finish_and_clear();
        pb_flow.finish_and_clear();
        pb_write.finish_and_clear();
        Ok((finished, times))
    }

    /// Stage 1: decodes the segments on the pool, in manifest order as workers free up;
    /// returns its wall seconds.
    fn decode_stage(
        self,
        segments: &[Vec<&Slot>],
        pool: &rayon::ThreadPool,
        tx: Sender<Decoded>,
        pb: &ProgressBar,
    ) -> f64 {
        let t0 = Instant::now();
        pool.install(|| {
            segments.iter().par_bridge().for_each_with(tx, |tx, seg| {
                let v = &self.videos[seg[0].pair.video as usize];
                // A failed send means downstream failed; it reports why.
                let emit = &mut |d| {
                    pb.inc(1);
                    tx.send(d).is_ok()
                };
                let o = self.opts;
                decode_segment(&o.config, &o.root, v, seg, o.drop_degenerate, emit);
            })
        });
        t0.elapsed().as_secs_f64()
    }

    /// Stage 2: flow in fixed slot groups (forward and backward in one model call), handed
    /// to the occlusion stage; decode failures go straight to the writer. Returns the
    /// model's busy seconds and the error that stopped it, if any.
    fn flow_stage(
        self,
        rx: Receiver<Decoded>,
        model: &mut FlowModel,
        tx_inf: Sender<Inferred>,
        tx_flow: Sender<Flowed>,
        pb: &ProgressBar,
    ) -> (f64, Option<PrepError>) {
        let (g, b) = (self.geometry, self.opts.batch_size);
        let group_of = |slot: usize| {
            let k = slot / g.pairs_per_shard;
            (k, (slot - g.shard_pairs(k).start) / b)
        };
        let group_len = |(k, i): (usize, usize)| (g.shard_pairs(k).len() - i * b).min(b);
        let mut groups: BTreeMap<(usize, usize), GroupBuf> = BTreeMap::new();
        let mut busy = 0.0;
        for d in rx {
            let slot = match &d {
                Decoded::Ok { slot, .. } | Decoded::Failed { slot, .. } => *slot,
            };
            let key = group_of(slot);
            let entry = groups.entry(key).or_insert((0, Vec::new()));
            entry.0 += 1;
            match d {
                Decoded::Ok { slot, f1, f2 } => entry.1.push((slot, f1, f2)),
                Decoded::Failed { slot, reason } => {
                    pb.inc(1);
                    if tx_flow.send(Flowed::Failed { slot, reason }).is_err() {
                        break;
                    }
                }
            }
            if entry.0 < group_len(key) {
                continue;
            }
            let (_, mut batch) = groups.remove(&key).expect("group");
            batch.sort_by_key(|x| x.0);
            let t0 = Instant::now();
            let imgs: Vec<(Map, Map)> = batch
                .par_iter()
                .map(|(_, f1, f2)| {
                    (
                        Map::from_hwc_u8(f1.height, f1.width, &f1.rgb),
                        Map::from_hwc_u8(f2.height, f2.width, &f2.rgb),
                    )
                })
                .collect();
            match infer_batch(model, &imgs) {
                Ok(flows) => {
                    busy += t0.elapsed().as_secs_f64();
                    if tx_inf.send(Inferred { batch, imgs, flows }).is_err() {
                        break;
                    }
                }
                Err(e) => return (busy, Some(e)),
            }
        }
        (busy, None)
    }

    /// Stage 3: one writer; each shard is written as soon as all its pairs arrived, then
    /// marked done. Returns the shards written and the busy seconds.
    fn write_stage(self, rx: Receiver<Flowed>, pb: &ProgressBar) -> Result<(Vec<ShardDone>, f64)> {
        let g = self.geometry;
        let slot_of = |i: &Flowed| match i {
            Flowed::Ok(p) => p.slot,
            Flowed::Failed { slot, .. } => *slot,
        };
        let mut busy = 0.0;
        let mut open: BTreeMap<usize, Vec<Flowed>> = BTreeMap::new();
        let mut finished = Vec::new();
        for item in rx {
            let k = slot_of(&item) / g.pairs_per_shard;
            let entry = open.entry(k).or_default();
            entry.push(item);
            if entry.len() < g.shard_pairs(k).len() {
                continue;
            }
            let mut items = open.remove(&k).expect("open shard");
            items.sort_by_key(slot_of);
            let t0 = Instant::now();
            let d = self.write_shard(k, items)?;
            self.job.mark_done(&d)?;
            busy += t0.elapsed().as_secs_f64();
            finished.push(d);
            pb.inc(1);
        }
        Ok((finished, busy))
    }

    /// Writes shard `k` from its items in slot order: frames, pair metadata and validity,
    /// then its flow group's arrays; the failed pairs are the shard's skips.
    fn write_shard(self, k: usize, items: Vec<Flowed>) -> Result<ShardDone> {
        let g = self.geometry;
        let n = items.len();
        let mut frames = vec![0u8; n * g.frame_len()];
        let mut meta = Vec::with_capacity(n * 3);
        let mut valid = vec![false; n];
        let mut flow = ShardFlow::new(g, n, self.opts.store_backward);
        let mut d = ShardDone {
            shard: k,
            ..Default::default()
        };
        let start = g.shard_pairs(k).start;
        for (j, item) in items.into_iter().enumerate() {
            let slot = start + j;
            let p = self.pairs[slot];
            meta.extend([i64::from(p.video), p.t as i64, p.dt as i64]);
            match item {
                Flowed::Ok(o) => {
                    debug_assert_eq!(o.slot, slot);
                    valid[j] = true;
                    frames[j * g.frame_len()..(j + 1) * g.frame_len()].copy_from_slice(&o.frames);
                    flow.put(j, &o.flow);
                    d.pairs_written += 1;
                }
                Flowed::Failed { reason, .. } => d.skipped.push(SkippedPair {
                    pair: slot,
                    video: self.videos[p.video as usize].path.clone(),
                    t: p.t,
                    dt: p.dt,
                    reason,
                }),
            }
        }
        self.arrays.write_shard(k, &frames, &meta, &valid)?;
        flow.write(self.arrays, self.flow_arrays, k)?;
        Ok(d)
    }
}

/// Raw size of a pair: two uint8 RGB frames plus float32 forward (and backward) flow.
pub fn raw_bytes_per_pair(g: &Geometry, backward: bool) -> f64 {
    let px = (g.height * g.width) as f64;
    2.0 * 3.0 * px + 8.0 * px * if backward { 2.0 } else { 1.0 }
}
