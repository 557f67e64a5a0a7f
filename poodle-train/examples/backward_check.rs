//! One training step's forward and backward on the CPU, timed, with every parameter gradient
//! written to a file or compared value for value with one: the check that a patched candle-core
//! (tools/cuda/patch_backprop.py, in the CUDA build) computes what the registry's computes.
//!
//!     cargo run --release -p poodle-train --example backward_check -- \
//!         PRESET PAIRS HEIGHT WIDTH REPEATS (--write FILE | --compare FILE) [KEY=VALUE ...]
//!
//! KEY=VALUE are config overrides, as `poodle-train train --set` takes them.
//! The weights come from the preset's seed and the batch from fixed seeds, so two builds see
//! the same numbers. Prints one JSON line: median forward and backward seconds over REPEATS
//! (after one untimed step), and with `--compare` the number of gradient elements that differ
//! (exit status 1 if any, or if the parameter names differ). tools/cuda/check-candle-patch.sh
//! runs it on both builds.

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use poodle_train::config::TrainConfig;
use poodle_train::gpucheck::synthetic_batch;
use poodle_train::optim::Grads;
use poodle_train::run::Learner;
use std::collections::HashMap;
use std::time::Instant;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [preset, pairs, height, width, repeats, mode, file, overrides @ ..] = &args[..] else {
        bail!(
            "usage: backward_check PRESET PAIRS HEIGHT WIDTH REPEATS (--write|--compare) FILE \
             [KEY=VALUE ...]"
        );
    };
    let (pairs, h, w): (usize, usize, usize) = (pairs.parse()?, height.parse()?, width.parse()?);
    let repeats: usize = repeats.parse()?;
    let dev = Device::Cpu;
    let mut cfg = TrainConfig::load(preset, overrides)?;
    cfg.augment.out_height = h;
    cfg.augment.out_width = w;
    let learner = Learner::new(&cfg, &dev)?;
    let (k, s) = (cfg.augment.subcrops.k, cfg.augment.subcrops.size);
    let batch = synthetic_batch(pairs, h, w, k, s, &dev)?;

    let (mut fwd, mut bwd) = (Vec::new(), Vec::new());
    let mut grads = Grads::default();
    for i in 0..=repeats {
        let t = Instant::now();
        let (total, ..) = learner.losses(&batch)?;
        let f = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let store = total.backward()?;
        let b = t.elapsed().as_secs_f64();
        grads = Grads::from_store(&store, learner.online_params());
        if i > 0 {
            fwd.push(f);
            bwd.push(b);
        }
    }
    let got: HashMap<String, Tensor> = grads.iter().map(|(n, g)| (n.clone(), g.clone())).collect();
    let mut report = serde_json::json!({
        "preset": preset, "overrides": overrides, "pairs": pairs, "res": [h, w], "repeats": repeats,
        "forward_s": median(&mut fwd), "backward_s": median(&mut bwd),
        "gradients": got.len(),
    });
    let mut differ = 0usize;
    match mode.as_str() {
        "--write" => {
            candle_core::safetensors::save(&got, file).with_context(|| format!("writing {file}"))?
        }
        "--compare" => {
            let want = candle_core::safetensors::load(file, &dev)
                .with_context(|| format!("reading {file}"))?;
            let (d, max_abs) = compare(&got, &want)?;
            differ = d;
            report["differing_elements"] = d.into();
            report["max_abs_diff"] = max_abs.into();
        }
        other => bail!("{other}: expected --write or --compare"),
    }
    println!("{report}");
    if differ > 0 {
        std::process::exit(1);
    }
    Ok(())
}

/// Elements that differ (NaN equal to NaN; -0 equal to 0, since `0 + -0` is `0`), and the
/// largest absolute difference.
fn compare(got: &HashMap<String, Tensor>, want: &HashMap<String, Tensor>) -> Result<(usize, f64)> {
    let mut names: Vec<&String> = got.keys().collect();
    names.sort();
    let mut want_names: Vec<&String> = want.keys().collect();
    want_names.sort();
    if names != want_names {
        bail!("the gradients name different parameters: {names:?} against {want_names:?}");
    }
    let (mut differ, mut max_abs) = (0usize, 0f64);
    for n in names {
        let a = got[n].flatten_all()?.to_vec1::<f32>()?;
        let b = want[n].flatten_all()?.to_vec1::<f32>()?;
        if a.len() != b.len() {
            bail!("{n}: {} elements against {}", a.len(), b.len());
        }
        for (x, y) in a.iter().zip(&b) {
            if x != y && !(x.is_nan() && y.is_nan()) {
                differ += 1;
                max_abs = max_abs.max((x - y).abs() as f64);
            }
        }
    }
    Ok((differ, max_abs))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
