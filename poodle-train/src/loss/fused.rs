//! The dense loss's compare step in one op, straight from the stride-8 maps: per sample
//! `sum_p m(p) |normalize(z_o(p)) - normalize(z_t(p))|^2`, where `z_o = S_o(pred_online)` and
//! `z_t = S_t(proj_target)` are the [`SampleGrid`] resamplings of [`super::dense`]. Neither
//! `z_o` nor `z_t` (each `(N, C, H, W)` at crop resolution, 537 MB per sample in f32 at
//! 512 x 1024 with C = 256) is ever built: every crop pixel gathers its own two C-vectors from
//! the low-resolution maps through the plans' taps, and the backward pass scatters its two
//! gradient vectors back through the same taps. Memory is the low-resolution maps, their
//! gradients and the plans; pixels with `m(p) = 0` cost nothing.
//!
//! The target side is a chain of one plan (the paper's order: one composed lookup) or two (the
//! authors' order: warp, then undo the affine; the outer plan's taps index the inner plan's
//! outputs), composed per pixel: an outer tap of weight `u` on a warped pixel whose inner taps
//! are `(i, w)` contributes `(i, u w)`. That is the exact linear composition of the two
//! bilinear resamplings, so the result equals the composed form up to rounding.
//!
//! Arithmetic, with `na = max(|o|, eps)`, `u = o / na`, `v = t / nb` and `g` the pixel's
//! upstream weight `m(p) * grad`: `d = u.u + v.v - 2 u.v`, and
//! `dd/do = 2 g (r - u (u . r)) / na = o (2 ia^2 (1 - u.r)) + t (-2 ia ib)`,
//! `dd/dt = -2 g (r - v (v . r)) / nb = o (-2 ia ib) + t (2 ib^2 (1 + v.r))`, `r = u - v`,
//! `ia = 1 / na`, the projections dropped where a norm is clamped (as [`super::normdiff`] and
//! PyTorch's `clamp_min`). The maps are read channels-last (`(N, h, w, C)`), so one pixel's
//! C-vector of a tap is contiguous (on the GPU: one coalesced load per tap and warp).
//!
//! CPU (f32/f64, f64 arithmetic) here; CUDA (f32) in `src/cuda/kernels.cu`, the same
//! arithmetic with a warp per pixel. Tested against the composed form in [`super::dense`]'s
//! tests and `gpucheck` (CUDA vs CPU).

use super::normdiff::Elem;
use super::sample::{Plan, SampleGrid};
use super::NORM_EPS;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// Most taps one pixel may gather on one branch (the CUDA kernel keeps them in registers):
/// 9 for an upsampled lookup, 4 x 9 for the authors' warp-then-undo chain.
pub const MAX_TAPS: usize = 36;

/// Whether [`masked_sq_diff_sums`] has a kernel for tensors like `x`; else the caller uses the
/// composed form.
pub fn supported(x: &Tensor) -> bool {
    let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
    let cuda = cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32;
    cpu || cuda
}

/// Per sample `sum_p m(p) |normalize(S_o o)(p) - normalize(S_t t)(p)|^2`, shape `(N,)`.
///
/// `online` samples `o` (`(N, C, h, w)`); `target` is the chain applied to `t`, innermost
/// first (its first plan samples `t`, a second one samples the first's output); `m` is
/// `(N, 1, H, W)` of the outputs' size. Differentiable w.r.t. `o`, and w.r.t. `t` when
/// `target_grad` (pass a detached `t` and `false` for a stop-gradient target).
pub fn masked_sq_diff_sums(
    o: &Tensor,
    t: &Tensor,
    online: &SampleGrid,
    target: &[&SampleGrid],
    m: &Tensor,
    target_grad: bool,
) -> Result<Tensor> {
    let op = FusedDense {
        online: online.plan().clone(),
        target: target.iter().map(|g| g.plan().clone()).collect(),
        c: o.dim(1)?,
        target_grad,
    };
    op.check(o, t, m)?;
    let nhwc = |x: &Tensor| x.permute((0, 2, 3, 1))?.contiguous();
    let m = m.to_dtype(o.dtype())?.contiguous()?;
    nhwc(o)?.apply_op3(&nhwc(t)?, &m, op)
}

/// The op: inputs `o`, `t` channels-last and the mask; output the `(N,)` sums.
#[derive(Clone)]
struct FusedDense {
    online: Arc<Plan>,
    /// Innermost first.
    target: Vec<Arc<Plan>>,
    c: usize,
    target_grad: bool,
}

/// Its backward: inputs `o`, `t` (channels-last) and `m * grad` `(N, H*W)`; output the
/// gradients of `o` and, with `target_grad`, of `t`, channels-last, one flat buffer.
struct FusedDenseGrad(FusedDense);

impl FusedDense {
    fn check(&self, o: &Tensor, t: &Tensor, m: &Tensor) -> Result<()> {
        let (on, tg) = (&self.online, &self.target);
        let (Some(inner), Some(outer)) = (tg.first(), tg.last()) else {
            candle_core::bail!("fused dense: empty target chain");
        };
        let chained = tg
            .windows(2)
            .all(|w| (w[0].h_out, w[0].w_out) == (w[1].h_in, w[1].w_in));
        let (n, c, h, w) = o.dims4()?;
        let ok = tg.len() <= 2
            && chained
            && tg.iter().all(|p| p.n == n)
            && (on.n, on.h_in, on.w_in) == (n, h, w)
            && t.dims4()? == (n, c, inner.h_in, inner.w_in)
            && (on.h_out, on.w_out) == (outer.h_out, outer.w_out)
            && m.dims() == [n, 1, on.h_out, on.w_out]
            && on.taps <= MAX_TAPS
            && tg.iter().map(|p| p.taps).product::<usize>() <= MAX_TAPS;
        if !ok {
            candle_core::bail!(
                "fused dense: o {:?}, t {:?}, m {:?} do not fit the plans (online {}x{} -> \
                 {}x{}, target chain of {})",
                o.dims(),
                t.dims(),
                m.dims(),
                on.h_in,
                on.w_in,
                on.h_out,
                on.w_out,
                tg.len()
            );
        }
        Ok(())
    }

    fn n(&self) -> usize {
        self.online.n
    }

    fn pixels(&self) -> usize {
        self.online.h_out * self.online.w_out
    }

    fn hw_o(&self) -> usize {
        self.online.h_in * self.online.w_in
    }

    fn hw_t(&self) -> usize {
        self.target[0].h_in * self.target[0].w_in
    }

    /// Pixel chunks per sample for the CPU kernels (each backward chunk has its own
    /// accumulators).
    fn chunks(&self) -> usize {
        (2 * rayon::current_num_threads())
            .div_ceil(self.n().max(1))
            .clamp(1, 16)
    }
}

/// The non-zero taps `(input index, weight)` of output pixel `p` of sample `b` of one plan.
fn plan_taps(plan: &Plan, b: usize, p: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
    let (np, tt) = (plan.h_out * plan.w_out, plan.cpu_taps());
    (0..plan.taps).filter_map(move |k| {
        let w = tt.wts[b][k * np + p];
        (w != 0.0).then(|| (tt.idx[b][k * np + p] as usize, w as f64))
    })
}

/// Taps of pixel `p` of sample `b` through a chain, innermost plan first.
fn pixel_taps(chain: &[Arc<Plan>], b: usize, p: usize, out: &mut Vec<(usize, f64)>) {
    out.clear();
    match chain {
        [single] => out.extend(plan_taps(single, b, p)),
        [inner, outer] => {
            for (q, u) in plan_taps(outer, b, p) {
                out.extend(plan_taps(inner, b, q).map(|(i, w)| (i, u * w)));
            }
        }
        _ => unreachable!("checked: one or two plans"),
    }
}

/// `acc = sum over taps of w * x[i, :]` for a channels-last sample `x` of `c` channels.
fn gather<T: Elem>(x: &[T], c: usize, taps: &[(usize, f64)], acc: &mut [f64]) {
    acc.fill(0.0);
    for &(i, w) in taps {
        for (a, v) in acc.iter_mut().zip(&x[i * c..(i + 1) * c]) {
            *a += w * v.f();
        }
    }
}

/// One pixel's two gathered vectors and the sums the forward and backward need.
struct PixelVectors {
    o: Vec<f64>,
    t: Vec<f64>,
    taps_o: Vec<(usize, f64)>,
    taps_t: Vec<(usize, f64)>,
}

/// `(ia, ib, d, u.r or 0, v.r or 0)` of two gathered vectors.
fn compare(o: &[f64], t: &[f64]) -> (f64, f64, f64, f64, f64) {
    let (mut oo, mut tt, mut ot) = (0f64, 0f64, 0f64);
    for (a, b) in o.iter().zip(t) {
        oo += a * a;
        tt += b * b;
        ot += a * b;
    }
    let (na, nb) = (oo.sqrt(), tt.sqrt());
    let (ia, ib) = (1.0 / na.max(NORM_EPS), 1.0 / nb.max(NORM_EPS));
    let (uu, vv, uv) = (oo * ia * ia, tt * ib * ib, ot * ia * ib);
    let d = (uu + vv - 2.0 * uv).max(0.0);
    let su = if na > NORM_EPS { uu - uv } else { 0.0 };
    let sv = if nb > NORM_EPS { uv - vv } else { 0.0 };
    (ia, ib, d, su, sv)
}

impl FusedDense {
    fn vectors(&self) -> PixelVectors {
        PixelVectors {
            o: vec![0.0; self.c],
            t: vec![0.0; self.c],
            taps_o: Vec::with_capacity(MAX_TAPS),
            taps_t: Vec::with_capacity(MAX_TAPS),
        }
    }

    /// Gathers pixel `p` of sample `b` into `v`.
    fn load<T: Elem>(&self, (o, t): (&[T], &[T]), b: usize, p: usize, v: &mut PixelVectors) {
        let c = self.c;
        pixel_taps(std::slice::from_ref(&self.online), b, p, &mut v.taps_o);
        pixel_taps(&self.target, b, p, &mut v.taps_t);
        let (so, st) = (self.hw_o() * c, self.hw_t() * c);
        gather(&o[b * so..(b + 1) * so], c, &v.taps_o, &mut v.o);
        gather(&t[b * st..(b + 1) * st], c, &v.taps_t, &mut v.t);
    }

    /// `(sample, pixel range)` work items.
    fn items(&self) -> Vec<(usize, std::ops::Range<usize>)> {
        let (p, k) = (self.pixels(), self.chunks());
        let step = p.div_ceil(k).max(1);
        (0..self.n())
            .flat_map(|b| (0..p).step_by(step).map(move |s| (b, s..(s + step).min(p))))
            .collect()
    }

    fn forward<T: Elem>(&self, o: &[T], t: &[T], m: &[T]) -> Vec<T> {
        let np = self.pixels();
        let parts: Vec<(usize, f64)> = self
            .items()
            .into_par_iter()
            .map(|(b, range)| {
                let mut v = self.vectors();
                let mut sum = 0f64;
                for p in range {
                    let mp = m[b * np + p].f();
                    if mp != 0.0 {
                        self.load((o, t), b, p, &mut v);
                        sum += mp * compare(&v.o, &v.t).2;
                    }
                }
                (b, sum)
            })
            .collect();
        let mut out = vec![0f64; self.n()];
        for (b, s) in parts {
            out[b] += s;
        }
        out.into_iter().map(T::from_f).collect()
    }

    /// Gradients of `o` (and `t` with `target_grad`), channels-last, for `mg = m * grad`.
    fn backward<T: Elem>(&self, o: &[T], t: &[T], mg: &[T]) -> Vec<T> {
        let (c, np) = (self.c, self.pixels());
        let (so, st) = (self.hw_o() * c, self.hw_t() * c);
        let st_acc = if self.target_grad { st } else { 0 };
        // Each item accumulates into its own sample-sized buffers, summed per sample after.
        let parts: Vec<(usize, Vec<f64>, Vec<f64>)> = self
            .items()
            .into_par_iter()
            .map(|(b, range)| {
                let (mut go, mut gt) = (vec![0f64; so], vec![0f64; st_acc]);
                let mut v = self.vectors();
                for p in range {
                    let g = mg[b * np + p].f();
                    if g == 0.0 {
                        continue;
                    }
                    self.load((o, t), b, p, &mut v);
                    let (ia, ib, _, su, sv) = compare(&v.o, &v.t);
                    let (ao, bo) = (2.0 * g * ia * ia * (1.0 - su), -2.0 * g * ia * ib);
                    scatter(&mut go, c, &v.taps_o, &v.o, &v.t, (ao, bo));
                    if self.target_grad {
                        let bt = 2.0 * g * ib * ib * (1.0 + sv);
                        scatter(&mut gt, c, &v.taps_t, &v.o, &v.t, (bo, bt));
                    }
                }
                (b, go, gt)
            })
            .collect();
        let n = self.n();
        let mut out = vec![0f64; n * (so + st_acc)];
        for (b, go, gt) in parts {
            add(&mut out[b * so..(b + 1) * so], &go);
            add(&mut out[n * so + b * st_acc..][..st_acc], &gt);
        }
        out.into_iter().map(T::from_f).collect()
    }
}

/// `acc[i, :] += w (alpha o + beta t)` over the taps `(i, w)`.
fn scatter(
    acc: &mut [f64],
    c: usize,
    taps: &[(usize, f64)],
    o: &[f64],
    t: &[f64],
    (alpha, beta): (f64, f64),
) {
    for &(i, w) in taps {
        let row = &mut acc[i * c..(i + 1) * c];
        for ((a, x), y) in row.iter_mut().zip(o).zip(t) {
            *a += w * (alpha * x + beta * y);
        }
    }
}

fn add(dst: &mut [f64], src: &[f64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d += s;
    }
}

fn slices<'a, T>(
    what: &str,
    parts: [(&'a [T], &Layout); 3],
) -> Result<(&'a [T], &'a [T], &'a [T])> {
    let [a, b, c] = parts.map(|(v, l)| crate::custom_op::contiguous_slice(v, l, what));
    Ok((a?, b?, c?))
}

/// Runs `f32` or `f64` CPU kernels on three storages of one dtype.
macro_rules! cpu_dispatch {
    ($name:expr, $s1:expr, $l1:expr, $s2:expr, $l2:expr, $s3:expr, $l3:expr, |$a:ident, $b:ident, $c:ident| $body:expr) => {
        match ($s1, $s2, $s3) {
            (CpuStorage::F32(x), CpuStorage::F32(y), CpuStorage::F32(z)) => {
                let ($a, $b, $c) = slices($name, [(x, $l1), (y, $l2), (z, $l3)])?;
                CpuStorage::F32($body)
            }
            (CpuStorage::F64(x), CpuStorage::F64(y), CpuStorage::F64(z)) => {
                let ($a, $b, $c) = slices($name, [(x, $l1), (y, $l2), (z, $l3)])?;
                CpuStorage::F64($body)
            }
            _ => candle_core::bail!("{}: f32 or f64 inputs of one dtype", $name),
        }
    };
}

impl CustomOp3 for FusedDense {
    fn name(&self) -> &'static str {
        "fused-dense-compare"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = cpu_dispatch!(self.name(), s1, l1, s2, l2, s3, l3, |o, t, m| self
            .forward(o, t, m));
        Ok((out, Shape::from(self.n())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = self.cuda_run((s1, l1), (s2, l2), (s3, l3), false)?;
        Ok((out, Shape::from(self.n())))
    }

    fn bwd(
        &self,
        o: &Tensor,
        t: &Tensor,
        m: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = self.n();
        let mg = m
            .reshape((n, self.pixels()))?
            .broadcast_mul(&grad.to_dtype(m.dtype())?.reshape((n, 1))?)?
            .contiguous()?;
        let flat = o
            .detach()
            .apply_op3_no_bwd(&t.detach(), &mg, &FusedDenseGrad(self.clone()))?;
        let len_o = o.elem_count();
        let go = flat.narrow(0, 0, len_o)?.reshape(o.shape())?;
        let gt = if self.target_grad {
            Some(flat.narrow(0, len_o, t.elem_count())?.reshape(t.shape())?)
        } else {
            None
        };
        Ok((Some(go), gt, None))
    }
}

impl CustomOp3 for FusedDenseGrad {
    fn name(&self) -> &'static str {
        "fused-dense-compare-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = &self.0;
        let out = cpu_dispatch!(self.name(), s1, l1, s2, l2, s3, l3, |o, t, mg| op
            .backward(o, t, mg));
        let len = out_len(op);
        Ok((out, Shape::from(len)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = self.0.cuda_run((s1, l1), (s2, l2), (s3, l3), true)?;
        Ok((out, Shape::from(out_len(&self.0))))
    }
}

/// Length of the backward's flat output.
fn out_len(op: &FusedDense) -> usize {
    let t = if op.target_grad { op.hw_t() } else { 0 };
    op.n() * op.c * (op.hw_o() + t)
}

#[cfg(feature = "cuda")]
impl FusedDense {
    /// The forward (`backward: false`; third input `m`) or backward (third input `m * grad`)
    /// kernel of `src/cuda/kernels.cu`.
    fn cuda_run(
        &self,
        o: (&candle_core::CudaStorage, &Layout),
        t: (&candle_core::CudaStorage, &Layout),
        m: (&candle_core::CudaStorage, &Layout),
        backward: bool,
    ) -> Result<candle_core::CudaStorage> {
        use crate::cuda::kernels::{fused_dense, FusedDims, PlanRef};
        let dev = &o.0.device;
        fn plan<'a>(p: &'a Plan, dev: &candle_core::CudaDevice) -> Result<PlanRef<'a>> {
            Ok(PlanRef {
                plan: p.device_plan(dev)?,
                taps: p.taps,
            })
        }
        let dims = FusedDims {
            n: self.n(),
            c: self.c,
            hw_o: self.hw_o(),
            hw_t: self.hw_t(),
            p_mid: self.target[0].h_out * self.target[0].w_out,
            p_out: self.pixels(),
        };
        let outer = match self.target.get(1) {
            Some(p) => Some(plan(p, dev)?),
            None => None,
        };
        let plans = (plan(&self.online, dev)?, plan(&self.target[0], dev)?, outer);
        let grads = backward.then_some(self.target_grad);
        fused_dense(o, t, m, plans, dims, grads, NORM_EPS)
    }
}
