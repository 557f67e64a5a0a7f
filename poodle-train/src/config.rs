//! The training configuration: one JSON file (or a named preset) plus `--set key=value`
//! overrides. Every augmentation, loss weight, schedule and method switch is here; unknown
//! keys are errors, so a misspelt option never silently falls back to a default.

use crate::data::augment::AugmentConfig;
use crate::model::ModelConfig;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

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
    /// Start from these backbone weights (safetensors or torchvision .pth), e.g.
    /// ImageNet-supervised (the paper's BDD* rows); `null`: random initialisation. Loaded by
    /// [`crate::export::load_init`] into the online backbone before the target is copied from
    /// it; the decoder and heads stay randomly initialised.
    #[serde(default)]
    pub init: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Stores written by poodle-prep, or folders of them (all parts of a job).
    pub stores: Vec<PathBuf>,
    /// Flow group to train with (default: each store's first).
    pub flow_group: Option<String>,
    /// Pairs per micro-batch (paper: 4 per GPU).
    pub batch_size: usize,
    /// Background loader workers and batches in flight.
    pub workers: usize,
    pub prefetch: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimConfig {
    /// AdamW (paper: lr 5e-4, wd 0.01, eps 1e-6; ablations lr 1e-3, wd 1e-6).
    pub lr: f64,
    pub weight_decay: f64,
    pub eps: f64,
    pub betas: [f64; 2],
    /// Linear warm-up, then cosine to 0 (paper: 2 warm-up epochs of 300).
    pub warmup_epochs: f64,
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
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Where metrics.jsonl, config.json and checkpoints go.
    pub dir: PathBuf,
    /// Optimiser steps between metric lines and between checkpoints.
    pub log_every: u64,
    pub checkpoint_every: u64,
    /// Stop after this many optimiser steps (the schedule still spans all epochs).
    pub max_steps: Option<u64>,
}

impl TrainConfig {
    /// The paper's BDD recipe (Appendix A): ResNet-50 + SDM, 512x1024 crops, K = 6, AdamW
    /// 5e-4 / 0.01, 2 warm-up epochs of 300, batch 4 per GPU.
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
            },
            seed: 0,
            run: RunConfig {
                dir: PathBuf::from("runs/paper"),
                log_every: 10,
                checkpoint_every: 1000,
                max_steps: None,
            },
            device: "cpu".into(),
            init: None,
        }
    }

    /// The ablation recipe (REFERENCE.md): 256x512 crops, no affine, 40 epochs, lr 1e-3, wd 1e-6.
    pub fn ablation() -> Self {
        let mut c = Self::paper();
        c.augment = AugmentConfig::ablation();
        c.optim.lr = 1e-3;
        c.optim.weight_decay = 1e-6;
        c.optim.epochs = 40;
        c.run.dir = PathBuf::from("runs/ablation");
        c
    }

    /// A CPU-sized configuration for tests and the demo: ResNet-18, small heads, 64x128 crops,
    /// K = 2 subcrops of 32 px.
    pub fn tiny() -> Self {
        let mut c = Self::paper();
        c.model = ModelConfig::tiny();
        c.augment.out_height = 64;
        c.augment.out_width = 128;
        c.augment.global_crop.area = [0.3, 0.8];
        c.augment.subcrops.k = 2;
        c.augment.subcrops.size = 32;
        c.data.batch_size = 4;
        c.data.workers = 1;
        c.data.prefetch = 2;
        c.optim.lr = 1e-3;
        c.optim.epochs = 4;
        c.optim.warmup_epochs = 0.5;
        c.run.dir = PathBuf::from("runs/tiny");
        c.run.log_every = 1;
        c.run.checkpoint_every = 50;
        c
    }

    pub fn preset(name: &str) -> Result<Self> {
        Ok(match name {
            "paper" => Self::paper(),
            "ablation" => Self::ablation(),
            "tiny" => Self::tiny(),
            other => bail!("unknown preset {other:?} (paper, ablation, tiny)"),
        })
    }

    /// Loads a preset name or a JSON file, then applies `key.path=value` overrides (values
    /// parsed as JSON, else taken as strings).
    pub fn load(source: &str, overrides: &[String]) -> Result<Self> {
        let mut v = if std::path::Path::new(source).is_file() {
            let text =
                std::fs::read_to_string(source).with_context(|| format!("config {source}"))?;
            serde_json::from_str::<serde_json::Value>(&text)
                .with_context(|| format!("config {source}: invalid JSON"))?
        } else {
            serde_json::to_value(Self::preset(source)?)?
        };
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
        if self.method.pooled && self.augment.subcrops.k == 0 {
            bail!("method.pooled needs augment.subcrops.k > 0");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip_and_validate() {
        for p in ["paper", "ablation", "tiny"] {
            let c = TrainConfig::load(p, &[]).unwrap();
            let back: TrainConfig =
                serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
            assert_eq!(back, c);
        }
        assert_eq!(TrainConfig::paper().optim.lr, 5e-4);
        assert_eq!(TrainConfig::paper().augment.subcrops.k, 6);
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
    }
}
