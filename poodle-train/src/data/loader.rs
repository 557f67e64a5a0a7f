//! Streaming loader: one or many `poodle-prep` stores -> seeded, shuffled epochs ->
//! background workers (augmentation on rayon) -> bounded prefetch -> [`Batch`]es of candle
//! tensors in epoch order.
//!
//! - **Stores**: each path is a store (a folder with `zarr.json`) or a folder whose `*.zarr`
//!   children are stores (all parts of a job), sorted by name. Every store must hold the
//!   chosen flow group (default: the first store's first group, by name) with backward flow;
//!   a store that does not, or that is not a poodle store of a known schema, is an error that
//!   names it. Stores may differ in stored resolution (crops are resized anyway).
//! - **Invalid pairs** (`valid == false`) are left out when the loader opens; how many is in
//!   [`Loader::summary`].
//! - **Passes** ([`super::sampling`]): the valid pairs of all stores are grouped into units
//!   (videos, clips of long videos, or single pairs for image sequences); pass `e` visits every
//!   unit in a seeded order and draws R pairs from its pool (the authors' fresh pairs per
//!   visit), so stores and shards mix. A pass counts as R paper epochs
//!   ([`Loader::epochs_per_pass`]). `epoch` in this module's API is the pass number.
//!   Batch `b` holds pass positions `b*B .. (b+1)*B`; the sample at position `p` augments with
//!   `Rng::derive(seed, [pass, p, ..])`. Batches are therefore identical for any worker count
//!   (including 0: built inline in `next`).
//! - **Unreadable pairs** (a corrupt chunk, a short buffer): counted, reported once on stderr
//!   and in [`Loader::stats`], and replaced by a pair drawn from a stream derived from
//!   (seed, epoch, position, attempt), so the replacement is deterministic too; after
//!   [`MAX_REPLACEMENTS`] failures the sample is dropped and the batch is one shorter.
//! - **Memory**: a token channel of `prefetch` tokens gates the workers: a worker takes a
//!   token before it starts a batch and the consumer returns it when it hands the batch out,
//!   so at most `prefetch` batches exist at once (being built, queued, or waiting in the
//!   reorder buffer). Workers beyond `prefetch` idle; use `prefetch >= workers`.
//!   Tensors are created on the target device by the workers (host-to-device copies overlap
//!   the training step; on a GPU, `prefetch` batches of device memory are held).

use super::augment::{augment_pair, AugmentConfig, AugmentedPair, RawPair};
use super::crop::GlobalCrop;
use super::sampling::{clip_of, PairKey, PairSampling, PassPlanner, VisitUnit};
use super::subcrops::SubcropSets;
use super::Rng;
use crate::geom::Affine;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use crossbeam_channel::{bounded, Receiver, Sender};
use poodle_common::config::Sampling;
use poodle_common::store::{
    PoodleStore, BACKWARD, FLOW_ROOT, FORWARD, OCCLUSION, OCCLUSION_BACKWARD,
};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Replacement draws for an unreadable pair before the sample is dropped.
pub const MAX_REPLACEMENTS: u64 = 8;
/// Unreadable-pair messages kept in [`LoaderStats::bad_pairs`].
const MAX_MESSAGES: usize = 64;
const TAG_AUG: u64 = 1;
const TAG_REPLACE: u64 = 2;

/// Loader settings (the device is passed to [`Loader::open`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderConfig {
    /// Stores, or folders of `*.zarr` stores.
    pub stores: Vec<PathBuf>,
    /// Flow group name (`--flow-group`); `None`: the first store's first group.
    pub flow_group: Option<String>,
    /// Pairs per batch (4).
    pub batch_size: usize,
    /// Background workers (2); 0 builds batches inline in `next()`. Each worker builds one
    /// batch at a time, its samples in parallel on the rayon pool.
    pub workers: usize,
    /// Batches in flight at most (being built + ready + waiting to be consumed) (4).
    pub prefetch: usize,
    pub seed: u64,
    /// Drop the last incomplete batch of an epoch (true).
    pub drop_last: bool,
    /// Which pairs a pass draws (default: the authors' R = 2 per video visit).
    pub sampling: PairSampling,
    pub augment: AugmentConfig,
    /// This process's share of every pass in data-parallel training (one process: all).
    pub shard: Shard,
}

/// One process's share of each pass, with PyTorch `DistributedSampler` semantics: every rank
/// walks the same seeded epoch order, and rank `r` of `W` takes positions `r, r + W, r + 2W,
/// ...` of each global batch of `W x batch_size` pairs. Augmentations are drawn from
/// (seed, epoch, position), so a pair gets the same crops and colours whichever rank reads
/// it, and `W` ranks with `B` pairs see exactly the batches one process with `W x B` sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Shard { rank: 0, world: 1 }
    }
}

impl Shard {
    /// Epoch position of pair `i` of this rank's local batch `b` (of `bs` pairs).
    pub fn position(&self, bs: usize, b: usize, i: usize) -> usize {
        b * bs * self.world + self.rank + self.world * i
    }
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            stores: Vec::new(),
            flow_group: None,
            batch_size: 4,
            workers: 2,
            prefetch: 4,
            seed: 0,
            drop_last: true,
            sampling: PairSampling::default(),
            augment: AugmentConfig::default(),
            shard: Shard::default(),
        }
    }
}

/// Where a sample came from, and its augmentation geometry (for logging and debugging).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct SampleMeta {
    pub store: PathBuf,
    /// Pair index within the store.
    pub pair: usize,
    /// Video path relative to the dataset root.
    pub video: String,
    pub t: i64,
    pub dt: i64,
    /// Position in the epoch's order (the RNG key).
    pub position: usize,
    /// True when this pair stands in for an unreadable one.
    pub replacement: bool,
    /// The global crop drawn for this pair (stored-frame geometry).
    pub crop: GlobalCrop,
    /// Subcrop boxes and centres in crop pixels.
    pub subcrops: SubcropSets,
}

/// One training batch. Index 0 of each pair of tensors is frame t, index 1 frame t+dt;
/// N = `meta.len()` (batch size, or less for a short last batch or dropped samples).
#[derive(Clone, Debug)]
pub struct Batch {
    pub epoch: u64,
    /// Batch index within the epoch.
    pub index: usize,
    /// Dense-branch views (N, 3, H, W), normalised, after the affine: `views[i](x) =
    /// crop_i(affines[i][n] x)`, zero outside.
    pub views: [Tensor; 2],
    /// Per-sample dense affines (sampling maps, `crate::geom` convention).
    pub affines: [Vec<Affine>; 2],
    /// Target-role views of frame i (N, 3, H, W) with their own affines: `target_views[i](x)
    /// = crop_i(target_affines[i][n] x)`.
    pub target_views: [Tensor; 2],
    pub target_affines: [Vec<Affine>; 2],
    /// (N, 2, H, W) crop pixels, not affine-transformed: [0] t -> t+dt, [1] t+dt -> t. On
    /// the CPU whatever the training device: only the dense loss's sampling plans read it,
    /// on the host, so a GPU step neither uploads it nor waits to read it back.
    pub flow: [Tensor; 2],
    /// (N, 1, H, W), 1.0 = occluded: [0] pixels of frame t, [1] pixels of frame t+dt. On the
    /// CPU, as `flow`.
    pub occluded: [Tensor; 2],
    /// `subcrops[d][r]` (N*K, 3, S, S): direction `d` (0: frame t online, 1: frame t+dt
    /// online), role `r` (0 online, 1 target); pair k of sample n at index n*K + k.
    pub subcrops: [[Tensor; 2]; 2],
    pub meta: Vec<SampleMeta>,
    /// Time the consumer waited in `next()` for this batch.
    pub wait: Duration,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.meta.len()
    }
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }
}

/// One store as opened.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StoreSummary {
    pub path: PathBuf,
    pub pairs: usize,
    pub valid: usize,
    pub invalid: usize,
    pub height: usize,
    pub width: usize,
}

/// What the loader found when it opened.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoaderSummary {
    pub flow_group: String,
    pub stores: Vec<StoreSummary>,
    pub valid_pairs: usize,
    /// Pairs left out because the store marks them invalid.
    pub invalid_skipped: usize,
    /// What a visit draws from (`video` or `pair`), and how many there are.
    pub unit: VisitUnit,
    pub units: usize,
    /// Smallest and largest pool of stored pairs per unit.
    pub pool_min: usize,
    pub pool_max: usize,
    /// R actually drawn per visit, pairs per pass, and paper epochs per pass (= R).
    pub pairs_per_visit: usize,
    pub pairs_per_pass: usize,
    pub epochs_per_pass: usize,
    pub batches_per_epoch: usize,
}

impl std::fmt::Display for LoaderSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} valid pairs in {} stores (flow group {}), {} invalid pairs skipped; {} {} units \
             (pools of {}-{} pairs), {} pairs per visit: {} pairs and {} batches per pass = {} paper epochs",
            self.valid_pairs,
            self.stores.len(),
            self.flow_group,
            self.invalid_skipped,
            self.units,
            serde_json::to_value(self.unit)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            self.pool_min,
            self.pool_max,
            self.pairs_per_visit,
            self.pairs_per_pass,
            self.batches_per_epoch,
            self.epochs_per_pass
        )
    }
}

/// Read failures so far (all epochs).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LoaderStats {
    /// Reads that failed (a pair failing in two epochs counts twice).
    pub corrupt_reads: usize,
    /// Distinct pairs found unreadable.
    pub bad_pairs_count: usize,
    /// Samples that used a replacement pair.
    pub replaced: usize,
    /// Samples dropped after [`MAX_REPLACEMENTS`] failures.
    pub dropped: usize,
    /// (store, pair, error) of the first unreadable pairs.
    pub bad_pairs: Vec<(PathBuf, usize, String)>,
}

#[derive(Default)]
struct Counters {
    corrupt_reads: AtomicUsize,
    replaced: AtomicUsize,
    dropped: AtomicUsize,
    /// Global index -> error message.
    bad: Mutex<HashMap<usize, String>>,
}

struct Shared {
    cfg: LoaderConfig,
    device: Device,
    stores: Vec<PoodleStore>,
    group: String,
    /// Valid pairs: (store, pair).
    index: Vec<(u32, u32)>,
    planner: PassPlanner,
    counters: Counters,
}

/// Lists the stores named by `paths`: a store itself, or a folder of `*.zarr` stores.
pub fn resolve_store_paths(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.join("zarr.json").is_file() {
            out.push(p.clone());
        } else if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("listing {}", p.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|c| c.is_dir() && c.extension().is_some_and(|x| x == "zarr"))
                .collect();
            if found.is_empty() {
                bail!(
                    "{}: neither a store (no zarr.json) nor a folder of *.zarr stores",
                    p.display()
                );
            }
            found.sort();
            out.extend(found);
        } else {
            bail!("{}: no such store or folder", p.display());
        }
    }
    Ok(out)
}

fn open_store(path: &Path, group: Option<&str>) -> Result<(PoodleStore, String)> {
    let s = PoodleStore::open(path).map_err(|e| anyhow!("{e}"))?;
    let (name, fa) = s.flow_group(group).map_err(|e| anyhow!("{e}"))?;
    let name = name.clone();
    if !fa.backward {
        bail!(
            "store {}: flow group {name} has no backward flow (t+dt -> t), which the symmetric \
             loss and the subcrops need; rerun poodle-prep without --no-backward",
            path.display()
        );
    }
    for a in [FORWARD, BACKWARD, OCCLUSION, OCCLUSION_BACKWARD] {
        let meta = path.join(FLOW_ROOT).join(&name).join(a).join("zarr.json");
        if !meta.is_file() {
            bail!(
                "store {}: array {FLOW_ROOT}/{name}/{a} is missing",
                path.display()
            );
        }
    }
    Ok((s, name))
}

/// The valid pairs of store `s` with the name of the unit each belongs to: `root|video|clip`
/// for video units (clip 0 except under `clips` sampling), `store|pair` for pair units.
fn store_units(s: &PoodleStore, unit: VisitUnit) -> Result<Vec<(usize, String)>> {
    let where_ = || format!("store {}", s.path.display());
    let valid = s
        .read_all_valid()
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("{}: reading `valid`", where_()))?;
    let pairs = s
        .read_all_pairs()
        .map_err(|e| anyhow!("{e}"))
        .with_context(where_)?;
    if valid.len() != s.num_pairs() || pairs.len() != s.num_pairs() {
        bail!(
            "{}: `valid` has {} and `pairs` {} entries for {} pairs",
            where_(),
            valid.len(),
            pairs.len(),
            s.num_pairs()
        );
    }
    let a = &s.attrs;
    let mut out = Vec::new();
    for (i, [video, t, dt]) in pairs.into_iter().enumerate() {
        if !valid[i] {
            continue;
        }
        let key = match unit {
            VisitUnit::Pair | VisitUnit::Auto => format!("{}|{i}", s.path.display()),
            VisitUnit::Video => {
                let v = usize::try_from(video).ok().filter(|&v| v < a.videos.len());
                let v = v.with_context(|| {
                    format!(
                        "{}: pair {i} names video {video} of {}",
                        where_(),
                        a.videos.len()
                    )
                })?;
                let clip = match &a.dataset.sampling {
                    Sampling::Clips {
                        clip_seconds,
                        dt_seconds,
                        ..
                    } => {
                        // Stores written before fps was recorded: dt = round(dt_seconds * fps).
                        let fps = a
                            .video_fps
                            .get(v)
                            .copied()
                            .unwrap_or(dt as f64 / dt_seconds);
                        clip_of(t, fps, *clip_seconds)
                    }
                    _ => 0,
                };
                format!("{}|{}|{clip}", a.root, a.videos[v])
            }
        };
        out.push((i, key));
    }
    Ok(out)
}

/// The loader: opened stores and an index of valid pairs. Cheap to keep; each
/// [`Loader::epoch`] starts its own workers.
pub struct Loader {
    shared: Arc<Shared>,
    summary: LoaderSummary,
}

/// Refuses a loader config that cannot make batches.
fn check_config(cfg: &LoaderConfig) -> Result<()> {
    cfg.augment
        .validate()
        .map_err(|e| anyhow!("augment config: {e}"))?;
    if cfg.batch_size == 0 {
        bail!("batch_size must be positive");
    }
    if cfg.prefetch == 0 {
        bail!("prefetch must be at least 1");
    }
    if cfg.shard.world == 0 || cfg.shard.rank >= cfg.shard.world {
        bail!(
            "shard: rank {} of world size {} is not a rank",
            cfg.shard.rank,
            cfg.shard.world
        );
    }
    Ok(())
}

/// The opened stores and their valid pairs, as the pass planner sees them.
struct StoreIndex {
    stores: Vec<PoodleStore>,
    summaries: Vec<StoreSummary>,
    /// `(store, pair)` of every valid pair.
    index: Vec<(u32, u32)>,
    /// The sampling unit of each entry of `index`.
    keys: Vec<PairKey>,
    unit: VisitUnit,
    /// The flow group read from every store.
    group: String,
}

impl StoreIndex {
    /// Opens `paths` (each with the flow group `cfg.flow_group`, else the first store's) and
    /// lists their valid pairs; the stores must agree on the sampling unit.
    fn open(cfg: &LoaderConfig, paths: &[PathBuf]) -> Result<Self> {
        let mut stores = Vec::new();
        let mut summaries = Vec::new();
        let mut index = Vec::new();
        let mut keys = Vec::new();
        let mut units_seen = Vec::new();
        let mut group = cfg.flow_group.clone();
        for p in paths {
            let (s, g) = open_store(p, group.as_deref())?;
            group.get_or_insert(g);
            let k = u32::try_from(stores.len()).context("too many stores")?;
            let unit = cfg.sampling.unit_for(&s.attrs.dataset.sampling);
            units_seen.push(unit);
            let before = index.len();
            for (i, key) in store_units(&s, unit)? {
                keys.push(PairKey {
                    index: u32::try_from(index.len()).context("too many pairs")?,
                    unit: key,
                });
                index.push((k, u32::try_from(i).context("store too large")?));
            }
            let nvalid = index.len() - before;
            let g = s.attrs.geometry;
            summaries.push(StoreSummary {
                path: p.clone(),
                pairs: s.num_pairs(),
                valid: nvalid,
                invalid: s.num_pairs() - nvalid,
                height: g.height,
                width: g.width,
            });
            stores.push(s);
        }
        let unit = units_seen[0];
        if units_seen.iter().any(|&u| u != unit) {
            bail!(
                "the stores mix image sequences (one unit per pair) and videos (one unit per \
                 video): set data.sampling.unit to \"video\" or \"pair\""
            );
        }
        Ok(StoreIndex {
            stores,
            summaries,
            index,
            keys,
            unit,
            group: group.expect("set by the first store"),
        })
    }
}

impl Loader {
    /// Opens every store, checks the schema and flow group, and indexes the valid pairs.
    pub fn open(cfg: LoaderConfig, device: Device) -> Result<Loader> {
        check_config(&cfg)?;
        let paths = resolve_store_paths(&cfg.stores)?;
        if paths.is_empty() {
            bail!("no stores given");
        }
        let StoreIndex {
            stores,
            summaries,
            index,
            keys,
            unit,
            group,
        } = StoreIndex::open(&cfg, &paths)?;
        let planner = PassPlanner::new(&cfg.sampling, cfg.seed, &keys, unit == VisitUnit::Pair);
        let n = planner.pairs_per_pass();
        // A batch here is one global batch: every rank's local batch of the same index.
        let bs = cfg.batch_size * cfg.shard.world;
        let batches = if cfg.drop_last {
            n / bs
        } else {
            n.div_ceil(bs)
        };
        if batches == 0 {
            bail!(
                "{} valid pairs in {} stores give {n} pairs per pass ({} units x {} per visit): \
                 not one batch of {bs} (batch_size {} x world size {}, drop_last = {})",
                index.len(),
                paths.len(),
                planner.num_units(),
                planner.pairs_per_visit(),
                cfg.batch_size,
                cfg.shard.world,
                cfg.drop_last
            );
        }
        let (pool_min, pool_max) = planner.pool_sizes();
        let summary = LoaderSummary {
            flow_group: group.clone(),
            valid_pairs: index.len(),
            invalid_skipped: summaries.iter().map(|s| s.invalid).sum(),
            stores: summaries,
            unit,
            units: planner.num_units(),
            pool_min,
            pool_max,
            pairs_per_visit: planner.pairs_per_visit(),
            pairs_per_pass: n,
            epochs_per_pass: planner.epochs_per_pass(),
            batches_per_epoch: batches,
        };
        Ok(Loader {
            shared: Arc::new(Shared {
                cfg,
                device,
                stores,
                group,
                index,
                planner,
                counters: Counters::default(),
            }),
            summary,
        })
    }

    pub fn summary(&self) -> &LoaderSummary {
        &self.summary
    }

    pub fn config(&self) -> &LoaderConfig {
        &self.shared.cfg
    }

    /// Batches in every pass.
    pub fn batches_per_epoch(&self) -> usize {
        self.summary.batches_per_epoch
    }

    /// Paper epochs one pass counts as (R; 1 for image sequences).
    pub fn epochs_per_pass(&self) -> usize {
        self.summary.epochs_per_pass
    }

    /// Read failures so far.
    pub fn stats(&self) -> LoaderStats {
        let c = &self.shared.counters;
        let bad = c.bad.lock().expect("bad-pair map");
        let mut bad_pairs: Vec<(PathBuf, usize, String)> = bad
            .iter()
            .map(|(&g, m)| {
                let (s, i) = self.shared.index[g];
                (
                    self.shared.stores[s as usize].path.clone(),
                    i as usize,
                    m.clone(),
                )
            })
            .collect();
        bad_pairs.sort();
        bad_pairs.truncate(MAX_MESSAGES);
        LoaderStats {
            corrupt_reads: c.corrupt_reads.load(Ordering::Relaxed),
            bad_pairs_count: bad.len(),
            replaced: c.replaced.load(Ordering::Relaxed),
            dropped: c.dropped.load(Ordering::Relaxed),
            bad_pairs,
        }
    }

    /// Epoch position of pair `i` of this process's batch `b`.
    pub fn position(&self, b: usize, i: usize) -> usize {
        let cfg = &self.shared.cfg;
        cfg.shard.position(cfg.batch_size, b, i)
    }

    /// The pairs of epoch `epoch` in order, as (store path, pair index).
    pub fn epoch_order(&self, epoch: u64) -> Vec<(PathBuf, usize)> {
        self.shared
            .permutation(epoch)
            .into_iter()
            .map(|g| {
                let (s, i) = self.shared.index[g as usize];
                (self.shared.stores[s as usize].path.clone(), i as usize)
            })
            .collect()
    }

    /// The augmented pair at position `pos` of pass `epoch`, exactly as a batch of that pass
    /// holds it (for pictures of the objective); `None` when it is unreadable.
    pub fn augmented(&self, epoch: u64, pos: usize) -> Option<(AugmentedPair, SampleMeta)> {
        let plan = EpochPlan {
            epoch,
            perm: self.shared.permutation(epoch),
            num_batches: self.summary.batches_per_epoch,
        };
        (pos < plan.perm.len())
            .then(|| self.shared.sample(&plan, pos))
            .flatten()
    }

    /// Starts pass `epoch`: its workers run until the iterator is exhausted or dropped.
    pub fn epoch(&self, epoch: u64) -> EpochIter {
        self.epoch_from(epoch, 0)
    }

    /// Starts pass `epoch` at batch `start` (resuming): the batches before it are neither
    /// read nor augmented, and batch `b >= start` is the same as in a full pass.
    pub fn epoch_from(&self, epoch: u64, start: usize) -> EpochIter {
        let plan = Arc::new(EpochPlan {
            epoch,
            perm: self.shared.permutation(epoch),
            num_batches: self.summary.batches_per_epoch,
        });
        let cfg = &self.shared.cfg;
        let mut it = EpochIter {
            shared: self.shared.clone(),
            plan: plan.clone(),
            next: start,
            pending: BTreeMap::new(),
            results: None,
            tokens: None,
            workers: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            buffered: Arc::new(AtomicUsize::new(0)),
            max_buffered: Arc::new(AtomicUsize::new(0)),
        };
        if cfg.workers == 0 {
            return it;
        }
        let (tok_tx, tok_rx) = bounded::<()>(cfg.prefetch);
        for _ in 0..cfg.prefetch {
            tok_tx.send(()).expect("token channel has room");
        }
        let (res_tx, res_rx) = bounded(cfg.prefetch);
        let next_batch = Arc::new(AtomicUsize::new(start));
        for w in 0..cfg.workers {
            let ctx = WorkerCtx {
                shared: self.shared.clone(),
                plan: plan.clone(),
                tokens: tok_rx.clone(),
                results: res_tx.clone(),
                next_batch: next_batch.clone(),
                stop: it.stop.clone(),
                buffered: it.buffered.clone(),
                max_buffered: it.max_buffered.clone(),
            };
            let h = std::thread::Builder::new()
                .name(format!("poodle-data-{w}"))
                .spawn(move || ctx.run())
                .expect("spawn data worker");
            it.workers.push(h);
        }
        it.tokens = Some(tok_tx);
        it.results = Some(res_rx);
        it
    }
}

struct EpochPlan {
    epoch: u64,
    /// Global indices in epoch order.
    perm: Vec<u32>,
    num_batches: usize,
}

impl Shared {
    fn permutation(&self, epoch: u64) -> Vec<u32> {
        self.planner.pass(epoch)
    }

    fn read_and_augment(&self, g: usize, rng: &mut Rng) -> Result<(AugmentedPair, SampleMeta)> {
        let (s, i) = self.index[g];
        let (store, i) = (&self.stores[s as usize], i as usize);
        let pair = store.read_pair(i).map_err(|e| anyhow!("{e}"))?;
        if !pair.valid {
            bail!("store {}: pair {i} is not valid", store.path.display());
        }
        let flow = store
            .read_flow(&self.group, i)
            .map_err(|e| anyhow!("{e}"))?;
        let geom = store.attrs.geometry;
        let missing = || anyhow!("store {}: pair {i}: no backward flow", store.path.display());
        let raw = RawPair {
            h: geom.height,
            w: geom.width,
            frames: &pair.frames,
            flow_fwd: &flow.forward,
            flow_bwd: flow.backward.as_deref().ok_or_else(missing)?,
            occ_fwd: &flow.occlusion,
            occ_bwd: flow.occlusion_backward.as_deref().ok_or_else(missing)?,
        };
        raw.check()
            .map_err(|e| anyhow!("store {}: pair {i}: {e}", store.path.display()))?;
        let aug = augment_pair(&raw, &self.cfg.augment, rng);
        let meta = SampleMeta {
            store: store.path.clone(),
            pair: i,
            video: usize::try_from(pair.video)
                .ok()
                .and_then(|v| store.attrs.videos.get(v).cloned())
                .unwrap_or_else(|| format!("#{}", pair.video)),
            t: pair.t,
            dt: pair.dt,
            position: 0,
            replacement: false,
            crop: aug.crop,
            subcrops: aug.subcrop_pairs.clone(),
        };
        Ok((aug, meta))
    }

    /// The sample at epoch position `pos`, or `None` when it and its replacements are
    /// unreadable.
    fn sample(&self, plan: &EpochPlan, pos: usize) -> Option<(AugmentedPair, SampleMeta)> {
        let (seed, e, p) = (self.cfg.seed, plan.epoch, pos as u64);
        let c = &self.counters;
        for attempt in 0..=MAX_REPLACEMENTS {
            let g = if attempt == 0 {
                plan.perm[pos] as usize
            } else {
                Rng::derive(seed, &[e, p, TAG_REPLACE, attempt]).below(self.index.len())
            };
            if c.bad.lock().expect("bad-pair map").contains_key(&g) {
                continue; // known unreadable: the same outcome as reading it again
            }
            let mut rng = Rng::derive(seed, &[e, p, TAG_AUG]);
            // A panic while decoding a damaged chunk is a read error of this pair too.
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.read_and_augment(g, &mut rng)
            }))
            .unwrap_or_else(|p| {
                let (s, i) = self.index[g];
                Err(anyhow!(
                    "store {}: pair {i}: panicked while reading: {}",
                    self.stores[s as usize].path.display(),
                    panic_message(&*p)
                ))
            });
            match res {
                Ok((aug, mut meta)) => {
                    meta.position = pos;
                    meta.replacement = attempt > 0;
                    if attempt > 0 {
                        c.replaced.fetch_add(1, Ordering::Relaxed);
                    }
                    return Some((aug, meta));
                }
                Err(err) => {
                    c.corrupt_reads.fetch_add(1, Ordering::Relaxed);
                    let msg = format!("{err:#}");
                    let mut bad = c.bad.lock().expect("bad-pair map");
                    if let std::collections::hash_map::Entry::Vacant(e) = bad.entry(g) {
                        eprintln!("poodle-train data: skipping unreadable pair: {msg}");
                        e.insert(msg);
                    }
                }
            }
        }
        c.dropped.fetch_add(1, Ordering::Relaxed);
        None
    }

    fn build_batch(&self, plan: &EpochPlan, b: usize) -> Result<Batch> {
        let (bs, shard) = (self.cfg.batch_size, self.cfg.shard);
        let positions: Vec<usize> = (0..bs)
            .map(|i| shard.position(bs, b, i))
            .filter(|&p| p < plan.perm.len())
            .collect();
        let samples: Vec<(AugmentedPair, SampleMeta)> = positions
            .into_par_iter()
            .filter_map(|pos| self.sample(plan, pos))
            .collect();
        if samples.is_empty() {
            bail!(
                "epoch {} batch {b}: every sample was unreadable (see the warnings above)",
                plan.epoch
            );
        }
        pack(samples, &self.cfg.augment, &self.device, plan.epoch, b)
    }
}

/// Stacks augmented pairs into device tensors.
fn pack(
    samples: Vec<(AugmentedPair, SampleMeta)>,
    cfg: &AugmentConfig,
    device: &Device,
    epoch: u64,
    index: usize,
) -> Result<Batch> {
    let n = samples.len();
    let (h, w) = (cfg.out_height, cfg.out_width);
    let (k, s) = (cfg.subcrops.k, cfg.subcrops.size);
    let stack = |len: usize, get: &dyn Fn(&AugmentedPair, &mut Vec<f32>)| {
        let mut v = Vec::with_capacity(len);
        for (a, _) in &samples {
            get(a, &mut v);
        }
        debug_assert_eq!(v.len(), len);
        v
    };
    let mut views = Vec::with_capacity(2);
    let mut target_views = Vec::with_capacity(2);
    let mut flow = Vec::with_capacity(2);
    let mut occluded = Vec::with_capacity(2);
    let mut subcrops = Vec::with_capacity(4);
    for i in 0..2 {
        let v = stack(n * 3 * h * w, &|a, v| v.extend_from_slice(&a.views[i].data));
        views.push(Tensor::from_vec(v, (n, 3, h, w), device)?);
        let v = stack(n * 3 * h * w, &|a, v| {
            v.extend_from_slice(&a.target_views[i].data)
        });
        target_views.push(Tensor::from_vec(v, (n, 3, h, w), device)?);
        let v = stack(n * 2 * h * w, &|a, v| v.extend_from_slice(&a.flow[i].data));
        flow.push(Tensor::from_vec(v, (n, 2, h, w), &Device::Cpu)?);
        let v = stack(n * h * w, &|a, v| {
            v.extend(a.occluded[i].iter().map(|&o| f32::from(u8::from(o))))
        });
        occluded.push(Tensor::from_vec(v, (n, 1, h, w), &Device::Cpu)?);
        for role in 0..2 {
            let v = stack(n * k * 3 * s * s, &|a, v| {
                for m in &a.subcrops[i][role] {
                    v.extend_from_slice(&m.data)
                }
            });
            subcrops.push(Tensor::from_vec(v, (n * k, 3, s, s), device)?);
        }
    }
    // On CUDA this thread's uploads went to its own per-thread stream (candle's), which
    // nothing orders with the training thread's: wait for them here, off the training thread.
    device.synchronize()?;
    let pair = |v: Vec<Tensor>| -> [Tensor; 2] { v.try_into().expect("two tensors") };
    let affines = [0, 1].map(|i| samples.iter().map(|(a, _)| a.affines[i]).collect());
    let target_affines = [0, 1].map(|i| samples.iter().map(|(a, _)| a.target_affines[i]).collect());
    Ok(Batch {
        epoch,
        index,
        views: pair(views),
        affines,
        target_views: pair(target_views),
        target_affines,
        flow: pair(flow),
        occluded: pair(occluded),
        subcrops: {
            let mut it = subcrops.into_iter();
            let mut next = || it.next().expect("four subcrop tensors");
            [[next(), next()], [next(), next()]]
        },
        meta: samples.into_iter().map(|(_, m)| m).collect(),
        wait: Duration::ZERO,
    })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

struct WorkerCtx {
    shared: Arc<Shared>,
    plan: Arc<EpochPlan>,
    tokens: Receiver<()>,
    results: Sender<(usize, Result<Batch>)>,
    next_batch: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    buffered: Arc<AtomicUsize>,
    max_buffered: Arc<AtomicUsize>,
}

impl WorkerCtx {
    fn run(self) {
        while self.tokens.recv().is_ok() {
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            let b = self.next_batch.fetch_add(1, Ordering::AcqRel);
            if b >= self.plan.num_batches {
                break;
            }
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.shared.build_batch(&self.plan, b)
            }))
            .unwrap_or_else(|p| {
                Err(anyhow!(
                    "data worker panicked building batch {b}: {}",
                    panic_message(&*p)
                ))
            });
            let now = self.buffered.fetch_add(1, Ordering::AcqRel) + 1;
            self.max_buffered.fetch_max(now, Ordering::AcqRel);
            if self.results.send((b, res)).is_err() {
                break;
            }
        }
    }
}

/// The batches of one epoch, in order. Dropping it stops its workers.
pub struct EpochIter {
    shared: Arc<Shared>,
    plan: Arc<EpochPlan>,
    next: usize,
    pending: BTreeMap<usize, Result<Batch>>,
    results: Option<Receiver<(usize, Result<Batch>)>>,
    tokens: Option<Sender<()>>,
    workers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    buffered: Arc<AtomicUsize>,
    max_buffered: Arc<AtomicUsize>,
}

impl EpochIter {
    pub fn epoch(&self) -> u64 {
        self.plan.epoch
    }

    pub fn num_batches(&self) -> usize {
        self.plan.num_batches
    }

    /// Batches finished by the workers and not yet handed out (now).
    pub fn buffered(&self) -> usize {
        self.buffered.load(Ordering::Acquire)
    }

    /// The most batches that were ever finished and not yet handed out at once (never more
    /// than `prefetch`).
    pub fn max_buffered(&self) -> usize {
        self.max_buffered.load(Ordering::Acquire)
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.tokens = None;
        self.results = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

impl Iterator for EpochIter {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.plan.num_batches {
            return None;
        }
        let t0 = Instant::now();
        let b = self.next;
        let res = match &self.results {
            None if self.workers.is_empty() && self.shared.cfg.workers == 0 => {
                self.shared.build_batch(&self.plan, b)
            }
            None => Err(anyhow!("epoch {} was shut down", self.plan.epoch)),
            Some(rx) => loop {
                if let Some(r) = self.pending.remove(&b) {
                    self.buffered.fetch_sub(1, Ordering::AcqRel);
                    if let Some(t) = &self.tokens {
                        let _ = t.send(());
                    }
                    break r;
                }
                match rx.recv() {
                    Ok((i, r)) => {
                        self.pending.insert(i, r);
                    }
                    Err(_) => break Err(anyhow!("data workers stopped before batch {b}")),
                }
            },
        };
        self.next += 1;
        let wait = t0.elapsed();
        Some(res.map(|mut batch| {
            batch.wait = wait;
            batch
        }))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.plan.num_batches - self.next;
        (left, Some(left))
    }
}

impl Drop for EpochIter {
    fn drop(&mut self) {
        self.shutdown();
    }
}
