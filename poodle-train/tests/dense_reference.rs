//! poodle's dense loss against an independent PyTorch reference built the way the authors'
//! forward pass builds it (kornia `RandomAffine`/`RandomHorizontalFlip` with fixed
//! parameters, their `warp`, mask and masked mean), and the paper's Eq. (1) order.
//!
//! Fixture: `tests/fixtures/dense/dense_reference.safetensors`, written by
//! `.venv-ref/bin/python tools/torch_reference_dense.py` (its docstring has the
//! conventions). (a) = the authors' order, (b) = the paper's order, both with exact pixel
//! coordinates; `authors_zero_outside` is (a) with poodle's sampler rule at the crop edge;
//! `loss_literal_*` / `loss_kornia072*` are (a) with the authors' literal quirks.
//! Tolerance: `max |got - want| <= 1e-4 * max |want|` per compared tensor.
//!
//! Findings (issue 10): `TargetOrder::Paper` matches (b). `TargetOrder::Authors` matches (a)
//! with the flip folded into the target affine as `run.rs` passes it (the loss splits the
//! flip off and undoes it before the flow warp, as the authors do; this reference found that
//! it first did not), up to `grid_sample`'s blend of points less than a pixel outside the
//! crop, which poodle's sampler sets to 0 (~0.7% of the loss here, a one-pixel band whose
//! share shrinks with the crop size; a known difference).
//!
//! Parameter mapping, from kornia's source (not tuned): kornia's `angle` and isotropic
//! `scale` are `Affine::about_centre`'s `deg` and `scale`, centre `((W-1)/2, (H-1)/2)`, the
//! flip (`x -> W-1-x`) applied after the affine, i.e. folded in on the output side.

use candle_core::{DType, Device, Tensor, Var};
use poodle_train::geom::Affine;
use poodle_train::loss::dense::{dense_aligned, dense_loss, Correspondence, TargetOrder};
use std::collections::HashMap;

const REL: f64 = 1e-4;
const FIXTURE: &str = "tests/fixtures/dense/dense_reference.safetensors";

type Fixture = HashMap<String, Tensor>;

/// The fixture, or `None` (skip locally; a failure naming the path under `CI=true`).
fn fixture() -> Option<Fixture> {
    let path = format!("{}/{FIXTURE}", env!("CARGO_MANIFEST_DIR"));
    poodle_common::testenv::require(&path, "run tools/torch_reference_dense.py")?;
    Some(
        candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {path}: {e}")),
    )
}

fn get<'a>(f: &'a Fixture, k: &str) -> &'a Tensor {
    f.get(k)
        .unwrap_or_else(|| panic!("fixture key {k} missing"))
}

fn f32t(f: &Fixture, k: &str) -> Tensor {
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

fn scalar64(f: &Fixture, k: &str) -> f64 {
    vec64(get(f, k))[0]
}

/// `max |got - want|` and `max |want|`.
fn max_err(got: &Tensor, want: &Tensor) -> (f64, f64) {
    assert_eq!(got.dims(), want.dims(), "shape");
    let (g, w) = (vec64(got), vec64(want));
    let scale = w.iter().fold(0f64, |a, v| a.max(v.abs()));
    let err = g
        .iter()
        .zip(&w)
        .fold(0f64, |a, (x, y)| a.max((x - y).abs()));
    (err, scale)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let (err, scale) = max_err(got, want);
    assert!(scale > 0.0, "{what}: reference is all zeros");
    assert!(
        err <= REL * scale,
        "{what}: max abs error {err:.3e} > {REL:.0e} * {scale:.3e}"
    );
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

/// One case: inputs, and per branch the affines rebuilt from the kornia parameters.
struct Case {
    f: Fixture,
    crop: (usize, usize),
    pred: Tensor,
    proj: Tensor,
    flow: Tensor,
    occ: Tensor,
    /// Flip folded into the matrix (poodle's convention, what `run.rs` passes).
    a_on: Vec<Affine>,
    a_tg: Vec<Affine>,
    /// Rotation and scale only, and which samples the flip applies to.
    a_tg_noflip: Vec<Affine>,
    flip_tg: Vec<bool>,
}

/// `Affine::about_centre` from the stored `(deg, scale, flip)`; asserts it is kornia's
/// sampling map `(Flip M)^-1` (stored by the script) to 1e-12.
fn affines(
    f: &Fixture,
    branch: &str,
    (h, w): (usize, usize),
) -> (Vec<Affine>, Vec<Affine>, Vec<bool>) {
    let params: Vec<Vec<f64>> = get(f, &format!("params_{branch}")).to_vec2().unwrap();
    let mats: Vec<Vec<f64>> = get(f, &format!("sampling_{branch}")).to_vec2().unwrap();
    let mut folded = Vec::new();
    let mut plain = Vec::new();
    let mut flips = Vec::new();
    for (p, m) in params.iter().zip(&mats) {
        let flip = p[2] > 0.5;
        let a = Affine::about_centre(w, h, p[0], p[1], flip);
        for (x, y) in a.0.iter().zip(m) {
            assert!(
                (x - y).abs() < 1e-12,
                "{branch}: about_centre{p:?} = {:?}, kornia's sampling map {m:?}",
                a.0
            );
        }
        folded.push(a);
        plain.push(Affine::about_centre(w, h, p[0], p[1], false));
        flips.push(flip);
    }
    (folded, plain, flips)
}

fn case() -> Option<Case> {
    let f = fixture()?;
    let crop: Vec<i64> = get(&f, "crop").to_vec1().unwrap();
    let crop = (crop[0] as usize, crop[1] as usize);
    let (a_on, _, _) = affines(&f, "online", crop);
    let (a_tg, a_tg_noflip, flip_tg) = affines(&f, "target", crop);
    Some(Case {
        pred: f32t(&f, "pred"),
        proj: f32t(&f, "proj"),
        flow: f32t(&f, "flow"),
        occ: f32t(&f, "occluded"),
        f,
        crop,
        a_on,
        a_tg,
        a_tg_noflip,
        flip_tg,
    })
}

/// Reverses the columns of the flagged samples (kornia's `hflip`, at feature resolution).
fn hflip_samples(x: &Tensor, flags: &[bool]) -> Tensor {
    let w = x.dim(3).unwrap();
    let rev = Tensor::from_vec((0..w as u32).rev().collect::<Vec<_>>(), w, x.device()).unwrap();
    let parts: Vec<Tensor> = flags
        .iter()
        .enumerate()
        .map(|(b, &fl)| {
            let s = x.narrow(0, b, 1).unwrap();
            if fl {
                s.index_select(&rev, 3).unwrap()
            } else {
                s
            }
        })
        .collect();
    Tensor::cat(&parts, 0).unwrap()
}

/// poodle's loss, per-sample losses, the online gradient and the aligned maps.
struct Got {
    loss: f64,
    per_sample: Vec<f64>,
    grad: Tensor,
    z_o: Tensor,
    z_t: Tensor,
    m: Tensor,
}

fn run(c: &Case, proj: &Tensor, a_tg: &[Affine], order: TargetOrder) -> Got {
    let pred = Var::from_tensor(&c.pred).unwrap();
    let full = Correspondence {
        a_online: &c.a_on,
        a_target: a_tg,
        flow: &c.flow,
        occluded: &c.occ,
        crop: c.crop,
        order,
    };
    let (loss, _) = dense_loss(pred.as_tensor(), proj, &full).unwrap();
    let grad = loss
        .backward()
        .unwrap()
        .get(pred.as_tensor())
        .unwrap()
        .clone();
    let (z_o, z_t, m, _) = dense_aligned(&c.pred, proj, &full).unwrap();
    let n = c.a_on.len();
    let per_sample = (0..n)
        .map(|b| {
            let one = |t: &Tensor| t.narrow(0, b, 1).unwrap();
            let (flow, occ) = (one(&c.flow), one(&c.occ));
            let corr = Correspondence {
                a_online: &c.a_on[b..b + 1],
                a_target: &a_tg[b..b + 1],
                flow: &flow,
                occluded: &occ,
                crop: c.crop,
                order,
            };
            let (l, _) = dense_loss(&one(&c.pred), &one(proj), &corr).unwrap();
            l.to_scalar::<f32>().unwrap() as f64
        })
        .collect();
    Got {
        loss: loss.to_scalar::<f32>().unwrap() as f64,
        per_sample,
        grad,
        z_o,
        z_t,
        m,
    }
}

/// Loss, per-sample losses, gradient, mask and masked maps against reference `key`.
fn assert_matches(what: &str, got: &Got, f: &Fixture, key: &str) {
    let want = scalar64(f, &format!("loss_{key}"));
    println!(
        "{what}: loss {:.6} vs reference ({key}) {want:.6}",
        got.loss
    );
    assert!(
        rel(got.loss, want) <= REL,
        "{what}: loss {} vs {want} (rel {:.2e})",
        got.loss,
        rel(got.loss, want)
    );
    let per = vec64(get(f, &format!("per_sample_{key}")));
    for (b, (g, w)) in got.per_sample.iter().zip(&per).enumerate() {
        assert!(rel(*g, *w) <= REL, "{what}: sample {b} loss {g} vs {w}");
    }
    assert_close(
        &format!("{what}: d loss / d pred"),
        &got.grad,
        get(f, &format!("grad_{key}")),
    );
    // The masks are 0/1 decisions on the same coordinates: exactly equal.
    let m_want = get(f, &format!("mask_{key}"));
    assert_eq!(vec64(&got.m), vec64(m_want), "{what}: mask");
    // The maps matter only where the mask is 1 (elsewhere poodle writes zeros).
    let m_f = got.m.broadcast_as(got.z_t.shape()).unwrap();
    let masked = |t: &Tensor| t.mul(&m_f).unwrap();
    assert_close(
        &format!("{what}: z_t * m"),
        &masked(&got.z_t),
        &masked(&f32t(f, &format!("zt_{key}"))),
    );
    assert_close(
        &format!("{what}: z_o * m"),
        &masked(&got.z_o),
        &masked(&f32t(f, "zo")),
    );
}

#[test]
fn kornia_parameters_map_to_about_centre() {
    // `case()` asserts every branch's matrix; here also that the case is the intended one:
    // each branch flips one sample and rotates and scales both.
    let Some(c) = case() else { return };
    for branch in ["online", "target"] {
        let p: Vec<Vec<f64>> = get(&c.f, &format!("params_{branch}")).to_vec2().unwrap();
        assert_eq!(p.iter().filter(|p| p[2] > 0.5).count(), 1, "{branch}");
        assert!(p
            .iter()
            .all(|p| p[0].abs() > 1.0 && (p[1] - 1.0).abs() > 0.01));
    }
    assert!(c.flip_tg.iter().any(|&f| f) && c.flip_tg.iter().any(|&f| !f));
}

#[test]
fn paper_order_matches_reference_b() {
    let Some(c) = case() else { return };
    let got = run(&c, &c.proj, &c.a_tg, TargetOrder::Paper);
    assert_matches("Paper", &got, &c.f, "paper");
}

#[test]
fn authors_order_matches_reference_a_with_poodles_sampler_rule() {
    // The authors undo the flip on the feature map before the flow warp: feed poodle the
    // unflipped target map and the rotation/scale-only affine. Reference: (a) with the
    // flow-warped map zero wherever y + flow(y) leaves the crop (poodle's sampler rule,
    // `loss/sample.rs`; the blend of `grid_sample` is the finding below).
    let Some(c) = case() else { return };
    let proj = hflip_samples(&c.proj, &c.flip_tg);
    let got = run(&c, &proj, &c.a_tg_noflip, TargetOrder::Authors);
    assert_matches(
        "Authors (flip undone first)",
        &got,
        &c.f,
        "authors_zero_outside",
    );
}

#[test]
fn authors_order_is_within_a_bound_of_reference_a() {
    // Finding 1: against (a) itself poodle's Authors order is off by more than the parity
    // tolerance. `grid_sample(padding_mode='zeros')` still blends the in-crop taps of a point
    // less than a pixel outside the crop, poodle samples exactly 0 there; the affine undo then
    // mixes those values into pixels whose own mask is 1 (the mask tests y + flow(y), the
    // content comes from A^-1 y + flow(A^-1 y)). A one-pixel band, so its weight falls like
    // 1/size; bound = the measured value rounded up.
    let Some(c) = case() else { return };
    let proj = hflip_samples(&c.proj, &c.flip_tg);
    let got = run(&c, &proj, &c.a_tg_noflip, TargetOrder::Authors);
    let want = scalar64(&c.f, "loss_authors");
    let r = rel(got.loss, want);
    println!(
        "Authors vs (a) (grid_sample blend at the crop edge): {:.6} vs {want:.6}, rel {r:.3e}",
        got.loss
    );
    assert!(r <= 1e-2, "rel {r:.3e}");
}

/// The per-sample relative errors of poodle's Authors order called as `run.rs` calls it (flip
/// folded into the target affine) against reference `key`.
fn authors_folded_errors(c: &Case, key: &str) -> Vec<f64> {
    let got = run(c, &c.proj, &c.a_tg, TargetOrder::Authors);
    let per = vec64(get(&c.f, &format!("per_sample_{key}")));
    got.per_sample
        .iter()
        .zip(&per)
        .map(|(g, w)| rel(*g, *w))
        .collect()
}

#[test]
fn authors_order_with_the_flip_folded_in_matches_reference_a() {
    // As `run.rs` calls it (flip folded into the target affine), flipped and unflipped
    // samples alike, against (a) with poodle's sampler rule at the crop edge.
    let Some(c) = case() else { return };
    assert!(c.flip_tg.iter().any(|&f| f), "the case flips a target");
    let errs = authors_folded_errors(&c, "authors_zero_outside");
    for (b, e) in errs.iter().enumerate() {
        println!(
            "Authors, flip folded in: sample {b} (target flip {}) rel. error {e:.3e}",
            c.flip_tg[b]
        );
        assert!(*e <= REL, "sample {b}: {e:.3e}");
    }
    // Against (a) itself the edge blend remains: bounded, and larger than the tolerance.
    let errs = authors_folded_errors(&c, "authors");
    assert!(errs.iter().all(|e| *e < 0.02), "{errs:?}");
}

#[test]
fn the_two_orders_differ_visibly() {
    let Some(c) = case() else { return };
    let (la, la0, lb) = (
        scalar64(&c.f, "loss_authors"),
        scalar64(&c.f, "loss_authors_zero_outside"),
        scalar64(&c.f, "loss_paper"),
    );
    let a = run(
        &c,
        &hflip_samples(&c.proj, &c.flip_tg),
        &c.a_tg_noflip,
        TargetOrder::Authors,
    );
    let b = run(&c, &c.proj, &c.a_tg, TargetOrder::Paper);
    let (d_ref, d_ref0, d_got) = (rel(la, lb), rel(la0, lb), rel(a.loss, b.loss));
    println!(
        "|loss_a - loss_b| / loss_b: reference {d_ref:.3e} ({d_ref0:.3e} with poodle's \
         sampler rule), poodle {d_got:.3e}"
    );
    // Visible: 100x the parity tolerance, and poodle shows the same gap.
    assert!(
        d_ref > 100.0 * REL && d_ref0 > 20.0 * REL,
        "{d_ref:.3e} {d_ref0:.3e}"
    );
    assert!(rel(d_got, d_ref0) < 0.05, "{d_got:.3e} vs {d_ref0:.3e}");
    // The aligned target maps differ by much more than the tolerance where both are valid.
    let m = a.m.mul(&b.m).unwrap();
    let m_f = m.broadcast_as(a.z_t.shape()).unwrap();
    let (err, scale) = max_err(&a.z_t.mul(&m_f).unwrap(), &b.z_t.mul(&m_f).unwrap());
    println!("max |z_t(a) - z_t(b)| on the common mask: {err:.3e} (max |z_t| {scale:.3e})");
    assert!(err > 0.05 * scale, "{err:.3e} vs {scale:.3e}");
}

#[test]
fn literal_quirks_of_the_authors_code_change_the_loss_by_a_bounded_amount() {
    // (a) uses exact pixel coordinates; the authors' code as written differs in three ways:
    // their warp samples with align_corners=False at (size-1)-normalised coordinates (a
    // W/(W-1) scaling about the centre), their affine masks are a round trip (about a pixel
    // of erosion at the view's and the crop's edges), and kornia 0.7.2 (their pin) conjugated
    // the affine by a sub-pixel scaling. Bounds are the measured values rounded up, on this
    // 24 x 40 crop; all three are sub-pixel or one-pixel effects that shrink like 1/size.
    let Some(c) = case() else { return };
    let la = scalar64(&c.f, "loss_authors");
    for (key, bound) in [
        ("literal_warp", 3e-3),
        ("literal_mask", 2e-3),
        ("kornia072", 3e-4),
        ("literal_all", 5e-3),
    ] {
        let want = scalar64(&c.f, &format!("loss_{key}"));
        let r = rel(want, la);
        println!("authors' literal {key}: loss {want:.6} vs (a) {la:.6}, rel. change {r:.3e}");
        assert!(r <= bound, "{key}: rel {r:.3e} > {bound:.0e}");
        assert!(
            r > REL,
            "{key}: the quirk should be visible at this size ({r:.3e})"
        );
    }
    // And poodle's default order (flip undone first) against the authors' code as written.
    let proj = hflip_samples(&c.proj, &c.flip_tg);
    let got = run(&c, &proj, &c.a_tg_noflip, TargetOrder::Authors).loss;
    let lit = scalar64(&c.f, "loss_literal_all");
    println!(
        "poodle Authors vs authors' literal code: {got:.6} vs {lit:.6}, rel {:.3e}",
        rel(got, lit)
    );
    assert!(rel(got, lit) <= 1e-2, "rel {:.3e}", rel(got, lit));
}

#[test]
fn kornia_072_affine_is_poodle_with_a_conjugated_affine() {
    // Reading of kornia 0.7.2's warp_affine(align_corners=False): the pixel sampling map is
    // phi^-1 o A o phi with phi(x) = c + D (x - c), D = diag((W-1)/W, (H-1)/H). With that
    // affine poodle reproduces the `kornia072` variant (exact warp, one-way masks, poodle's
    // sampler rule otherwise).
    let Some(c) = case() else { return };
    let (h, w) = c.crop;
    let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
    let (dx, dy) = ((w as f64 - 1.0) / w as f64, (h as f64 - 1.0) / h as f64);
    let phi = Affine([dx, 0.0, cx - dx * cx, 0.0, dy, cy - dy * cy]);
    let conj = |a: &Affine| phi.inverse().compose(&a.compose(&phi));
    let plain_on: Vec<Affine> = {
        let p: Vec<Vec<f64>> = get(&c.f, "params_online").to_vec2().unwrap();
        p.iter()
            .map(|p| conj(&Affine::about_centre(w, h, p[0], p[1], false)))
            .collect()
    };
    let on_flip: Vec<bool> = {
        let p: Vec<Vec<f64>> = get(&c.f, "params_online").to_vec2().unwrap();
        p.iter().map(|p| p[2] > 0.5).collect()
    };
    let a_tg: Vec<Affine> = c.a_tg_noflip.iter().map(conj).collect();
    // The online flip commutes with the upsampling: undo it on the features as well.
    let c2 = Case {
        f: c.f.clone(),
        pred: hflip_samples(&c.pred, &on_flip),
        a_on: plain_on,
        ..c
    };
    let proj = hflip_samples(&c2.proj, &c2.flip_tg);
    let got = run(&c2, &proj, &a_tg, TargetOrder::Authors).loss;
    let want = scalar64(&c2.f, "loss_kornia072_zero_outside");
    println!("poodle with conjugated affines {got:.6} vs kornia072 (zero outside) {want:.6}");
    assert!(rel(got, want) <= REL, "rel {:.3e}", rel(got, want));
}
