//! The dense flow-equivariant loss (paper Eq. (1); docs/method.md "Losses").
//!
//! Frames: the online branch sees frame `t`, the target branch frame `t+dt`, both as the same
//! global crop of size `H x W` ("crop coordinates"); each branch then draws its own affine
//! (flip folded in, [`Affine`] maps view pixel -> crop pixel). `flow` is `t -> t+dt` in crop
//! pixels: crop pixel `y` of frame `t` moves to `y + flow(y)` in frame `t+dt`.
//!
//! For every crop pixel `y` of frame `t`:
//! - online:  `z_o(y) = up(pred_online)(A_o^-1 y)`, valid iff `A_o^-1 y` lies inside the view;
//! - target:  `z_t(y) = up(proj_target)(A_t^-1 (y + flow(y)))`, valid iff `y + flow(y)` lies
//!   inside the crop and `A_t^-1 (y + flow(y))` inside the view;
//! - `m(y) = valid_o * valid_t * (1 - occluded(y))`;
//! - `z_o`, `z_t` L2-normalised over channels (`x / max(|x|, 1e-12)`, as `F.normalize`);
//! - per sample `sum_y m(y) |z_o(y) - z_t(y)|^2 / (sum_y m(y) + 1e-7)`, then the batch mean.
//!
//! `up` is bilinear upsampling to `H x W` (`align_corners=False`), sampling is bilinear with
//! zeros outside (`grid_sample(align_corners=True)`).
//!
//! # Target order ([`TargetOrder`])
//! The formulas above are the paper's `M o A_2^-1` ([`TargetOrder::Paper`]): undo the
//! target's affine, then warp by the flow, as one composed coordinate map and one bilinear
//! lookup. The authors' code (`src/models/poodle.py`) does it the other way round, and that
//! is the default ([`TargetOrder::Authors`]). Write the target affine as `A_t = M F`, `F` its
//! horizontal flip (if any) and `M` the rotation and scale. They undo the flip on the
//! features, warp the upsampled map by the flow in the affine view's coordinates,
//! `w(u) = up(proj_target)(F (u + flow(u)))`, and then undo `M`, `z_t(y) = w(M^-1 y)` (two
//! successive bilinear resamplings), with their mask `m(y) = [A_o^-1 y in view] *
//! [M^-1 y in view] * [y + flow(y) in crop] * (1 - occluded(y))`. Content at `y` is then
//! compared with target content at `y + M flow(M^-1 y)` instead of `y + flow(y)`: the two
//! orders agree when the target affine is a flip or the identity (the ablation recipe) and
//! differ by about `|(M - I) flow|` pixels otherwise.
//!
//! Implementation: `up` is never materialised; each branch is one [`SampleGrid`] plan that
//! composes the upsampling with the sampling exactly (taps into the stride-8 map), the
//! authors' order a chain of two (warp, then undo). [`dense_loss`] then compares the branches
//! with one fused op ([`super::fused`]) that gathers each crop pixel's two vectors through the
//! plans' taps, so no `(N, C, H, W)` map exists at crop resolution: memory is the stride-8
//! maps, their gradients and the plans' taps (~38 MB per 9-tap plan and sample at 512 x
//! 1024, formed on the device that uses them). [`dense_loss_composed`] builds the aligned maps
//! ([`dense_aligned`]) and compares them with [`super::normdiff`]; it is the reference of the
//! fused form. Coordinates and masks are computed in f64 on the CPU from the affines and the
//! flow (which is read back from its tensor) and kept as f32 points, 8 bytes a pixel: the
//! host work of a call ([`DensePlans`]).

use super::fused;
use super::normdiff::normalized_sq_diff;
use super::sample::SampleGrid;
use crate::geom::Affine;
use candle_core::{DType, Result, Tensor};
use rayon::prelude::*;

/// Denominator guard of the per-sample mean (paper Eq. (1)).
pub const DENSE_DEN_EPS: f64 = 1e-7;

/// How the target branch combines the flow warp with undoing its affine (module docs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TargetOrder {
    /// The authors' code: warp by the flow in view coordinates, then undo the affine.
    #[default]
    Authors,
    /// The paper's Eq. (1) `M o A_2^-1`: undo the affine, then warp (one composed lookup).
    Paper,
}

/// Everything that relates the two branches' maps: their affines, the flow and occlusion
/// from the online frame to the target frame, the crop size and the target order.
#[derive(Clone, Copy, Debug)]
pub struct Correspondence<'a> {
    pub a_online: &'a [Affine],
    pub a_target: &'a [Affine],
    /// `(N, 2, H, W)`, crop pixels, online frame -> target frame. Read on the host: pass a
    /// CPU tensor (as the loader does) so that a GPU step does not wait to read it back.
    pub flow: &'a Tensor,
    /// `(N, 1, H, W)`, 1 = occluded (fractional values act as weights); read on the host,
    /// as `flow`.
    pub occluded: &'a Tensor,
    /// `(H, W)`.
    pub crop: (usize, usize),
    pub order: TargetOrder,
}

/// Mask statistics of one dense-loss call, averaged over samples and pixels.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct DenseStats {
    /// Mean of the final mask `m` (the fraction of crop pixels that carry loss).
    pub mask_fraction: f32,
    /// Fraction of pixels valid for the online branch (inside the online view).
    pub online_valid: f32,
    /// Fraction of pixels valid for the target branch (flow and target view in bounds).
    pub target_valid: f32,
    /// Fraction of pixels not marked occluded.
    pub non_occluded: f32,
}

impl<'a> Correspondence<'a> {
    pub fn new(
        a_online: &'a [Affine],
        a_target: &'a [Affine],
        flow: &'a Tensor,
        occluded: &'a Tensor,
        crop: (usize, usize),
        order: TargetOrder,
    ) -> Self {
        Correspondence {
            a_online,
            a_target,
            flow,
            occluded,
            crop,
            order,
        }
    }
}

/// Dense loss with stop-gradient on the target: `proj_target` is detached inside, so gradients
/// reach only `pred_online`. Returns the scalar loss (batch mean) and mask statistics.
///
/// Shapes: `pred_online`, `proj_target` `(N, C, h, w)` (any stride; both are upsampled to the
/// crop); the rest in [`Correspondence`], one affine per sample and branch.
pub fn dense_loss(
    pred_online: &Tensor,
    proj_target: &Tensor,
    c: &Correspondence,
) -> Result<(Tensor, DenseStats)> {
    dense_loss_impl(pred_online, &proj_target.detach(), c, Form::Fused, false)
}

/// [`dense_loss`] through plans built beforehand by [`DensePlans::new`] from the same maps'
/// shapes. Building plans is host work only; the loss uploads them. The training step builds
/// both frame orders' plans first, so that on a GPU all of that host work runs while the
/// forward passes execute (an upload from pageable memory waits for the queued work).
pub fn dense_loss_with_plans(
    pred_online: &Tensor,
    proj_target: &Tensor,
    plans: &DensePlans,
) -> Result<(Tensor, DenseStats)> {
    compare_with_plans(
        pred_online,
        &proj_target.detach(),
        plans,
        Form::Fused,
        false,
    )
}

/// [`dense_loss`] without the stop-gradient: gradients also flow into `proj_target` (for
/// gradient checks of the target path; training uses [`dense_loss`]).
pub fn dense_loss_with_target_grad(
    pred_online: &Tensor,
    proj_target: &Tensor,
    c: &Correspondence,
) -> Result<(Tensor, DenseStats)> {
    dense_loss_impl(pred_online, proj_target, c, Form::Fused, true)
}

/// [`dense_loss`] (or, `target_grad`, [`dense_loss_with_target_grad`]) computed the composed
/// way: both aligned maps built at crop resolution ([`dense_aligned`]), then compared. The
/// reference the fused form is tested against, and the baseline of its benchmark.
pub fn dense_loss_composed(
    pred_online: &Tensor,
    proj_target: &Tensor,
    c: &Correspondence,
    target_grad: bool,
) -> Result<(Tensor, DenseStats)> {
    let t = if target_grad {
        proj_target.clone()
    } else {
        proj_target.detach()
    };
    dense_loss_impl(pred_online, &t, c, Form::Composed, target_grad)
}

/// How the compare step runs: one op from the low-resolution maps ([`super::fused`], where it
/// has a kernel for the device and dtype) or through the aligned maps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Form {
    Fused,
    Composed,
}

/// The sampling plans and the mask of one dense-loss call: what both forms share, and all
/// the host work of a call on the GPU (the coordinates and masks are computed on the CPU).
/// Building them touches no device: the loss that uses them uploads them.
pub struct DensePlans {
    online: SampleGrid,
    /// The target chain, innermost first (one plan, or warp then undo).
    target: Vec<SampleGrid>,
    /// `(N, 1, H, W)` f32, a CPU tensor until a loss uploads it.
    m: Tensor,
    stats: DenseStats,
}

impl DensePlans {
    /// The plans of comparing `pred_online` with `proj_target` (only their shapes are read)
    /// through `c`.
    pub fn new(pred_online: &Tensor, proj_target: &Tensor, c: &Correspondence) -> Result<Self> {
        let (h, w) = c.crop;
        let (n, _, _, _) = pred_online.dims4()?;
        check_shapes(pred_online, proj_target, c)?;

        // Online branch: crop pixel y samples the upsampled view at A_o^-1 y. The plan composes
        // the bilinear upsampling to the crop with the sampling (exact, see `sample`).
        let (h_o, w_o) = (pred_online.dim(2)?, pred_online.dim(3)?);
        let inv_o: Vec<Affine> = c.a_online.iter().map(Affine::inverse).collect();
        let online = SampleGrid::from_fn_upsampled(n, (h_o, w_o), (h, w), (h, w), |b, y, x| {
            Some(inv_o[b].apply(x as f64, y as f64))
        });
        // The mask and its statistics on the host, uploaded once by the loss: nothing here
        // waits for the GPU (the flow and occlusion of a training batch are CPU tensors), so
        // on a GPU this host work runs while the networks' forward pass does.
        let (target, mask_t) = target_branch(proj_target, c)?;
        let occ: Vec<f32> = c.occluded.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let mask_o = online.mask_host().concat();
        let m: Vec<f32> = (mask_o.par_iter().zip(&mask_t).zip(&occ))
            .map(|((a, b), o)| a * b * (1.0 - o))
            .collect();
        let mean = |v: &mut dyn Iterator<Item = f32>| {
            (v.map(f64::from).sum::<f64>() / (n * h * w).max(1) as f64) as f32
        };
        let stats = DenseStats {
            mask_fraction: mean(&mut m.iter().copied()),
            online_valid: online.valid_fraction() as f32,
            target_valid: mean(&mut mask_t.iter().copied()),
            non_occluded: mean(&mut occ.iter().map(|o| 1.0 - o)),
        };
        let m = Tensor::from_vec(m, (n, 1, h, w), &candle_core::Device::Cpu)?;
        Ok(DensePlans {
            online,
            target,
            m,
            stats,
        })
    }

    /// Mask statistics of the call.
    pub fn stats(&self) -> DenseStats {
        self.stats
    }
}

/// The aligned, *unnormalised* maps and the mask of the dense loss, for inspection and tests:
/// `(z_o, z_t, m, stats)` with shapes `(N, C, H, W)`, `(N, C, H, W)`, `(N, 1, H, W)`; `z_o`
/// and `z_t` are exactly 0 where their own branch is invalid. Gradients flow into both inputs
/// (no stop-gradient here).
pub fn dense_aligned(
    pred_online: &Tensor,
    proj_target: &Tensor,
    c: &Correspondence,
) -> Result<(Tensor, Tensor, Tensor, DenseStats)> {
    let p = DensePlans::new(pred_online, proj_target, c)?;
    let (z_o, z_t) = p.aligned(pred_online, proj_target)?;
    let m = p.m.to_device(z_o.device())?.to_dtype(z_o.dtype())?;
    Ok((z_o, z_t, m, p.stats))
}

impl DensePlans {
    /// `(z_o, z_t)`: both maps resampled to the crop and aligned to the online frame.
    fn aligned(&self, pred_online: &Tensor, proj_target: &Tensor) -> Result<(Tensor, Tensor)> {
        let z_o = self.online.sample(pred_online)?;
        let mut z_t = proj_target.clone();
        for grid in &self.target {
            z_t = grid.sample(&z_t)?;
        }
        Ok((z_o, z_t))
    }
}

/// The target branch's sampling chain (innermost first) and its validity mask (`N * H * W`
/// values of 0 / 1, on the host), in the configured order (module docs).
fn target_branch(proj_target: &Tensor, c: &Correspondence) -> Result<(Vec<SampleGrid>, Vec<f32>)> {
    let (h, w) = c.crop;
    let n = c.a_target.len();
    let fl: Vec<f32> = c.flow.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let inv_t: Vec<Affine> = c.a_target.iter().map(Affine::inverse).collect();
    // A mirrored affine (negative determinant) holds a horizontal flip about the centre.
    let flipped: Vec<bool> = c
        .a_target
        .iter()
        .map(|a| a.0[0] * a.0[4] - a.0[1] * a.0[3] < 0.0)
        .collect();
    let plane = h * w;
    let (wf, hf) = (w as f64 - 1.0, h as f64 - 1.0);
    let moved = |b: usize, y: usize, x: usize| {
        let k = y * w + x;
        let qx = x as f64 + fl[b * 2 * plane + k] as f64;
        let qy = y as f64 + fl[b * 2 * plane + plane + k] as f64;
        (qx, qy)
    };
    let inside = |(qx, qy): (f64, f64)| qx >= 0.0 && qy >= 0.0 && qx <= wf && qy <= hf;
    let low = (proj_target.dim(2)?, proj_target.dim(3)?);
    match c.order {
        TargetOrder::Paper => {
            // y samples the upsampled target view at A_t^-1 (y + flow(y)), valid only where
            // y + flow(y) stays inside the crop.
            let grid = SampleGrid::from_fn_upsampled(n, low, (h, w), (h, w), |b, y, x| {
                let q = moved(b, y, x);
                inside(q).then(|| inv_t[b].apply(q.0, q.1))
            });
            let mask = grid.mask_host().concat();
            Ok((vec![grid], mask))
        }
        TargetOrder::Authors => {
            // The authors undo the flip on the features first, then warp by the flow, then
            // undo the rest of the affine: with A = M F (F the flip, if any), the map is
            // warped at F(u + flow(u)), then read at M^-1 y = F A^-1 y.
            let mirror = |b: usize, (x, y): (f64, f64)| {
                if flipped[b] {
                    (wf - x, y)
                } else {
                    (x, y)
                }
            };
            let warp = SampleGrid::from_fn_upsampled(n, low, (h, w), (h, w), |b, y, x| {
                Some(mirror(b, moved(b, y, x)))
            });
            let undo = SampleGrid::from_fn(n, (h, w), (h, w), |b, y, x| {
                Some(mirror(b, inv_t[b].apply(x as f64, y as f64)))
            });
            let (a, b) = (warp.mask_host().concat(), undo.mask_host().concat());
            let mask = a.iter().zip(&b).map(|(x, y)| x * y).collect();
            Ok((vec![warp, undo], mask))
        }
    }
}

fn dense_loss_impl(
    pred_online: &Tensor,
    proj_target: &Tensor,
    c: &Correspondence,
    form: Form,
    target_grad: bool,
) -> Result<(Tensor, DenseStats)> {
    let p = DensePlans::new(pred_online, proj_target, c)?;
    compare_with_plans(pred_online, proj_target, &p, form, target_grad)
}

/// The loss of one call from its plans, in `form` (`proj_target` detached by the caller
/// unless `target_grad`).
fn compare_with_plans(
    pred_online: &Tensor,
    proj_target: &Tensor,
    p: &DensePlans,
    form: Form,
    target_grad: bool,
) -> Result<(Tensor, DenseStats)> {
    // The mask's upload: on a GPU the first wait for the queued forward passes.
    let m = p.m.to_device(pred_online.device())?;
    let fused = form == Form::Fused
        && fused::supported(pred_online)
        && proj_target.dtype() == pred_online.dtype();
    let num = if fused {
        let chain: Vec<&SampleGrid> = p.target.iter().collect();
        fused::masked_sq_diff_sums(pred_online, proj_target, &p.online, &chain, &m, target_grad)?
    } else {
        let (z_o, z_t) = p.aligned(pred_online, proj_target)?;
        let m = m.to_dtype(z_o.dtype())?;
        normalized_sq_diff(&z_o, &z_t)?.mul(&m)?.sum((1, 2, 3))? // (N,)
    };
    let m = m.to_dtype(num.dtype())?;
    let den = m.sum((1, 2, 3))?.affine(1.0, DENSE_DEN_EPS)?;
    let loss = num.div(&den)?.mean_all()?;
    Ok((loss, p.stats))
}

fn check_shapes(pred_online: &Tensor, proj_target: &Tensor, corr: &Correspondence) -> Result<()> {
    let (h, w) = corr.crop;
    let (flow, occluded) = (corr.flow, corr.occluded);
    let (a_online, a_target) = (corr.a_online, corr.a_target);
    let (n, c, _, _) = pred_online.dims4()?;
    let (nt, ct, _, _) = proj_target.dims4()?;
    if (nt, ct) != (n, c) {
        candle_core::bail!(
            "dense_loss: pred_online {:?} and proj_target {:?} differ in batch or channels",
            pred_online.dims(),
            proj_target.dims()
        );
    }
    if flow.dims() != [n, 2, h, w] {
        candle_core::bail!(
            "dense_loss: flow {:?}, expected [{n}, 2, {h}, {w}]",
            flow.dims()
        );
    }
    if occluded.dims() != [n, 1, h, w] {
        candle_core::bail!(
            "dense_loss: occluded {:?}, expected [{n}, 1, {h}, {w}]",
            occluded.dims()
        );
    }
    if a_online.len() != n || a_target.len() != n {
        candle_core::bail!(
            "dense_loss: {} online / {} target affines for batch {n}",
            a_online.len(),
            a_target.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    const DEV: Device = Device::Cpu;

    /// The paper's order (the tests below were written for it; the orders agree whenever
    /// the target affine is the identity).
    fn paper<'a>(
        a: &'a [Affine],
        b: &'a [Affine],
        f: &'a Tensor,
        o: &'a Tensor,
        crop: (usize, usize),
    ) -> Correspondence<'a> {
        Correspondence::new(a, b, f, o, crop, TargetOrder::Paper)
    }

    #[test]
    fn authors_order_warps_in_view_coordinates_then_undoes_the_affine() {
        // Full-resolution ramp T(x, y) = x / 2 + y, so bilinear lookups are exact; flow
        // constant f = (3, -2); centre c = (7.5, 4.5).
        let (h, w) = (10, 16);
        let ramp: Vec<f32> = (0..h * w)
            .map(|k| (k % w) as f32 * 0.5 + (k / w) as f32)
            .collect();
        let target = Tensor::from_vec(ramp, (1, 1, h, w), &DEV).unwrap();
        let mut fl = vec![0f32; 2 * h * w];
        fl[..h * w].fill(3.0);
        fl[h * w..].fill(-2.0);
        let flow = Tensor::from_vec(fl, (1, 2, h, w), &DEV).unwrap();
        let occ = zeros(1, 1, h, w);
        let id = [Affine::IDENTITY];
        let value = |order, a: &[Affine], x: usize, y: usize| {
            let c = Correspondence {
                order,
                ..paper(&id, a, &flow, &occ, (h, w))
            };
            let (_, z_t, m, _) = dense_aligned(&target, &target, &c).unwrap();
            let v: Vec<f32> = z_t.flatten_all().unwrap().to_vec1().unwrap();
            let mv: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
            (v[y * w + x], mv[y * w + x])
        };
        let t = |x: f64, y: f64| (x * 0.5 + y) as f32;
        let close = |a: (f32, f32), b: (f32, f32)| (a.0 - b.0).abs() < 1e-5 && a.1 == b.1;
        // Identity, or a flip alone (undone before the warp): both orders agree.
        let flip = [Affine::about_centre(w, h, 0.0, 1.0, true)];
        for a in [&id, &flip] {
            for (x, y) in [(4, 5), (6, 5), (1, 7)] {
                let (va, vp) = (
                    value(TargetOrder::Authors, a, x, y),
                    value(TargetOrder::Paper, a, x, y),
                );
                assert!(close(va, vp), "{va:?} {vp:?}");
            }
        }
        assert_eq!(value(TargetOrder::Authors, &id, 4, 5), (t(7.0, 3.0), 1.0));
        // Zoom by 1.1 (A^-1 y = c + 1.1 (y - c)) at y = (6, 5): the authors read
        // T(A^-1 y + f) = T(8.85, 3.05), the paper T(A^-1 (y + f)) = T(9.15, 2.85).
        let zoom = [Affine::about_centre(w, h, 0.0, 1.1, false)];
        assert!(close(
            value(TargetOrder::Authors, &zoom, 6, 5),
            (t(8.85, 3.05), 1.0)
        ));
        assert!(close(
            value(TargetOrder::Paper, &zoom, 6, 5),
            (t(9.15, 2.85), 1.0)
        ));
        // With the flip too (A = M F): the authors read the map at F(M^-1 y + f) with
        // M^-1 y = (5.85, 5.05), i.e. at (15 - 8.85, 3.05), the mirror of the zoom case.
        let both = [Affine::about_centre(w, h, 0.0, 1.1, true)];
        let (va, _) = value(TargetOrder::Authors, &both, 6, 5);
        assert!((va - t(15.0 - 8.85, 3.05)).abs() < 1e-4, "{va}");
        // x = 13 moves to 16, outside the crop: masked in both.
        assert_eq!(value(TargetOrder::Authors, &zoom, 13, 5).1, 0.0);
        assert_eq!(value(TargetOrder::Paper, &zoom, 13, 5).1, 0.0);
    }

    /// The fused compare (one op from the stride-8 maps) against the composed form (aligned
    /// maps at crop size, then normalise and compare): loss and both gradients, in both
    /// target orders, with rotation, zoom and flips, flow moving points out of the crop,
    /// occlusion, a zero feature vector (out-of-view samples are zero too) and a non-square
    /// upsampling (5 x 7 -> 19 x 30), in f32 and f64.
    #[test]
    fn fused_compare_equals_composed_form() {
        let (n, c, h, w, lo) = (3, 6, 19, 30, (5, 7));
        let a_on = [
            Affine::about_centre(w, h, 7.0, 0.9, false),
            Affine::about_centre(w, h, -12.0, 1.15, true),
            Affine::IDENTITY,
        ];
        let a_tg = [
            Affine::about_centre(w, h, -5.0, 1.1, true),
            Affine::about_centre(w, h, 20.0, 0.8, false),
            Affine::about_centre(w, h, 0.0, 1.0, true),
        ];
        let fl: Vec<f32> = (0..n * 2 * h * w)
            .map(|i| ((i as f32 * 0.731).sin() * 2.5) + if i % 3 == 0 { 4.0 } else { -1.5 })
            .collect();
        let occ: Vec<f32> = (0..n * h * w)
            .map(|i| if i % 7 == 3 { 1.0 } else { 0.0 })
            .collect();
        for dt in [DType::F32, DType::F64] {
            let flow = Tensor::from_vec(fl.clone(), (n, 2, h, w), &DEV).unwrap();
            let occluded = Tensor::from_vec(occ.clone(), (n, 1, h, w), &DEV).unwrap();
            let mut o = feats(n, c, lo.0, lo.1, 3).to_dtype(dt).unwrap();
            // Zero vector at low-res pixel (1, 2) of sample 0.
            let mut ov: Vec<f64> = o
                .flatten_all()
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
                .to_vec1()
                .unwrap();
            for ch in 0..c {
                ov[ch * lo.0 * lo.1 + lo.1 + 2] = 0.0;
            }
            o = Tensor::from_vec(ov, (n, c, lo.0, lo.1), &DEV)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let t = feats(n, c, lo.0, lo.1, 8).to_dtype(dt).unwrap();
            for order in [TargetOrder::Authors, TargetOrder::Paper] {
                let corr = Correspondence::new(&a_on, &a_tg, &flow, &occluded, (h, w), order);
                for target_grad in [false, true] {
                    let run = |fused: bool| {
                        let (ov, tv) =
                            (Var::from_tensor(&o).unwrap(), Var::from_tensor(&t).unwrap());
                        let (l, st) = if fused {
                            let f = if target_grad {
                                dense_loss_with_target_grad
                            } else {
                                dense_loss
                            };
                            f(ov.as_tensor(), tv.as_tensor(), &corr).unwrap()
                        } else {
                            dense_loss_composed(ov.as_tensor(), tv.as_tensor(), &corr, target_grad)
                                .unwrap()
                        };
                        let g = l.backward().unwrap();
                        let v = |x: &Tensor| -> Vec<f64> {
                            x.flatten_all()
                                .unwrap()
                                .to_dtype(DType::F64)
                                .unwrap()
                                .to_vec1()
                                .unwrap()
                        };
                        let gt = g.get(tv.as_tensor()).map(v);
                        (v(&l)[0], v(g.get(ov.as_tensor()).unwrap()), gt, st)
                    };
                    let (f, r) = (run(true), run(false));
                    let tol = if dt == DType::F32 { 2e-5 } else { 1e-10 };
                    assert_eq!(f.3, r.3, "{order:?}");
                    assert!(
                        f.3.mask_fraction > 0.3 && f.3.mask_fraction < 0.9,
                        "{:?}",
                        f.3
                    );
                    assert!(
                        f.0 > 0.1 && (f.0 - r.0).abs() <= tol * r.0,
                        "{order:?} {dt:?}: loss {} vs {}",
                        f.0,
                        r.0
                    );
                    let close = |a: &[f64], b: &[f64], what: &str| {
                        let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
                        assert!(scale > 0.0, "{what}: zero gradient");
                        for (x, y) in a.iter().zip(b) {
                            assert!(
                                (x - y).abs() <= tol * scale,
                                "{order:?} {dt:?} {what}: {x} vs {y}"
                            );
                        }
                    };
                    close(&f.1, &r.1, "d/d online");
                    match (f.2, r.2) {
                        (Some(a), Some(b)) => close(&a, &b, "d/d target"),
                        (None, None) => assert!(!target_grad),
                        (a, b) => panic!(
                            "target grad present: fused {} composed {}",
                            a.is_some(),
                            b.is_some()
                        ),
                    }
                }
            }
        }
    }

    /// A smooth random-looking feature map (N, C, h, w).
    fn feats(n: usize, c: usize, h: usize, w: usize, seed: u32) -> Tensor {
        let v: Vec<f32> = (0..n * c * h * w)
            .map(|i| {
                let t = (i as f32 + 1.0) * (0.618 + seed as f32 * 0.1);
                (t.sin() * 3.0 + (t * 0.37).cos()).sin()
            })
            .collect();
        Tensor::from_vec(v, (n, c, h, w), &DEV).unwrap()
    }

    fn zeros(n: usize, c: usize, h: usize, w: usize) -> Tensor {
        Tensor::zeros((n, c, h, w), DType::F32, &DEV).unwrap()
    }

    fn scalar(t: &Tensor) -> f32 {
        t.to_scalar::<f32>().unwrap()
    }

    #[test]
    fn identical_maps_identity_affines_zero_flow_give_zero() {
        let (n, c, h, w) = (2, 5, 4, 6);
        let p = feats(n, c, h, w, 1);
        let id = vec![Affine::IDENTITY; n];
        let (l, st) = dense_loss(
            &p,
            &p,
            &paper(
                &id,
                &id,
                &zeros(n, 2, 16, 24),
                &zeros(n, 1, 16, 24),
                (16, 24),
            ),
        )
        .unwrap();
        assert!(scalar(&l).abs() < 1e-6, "loss {}", scalar(&l));
        assert_eq!(st.mask_fraction, 1.0);
        // A shifted target no longer matches.
        let q = feats(n, c, h, w, 2);
        let (l2, _) = dense_loss(
            &p,
            &q,
            &paper(
                &id,
                &id,
                &zeros(n, 2, 16, 24),
                &zeros(n, 1, 16, 24),
                (16, 24),
            ),
        )
        .unwrap();
        assert!(scalar(&l2) > 0.05, "loss {}", scalar(&l2));
    }

    #[test]
    fn same_affine_on_both_branches_with_zero_flow_gives_zero() {
        // Both views are the same rotated/flipped view of the same frame: undoing the affine on
        // both sides aligns them exactly wherever both are valid.
        let (n, c, h, w) = (1, 4, 4, 6);
        let p = feats(n, c, h, w, 3);
        let a = vec![Affine::about_centre(24, 16, 8.0, 1.05, true)];
        let (l, st) = dense_loss(
            &p,
            &p,
            &paper(&a, &a, &zeros(n, 2, 16, 24), &zeros(n, 1, 16, 24), (16, 24)),
        )
        .unwrap();
        assert!(scalar(&l).abs() < 1e-6, "loss {}", scalar(&l));
        assert!(st.mask_fraction > 0.5 && st.mask_fraction < 1.0, "{st:?}");
    }

    #[test]
    fn translation_flow_with_matching_shifted_target_gives_zero_on_valid_region() {
        // Full-resolution maps (h = H) so a shift by whole pixels is exact: target frame content
        // at x + 3 equals online content at x, i.e. flow u = +3 everywhere.
        let (n, c, h, w) = (1, 3, 8, 12);
        let base = feats(n, c, h, w + 3, 4);
        let online = base.narrow(3, 0, w).unwrap();
        let target = base.narrow(3, 3, w).unwrap().contiguous().unwrap();
        // target(x') = base(x' + 3) => online(x) = base(x) = target(x - 3): flow u = -3.
        let mut fl = vec![0f32; 2 * h * w];
        fl[..h * w].iter_mut().for_each(|u| *u = -3.0);
        let flow = Tensor::from_vec(fl, (1, 2, h, w), &DEV).unwrap();
        let id = vec![Affine::IDENTITY];
        let (l, st) = dense_loss(
            &online,
            &target,
            &paper(&id, &id, &flow, &zeros(1, 1, h, w), (h, w)),
        )
        .unwrap();
        assert!(scalar(&l).abs() < 1e-6, "loss {}", scalar(&l));
        // Columns 0..2 map to x - 3 < 0: out of bounds, masked.
        let want = (w - 3) as f32 / w as f32;
        assert!((st.mask_fraction - want).abs() < 1e-6, "{st:?}");
        // The wrong direction does not align.
        let mut fl = vec![0f32; 2 * h * w];
        fl[..h * w].iter_mut().for_each(|u| *u = 3.0);
        let flow = Tensor::from_vec(fl, (1, 2, h, w), &DEV).unwrap();
        let (l, _) = dense_loss(
            &online,
            &target,
            &paper(&id, &id, &flow, &zeros(1, 1, h, w), (h, w)),
        )
        .unwrap();
        assert!(scalar(&l) > 0.05);
    }

    #[test]
    fn flow_then_affine_composition_order() {
        // Target view is a flipped view of the target frame; the online view is the plain online
        // frame. With the flip undone and the translation flow applied, the loss is 0.
        let (n, c, h, w) = (1, 3, 6, 10);
        let base = feats(n, c, h, w + 2, 5);
        let online = base.narrow(3, 0, w).unwrap().contiguous().unwrap();
        let frame_t = base.narrow(3, 2, w).unwrap().contiguous().unwrap(); // frame_t(x) = online(x + 2)
        let flip = Affine::about_centre(w, h, 0.0, 1.0, true);
        // view(x) = frame_t(flip(x)) = frame_t(w - 1 - x)
        let idx: Vec<u32> = (0..w as u32).rev().collect();
        let view = frame_t
            .index_select(&Tensor::from_vec(idx, w, &DEV).unwrap(), 3)
            .unwrap();
        let mut fl = vec![0f32; 2 * h * w];
        fl[..h * w].iter_mut().for_each(|u| *u = -2.0);
        let flow = Tensor::from_vec(fl, (1, 2, h, w), &DEV).unwrap();
        let (l, st) = dense_loss(
            &online,
            &view,
            &paper(
                &[Affine::IDENTITY],
                &[flip],
                &flow,
                &zeros(1, 1, h, w),
                (h, w),
            ),
        )
        .unwrap();
        assert!(scalar(&l).abs() < 1e-6, "loss {}", scalar(&l));
        assert!((st.mask_fraction - 0.8).abs() < 1e-6, "{st:?}");
    }

    #[test]
    fn occluded_pixels_do_not_count() {
        let (n, c, h, w) = (2, 4, 4, 6);
        let (hh, ww) = (16, 24);
        let p = feats(n, c, h, w, 6);
        let q = feats(n, c, h, w, 7);
        let id = vec![Affine::IDENTITY; n];
        let a = vec![
            Affine::about_centre(ww, hh, 5.0, 1.0, false),
            Affine::about_centre(ww, hh, -4.0, 0.95, true),
        ];
        // Occlude a block and put garbage flow into it: nothing changes.
        let mut occ = vec![0f32; n * hh * ww];
        let fl1 = vec![0.5f32; n * 2 * hh * ww];
        let mut fl2 = fl1.clone();
        for b in 0..n {
            for y in 4..10 {
                for x in 6..15 {
                    occ[b * hh * ww + y * ww + x] = 1.0;
                    fl2[b * 2 * hh * ww + y * ww + x] = 7.0 - x as f32;
                    fl2[b * 2 * hh * ww + hh * ww + y * ww + x] = -3.0;
                }
            }
        }
        let occ = Tensor::from_vec(occ, (n, 1, hh, ww), &DEV).unwrap();
        let f1 = Tensor::from_vec(fl1, (n, 2, hh, ww), &DEV).unwrap();
        let f2 = Tensor::from_vec(fl2, (n, 2, hh, ww), &DEV).unwrap();
        let (l1, s1) = dense_loss(&p, &q, &paper(&id, &a, &f1, &occ, (hh, ww))).unwrap();
        let (l2, s2) = dense_loss(&p, &q, &paper(&id, &a, &f2, &occ, (hh, ww))).unwrap();
        assert!((scalar(&l1) - scalar(&l2)).abs() < 1e-7);
        assert_eq!(s1.mask_fraction, s2.mask_fraction);
        // Without the occlusion mask the garbage would matter.
        let none = zeros(n, 1, hh, ww);
        let (l3, _) = dense_loss(&p, &q, &paper(&id, &a, &f1, &none, (hh, ww))).unwrap();
        let (l4, _) = dense_loss(&p, &q, &paper(&id, &a, &f2, &none, (hh, ww))).unwrap();
        assert!((scalar(&l3) - scalar(&l4)).abs() > 1e-4);
        assert!(s1.non_occluded < 1.0 && s1.mask_fraction < s1.non_occluded);
    }

    #[test]
    fn occluded_values_in_the_maps_do_not_change_loss_or_gradient() {
        // Changing target features that are only seen through occluded pixels changes nothing.
        // With identity affines and zero flow at full resolution, pixel y of the target is used
        // only by pixel y of the online map.
        let (n, c, h, w) = (1, 3, 5, 7);
        let p = Var::from_tensor(&feats(n, c, h, w, 8)).unwrap();
        let q = feats(n, c, h, w, 9);
        let mut occ = vec![0f32; h * w];
        occ[2 * w + 3] = 1.0;
        let occ = Tensor::from_vec(occ, (1, 1, h, w), &DEV).unwrap();
        let mut qv: Vec<f32> = q.flatten_all().unwrap().to_vec1().unwrap();
        for ch in 0..c {
            qv[ch * h * w + 2 * w + 3] = 100.0 * (ch as f32 + 1.0);
        }
        let q2 = Tensor::from_vec(qv, (n, c, h, w), &DEV).unwrap();
        let id = [Affine::IDENTITY];
        let fl = zeros(1, 2, h, w);
        let (l1, _) = dense_loss(p.as_tensor(), &q, &paper(&id, &id, &fl, &occ, (h, w))).unwrap();
        let (l2, _) = dense_loss(p.as_tensor(), &q2, &paper(&id, &id, &fl, &occ, (h, w))).unwrap();
        assert!((scalar(&l1) - scalar(&l2)).abs() < 1e-7);
        let g = l1.backward().unwrap();
        let gp: Vec<f32> = g
            .get(p.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for ch in 0..c {
            assert_eq!(
                gp[ch * h * w + 2 * w + 3],
                0.0,
                "occluded pixel gets no gradient"
            );
            assert_ne!(gp[ch * h * w + 2 * w + 4], 0.0);
        }
    }

    #[test]
    fn target_is_detached_by_default() {
        let (n, c, h, w) = (1, 3, 4, 6);
        let p = Var::from_tensor(&feats(n, c, h, w, 10)).unwrap();
        let q = Var::from_tensor(&feats(n, c, h, w, 11)).unwrap();
        let id = [Affine::IDENTITY];
        let (fl, occ) = (zeros(1, 2, 8, 12), zeros(1, 1, 8, 12));
        let (l, _) = dense_loss(
            p.as_tensor(),
            q.as_tensor(),
            &paper(&id, &id, &fl, &occ, (8, 12)),
        )
        .unwrap();
        let g = l.backward().unwrap();
        assert!(g.get(p.as_tensor()).is_some());
        assert!(g.get(q.as_tensor()).is_none());
        let (l, _) = dense_loss_with_target_grad(
            p.as_tensor(),
            q.as_tensor(),
            &paper(&id, &id, &fl, &occ, (8, 12)),
        )
        .unwrap();
        let g = l.backward().unwrap();
        assert!(g.get(q.as_tensor()).is_some());
    }

    /// The training step's form: plans built first (host only: the mask stays a CPU tensor),
    /// then the loss; the same value, gradient and stop-gradient as `dense_loss`.
    #[test]
    fn loss_through_prebuilt_plans_equals_dense_loss() {
        let (n, c, h, w) = (2, 5, 4, 6);
        let p = Var::from_tensor(&feats(n, c, h, w, 20)).unwrap();
        let q = Var::from_tensor(&feats(n, c, h, w, 21)).unwrap();
        let a = [
            Affine::IDENTITY,
            Affine::about_centre(12, 8, 15.0, 1.2, true),
        ];
        let fl = feats(n, 2, 8, 12, 22).affine(3.0, 0.5).unwrap();
        let occ = zeros(n, 1, 8, 12);
        let corr = Correspondence::new(&a, &a, &fl, &occ, (8, 12), TargetOrder::Authors);
        let plans = DensePlans::new(p.as_tensor(), q.as_tensor(), &corr).unwrap();
        assert!(plans.m.device().is_cpu());
        let (l1, s1) = dense_loss_with_plans(p.as_tensor(), q.as_tensor(), &plans).unwrap();
        let (l2, s2) = dense_loss(p.as_tensor(), q.as_tensor(), &corr).unwrap();
        assert_eq!(s1, s2);
        let v = |l: &Tensor| l.to_scalar::<f32>().unwrap();
        assert_eq!(v(&l1), v(&l2));
        assert!(v(&l1) > 0.0);
        let (g1, g2) = (l1.backward().unwrap(), l2.backward().unwrap());
        assert!(g1.get(q.as_tensor()).is_none());
        let grad = |g: &candle_core::backprop::GradStore| -> Vec<f32> {
            g.get(p.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        assert_eq!(grad(&g1), grad(&g2));
    }

    #[test]
    fn fully_masked_batch_is_finite_zero() {
        let (n, c, h, w) = (1, 3, 4, 6);
        let p = Var::from_tensor(&feats(n, c, h, w, 12)).unwrap();
        let id = [Affine::IDENTITY];
        let occ = Tensor::ones((1, 1, 8, 12), DType::F32, &DEV).unwrap();
        let (l, st) = dense_loss(
            p.as_tensor(),
            p.as_tensor(),
            &paper(&id, &id, &zeros(1, 2, 8, 12), &occ, (8, 12)),
        )
        .unwrap();
        assert_eq!(scalar(&l), 0.0);
        assert_eq!(st.mask_fraction, 0.0);
        let g = l.backward().unwrap();
        let gp: Vec<f32> = g
            .get(p.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(gp.iter().all(|v| v.is_finite() && *v == 0.0));
    }

    #[test]
    fn zero_feature_vectors_give_finite_gradients() {
        // Out-of-view samples are exactly zero vectors; F.normalize's eps keeps them finite.
        let (n, c, h, w) = (1, 3, 4, 6);
        let p = Var::from_tensor(&feats(n, c, h, w, 13)).unwrap();
        let q = feats(n, c, h, w, 14);
        // A^-1 y = c + 1.3 (y - c): crop borders fall outside the view, sampled as zero vectors.
        let a = [Affine::about_centre(12, 8, 0.0, 1.3, false)];
        let (l, st) = dense_loss(
            p.as_tensor(),
            &q,
            &paper(&a, &a, &zeros(1, 2, 8, 12), &zeros(1, 1, 8, 12), (8, 12)),
        )
        .unwrap();
        assert!(st.online_valid < 1.0);
        let g = l.backward().unwrap();
        let gp: Vec<f32> = g
            .get(p.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(gp.iter().all(|v| v.is_finite()));
        assert!(gp.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn shape_errors_are_reported() {
        let p = feats(2, 3, 4, 6, 1);
        let id = vec![Affine::IDENTITY; 2];
        let r = dense_loss(
            &p,
            &p,
            &paper(&id, &id, &zeros(2, 2, 8, 12), &zeros(2, 1, 8, 12), (16, 24)),
        );
        assert!(r.is_err());
        let r = dense_loss(
            &p,
            &p,
            &paper(
                &id[..1],
                &id,
                &zeros(2, 2, 8, 12),
                &zeros(2, 1, 8, 12),
                (8, 12),
            ),
        );
        assert!(r.is_err());
    }
}
