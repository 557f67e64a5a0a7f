//! Parity of the candle losses, sampler, AdamW and EMA with their PyTorch reference forms.
//!
//! Fixtures: `tests/fixtures/loss/*.safetensors`, written by
//! `.venv-ref/bin/python tools/torch_reference_losses.py` (loss references in float64 from
//! float32 inputs; AdamW and EMA in float32). Tolerance: every compared tensor satisfies
//! `max |got - want| <= 1e-4 * max |want|` (relative to the tensor's magnitude), in f32.

use candle_core::{DType, Device, Tensor, Var};
use poodle_train::geom::Affine;
use poodle_train::loss::dense::{
    dense_aligned, dense_loss, dense_loss_with_target_grad, Correspondence, TargetOrder,
};

use poodle_train::loss::pooled::{pooled_loss, pooled_loss_with_target_grad};
use poodle_train::loss::sample_bilinear;
use poodle_train::optim::{ema_momentum, ema_update, AdamW, AdamWConfig, Grads};
use std::collections::HashMap;

const REL: f64 = 1e-4;

/// The fixtures were made with the paper's order (undo the affine, then warp).
fn paper<'a>(
    a: &'a [Affine],
    b: &'a [Affine],
    f: &'a Tensor,
    o: &'a Tensor,
    crop: (usize, usize),
) -> Correspondence<'a> {
    Correspondence::new(a, b, f, o, crop, TargetOrder::Paper)
}

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = format!(
        "{}/tests/fixtures/loss/{name}.safetensors",
        env!("CARGO_MANIFEST_DIR")
    );
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {path}: {e}"))
}

fn get<'a>(f: &'a HashMap<String, Tensor>, k: &str) -> &'a Tensor {
    f.get(k)
        .unwrap_or_else(|| panic!("fixture key {k} missing"))
}

fn f32t(f: &HashMap<String, Tensor>, k: &str) -> Tensor {
    get(f, k).to_dtype(DType::F32).unwrap()
}

fn vec64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn scalar64(t: &Tensor) -> f64 {
    vec64(t)[0]
}

/// `max |got - want| <= rel * max |want|`, with matching shapes.
fn assert_close(what: &str, got: &Tensor, want: &Tensor, rel: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (vec64(got), vec64(want));
    let scale = w.iter().fold(0f64, |a, v| a.max(v.abs()));
    assert!(scale > 0.0, "{what}: reference is all zeros");
    let err = g
        .iter()
        .zip(&w)
        .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
    assert!(
        err <= rel * scale,
        "{what}: max abs error {err:.3e} > {rel:.0e} * {scale:.3e}"
    );
}

fn affines(f: &HashMap<String, Tensor>, branch: &str, (h, w): (usize, usize)) -> Vec<Affine> {
    let params: Vec<Vec<f64>> = get(f, &format!("params_{branch}")).to_vec2().unwrap();
    let mats: Vec<Vec<f64>> = get(f, &format!("affine_{branch}")).to_vec2().unwrap();
    params
        .iter()
        .zip(&mats)
        .map(|(p, m)| {
            let a = Affine::about_centre(w, h, p[0], p[1], p[2] > 0.5);
            for (x, y) in a.0.iter().zip(m) {
                assert!(
                    (x - y).abs() < 1e-12,
                    "{branch} affine {:?} vs python {m:?}",
                    a.0
                );
            }
            a
        })
        .collect()
}

#[test]
fn dense_loss_value_and_gradients_match_pytorch() {
    let f = fixture("dense");
    let crop: Vec<i64> = get(&f, "crop").to_vec1().unwrap();
    let crop = (crop[0] as usize, crop[1] as usize);
    let (a_on, a_tg) = (affines(&f, "online", crop), affines(&f, "target", crop));
    let pred = Var::from_tensor(&f32t(&f, "pred")).unwrap();
    let proj = Var::from_tensor(&f32t(&f, "proj")).unwrap();
    let (flow, occ) = (f32t(&f, "flow"), f32t(&f, "occluded"));

    // Stop-gradient form (training): value and online gradient.
    let (loss, stats) = dense_loss(
        pred.as_tensor(),
        proj.as_tensor(),
        &paper(&a_on, &a_tg, &flow, &occ, crop),
    )
    .unwrap();
    let want = scalar64(get(&f, "loss"));
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got - want).abs() <= REL * want.abs(),
        "dense loss {got} vs torch {want}"
    );
    let grads = loss.backward().unwrap();
    assert_close(
        "dense grad_pred",
        grads.get(pred.as_tensor()).unwrap(),
        get(&f, "grad_pred"),
        REL,
    );
    assert!(grads.get(proj.as_tensor()).is_none(), "target is detached");
    let mask = get(&f, "mask");
    let frac = vec64(mask).iter().sum::<f64>() / mask.elem_count() as f64;
    assert!(
        (stats.mask_fraction as f64 - frac).abs() < 1e-6,
        "{stats:?} vs {frac}"
    );

    // Without stop-gradient: the target path (upsample + flow/affine sampler) backpropagates
    // like grid_sample.
    let (loss2, _) = dense_loss_with_target_grad(
        pred.as_tensor(),
        proj.as_tensor(),
        &paper(&a_on, &a_tg, &flow, &occ, crop),
    )
    .unwrap();
    let grads2 = loss2.backward().unwrap();
    assert_close(
        "dense grad_proj",
        grads2.get(proj.as_tensor()).unwrap(),
        get(&f, "grad_proj"),
        REL,
    );
    assert_close(
        "dense grad_pred (no stop-grad)",
        grads2.get(pred.as_tensor()).unwrap(),
        get(&f, "grad_pred"),
        REL,
    );
}

#[test]
fn dense_masks_and_aligned_maps_match_pytorch() {
    let f = fixture("dense");
    let crop = (16, 24);
    let (a_on, a_tg) = (affines(&f, "online", crop), affines(&f, "target", crop));
    let (pred, proj) = (f32t(&f, "pred"), f32t(&f, "proj"));
    let (flow, occ) = (f32t(&f, "flow"), f32t(&f, "occluded"));
    let (z_o, z_t, m, _) =
        dense_aligned(&pred, &proj, &paper(&a_on, &a_tg, &flow, &occ, crop)).unwrap();
    // The mask is exact (0/1 decisions on the same f64 coordinates).
    assert_eq!(vec64(&m), vec64(get(&f, "mask")));
    let m_f = m.broadcast_as(z_o.shape()).unwrap();
    assert_close(
        "z_online * m",
        &z_o.mul(&m_f).unwrap(),
        get(&f, "z_online_masked"),
        REL,
    );
    assert_close(
        "z_target * m",
        &z_t.mul(&m_f).unwrap(),
        get(&f, "z_target_masked"),
        REL,
    );
}

#[test]
fn upsampling_matches_f_interpolate() {
    // Identity affines, zero flow: the aligned maps are the upsampled inputs themselves.
    let f = fixture("dense");
    let x = f32t(&f, "up_in");
    let want = get(&f, "up_ref");
    let (h, w) = (want.dims()[2], want.dims()[3]);
    let zeros = |c| Tensor::zeros((1, c, h, w), DType::F32, &Device::Cpu).unwrap();
    let id = [Affine::IDENTITY];
    let (z_o, z_t, m, _) =
        dense_aligned(&x, &x, &paper(&id, &id, &zeros(2), &zeros(1), (h, w))).unwrap();
    assert_close("upsample (online path)", &z_o, want, REL);
    assert_close("upsample (target path)", &z_t, want, REL);
    assert!(vec64(&m).iter().all(|&v| v == 1.0));
}

#[test]
fn sampler_matches_grid_sample() {
    let f = fixture("sampler");
    let x = Var::from_tensor(&f32t(&f, "x")).unwrap();
    let (out, mask) = sample_bilinear(x.as_tensor(), &f32t(&f, "coords")).unwrap();
    assert_eq!(vec64(&mask), vec64(get(&f, "mask")));
    assert_close("sample_bilinear", &out, get(&f, "out"), REL);
    let g = f32t(&f, "g");
    let grads = out.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
    assert_close(
        "sample_bilinear grad",
        grads.get(x.as_tensor()).unwrap(),
        get(&f, "grad_x"),
        REL,
    );
}

#[test]
fn pooled_loss_matches_pytorch() {
    let f = fixture("pooled");
    let q = Var::from_tensor(&f32t(&f, "q")).unwrap();
    let z = Var::from_tensor(&f32t(&f, "z")).unwrap();
    let loss = pooled_loss(q.as_tensor(), z.as_tensor()).unwrap();
    let want = scalar64(get(&f, "loss"));
    let got = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((got - want).abs() <= REL * want, "pooled {got} vs {want}");
    let grads = loss.backward().unwrap();
    assert_close(
        "pooled grad_q",
        grads.get(q.as_tensor()).unwrap(),
        get(&f, "grad_q"),
        REL,
    );
    assert!(grads.get(z.as_tensor()).is_none());
    let grads = pooled_loss_with_target_grad(q.as_tensor(), z.as_tensor())
        .unwrap()
        .backward()
        .unwrap();
    assert_close(
        "pooled grad_z",
        grads.get(z.as_tensor()).unwrap(),
        get(&f, "grad_z"),
        REL,
    );
}

#[test]
fn adamw_two_steps_match_torch_optim_adamw() {
    let f = fixture("adamw");
    let w = Var::from_tensor(get(&f, "w0")).unwrap();
    let b = Var::from_tensor(get(&f, "b0")).unwrap();
    let lrs = vec64(get(&f, "lr"));
    let cfg = AdamWConfig {
        weight_decay: scalar64(get(&f, "weight_decay")),
        ..AdamWConfig::default()
    };
    let params = vec![
        ("head.linear.weight".to_string(), w.clone()),
        ("head.linear.bias".to_string(), b.clone()),
    ];
    let mut opt = AdamW::new(params.clone(), cfg).unwrap();
    assert_eq!(opt.no_decay_names(), vec!["head.linear.bias"]);
    let grads = |gw: &str, gb: &str| {
        let mut g = Grads::default();
        g.insert("head.linear.weight", get(&f, gw).clone());
        g.insert("head.linear.bias", get(&f, gb).clone());
        g
    };
    opt.step(&grads("g1w", "g1b"), lrs[0]).unwrap();
    assert_close("adamw w after step 1", w.as_tensor(), get(&f, "w1"), REL);
    assert_close("adamw b after step 1", b.as_tensor(), get(&f, "b1"), REL);
    let state = opt.state_tensors().unwrap();
    for (k, r) in [
        ("adam.m.head.linear.weight", "m1w"),
        ("adam.v.head.linear.weight", "v1w"),
        ("adam.m.head.linear.bias", "m1b"),
        ("adam.v.head.linear.bias", "v1b"),
    ] {
        assert_close(k, &state[k], get(&f, r), REL);
    }
    // Step 2 from a restored optimiser: bias correction continues at t = 2.
    let mut opt2 = AdamW::new(params, cfg).unwrap();
    opt2.load_state(&state).unwrap();
    opt2.step(&grads("g2w", "g2b"), lrs[1]).unwrap();
    assert_close("adamw w after step 2", w.as_tensor(), get(&f, "w2"), REL);
    assert_close("adamw b after step 2", b.as_tensor(), get(&f, "b2"), REL);
    let state = opt2.state_tensors().unwrap();
    assert_close(
        "adam m step 2",
        &state["adam.m.head.linear.weight"],
        get(&f, "m2w"),
        REL,
    );
    assert_close(
        "adam v step 2",
        &state["adam.v.head.linear.weight"],
        get(&f, "v2w"),
        REL,
    );
    assert_eq!(scalar64(&state["adam.step"]), 2.0);
    // The update is tiny relative to the weights: check it separately so a no-op would fail.
    let upd = w.as_tensor().sub(get(&f, "w0")).unwrap();
    let want = get(&f, "w2").sub(get(&f, "w0")).unwrap();
    assert_close("adamw total update", &upd, &want, 1e-3);
}

#[test]
fn clip_grad_norm_matches_torch() {
    let f = fixture("adamw");
    let mut g = Grads::default();
    g.insert("a", get(&f, "clip_ga").clone());
    g.insert("b", get(&f, "clip_gb").clone());
    let total = g
        .clip_global_norm(scalar64(get(&f, "clip_max_norm")))
        .unwrap();
    let want = scalar64(get(&f, "clip_total"));
    assert!((total - want).abs() <= REL * want, "{total} vs {want}");
    assert_close(
        "clipped a",
        g.get("a").unwrap(),
        get(&f, "clip_ga_out"),
        REL,
    );
    assert_close(
        "clipped b",
        g.get("b").unwrap(),
        get(&f, "clip_gb_out"),
        REL,
    );
}

#[test]
fn ema_update_matches_pytorch() {
    let f = fixture("ema");
    let stm = vec64(get(&f, "step_total_m0"));
    let m = ema_momentum(stm[0] as u64, stm[1] as u64, stm[2]);
    assert!((m - scalar64(get(&f, "momentum"))).abs() < 1e-15);
    let target = Var::from_tensor(get(&f, "target")).unwrap();
    let online = Var::from_tensor(get(&f, "online")).unwrap();
    ema_update(
        &[("backbone.conv1.weight".into(), target.clone())],
        &[("backbone.conv1.weight".into(), online)],
        m,
    )
    .unwrap();
    assert_close("ema", target.as_tensor(), get(&f, "out"), REL);
    let moved = target.as_tensor().sub(get(&f, "target")).unwrap();
    let want = get(&f, "out").sub(get(&f, "target")).unwrap();
    assert_close("ema step", &moved, &want, 1e-3);
}
