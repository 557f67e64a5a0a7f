//! Linear readout for semantic segmentation (the paper's "linear" DeepLab-v1-style readout,
//! Section 4 and Appendix A): the pre-trained backbone **and spatial decoder** are frozen,
//! and a single 1x1 convolution (C -> classes, with bias) is trained on their stride-8
//! output.
//!
//! # Recipe
//! 1. Encoder: the online encoder of a checkpoint (`online.<name>` keys; `--target` takes
//!    the EMA `target.<name>` weights), or a randomly initialised one (seeded, the "scratch"
//!    row). Features are [`Encoder::dense_features`] in eval mode (BatchNorm running
//!    statistics): the decoder output at stride 8 (C5's width: 512 for ResNet-18, 2048 for
//!    ResNet-50), or C5 for a model without decoder.
//! 2. Input: each image resized (antialiased bilinear) to `size` = (H, W), multiples of 32,
//!    ImageNet mean/std normalisation; no augmentation. Training labels are resized to
//!    (H, W) with nearest neighbour.
//! 3. Features are standardised per channel with the training set's mean and std (a frozen,
//!    non-affine BatchNorm: the readout stays linear; it only makes one learning rate fit
//!    encoders whose feature scales differ by orders of magnitude, e.g. random vs trained).
//!    With `cache_features` (default) the training features are computed once and kept in
//!    memory (`N x C x H/8 x W/8` f32: CamVid 367 images at 192x256 = 0.58 GB for
//!    ResNet-18, 2.3 GB for ResNet-50); without it they are recomputed every epoch.
//! 4. Readout: logits = W f + b at stride 8, bilinearly upsampled to (H, W)
//!    (`align_corners=False`), pixel-mean cross-entropy over labelled pixels (ignored labels
//!    `>= classes` excluded). W and b start at zero (the problem is convex). AdamW (weight
//!    decay on W only), one epoch of linear learning-rate warm-up, then cosine decay to 0;
//!    shuffled mini-batches.
//! 5. Evaluation: val logits upsampled bilinearly to each label map's **native** resolution,
//!    argmax, confusion matrix -> mIoU, pixel accuracy, IoU per class, and the paper's class
//!    groups ([`super::metrics`]) from the statistics of the **full** training split's
//!    labels (not the `max_train` subset). Training metrics are the same at (H, W) after
//!    training.
//!
//! `max_train` / `max_val` take evenly spaced images of the sorted split (deterministic, and
//! spread over all sequences).

use super::datasets::{
    colourise, read_label, read_rgb, resize_label_nearest, resize_normalise, resize_rgb_nearest,
    DatasetKind, LabelMap, Sample,
};
use super::metrics::{group_miou, ClassGroups, ClassStats, ClassStatsAccumulator, Confusion};
use super::readout::{AdamW, LinearHead};
use crate::model::{named_vars, Encoder, ModelConfig};
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use poodle_common::rng::SplitMix64;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Everything a linear readout run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearEvalConfig {
    /// A run folder (its `latest.json` checkpoint) or a checkpoint file; `None`: a randomly
    /// initialised encoder (the scratch baseline) with `seed`.
    pub checkpoint: Option<PathBuf>,
    /// The architecture. `None`: the `config.json` of the checkpoint's run folder (a file's
    /// parent folder). Required for scratch.
    pub model: Option<ModelConfig>,
    /// Read the EMA target's weights instead of the online network's.
    pub use_target: bool,
    /// Seed of the scratch encoder and of the readout's batch order.
    pub seed: u64,
    pub dataset: DatasetKind,
    pub root: PathBuf,
    pub train_split: String,
    pub val_split: String,
    /// Use at most this many (evenly spaced) training / validation images.
    pub max_train: Option<usize>,
    pub max_val: Option<usize>,
    /// Readout input (height, width), multiples of 32; `None`: the dataset's default
    /// ([`DatasetKind::default_size`]).
    pub size: Option<(usize, usize)>,
    pub epochs: usize,
    pub batch_size: usize,
    /// AdamW peak learning rate (cosine to 0) and weight decay (on W).
    pub lr: f64,
    pub weight_decay: f64,
    /// Images per encoder forward pass.
    pub feature_batch: usize,
    /// Keep the training features in memory (else recompute them every epoch).
    pub cache_features: bool,
    /// Validation images to draw (image | ground truth | prediction) into `out/vis/`.
    pub num_vis: usize,
    /// Class-group thresholds: small if the average pixel share per image is below
    /// `small_share`, rare if in fewer than `rare_share` of the images (paper: 0.01, 0.20).
    pub small_share: f64,
    pub rare_share: f64,
    /// Output folder: `report.json`, `report.md`, `readout.safetensors`, `vis/`.
    pub out: Option<PathBuf>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// No progress lines on stderr.
    pub quiet: bool,
}

impl LinearEvalConfig {
    /// Defaults: scratch (set `model`), full splits, dataset size, 20 epochs of batch 8,
    /// AdamW lr 0.05, weight decay 1e-4, 4 visualisations, CPU.
    pub fn new(dataset: DatasetKind, root: impl Into<PathBuf>) -> Self {
        LinearEvalConfig {
            checkpoint: None,
            model: None,
            use_target: false,
            seed: 0,
            dataset,
            root: root.into(),
            train_split: "train".into(),
            val_split: "val".into(),
            max_train: None,
            max_val: None,
            size: None,
            epochs: 20,
            batch_size: 8,
            lr: 0.05,
            weight_decay: 1e-4,
            feature_batch: 4,
            cache_features: true,
            num_vis: 4,
            small_share: super::metrics::SMALL_SHARE,
            rare_share: super::metrics::RARE_SHARE,
            out: None,
            device: "cpu".into(),
            quiet: false,
        }
    }
}

/// IoU and training-set statistics of one class.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClassResult {
    pub id: usize,
    pub name: String,
    /// Validation IoU; `null` if the class is neither in the ground truth nor predicted.
    pub iou: Option<f64>,
    /// Validation recall; `null` if absent from the ground truth.
    pub acc: Option<f64>,
    pub val_pixels: u64,
    /// Training-split statistics (fractions): average pixel share per image, share of all
    /// pixels, share of images containing the class.
    pub avg_pixel_share: f64,
    pub total_pixel_share: f64,
    pub image_share: f64,
    /// "small" or "large".
    pub size: String,
    /// "rare" or "common".
    pub freq: String,
}

/// One class group and its mIoU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupResult {
    pub classes: Vec<String>,
    /// Mean of the members' defined IoUs; `null` if none is defined (e.g. an empty group).
    pub miou: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupsReport {
    pub small: GroupResult,
    pub large: GroupResult,
    pub rare: GroupResult,
    pub common: GroupResult,
    /// Training images the statistics come from, and the thresholds used.
    pub stats_images: u64,
    pub small_share: f64,
    pub rare_share: f64,
}

/// What a linear readout reports (`report.json`). Shares and IoUs are fractions (0..1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LinearReport {
    /// The checkpoint path, or "scratch".
    pub model: String,
    /// Training step of the checkpoint (from `latest.json` or the file name).
    pub checkpoint_step: Option<u64>,
    /// "online", "target" or "random(seed=N)".
    pub weights: String,
    pub backbone: String,
    pub decoder: bool,
    pub dataset: String,
    pub root: String,
    pub num_classes: usize,
    pub train_images: usize,
    pub val_images: usize,
    /// Images of the splits skipped for a missing label file.
    pub skipped_unlabelled: usize,
    /// Readout input (H, W) and feature map (h, w, channels).
    pub input_size: [usize; 2],
    pub feature_size: [usize; 3],
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub seed: u64,
    /// Mean training loss of each epoch.
    pub epoch_loss: Vec<f64>,
    /// Validation metrics at native label resolution.
    pub miou: f64,
    pub pixel_acc: f64,
    pub mean_class_acc: f64,
    /// Training-set metrics at the readout's input resolution.
    pub train_miou: f64,
    pub train_pixel_acc: f64,
    pub classes: Vec<ClassResult>,
    pub groups: GroupsReport,
    /// Validation confusion matrix (`k x k`, row = ground truth).
    pub confusion: Confusion,
    pub visualisations: Vec<String>,
    pub feature_s: f64,
    pub readout_s: f64,
    pub eval_s: f64,
    pub wall_s: f64,
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.1}", 100.0 * v))
}

impl LinearReport {
    /// A markdown summary: the headline numbers, the groups, and IoU per class.
    pub fn to_table(&self) -> String {
        let mut s = String::new();
        let g = &self.groups;
        s.push_str(&format!(
            "linear readout: {} ({} weights, {}{}) on {} ({} train / {} val images, input {}x{}, features {}x{}x{}), {} epochs, {:.1} s\n\n",
            self.model,
            self.weights,
            self.backbone,
            if self.decoder { " + SDM" } else { "" },
            self.dataset,
            self.train_images,
            self.val_images,
            self.input_size[0],
            self.input_size[1],
            self.feature_size[2],
            self.feature_size[0],
            self.feature_size[1],
            self.epochs,
            self.wall_s
        ));
        s.push_str("| mIoU | Acc | small | large | rare | common | train mIoU | train Acc |\n");
        s.push_str("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n\n",
            pct(Some(self.miou)),
            pct(Some(self.pixel_acc)),
            pct(g.small.miou),
            pct(g.large.miou),
            pct(g.rare.miou),
            pct(g.common.miou),
            pct(Some(self.train_miou)),
            pct(Some(self.train_pixel_acc)),
        ));
        s.push_str(
            "| id | class | IoU | Acc | val px | avg px %/im (train) | % of im (train) | group |\n",
        );
        s.push_str("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |\n");
        for c in &self.classes {
            s.push_str(&format!(
                "| {} | {} | {} | {} | {} | {:.2} | {:.1} | {}, {} |\n",
                c.id,
                c.name,
                pct(c.iou),
                pct(c.acc),
                c.val_pixels,
                100.0 * c.avg_pixel_share,
                100.0 * c.image_share,
                c.size,
                c.freq
            ));
        }
        s
    }
}

/// Parses `HxW` (e.g. `192x256`).
pub fn parse_size(s: &str) -> Result<(usize, usize)> {
    let (h, w) = s
        .split_once(['x', 'X'])
        .with_context(|| format!("size {s:?}: expected HxW, e.g. 192x256"))?;
    Ok((h.trim().parse()?, w.trim().parse()?))
}

/// A model architecture by name (`tiny`, `paper`, `ablation`: the presets' models; `flowe`)
/// or from a JSON file holding a `ModelConfig`, a `TrainConfig`, or a run's `config.json`.
pub fn parse_model(s: &str) -> Result<ModelConfig> {
    if s == "flowe" {
        return Ok(ModelConfig::flowe());
    }
    let p = Path::new(s);
    if !p.is_file() {
        return Ok(crate::config::TrainConfig::preset(s)?.model);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(p)?).with_context(|| format!("{s}: invalid JSON"))?;
    model_from_json(&v).with_context(|| format!("{s}: no model config"))
}

fn model_from_json(v: &serde_json::Value) -> Result<ModelConfig> {
    for m in [&v["config"]["model"], &v["model"], v] {
        if let Ok(c) = serde_json::from_value::<ModelConfig>(m.clone()) {
            return Ok(c);
        }
    }
    bail!("expected a ModelConfig, a TrainConfig or a run's config.json")
}

/// The checkpoint file and its step: a run folder's `latest.json` target, or the file itself
/// (step from a `checkpoint-NNNNNNNN.safetensors` name).
pub fn resolve_checkpoint(path: &Path) -> Result<(PathBuf, Option<u64>)> {
    if path.is_dir() {
        let latest = path.join("latest.json");
        ensure!(
            latest.is_file(),
            "{}: no latest.json (not a run folder with a checkpoint)",
            path.display()
        );
        let p: crate::checkpoint::Progress = poodle_common::atomic::read_json(&latest)?;
        return Ok((path.join(&p.file), Some(p.step)));
    }
    ensure!(path.is_file(), "{}: no such checkpoint", path.display());
    let step = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("checkpoint-"))
        .and_then(|n| n.strip_suffix(".safetensors"))
        .and_then(|n| n.parse().ok());
    Ok((path.to_path_buf(), step))
}

/// The architecture recorded in a run folder's `config.json` (for a checkpoint file: its
/// folder's).
pub fn model_config_of(checkpoint: &Path) -> Result<ModelConfig> {
    ensure!(
        checkpoint.exists(),
        "{}: no such run folder or checkpoint file",
        checkpoint.display()
    );
    let dir = if checkpoint.is_dir() {
        checkpoint.to_path_buf()
    } else {
        checkpoint
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default()
    };
    let f = dir.join("config.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&f).with_context(|| {
        format!(
            "{}: cannot read the run's config (pass the architecture explicitly)",
            f.display()
        )
    })?)
    .with_context(|| format!("{}: invalid JSON", f.display()))?;
    model_from_json(&v).with_context(|| format!("{}", f.display()))
}

/// Builds the encoder and fills it from a checkpoint (`online.` or `target.` keys), or draws
/// it from `seed` when `checkpoint` is `None`.
pub fn load_encoder(
    model: &ModelConfig,
    checkpoint: Option<&Path>,
    use_target: bool,
    seed: u64,
    dev: &Device,
) -> Result<(Encoder, VarMap)> {
    let map = VarMap::new();
    let enc = Encoder::new(model, VarBuilder::from_varmap(&map, DType::F32, dev))?;
    crate::model::init::reseed(&map, seed)?;
    if let Some(file) = checkpoint.filter(|f| crate::export::is_pth(f)) {
        // A .pth: the authors' PooDLe / FlowE checkpoint (or a torchvision ResNet).
        let which = if use_target {
            crate::export::Which::Target
        } else {
            crate::export::Which::Online
        };
        let rep = crate::export::load_init_with(&map, file, which)?;
        ensure!(
            rep.layout == "poodle" || !model.decoder.enabled,
            "{}: holds a backbone only (layout {}), but the model has a decoder; pass a \
             model without one (e.g. --model flowe)",
            file.display(),
            rep.layout
        );
    } else if let Some(file) = checkpoint {
        let all = candle_core::safetensors::load(file, dev)
            .with_context(|| format!("checkpoint {}", file.display()))?;
        let prefix = if use_target { "target" } else { "online" };
        for (name, var) in named_vars(&map) {
            let key = format!("{prefix}.{name}");
            let t = all.get(&key).with_context(|| {
                format!(
                    "checkpoint {}: missing {key} (architecture differs from the checkpoint's?)",
                    file.display()
                )
            })?;
            ensure!(
                t.dims() == var.dims(),
                "checkpoint {}: {key} has shape {:?}, the model {:?}",
                file.display(),
                t.dims(),
                var.dims()
            );
            var.set(&t.to_dtype(DType::F32)?)?;
        }
    }
    Ok((enc, map))
}

/// Evenly spaced subset of at most `max` items (all when `None` or enough).
fn spaced<T: Clone>(v: &[T], max: Option<usize>) -> Vec<T> {
    match max {
        Some(m) if m < v.len() => (0..m).map(|i| v[i * v.len() / m].clone()).collect(),
        _ => v.to_vec(),
    }
}

/// Frozen encoder + preprocessing.
struct Extractor<'a> {
    enc: &'a Encoder,
    dev: Device,
    size: (usize, usize),
    batch: usize,
}

/// Features of one image, `C x (h*w)` row-major on the CPU.
type Feat = Vec<f32>;

impl Extractor<'_> {
    /// Features of the samples, the feature map size `(h, w, C)`, and the native label maps.
    fn run(&self, samples: &[Sample]) -> Result<Extracted> {
        let (h, w) = self.size;
        let loaded: Vec<(Vec<f32>, LabelMap)> = samples
            .par_iter()
            .map(|s| -> Result<_> {
                let img = read_rgb(&s.image)?;
                Ok((resize_normalise(&img, h, w), read_label(&s.label)?))
            })
            .collect::<Result<_>>()?;
        let mut feats = Vec::with_capacity(loaded.len());
        let mut labels = Vec::with_capacity(loaded.len());
        let mut dims = (0, 0, 0);
        for chunk in loaded.chunks(self.batch.max(1)) {
            let data: Vec<f32> = chunk.iter().flat_map(|(x, _)| x.iter().copied()).collect();
            let x = Tensor::from_vec(data, (chunk.len(), 3, h, w), &self.dev)?;
            let f = self
                .enc
                .dense_features(&x, false)?
                .detach()
                .to_dtype(DType::F32)?
                .to_device(&Device::Cpu)?;
            let (n, c, fh, fw) = f.dims4()?;
            dims = (fh, fw, c);
            for i in 0..n {
                feats.push(f.get(i)?.flatten_all()?.to_vec1::<f32>()?);
            }
            labels.extend(chunk.iter().map(|(_, l)| l.clone()));
        }
        Ok(Extracted {
            feats,
            dims,
            labels,
        })
    }
}

/// What [`Extractor::run`] returns.
struct Extracted {
    feats: Vec<Feat>,
    /// `(h, w, C)` of the feature maps.
    dims: (usize, usize, usize),
    /// Native-resolution labels.
    labels: Vec<LabelMap>,
}

/// Per-channel standardisation `(f - mean) / std` with statistics of the training features.
struct Standardise {
    mean: Vec<f32>,
    inv_std: Vec<f32>,
}

/// Running per-channel sums for [`Standardise`].
struct Moments {
    sum: Vec<f64>,
    sq: Vec<f64>,
    n: f64,
}

impl Moments {
    fn new() -> Self {
        Moments {
            sum: Vec::new(),
            sq: Vec::new(),
            n: 0.0,
        }
    }

    fn add(&mut self, f: &[f32], c: usize) {
        let p = f.len() / c;
        if self.sum.is_empty() {
            (self.sum, self.sq) = (vec![0.0; c], vec![0.0; c]);
        }
        for i in 0..c {
            let (mut s, mut q) = (0f64, 0f64);
            for &v in &f[i * p..(i + 1) * p] {
                s += f64::from(v);
                q += f64::from(v) * f64::from(v);
            }
            self.sum[i] += s;
            self.sq[i] += q;
        }
        self.n += p as f64;
    }

    fn finish(&self) -> Standardise {
        let (mean, inv_std) = self
            .sum
            .iter()
            .zip(&self.sq)
            .map(|(s, q)| {
                let m = s / self.n;
                let var = (q / self.n - m * m).max(0.0);
                // A constant (dead) channel stays 0 after centring.
                let inv = if var > 1e-12 { 1.0 / var.sqrt() } else { 1.0 };
                (m as f32, inv as f32)
            })
            .unzip();
        Standardise { mean, inv_std }
    }
}

impl Standardise {
    fn apply(&self, f: &mut [f32]) {
        let c = self.mean.len();
        let p = f.len() / c;
        for i in 0..c {
            let (m, s) = (self.mean[i], self.inv_std[i]);
            f[i * p..(i + 1) * p]
                .iter_mut()
                .for_each(|v| *v = (*v - m) * s);
        }
    }
}

fn log(quiet: bool, msg: impl AsRef<str>) {
    if !quiet {
        eprintln!("[eval linear] {}", msg.as_ref());
    }
}

/// Statistics of every label map of a split, read in parallel.
fn split_stats(samples: &[Sample], k: usize) -> Result<ClassStats> {
    let acc = samples
        .par_iter()
        .map(|s| -> Result<ClassStatsAccumulator> {
            let mut a = ClassStatsAccumulator::new(k);
            a.add_image(&read_label(&s.label)?.data);
            Ok(a)
        })
        .try_reduce(
            || ClassStatsAccumulator::new(k),
            |mut a, b| {
                a.merge(&b);
                Ok(a)
            },
        )?;
    Ok(acc.finish())
}

/// Trains and evaluates a linear readout; writes the outputs if `cfg.out` is set.
pub fn run(cfg: &LinearEvalConfig) -> Result<LinearReport> {
    let t0 = Instant::now();
    let dev = crate::run::device(&cfg.device)?;
    let ev = LinearEval::new(cfg)?;
    let frozen = ev.load_frozen(&dev)?;
    let splits = ev.load_splits()?;
    let ex = Extractor {
        enc: &frozen.enc,
        dev: dev.clone(),
        size: ev.size,
        batch: cfg.feature_batch,
    };
    let fit = ev.fit(&ex, &splits.train)?;
    let val = ev.validate(&ex, &splits.val, &fit)?;
    let report = ev.report(&frozen, &splits, &fit, val, t0);
    if let Some(o) = &cfg.out {
        ev.write_outputs(o, &report, &fit)?;
    }
    log(
        cfg.quiet,
        format!(
            "mIoU {:.1}  Acc {:.1}  ({:.1} s)",
            100.0 * report.miou,
            100.0 * report.pixel_acc,
            report.wall_s
        ),
    );
    Ok(report)
}

/// What the stages of [`run`] share: the checked config and what follows from it.
struct LinearEval<'a> {
    cfg: &'a LinearEvalConfig,
    kind: DatasetKind,
    /// Number of classes.
    k: usize,
    /// Readout input (H, W).
    size: (usize, usize),
    /// Images per feature-extraction pass over a split (bounds the decoded images in memory).
    chunk: usize,
}

/// The frozen encoder and how the report names it.
struct Frozen {
    enc: Encoder,
    /// The variables behind `enc`, kept alive as long as it.
    _vars: VarMap,
    model: ModelConfig,
    /// The checkpoint path, or "scratch".
    name: String,
    /// Training step of the checkpoint.
    step: Option<u64>,
    /// "online", "target" or "random(seed=N)".
    weights: String,
}

/// The images the readout trains and is scored on, and the full training split's class
/// statistics and groups.
struct Splits {
    train: Vec<Sample>,
    val: Vec<Sample>,
    stats: ClassStats,
    groups: ClassGroups,
    /// Images of both splits skipped for a missing label file.
    skipped: usize,
}

/// What [`LinearEval::train_features`] returns.
struct TrainFeatures {
    /// Standardised features and (H, W) labels; empty without `cache_features`.
    cache: Vec<(Feat, LabelMap)>,
    std: Standardise,
    /// `(h, w, C)` of the feature maps.
    dims: (usize, usize, usize),
    /// Seconds spent.
    secs: f64,
}

/// The trained readout and its training-set numbers.
struct Fitted {
    head: LinearHead,
    std: Standardise,
    /// `(h, w, C)` of the feature maps.
    fdims: (usize, usize, usize),
    /// Mean training loss of each epoch.
    epoch_loss: Vec<f64>,
    /// Training-set confusion at (H, W).
    train_conf: Confusion,
    feature_s: f64,
    readout_s: f64,
}

/// What [`LinearEval::validate`] returns.
struct Validation {
    conf: Confusion,
    /// Paths of the pictures written.
    vis: Vec<String>,
    eval_s: f64,
}

impl<'a> LinearEval<'a> {
    /// Checks the config: the readout size (the dataset's default unless set) and schedule.
    fn new(cfg: &'a LinearEvalConfig) -> Result<Self> {
        let kind = cfg.dataset;
        let k = kind.num_classes();
        let (h, w) = cfg.size.unwrap_or_else(|| kind.default_size());
        ensure!(
            h > 0 && w > 0 && h % 32 == 0 && w % 32 == 0,
            "readout size {h}x{w}: height and width must be positive multiples of 32"
        );
        ensure!(
            cfg.epochs > 0 && cfg.batch_size > 0,
            "epochs and batch_size must be positive"
        );
        Ok(LinearEval {
            cfg,
            kind,
            k,
            size: (h, w),
            chunk: cfg.feature_batch.max(1) * 8,
        })
    }

    /// Resolves the architecture and checkpoint and loads the frozen encoder (or a seeded
    /// random one).
    fn load_frozen(&self, dev: &Device) -> Result<Frozen> {
        let cfg = self.cfg;
        let (h, w) = self.size;
        let model = match (&cfg.model, &cfg.checkpoint) {
            (Some(m), _) => m.clone(),
            (None, Some(c)) => model_config_of(c)?,
            (None, None) => bail!("scratch readout needs a model architecture (model: Some(..))"),
        };
        let (ckpt_file, ckpt_step) = match &cfg.checkpoint {
            Some(c) => {
                let (f, s) = resolve_checkpoint(c)?;
                (Some(f), s)
            }
            None => (None, None),
        };
        let (enc, map) = load_encoder(&model, ckpt_file.as_deref(), cfg.use_target, cfg.seed, dev)?;
        let weights = match (&cfg.checkpoint, cfg.use_target) {
            (None, _) => format!("random(seed={})", cfg.seed),
            (Some(_), false) => "online".into(),
            (Some(_), true) => "target".into(),
        };
        let model_name = cfg
            .checkpoint
            .as_ref()
            .map_or("scratch".into(), |c| c.display().to_string());
        log(
            cfg.quiet,
            format!(
                "{model_name} ({weights}), {:?}, input {h}x{w}",
                model.backbone
            ),
        );
        Ok(Frozen {
            enc,
            _vars: map,
            model,
            name: model_name,
            step: ckpt_step,
            weights,
        })
    }

    /// Lists both splits, takes the evenly spaced subsets, and computes the class
    /// statistics and groups from the **full** training split.
    fn load_splits(&self) -> Result<Splits> {
        let cfg = self.cfg;
        let (train_all, skip_t) = self.kind.list(&cfg.root, &cfg.train_split)?;
        let (val_all, skip_v) = self.kind.list(&cfg.root, &cfg.val_split)?;
        let train = spaced(&train_all, cfg.max_train);
        let val = spaced(&val_all, cfg.max_val);
        let stats = split_stats(&train_all, self.k)?;
        let groups = ClassGroups::with_thresholds(&stats, cfg.small_share, cfg.rare_share);
        Ok(Splits {
            train,
            val,
            stats,
            groups,
            skipped: skip_t + skip_v,
        })
    }

    /// Extracts the training features once: their moments give the standardisation, and
    /// with `cache_features` they are kept (standardised, with (H, W) labels).
    fn train_features(&self, ex: &Extractor<'_>, train: &[Sample]) -> Result<TrainFeatures> {
        let (h, w) = self.size;
        let t_feat = Instant::now();
        let mut cache: Vec<(Feat, LabelMap)> = Vec::new();
        let mut moments = Moments::new();
        let mut fdims = (0, 0, 0);
        for part in train.chunks(self.chunk) {
            let e = ex.run(part)?;
            fdims = e.dims;
            for (f, l) in e.feats.into_iter().zip(e.labels) {
                moments.add(&f, fdims.2);
                if self.cfg.cache_features {
                    cache.push((f, resize_label_nearest(&l, h, w)));
                }
            }
        }
        let std = moments.finish();
        cache.par_iter_mut().for_each(|(f, _)| std.apply(f));
        let feature_s = t_feat.elapsed().as_secs_f64();
        log(
            self.cfg.quiet,
            format!(
                "features of {} training images ({}x{}x{}) in {feature_s:.1} s",
                train.len(),
                fdims.2,
                fdims.0,
                fdims.1
            ),
        );
        Ok(TrainFeatures {
            cache,
            std,
            dims: fdims,
            secs: feature_s,
        })
    }

    /// Fits the readout: training features, the head's training epochs, and the training
    /// metrics (the feature cache is freed before `readout_s` is taken).
    fn fit(&self, ex: &Extractor<'_>, train: &[Sample]) -> Result<Fitted> {
        let TrainFeatures {
            cache,
            std,
            dims: fdims,
            secs: feature_s,
        } = self.train_features(ex, train)?;
        let t_train = Instant::now();
        let batches = TrainBatches {
            ev: self,
            ex,
            train,
            std: &std,
            cache,
            fsize: (fdims.0, fdims.1),
        };
        let (head, epoch_loss) = batches.train_head(fdims.2)?;
        let train_conf = batches.confusion(&head)?;
        drop(batches);
        let readout_s = t_train.elapsed().as_secs_f64();
        Ok(Fitted {
            head,
            std,
            fdims,
            epoch_loss,
            train_conf,
            feature_s,
            readout_s,
        })
    }

    /// Scores the validation images at their labels' native resolution and draws the first
    /// `num_vis` of them into `out/vis/`.
    fn validate(&self, ex: &Extractor<'_>, val: &[Sample], fit: &Fitted) -> Result<Validation> {
        let cfg = self.cfg;
        let fsize = (fit.fdims.0, fit.fdims.1);
        let t_eval = Instant::now();
        let mut conf = Confusion::new(self.k);
        let mut vis = Vec::new();
        let vis_dir = cfg.out.as_ref().map(|o| o.join("vis"));
        if let (Some(d), true) = (&vis_dir, cfg.num_vis > 0) {
            std::fs::create_dir_all(d).with_context(|| format!("{}", d.display()))?;
        }
        let mut seen = 0;
        for part in val.chunks(self.chunk) {
            let Extracted {
                mut feats, labels, ..
            } = ex.run(part)?;
            let preds: Vec<Vec<u8>> = feats
                .par_iter_mut()
                .zip(&labels)
                .map(|(f, l)| {
                    fit.std.apply(f);
                    fit.head.predict(f, fsize, (l.height, l.width))
                })
                .collect();
            for (i, (l, pred)) in labels.iter().zip(&preds).enumerate() {
                conf.add(&l.data, pred);
                if let (Some(d), true) = (&vis_dir, seen < cfg.num_vis) {
                    let stem = part[i]
                        .image
                        .file_stem()
                        .and_then(|s| s.to_str())
                        .unwrap_or("image");
                    let path = d.join(format!("{seen:03}_{stem}.png"));
                    write_vis(&path, &part[i], l, pred, self.kind.palette())?;
                    vis.push(path.display().to_string());
                }
                seen += 1;
            }
        }
        Ok(Validation {
            conf,
            vis,
            eval_s: t_eval.elapsed().as_secs_f64(),
        })
    }

    /// Assembles the report; `wall_s` is the time since `t0`.
    fn report(
        &self,
        frozen: &Frozen,
        splits: &Splits,
        fit: &Fitted,
        val: Validation,
        t0: Instant,
    ) -> LinearReport {
        let cfg = self.cfg;
        let (h, w) = self.size;
        let conf = val.conf;
        let iou = conf.iou();
        let acc = conf.class_acc();
        let classes = self.class_results(&iou, &acc, &conf.gt_counts(), splits);
        let model = &frozen.model;
        LinearReport {
            model: frozen.name.clone(),
            checkpoint_step: frozen.step,
            weights: frozen.weights.clone(),
            backbone: match &model.backbone {
                crate::model::Backbone::Resnet18 => "resnet18".into(),
                crate::model::Backbone::Resnet50 => "resnet50".into(),
                crate::model::Backbone::Custom(_) => "custom".into(),
            },
            decoder: model.decoder.enabled,
            dataset: self.kind.name().into(),
            root: cfg.root.display().to_string(),
            num_classes: self.k,
            train_images: splits.train.len(),
            val_images: splits.val.len(),
            skipped_unlabelled: splits.skipped,
            input_size: [h, w],
            feature_size: [fit.fdims.0, fit.fdims.1, fit.fdims.2],
            epochs: cfg.epochs,
            batch_size: cfg.batch_size,
            lr: cfg.lr,
            weight_decay: cfg.weight_decay,
            seed: cfg.seed,
            epoch_loss: fit.epoch_loss.clone(),
            miou: conf.miou(),
            pixel_acc: conf.pixel_acc(),
            mean_class_acc: super::metrics::mean_defined(&acc).unwrap_or(0.0),
            train_miou: fit.train_conf.miou(),
            train_pixel_acc: fit.train_conf.pixel_acc(),
            classes,
            groups: self.groups_report(&iou, splits),
            confusion: conf,
            visualisations: val.vis,
            feature_s: fit.feature_s,
            readout_s: fit.readout_s,
            eval_s: val.eval_s,
            wall_s: t0.elapsed().as_secs_f64(),
        }
    }

    /// Validation IoU, recall and pixels of each class, with its training-split statistics
    /// and groups.
    fn class_results(
        &self,
        iou: &[Option<f64>],
        acc: &[Option<f64>],
        gt: &[u64],
        splits: &Splits,
    ) -> Vec<ClassResult> {
        let names = self.kind.class_names();
        let (stats, groups) = (&splits.stats, &splits.groups);
        (0..self.k)
            .map(|c| ClassResult {
                id: c,
                name: names[c].to_string(),
                iou: iou[c],
                acc: acc[c],
                val_pixels: gt[c],
                avg_pixel_share: stats.avg_pixel_share[c],
                total_pixel_share: stats.total_pixel_share[c],
                image_share: stats.image_share[c],
                size: if groups.small.contains(&c) {
                    "small"
                } else {
                    "large"
                }
                .into(),
                freq: if groups.rare.contains(&c) {
                    "rare"
                } else {
                    "common"
                }
                .into(),
            })
            .collect()
    }

    /// The class groups' members and mIoUs, and the thresholds they come from.
    fn groups_report(&self, iou: &[Option<f64>], splits: &Splits) -> GroupsReport {
        let names = self.kind.class_names();
        let group = |m: &[usize]| GroupResult {
            classes: m.iter().map(|&c| names[c].to_string()).collect(),
            miou: group_miou(iou, m),
        };
        let groups = &splits.groups;
        GroupsReport {
            small: group(&groups.small),
            large: group(&groups.large),
            rare: group(&groups.rare),
            common: group(&groups.common),
            stats_images: splits.stats.images,
            small_share: self.cfg.small_share,
            rare_share: self.cfg.rare_share,
        }
    }

    /// Writes `report.json`, `report.md`, `confusion.png` and `readout.safetensors` (the
    /// head and the feature standardisation) into `o`.
    fn write_outputs(&self, o: &Path, report: &LinearReport, fit: &Fitted) -> Result<()> {
        std::fs::create_dir_all(o).with_context(|| format!("{}", o.display()))?;
        poodle_common::atomic::write_json_atomic(&o.join("report.json"), report)?;
        poodle_common::atomic::write_atomic(&o.join("report.md"), report.to_table().as_bytes())?;
        let (w, h, rgb) = report.confusion.picture(16, self.cfg.dataset.palette());
        poodle_common::flowmath::write_png_rgb(&o.join("confusion.png"), w as u32, h as u32, &rgb)
            .with_context(|| format!("{}", o.join("confusion.png").display()))?;
        let (k, c) = (self.k, fit.fdims.2);
        let mut t = HashMap::new();
        t.insert(
            "readout.weight".to_string(),
            Tensor::from_vec(fit.head.w.clone(), (k, c, 1, 1), &Device::Cpu)?,
        );
        t.insert(
            "readout.bias".to_string(),
            Tensor::from_vec(fit.head.b.clone(), k, &Device::Cpu)?,
        );
        t.insert(
            "feature_mean".to_string(),
            Tensor::from_vec(fit.std.mean.clone(), c, &Device::Cpu)?,
        );
        t.insert(
            "feature_inv_std".to_string(),
            Tensor::from_vec(fit.std.inv_std.clone(), c, &Device::Cpu)?,
        );
        poodle_common::atomic::write_with(&o.join("readout.safetensors"), |tmp| {
            candle_core::safetensors::save(&t, tmp)
        })?;
        Ok(())
    }
}

/// The training images as readout batches: standardised features and (H, W) labels, from
/// the cache or recomputed per batch without `cache_features`.
struct TrainBatches<'a> {
    ev: &'a LinearEval<'a>,
    ex: &'a Extractor<'a>,
    train: &'a [Sample],
    std: &'a Standardise,
    cache: Vec<(Feat, LabelMap)>,
    /// `(h, w)` of the feature maps.
    fsize: (usize, usize),
}

impl TrainBatches<'_> {
    /// The images `ids` recomputed (owned); `None` when they are in the cache.
    fn fetch(&self, ids: &[usize]) -> Result<Option<Vec<(Feat, LabelMap)>>> {
        if self.ev.cfg.cache_features {
            return Ok(None);
        }
        let (h, w) = self.ev.size;
        let s: Vec<Sample> = ids.iter().map(|&i| self.train[i].clone()).collect();
        let e = self.ex.run(&s)?;
        Ok(Some(
            e.feats
                .into_iter()
                .zip(e.labels)
                .map(|(mut f, l)| {
                    self.std.apply(&mut f);
                    (f, resize_label_nearest(&l, h, w))
                })
                .collect(),
        ))
    }

    /// Trains a zero-initialised head on `c` channels over shuffled mini-batches; the head
    /// and each epoch's mean loss.
    fn train_head(&self, c: usize) -> Result<(LinearHead, Vec<f64>)> {
        let cfg = self.ev.cfg;
        let mut head = LinearHead::zeros(c, self.ev.k);
        let mut opt = AdamW::new(&head, cfg.weight_decay)?;
        let n = self.train.len();
        let steps_per_epoch = n.div_ceil(cfg.batch_size);
        let total = (steps_per_epoch * cfg.epochs) as u64;
        // One epoch of linear warm-up (Adam's first steps are sign-sized), then cosine to 0.
        let warmup = if cfg.epochs > 1 {
            steps_per_epoch as u64
        } else {
            0
        };
        let mut rng = SplitMix64::new(cfg.seed ^ 0x05ee_d0f1_1ea5);
        let mut step = 0u64;
        let mut epoch_loss = Vec::with_capacity(cfg.epochs);
        for epoch in 0..cfg.epochs {
            let order = shuffled(n, &mut rng);
            let (mut loss_sum, mut count) = (0.0, 0u64);
            for ids in order.chunks(cfg.batch_size) {
                // Shifted by one: neither the first nor the last step has lr 0.
                let lr = crate::optim::lr_at(step + 1, total + 1, warmup, cfg.lr);
                let (l, m) = self.step(&mut head, &mut opt, ids, lr)?;
                step += 1;
                loss_sum += l;
                count += m;
            }
            let mean = loss_sum / count.max(1) as f64;
            ensure!(
                mean.is_finite(),
                "readout loss is not finite at epoch {}",
                epoch + 1
            );
            epoch_loss.push(mean);
            log(cfg.quiet, format!("epoch {:>3}: loss {mean:.4}", epoch + 1));
        }
        Ok((head, epoch_loss))
    }

    /// One AdamW step at `lr` on the images `ids` (skipped if they have no labelled pixel);
    /// their summed loss and labelled pixel count.
    fn step(
        &self,
        head: &mut LinearHead,
        opt: &mut AdamW,
        ids: &[usize],
        lr: f64,
    ) -> Result<(f64, u64)> {
        let owned = self.fetch(ids)?;
        let items: Vec<(&[f32], &[u8])> = match &owned {
            Some(v) => v.iter().map(|(f, l)| (&f[..], &l.data[..])).collect(),
            None => ids
                .iter()
                .map(|&i| (&self.cache[i].0[..], &self.cache[i].1.data[..]))
                .collect(),
        };
        let g = head.batch_loss_grad(&items, self.fsize, self.ev.size);
        if g.count > 0 {
            let s = 1.0 / g.count as f32;
            let gw: Vec<f32> = g.gw.iter().map(|v| v * s).collect();
            let gb: Vec<f32> = g.gb.iter().map(|v| v * s).collect();
            opt.step(head, &gw, &gb, lr)?;
        }
        Ok((g.loss_sum, g.count))
    }

    /// Confusion of the head's predictions on the training images at (H, W).
    fn confusion(&self, head: &LinearHead) -> Result<Confusion> {
        let mut train_conf = Confusion::new(self.ev.k);
        let all: Vec<usize> = (0..self.train.len()).collect();
        for ids in all.chunks(self.ev.cfg.batch_size.max(16)) {
            let owned = self.fetch(ids)?;
            let items: Vec<(&Feat, &LabelMap)> = match &owned {
                Some(v) => v.iter().map(|(f, l)| (f, l)).collect(),
                None => ids
                    .iter()
                    .map(|&i| (&self.cache[i].0, &self.cache[i].1))
                    .collect(),
            };
            let preds: Vec<Vec<u8>> = items
                .par_iter()
                .map(|(f, _)| head.predict(f, self.fsize, self.ev.size))
                .collect();
            for ((_, l), p) in items.iter().zip(&preds) {
                train_conf.add(&l.data, p);
            }
        }
        Ok(train_conf)
    }
}

/// `0..n` shuffled by Fisher-Yates (one draw per position, from the end).
fn shuffled(n: usize, rng: &mut SplitMix64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.range_inclusive(0, i as u64) as usize;
        order.swap(i, j);
    }
    order
}

/// Writes `image | ground truth | prediction` side by side at the label's resolution.
fn write_vis(
    path: &Path,
    s: &Sample,
    l: &LabelMap,
    pred: &[u8],
    palette: &[[u8; 3]],
) -> Result<()> {
    let (h, w) = (l.height, l.width);
    let mut img = read_rgb(&s.image)?;
    if (img.height, img.width) != (h, w) {
        img = resize_rgb_nearest(&img, h, w);
    }
    let gt = colourise(&l.data, palette);
    let pr = colourise(pred, palette);
    let mut out = Vec::with_capacity(h * w * 9);
    for y in 0..h {
        for part in [&img.data, &gt, &pr] {
            out.extend_from_slice(&part[y * w * 3..(y + 1) * w * 3]);
        }
    }
    poodle_common::flowmath::write_png_rgb(path, (3 * w) as u32, h as u32, &out)
        .with_context(|| format!("{}", path.display()))?;
    Ok(())
}

/// `poodle-train eval linear`: the command-line flags (flatten into a clap subcommand).
#[derive(clap::Args, Clone, Debug)]
pub struct LinearArgs {
    /// Run folder (its latest checkpoint) or checkpoint file. With --scratch: only where the
    /// architecture comes from.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Randomly initialised encoder (the scratch baseline), seeded by --seed.
    #[arg(long)]
    pub scratch: bool,
    /// Architecture: tiny, paper, ablation, flowe, or a JSON file (ModelConfig, TrainConfig
    /// or a run's config.json). Default: the checkpoint's config.json.
    #[arg(long)]
    pub model: Option<String>,
    /// Use the EMA target encoder's weights instead of the online encoder's.
    #[arg(long)]
    pub target: bool,
    #[arg(long, value_enum, default_value = "camvid")]
    pub dataset: DatasetKind,
    /// Dataset root (layouts: poodle_train::eval::datasets).
    #[arg(long)]
    pub root: PathBuf,
    #[arg(long, default_value = "train")]
    pub train_split: String,
    #[arg(long, default_value = "val")]
    pub val_split: String,
    /// Use at most N evenly spaced training images.
    #[arg(long)]
    pub max_train: Option<usize>,
    /// Use at most N evenly spaced validation images.
    #[arg(long)]
    pub max_val: Option<usize>,
    /// Readout input HxW, multiples of 32 (default per dataset: camvid 192x256, bdd100k
    /// 288x512, cityscapes 256x512).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<(usize, usize)>,
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    #[arg(long, default_value_t = 1e-4)]
    pub weight_decay: f64,
    /// Images per encoder forward pass.
    #[arg(long, default_value_t = 4)]
    pub feature_batch: usize,
    /// Recompute training features every epoch instead of keeping them in memory.
    #[arg(long)]
    pub no_cache: bool,
    /// Validation images to visualise into OUT/vis.
    #[arg(long, default_value_t = 4)]
    pub vis: usize,
    /// Small-class threshold: average pixel share per training image (paper: 0.01).
    #[arg(long, default_value_t = super::metrics::SMALL_SHARE)]
    pub small_share: f64,
    /// Rare-class threshold: share of training images containing the class (paper: 0.20).
    #[arg(long, default_value_t = super::metrics::RARE_SHARE)]
    pub rare_share: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder: report.json, report.md, readout.safetensors, vis/.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Print the report as JSON on stdout (default: a markdown table).
    #[arg(long)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl LinearArgs {
    pub fn to_config(&self) -> Result<LinearEvalConfig> {
        let model = match (&self.model, &self.checkpoint, self.scratch) {
            (Some(m), _, _) => Some(parse_model(m)?),
            (None, Some(c), true) => Some(model_config_of(c)?),
            (None, None, true) => {
                bail!("--scratch needs --model or --checkpoint (for the architecture)")
            }
            (None, _, false) => None,
        };
        ensure!(
            self.scratch || self.checkpoint.is_some(),
            "give --checkpoint, or --scratch for a random encoder"
        );
        Ok(LinearEvalConfig {
            checkpoint: if self.scratch {
                None
            } else {
                self.checkpoint.clone()
            },
            model,
            use_target: self.target,
            seed: self.seed,
            dataset: self.dataset,
            root: self.root.clone(),
            train_split: self.train_split.clone(),
            val_split: self.val_split.clone(),
            max_train: self.max_train,
            max_val: self.max_val,
            size: self.size,
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            weight_decay: self.weight_decay,
            feature_batch: self.feature_batch,
            cache_features: !self.no_cache,
            num_vis: self.vis,
            small_share: self.small_share,
            rare_share: self.rare_share,
            out: self.out.clone(),
            device: self.device.clone(),
            quiet: self.quiet,
        })
    }
}

/// Runs `poodle-train eval linear` and prints the report (table, or JSON with `--json`).
pub fn run_cli(args: &LinearArgs) -> Result<LinearReport> {
    let report = run(&args.to_config()?)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_table());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_subsets() {
        assert_eq!(parse_size("192x256").unwrap(), (192, 256));
        assert!(parse_size("192").is_err());
        let v: Vec<usize> = (0..10).collect();
        assert_eq!(spaced(&v, Some(3)), vec![0, 3, 6]);
        assert_eq!(spaced(&v, Some(20)), v);
        assert_eq!(spaced(&v, None), v);
    }
}
