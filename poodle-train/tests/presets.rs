//! Every value of every training preset, pinned: a default that drifts fails here. The
//! `paper` table is complete; the other presets list how they differ from it (the authors'
//! configs/exp/poodle_ablation.yaml and poodle_wt.yaml; `tiny` is the CPU demo). The sources
//! of the method's values are in docs/method.md.

use poodle_train::config::TrainConfig;
use std::collections::BTreeMap;

/// (dotted path, JSON value) of the `paper` preset.
const PAPER: &[(&str, &str)] = &[
    ("model.backbone", r#""resnet50""#), // paper
    ("model.decoder.enabled", r#"true"#),
    ("model.decoder.top_down", r#"true"#),
    ("model.decoder.lateral", r#"true"#),
    ("model.decoder.order", r#""authors""#), // authors (paper: Eq. (3) order)
    ("model.dilated", r#"false"#),
    ("model.proj_hidden", r#"4096"#), // authors mlp_hidden_dim
    ("model.proj_out", r#"256"#),     // authors proj_dim
    ("augment.out_height", r#"512"#), // authors initial_crop_size
    ("augment.out_width", r#"1024"#),
    ("augment.global_crop.mode", r#""scale_then_crop""#), // authors
    ("augment.global_crop.initial_size", r#"[1080, 1920]"#), // authors
    ("augment.global_crop.initial_scale", r#"[0.75, 1.25]"#), // authors
    ("augment.global_crop.area", r#"[0.16, 0.45]"#),
    ("augment.global_crop.ratio", r#"[0.75, 1.3333333333333333]"#),
    ("augment.colour.jitter_p", r#"0.8"#),
    ("augment.colour.brightness", r#"0.8"#), // authors ColorJitter
    ("augment.colour.contrast", r#"0.8"#),
    ("augment.colour.saturation", r#"0.8"#),
    ("augment.colour.hue", r#"0.2"#), // authors ColorJitter
    ("augment.colour.grayscale_p", r#"0.2"#),
    ("augment.colour.blur_p", r#"[0.5, 0.5]"#), // authors
    ("augment.colour.blur_sigma", r#"[0.1, 2.0]"#),
    (
        "augment.colour.blur_kernel.crop_fraction.fraction",
        r#"0.1"#,
    ), // authors round_up_odd(0.1 H)
    ("augment.colour.solarize_p", r#"[0.0, 0.0]"#), // authors: none
    ("augment.colour.solarize_threshold", r#"0.5"#),
    ("augment.colour.mean", r#"[0.485, 0.456, 0.406]"#),
    ("augment.colour.std", r#"[0.229, 0.224, 0.225]"#),
    ("augment.affine.enabled", r#"true"#),
    ("augment.affine.scale", r#"[0.9, 1.1]"#), // authors affine_aug_params
    ("augment.affine.rotation_deg", r#"10.0"#), // authors affine_aug_params
    ("augment.affine.flip_p", r#"0.5"#),
    ("augment.occlusion_threshold", r#"0.5"#),
    ("augment.subcrops.k", r#"6"#),      // authors subcrop_num_pair
    ("augment.subcrops.size", r#"192"#), // authors subcrop_size
    ("augment.subcrops.area", r#"[0.05, 0.3]"#), // authors subcrop_scale
    ("augment.subcrops.ratio", r#"[0.75, 1.3333]"#), // authors subcrop_ratio
    ("augment.subcrops.jitter", r#"0.1"#), // authors subcrop_jitter
    ("augment.subcrops.tries", r#"5"#),  // authors MAX_TRIES_PER_CROP
    ("data.stores", r#"[]"#),
    ("data.flow_group", r#"null"#),
    ("data.batch_size", r#"4"#), // authors: 2 videos x R
    ("data.workers", r#"4"#),
    ("data.prefetch", r#"8"#),
    ("data.sampling.unit", r#""auto""#),
    ("data.sampling.pairs_per_visit", r#"2"#), // authors repeat_sample
    ("data.sampling.visits_per_pass", r#"1"#),
    ("data.sampling.keep_visits_together", r#"true"#),
    ("optim.lr", r#"0.0005"#),         // paper and authors
    ("optim.weight_decay", r#"0.01"#), // paper and authors
    ("optim.eps", r#"1e-06"#),         // paper
    ("optim.betas", r#"[0.9, 0.999]"#),
    ("optim.warmup_epochs", r#"2.0"#), // authors
    ("optim.epochs", r#"300"#),        // authors
    ("optim.grad_clip", r#"null"#),
    ("optim.accumulate", r#"1"#),
    ("optim.ema_m0", r#"0.996"#), // authors base_momentum
    ("method.dense", r#"true"#),
    ("method.pooled", r#"true"#),
    ("method.w_dense", r#"0.5"#), // authors loss_weights
    ("method.w_pooled", r#"0.5"#),
    ("method.dense_order", r#""authors""#), // authors (paper: M o A2^-1)
    ("seed", r#"0"#),
    ("run.dir", r#""runs/paper""#),
    ("run.log_every", r#"10"#),
    ("run.checkpoint_every", r#"1000"#),
    ("run.max_steps", r#"null"#),
    ("run.picture_every", r#"5000"#),
    ("device", r#""cpu""#),
    ("init", r#"null"#),
    ("init_network", r#""online""#),
    ("dist.backend", r#""auto""#),
    ("dist.sync_bn", r#"true"#), // paper: synchronised BatchNorm over the 32 GPUs
    ("dist.bucket_mb", r#"25.0"#), // PyTorch DDP's bucket_cap_mb
    ("dist.check_every", r#"null"#),
    ("dist.rendezvous_timeout_s", r#"300"#),
];

const ABLATION: &[(&str, &str)] = &[
    ("augment.out_height", "256"),
    ("augment.out_width", "512"),
    ("augment.affine.enabled", "false"),
    ("data.batch_size", "20"), // 2 videos x R = 10
    ("data.sampling.pairs_per_visit", "10"),
    ("optim.lr", "0.001"),
    ("optim.weight_decay", "1e-06"),
    ("optim.warmup_epochs", "3.0"),
    ("optim.epochs", "40"),
    ("run.dir", r#""runs/ablation""#),
];

const WALKING_TOURS: &[(&str, &str)] = &[
    ("augment.global_crop.initial_scale", "[0.535, 0.625]"),
    ("data.sampling.visits_per_pass", "75"), // dataset_repeats
    ("run.dir", r#""runs/walking_tours""#),
];

const TINY: &[(&str, &str)] = &[
    ("model.backbone", r#""resnet18""#),
    ("model.proj_hidden", "256"),
    ("model.proj_out", "64"),
    ("augment.out_height", "64"),
    ("augment.out_width", "128"),
    ("augment.global_crop.initial_size", "[135, 240]"),
    ("augment.subcrops.k", "2"),
    ("augment.subcrops.size", "32"),
    ("data.workers", "1"),
    ("data.prefetch", "2"),
    ("data.sampling.pairs_per_visit", "4"),
    ("optim.lr", "0.001"),
    ("optim.warmup_epochs", "5.0"),
    ("optim.epochs", "40"),
    ("run.dir", r#""runs/tiny""#),
    ("run.log_every", "1"),
    ("run.checkpoint_every", "50"),
    ("run.picture_every", "10"),
];

fn flatten(v: &serde_json::Value, prefix: &str, out: &mut BTreeMap<String, serde_json::Value>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(x, &p, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.clone());
        }
    }
}

fn expected(diff: &[(&str, &str)]) -> BTreeMap<String, serde_json::Value> {
    let mut m: BTreeMap<String, serde_json::Value> = PAPER
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::from_str(v).unwrap()))
        .collect();
    for (k, v) in diff {
        assert!(m.contains_key(*k), "{k} is not a paper key");
        m.insert(k.to_string(), serde_json::from_str(v).unwrap());
    }
    m
}

#[test]
fn every_preset_value_is_pinned() {
    for (name, diff) in [
        ("paper", &[][..]),
        ("ablation", ABLATION),
        ("walking_tours", WALKING_TOURS),
        ("tiny", TINY),
    ] {
        let cfg = TrainConfig::preset(name).unwrap();
        let mut got = BTreeMap::new();
        // Through the JSON text, as a run writes config.json (f32 fields print shortest).
        let text = serde_json::to_string(&cfg).unwrap();
        flatten(&serde_json::from_str(&text).unwrap(), "", &mut got);
        let want = expected(diff);
        for (k, v) in &want {
            assert_eq!(got.get(k), Some(v), "preset {name}: {k}");
        }
        let extra: Vec<_> = got.keys().filter(|k| !want.contains_key(*k)).collect();
        assert!(extra.is_empty(), "preset {name}: unpinned fields {extra:?}");
    }
}
