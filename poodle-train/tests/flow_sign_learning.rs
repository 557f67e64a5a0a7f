//! Learning with the flow's sign (issue 10, item 5): on real CamVid pairs prepared by
//! poodle-prep with the default flow model, a short dense-only run with the stored flow ends
//! with a clearly lower dense loss than the same run with the flow negated. A sign error
//! anywhere between prep and the loss swaps the two runs and fails the test.
//!
//! # The measure
//! Both runs start from the same weights and train on the same batches; they differ only in
//! the sign of `Batch::flow`. Each is then scored by its own objective, the dense loss under
//! the flow it trained with, on held-out pairs of another CamVid sequence (the same batches
//! for both), and the test asserts negated / true > [`MIN_RATIO`] for each seed.
//! - At initialisation the loss does not see the sign (the random predictor's mismatch
//!   dominates: negated / true is 0.99-1.02 here), so the gap measured is learned.
//! - Under the true flow the target at `y + flow(y)` is the same scene point as the online
//!   pixel, which a network can learn to predict; under the negated flow it is content about
//!   `2 flow` away, which it can only partly predict. Held-out pairs show that what was learned
//!   generalises rather than being memorised.
//! - Scoring both networks under the *true* flow is weaker: the run with the negated flow
//!   learns smoother features that lower the true-flow loss too (0.95-1.31 over the seeds
//!   below, one of them reversed); so is the mean training loss of the last quarter of the
//!   steps (1.01-1.14 in tuning runs of 16-24 steps).
//!
//! # Why this setup
//! CamVid frames are 1 s apart, and the default flow model marks many pixels occluded. The
//! pairs were chosen by the flow statistics of a 96x128 store of all CamVid train pairs
//! (TV-L1): median flow 6-30 px and under 45% of the pixels occluded, so that the sign moves
//! the target by more than the features' stride-8 resolution and the mask keeps most pixels
//! (after 16 steps: 1.05-1.10 here, 1.00-1.03 on pairs of median 4-15 px and under 40%
//! occluded). That is motion in the scenes: a flow model with cleaner occlusion keeps them
//! valid. Photometric augmentation and the dense affine are off: they differ between the two
//! branches and, over a short run, their mismatch dominates the loss (colour on: ratios
//! 0.99-1.02); `geometry_e2e.rs` covers the affines. A one-block-per-stage ResNet of width 16-128 keeps the runs within CI time.
//!
//! Measured with this test on the 2-core development machine (2026-12-07), negated / true
//! after 32 steps, seeds 1-10: 1.254, 1.187, 1.217, 1.164, 1.160, 1.446, 1.209, 1.080, 1.164,
//! 1.073 (after 24 steps: 1.161, 1.127, 1.138, 1.142, 1.094, 1.306, 1.171, 1.045, 1.079,
//! 1.032, so the gap grows with training). CI runs seeds 1 and 2 (about 2 minutes);
//! `POODLE_SIGN_SEEDS=1,2,3` runs others.

use candle_core::Device;
use poodle_train::config::TrainConfig;
use poodle_train::data::Batch;
use poodle_train::model::{Backbone, BlockKind, ResNetConfig};
use poodle_train::optim::GradAccumulator;
use poodle_train::run::Learner;
use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::{ort_library, prep_binary, repo, shared_data, tmpdir};

/// Training pairs (sequence 0006R0): frame `t` and `t + 30` each.
const TRAIN_PAIRS: [(&str, u32); 18] = [
    ("0006R0_f", 1530),
    ("0006R0_f", 2160),
    ("0006R0_f", 2190),
    ("0006R0_f", 2220),
    ("0006R0_f", 2400),
    ("0006R0_f", 2460),
    ("0006R0_f", 2970),
    ("0006R0_f", 3000),
    ("0006R0_f", 3030),
    ("0006R0_f", 3180),
    ("0006R0_f", 3210),
    ("0006R0_f", 3570),
    ("0006R0_f", 3600),
    ("0006R0_f", 3630),
    ("0006R0_f", 3660),
    ("0006R0_f", 3690),
    ("0006R0_f", 3750),
    ("0006R0_f", 3840),
];

/// Held-out pairs (sequence 0016E5, another drive).
const HELD_PAIRS: [(&str, u32); 12] = [
    ("0016E5_", 390),
    ("0016E5_", 4350),
    ("0016E5_", 4530),
    ("0016E5_", 4560),
    ("0016E5_", 4590),
    ("0016E5_", 4650),
    ("0016E5_", 4680),
    ("0016E5_", 4710),
    ("0016E5_", 5700),
    ("0016E5_", 7380),
    ("0016E5_", 7830),
    ("0016E5_", 8370),
];

const STEPS: usize = 32;
/// Constant: a schedule's warm-up would spend most of so short a run.
const LR: f64 = 3e-3;
const EMA_MOMENTUM: f64 = 0.99;
/// Held-out batches: every held-out pair twice, with different crops.
const HELD_BATCHES: usize = 6;
/// Negated-flow run's loss over the true-flow run's: seeds 1-10 gave 1.07 to 1.45.
const MIN_RATIO: f64 = 1.03;

/// A store of `pairs`, each its own two-frame sequence (a `p<k>x` prefix keeps unrelated
/// frames from pairing up), at 96x128 with the default flow model; `None` to skip.
fn camvid_pairs_store(d: &Path, tag: &str, pairs: &[(&str, u32)]) -> Option<PathBuf> {
    let camvid = shared_data("camvid/train")?;
    let (ort, bin) = (ort_library()?, prep_binary()?);
    let frames = d.join(tag);
    std::fs::create_dir_all(&frames).unwrap();
    for (k, (prefix, t)) in pairs.iter().enumerate() {
        for f in [t, &(t + 30)] {
            let name = format!("{prefix}{f:05}.png");
            let src = camvid.join(&name);
            assert!(src.exists(), "{} is missing", src.display());
            std::os::unix::fs::symlink(src, frames.join(format!("p{k:02}x{name}"))).unwrap();
        }
    }
    let cfg = d.join(format!("{tag}.json"));
    let json = serde_json::json!({
        "name": tag, "layout": {"kind": "frames", "extensions": ["png"]},
        "sampling": {"kind": "consecutive"}, "height": 96, "width": 128, "pairs_per_shard": 16
    });
    std::fs::write(&cfg, serde_json::to_vec(&json).unwrap()).unwrap();
    let out = d.join(format!("{tag}-store"));
    let o = Command::new(bin)
        .current_dir(repo())
        .args([
            "prep",
            "--quiet",
            "--model",
            "models/tvl1_flow.json",
            "--config",
        ])
        .arg(&cfg)
        .arg("--root")
        .arg(&frames)
        .arg("--out")
        .arg(&out)
        .env("ORT_DYLIB_PATH", ort)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    Some(out)
}

/// `tiny`, dense only, small backbone, no photometric augmentation or dense affine.
fn config(store: &Path, seed: u64) -> TrainConfig {
    let mut c = TrainConfig::tiny();
    c.data.stores = vec![store.to_path_buf()];
    c.seed = seed;
    c.method.pooled = false;
    c.augment = c.augment.without_colour();
    c.augment.affine.enabled = false;
    c.model.backbone = Backbone::Custom(ResNetConfig {
        block: BlockKind::Basic,
        layers: [1, 1, 1, 1],
        stem_width: 16,
        widths: [16, 32, 64, 128],
        dilated: false,
    });
    c.model.proj_hidden = 64;
    c.model.proj_out = 32;
    c.validate().unwrap();
    c
}

/// The first `n` batches of consecutive passes over `cfg`'s store.
fn batches(cfg: &TrainConfig, n: usize) -> Vec<Batch> {
    let loader = poodle_train::run::open_loader(cfg, &Device::Cpu).unwrap();
    (0..)
        .flat_map(|pass| loader.epoch(pass).map(|b| b.unwrap()).collect::<Vec<_>>())
        .take(n)
        .collect()
}

/// `b` with both flows (t -> t+dt and back) negated if `negate`; occlusion is kept.
fn flow_sign(b: &Batch, negate: bool) -> Batch {
    let mut b = b.clone();
    if negate {
        b.flow = b.flow.map(|f| f.neg().unwrap());
    }
    b
}

/// Mean dense loss over `bs` (forward only).
fn dense(l: &Learner, bs: &[Batch], negate: bool) -> f64 {
    let sum: f64 = bs
        .iter()
        .map(|b| f64::from(l.losses(&flow_sign(b, negate)).unwrap().1.dense))
        .sum();
    sum / bs.len() as f64
}

/// One AdamW step and EMA update per batch.
fn train(cfg: &TrainConfig, bs: &[Batch], negate: bool) -> Learner {
    let mut l = Learner::new(cfg, &Device::Cpu).unwrap();
    for b in bs {
        let (total, ..) = l.losses(&flow_sign(b, negate)).unwrap();
        let mut acc = GradAccumulator::new();
        acc.add(&total.backward().unwrap(), l.online_params())
            .unwrap();
        let grads = acc.finish(1.0).unwrap();
        l.apply(&grads, LR, EMA_MOMENTUM).unwrap();
    }
    l
}

fn seeds() -> Vec<u64> {
    std::env::var("POODLE_SIGN_SEEDS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("POODLE_SIGN_SEEDS: comma-separated integers")
        })
        .collect()
}

#[test]
fn training_with_the_true_flow_ends_with_a_lower_dense_loss_than_with_it_negated() {
    let d = tmpdir("flow-sign");
    let Some(train_store) = camvid_pairs_store(&d, "train", &TRAIN_PAIRS) else {
        return;
    };
    let Some(held_store) = camvid_pairs_store(&d, "held", &HELD_PAIRS) else {
        return;
    };
    for seed in seeds() {
        let cfg = config(&train_store, seed);
        let train_batches = batches(&cfg, STEPS);
        let held = batches(&config(&held_store, seed + 1000), HELD_BATCHES);
        let init = Learner::new(&cfg, &Device::Cpu).unwrap();
        let init_ratio = dense(&init, &held, true) / dense(&init, &held, false);
        let with_true = dense(&train(&cfg, &train_batches, false), &held, false);
        let with_negated = dense(&train(&cfg, &train_batches, true), &held, true);
        let ratio = with_negated / with_true;
        eprintln!(
            "flow sign, seed {seed}: held-out dense loss after {STEPS} steps: true flow \
             {with_true:.4}, negated {with_negated:.4} (ratio {ratio:.3}; at init \
             {init_ratio:.3})"
        );
        assert!(
            ratio > MIN_RATIO,
            "seed {seed}: the run with the true flow should end lower: {with_true:.4} vs \
             negated {with_negated:.4} (ratio {ratio:.3}, want > {MIN_RATIO})"
        );
    }
    std::fs::remove_dir_all(d).unwrap();
}
