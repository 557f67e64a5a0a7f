//! The training configuration: one JSON file (or a named preset) plus `--set key=value`
//! overrides. Every augmentation, loss weight, schedule and method switch is here; unknown
//! keys are errors, so a misspelt option never silently falls back to a default.

use crate::data::augment::AugmentConfig;
use crate::data::sampling::PairSampling;
use crate::loss::dense::TargetOrder;
use crate::model::ModelConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// `f32`: IEEE f32 everywhere (the CPU reference). `tf32`: f32 tensors, TF32 tensor cores in
/// convolutions (cuDNN) and matmuls (cuBLAS). `bf16`: bf16 activations, convolutions and
/// matmuls (weights cast per use from the f32 master copy, which AdamW and the EMA update),
/// f32 BatchNorm parameters and statistics (cuDNN), and the losses computed in f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Tf32,
    Bf16,
}

impl Precision {
    pub fn is_f32(&self) -> bool {
        *self == Precision::F32
    }

    /// The dtype of activations.
    pub fn activation_dtype(self) -> candle_core::DType {
        match self {
            Precision::Bf16 => candle_core::DType::BF16,
            _ => candle_core::DType::F32,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Backbone, decoder (SDM) switches, projector sizes.
    pub model: ModelConfig,
    /// Global crop, colour, blur, dense affine, subcrops (K, size, areas).
    pub augment: AugmentConfig,
    pub data: DataConfig,
    pub optim: OptimConfig,
    /// Which objectives are on (the paper's Table 4: dense only, pooled only).
    pub method: MethodConfig,
    pub seed: u64,
    pub run: RunConfig,
    /// `cpu` or `cuda:N` (a build with the `cuda` feature).
    pub device: String,
    /// Arithmetic of the step on CUDA (docs/cuda.md); the CPU runs `f32` only. Left out of
    /// the JSON when `f32`, so configs and checkpoints written before the field still match.
    #[serde(default, skip_serializing_if = "Precision::is_f32")]
    pub precision: Precision,
    /// Start from these weights, e.g. ImageNet-supervised (the paper's BDD* rows) or the
    /// authors' released PooDLe checkpoint; `null`: random initialisation. Loaded by
    /// [`crate::export::load_init_with`] into the online network before the target is copied
    /// from it: a backbone file fills the backbone, an authors' checkpoint the whole encoder.
    #[serde(default)]
    pub init: Option<PathBuf>,
    /// Which network of an authors' checkpoint `init` reads: `online` or `target` (their
    /// `teacher_*`).
    #[serde(default)]
    pub init_network: crate::export::Which,
    /// Data-parallel training over several processes (one per device): engine, synchronised
    /// BatchNorm (on, as the paper), gradient buckets. One process needs none of it.
    #[serde(default)]
    pub dist: crate::dist::DistConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Stores written by poodle-prep, or folders of them (all parts of a job).
    pub stores: Vec<PathBuf>,
    /// Flow group to train with (default: each store's first).
    pub flow_group: Option<String>,
    /// Pairs per micro-batch on one device (authors: 2 videos x R = 2 pairs = 4 per GPU; the
    /// paper's global batch is 128 = 32 GPUs x 4).
    pub batch_size: usize,
    /// Background loader workers and batches in flight.
    pub workers: usize,
    pub prefetch: usize,
    /// Which stored pairs a pass draws: R pairs per video visit from the video's pool (the
    /// authors' `repeat_sample`); a pass counts as R paper epochs.
    #[serde(default)]
    pub sampling: PairSampling,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// AdamW (paper: lr 5e-4, wd 0.01, eps 1e-6; ablations lr 1e-3, wd 1e-6).
    pub lr: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub betas: [f64; 2],
    /// Linear warm-up from 0, then cosine to 0 (paper and authors: 2 warm-up epochs of
    /// 300). In paper epochs: a pass drawing R pairs per video counts as R epochs.
    pub warmup_epochs: f64,
    /// Paper epochs (300); the run makes ceil(epochs / R) passes.
    pub epochs: usize,
    /// Clip the global gradient norm (off: null).
    pub grad_clip: Option<f64>,
    /// Micro-batches per optimiser step (global batch = batch_size x accumulate x GPUs).
    pub accumulate: usize,
    /// EMA momentum start (0.996, rising to 1 on a cosine).
    pub ema_m0: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MethodConfig {
    pub dense: bool,
    pub pooled: bool,
    /// Loss weights (paper: 0.5 and 0.5).
    pub w_dense: f64,
    pub w_pooled: f64,
    /// Dense target branch: `authors` (default; their code warps by the flow, then undoes the
    /// affine) or `paper` (Eq. (1), `M o A_2^-1`); see `loss::dense`.
    #[serde(default)]
    pub dense_order: TargetOrder,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Where metrics.jsonl, config.json and checkpoints go.
    pub dir: PathBuf,
    /// Optimiser steps between metric lines and between checkpoints (the authors
    /// checkpoint every pass; poodle by steps so that long passes are restartable).
    pub log_every: u64,
    pub checkpoint_every: u64,
    /// Stop after this many optimiser steps (the schedule still spans all epochs).
    pub max_steps: Option<u64>,
    /// Optimiser steps between pictures of the objective (`RUN_DIR/pictures/step-N.png`,
    /// the first pair of the step's last batch, as `show-batch` draws it); `null`: none.
    #[serde(default)]
    pub picture_every: Option<u64>,
}

impl TrainConfig {
    /// The paper's BDD100K recipe (Appendix A; the authors' configs/exp/poodle.yaml):
    /// ResNet-50 + SDM, 512x1024 crops, K = 6, AdamW 5e-4 / 0.01 / eps 1e-6, 2 warm-up epochs
    /// of 300, R = 2 pairs per video visit, 4 pairs (2 videos) per GPU; the published global
    /// batch of 128 is 32 GPUs x 4.
    pub fn paper() -> Self {
        TrainConfig {
            model: ModelConfig::paper(),
            augment: AugmentConfig::bdd(),
            data: DataConfig {
                stores: vec![],
                flow_group: None,
                batch_size: 4,
                workers: 4,
                prefetch: 8,
                sampling: PairSampling::default(),
            },
            optim: OptimConfig {
                lr: 5e-4,
                weight_decay: 0.01,
                eps: 1e-6,
                betas: [0.9, 0.999],
                warmup_epochs: 2.0,
                epochs: 300,
                grad_clip: None,
                accumulate: 1,
                ema_m0: 0.996,
            },
            method: MethodConfig {
                dense: true,
                pooled: true,
                w_dense: 0.5,
                w_pooled: 0.5,
                dense_order: TargetOrder::Authors,
            },
            seed: 0,
            run: RunConfig {
                dir: PathBuf::from("runs/paper"),
                log_every: 10,
                checkpoint_every: 1000,
                max_steps: None,
                picture_every: Some(5000),
            },
            device: "cpu".into(),
            precision: Precision::F32,
            init: None,
            init_network: crate::export::Which::Online,
            dist: crate::dist::DistConfig::default(),
        }
    }

    /// The ablation recipe (paper Section 4.3; the authors' configs/exp/poodle_ablation.yaml):
    /// 256x512 crops, no dense affine, R = 10 pairs per visit (2 videos x 10 = 20 pairs per
    /// GPU), 40 epochs with 3 warm-up, lr 1e-3, weight decay 1e-6. Pair it with
    /// manifests/bdd_ablation.json (dt = 15 frames).
    pub fn ablation() -> Self {
        let mut c = Self::paper();
        c.augment = AugmentConfig::ablation();
        c.data.batch_size = 20;
        c.data.sampling.pairs_per_visit = 10;
        c.optim.lr = 1e-3;
        c.optim.weight_decay = 1e-6;
        c.optim.epochs = 40;
        c.optim.warmup_epochs = 3.0;
        c.run.dir = PathBuf::from("runs/ablation");
        c
    }

    /// Walking Tours (the authors' configs/exp/poodle_wt.yaml): as the paper preset, with
    /// frames scaled by U(0.535, 0.625) before the 512x1024 crop and every 10 s clip visited
    /// 75 times per pass (`dataset_repeats`), R = 2. Pair it with manifests/wt.json.
    pub fn walking_tours() -> Self {
        let mut c = Self::paper();
        c.augment = AugmentConfig::walking_tours();
        c.data.sampling.visits_per_pass = 75;
        c.run.dir = PathBuf::from("runs/walking_tours");
        c
    }

    /// A CPU-sized configuration for tests and the demo: ResNet-18, small heads, 64x128 crops,
    /// K = 2 subcrops of 32 px; R = 4 pairs per visit, so that the one-video demo store fills
    /// a batch of 4 (image-sequence stores such as CamVid draw every pair once per pass).
    pub fn tiny() -> Self {
        let mut c = Self::paper();
        c.model = ModelConfig::tiny();
        c.augment.out_height = 64;
        c.augment.out_width = 128;
        // The paper's geometry at 1/8 scale: 64x128 windows of (135 s, 240 s).
        c.augment.global_crop.initial_size = [135, 240];
        c.augment.subcrops.k = 2;
        c.augment.subcrops.size = 32;
        c.data.batch_size = 4;
        c.data.sampling.pairs_per_visit = 4;
        c.data.workers = 1;
        c.data.prefetch = 2;
        c.optim.lr = 1e-3;
        // 10 passes over the one-video demo store (R = 4: 4 paper epochs a pass, 2 steps):
        // the 20 steps `make train` asks for.
        c.optim.epochs = 40;
        c.optim.warmup_epochs = 5.0;
        c.run.dir = PathBuf::from("runs/tiny");
        c.run.log_every = 1;
        c.run.checkpoint_every = 50;
        c.run.picture_every = Some(10);
        c
    }

    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "paper" | "bdd" => Self::paper(),
            "ablation" => Self::ablation(),
            "walking_tours" | "wt" => Self::walking_tours(),
            "tiny" => Self::tiny(),
            other => bail!("unknown preset {other:?} (paper, ablation, walking_tours, tiny)"),
        })
    }

    /// Loads a preset name, a JSON file or a run folder (its `config.json`), then applies
    /// `key.path=value` overrides (values parsed as JSON, else taken as strings). Files
    /// written by older runs as `{"git_sha": .., "config": {..}}` are unwrapped.
    pub fn load(source: &str, overrides: &[String]) -> Result<Self> {
        let path = std::path::Path::new(source);
        let file = if path.is_dir() && path.join("config.json").is_file() {
            Some(path.join("config.json"))
        } else {
            path.is_file().then(|| path.to_path_buf())
        };
        let mut v = if let Some(file) = file {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("config {}", file.display()))?;
            let v = serde_json::from_str::<serde_json::Value>(&text)
                .with_context(|| format!("config {}: invalid JSON", file.display()))?;
            match v {
                serde_json::Value::Object(mut o)
                    if o.len() == 2 && o.contains_key("git_sha") && o.contains_key("config") =>
                {
                    o.remove("config").expect("checked")
                }
                v => v,
            }
        } else {
            serde_json::to_value(Self::preset(source)?)?
        };
        // `precision` is left out of the JSON when f32 (see the field): make it settable.
        if let Some(obj) = v.as_object_mut() {
            obj.entry("precision")
                .or_insert_with(|| serde_json::Value::String("f32".into()));
        }
        for o in overrides {
            let (key, raw) = o
                .split_once('=')
                .with_context(|| format!("override {o:?}: expected key.path=value"))?;
            let value = serde_json::from_str(raw).unwrap_or(serde_json::Value::String(raw.into()));
            let mut slot = &mut v;
            for part in key.split('.') {
                let obj = slot
                    .as_object_mut()
                    .with_context(|| format!("override {key}: {part:?} is inside a non-object"))?;
                if !obj.contains_key(part) {
                    bail!("override {key}: unknown config key {part:?}");
                }
                slot = obj.get_mut(part).expect("checked");
            }
            *slot = value;
        }
        let cfg: TrainConfig =
            serde_json::from_value(v).with_context(|| format!("config {source}"))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        self.model
            .validate()
            .map_err(|e| anyhow::anyhow!("model: {e}"))?;
        if !self.method.dense && !self.method.pooled {
            bail!("method: at least one of dense and pooled must be on");
        }
        if self.data.batch_size == 0 || self.optim.accumulate == 0 || self.optim.epochs == 0 {
            bail!("data.batch_size, optim.accumulate and optim.epochs must be positive");
        }
        self.data
            .sampling
            .validate()
            .map_err(|e| anyhow::anyhow!("data.{e}"))?;
        if self.method.pooled && self.augment.subcrops.k == 0 {
            bail!("method.pooled needs augment.subcrops.k > 0");
        }
        if self.run.log_every == 0 || self.run.checkpoint_every == 0 {
            bail!("run.log_every and run.checkpoint_every must be at least 1");
        }
        let bucket = self.dist.bucket_mb;
        if bucket.is_nan() || bucket <= 0.0 || self.dist.check_every == Some(0) {
            bail!("dist.bucket_mb must be positive and dist.check_every at least 1 (or null)");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_and_validate() {
        for p in ["paper", "ablation", "walking_tours", "tiny"] {
            let c = TrainConfig::load(p, &[]).unwrap();
            let back: TrainConfig =
                serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
        assert_eq!(TrainConfig::paper().optim.lr, 5e-4);
        assert_eq!(TrainConfig::paper().augment.subcrops.k, 6);
    }

    #[test]
    fn precision_is_a_switch_that_old_configs_do_not_see() {
        let c = TrainConfig::tiny();
        assert_eq!(c.precision, Precision::F32);
        // f32 stays out of the JSON: configs and checkpoints from before the field match.
        assert!(serde_json::to_value(&c).unwrap().get("precision").is_none());
        let b = TrainConfig::load("tiny", &["precision=bf16".into()]).unwrap();
        assert_eq!(b.precision, Precision::Bf16);
        assert_eq!(b.precision.activation_dtype(), candle_core::DType::BF16);
        assert_eq!(serde_json::to_value(&b).unwrap()["precision"], "bf16");
        assert!(TrainConfig::load("tiny", &["precision=fp16".into()]).is_err());
        // The CPU computes in f32 only.
        let e = crate::run::Learner::new(&b, &candle_core::Device::Cpu)
            .err()
            .unwrap();
        assert!(e.to_string().contains("needs a CUDA device"), "{e}");
    }

    #[test]
    fn overrides_set_values_and_reject_unknown_keys() {
        let c = TrainConfig::load(
            "tiny",
            &["optim.lr=0.002".into(), "method.pooled=false".into()],
        )
        .unwrap();
        assert_eq!(c.optim.lr, 0.002);
        assert!(!c.method.pooled);
        let e = TrainConfig::load("tiny", &["optim.learning_rate=1".into()]).unwrap_err();
        assert!(
            e.to_string()
                .contains("unknown config key \"learning_rate\""),
            "{e}"
        );
        let e = TrainConfig::load(
            "tiny",
            &["method.dense=false".into(), "method.pooled=false".into()],
        )
        .unwrap_err();
        assert!(e.to_string().contains("at least one"), "{e}");
        for zero in ["run.log_every=0", "run.checkpoint_every=0"] {
            let e = TrainConfig::load("tiny", &[zero.into()]).unwrap_err();
            assert!(e.to_string().contains("must be at least 1"), "{zero}: {e}");
        }
    }
}
