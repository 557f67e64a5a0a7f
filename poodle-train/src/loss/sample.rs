//! Differentiable resampling in candle: a bilinear point sampler, optionally composed with an
//! exact bilinear upsampling, with gradients w.r.t. the sampled map (coordinates are constants).
//!
//! Conventions (see [`crate::geom`] and `poodle_common::flowmath`): pixel centres sit at
//! integer coordinates; a point `(x, y)` is *in bounds* iff it lies in `[0, W-1] x [0, H-1]`.
//!
//! - [`sample_bilinear`] / [`SampleGrid::from_fn`] equal PyTorch
//!   `F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=True)` with
//!   `grid = 2 * p / (size - 1) - 1` for every in-bounds point. **Difference:** a point outside
//!   `[0, W-1] x [0, H-1]` samples exactly 0 here, while `grid_sample` still blends the in-image
//!   corners of a point less than one pixel outside. Every such point has mask 0, and the loss
//!   multiplies by the mask, so the loss and its gradients agree with the PyTorch form.
//! - [`SampleGrid::from_fn_upsampled`] samples `up(x)` where `up` is
//!   `F.interpolate(x, size=(H, W), mode='bilinear', align_corners=False)`, *without*
//!   materialising `up(x)`: bilinear sampling and bilinear upsampling are both separable and
//!   linear, so a point of `up(x)` is a fixed weighted sum of at most 3 x 3 pixels of `x`
//!   (upsampling) whose weights are the exact products of the two interpolations. Same values
//!   as "upsample, then sample" up to float rounding, far less memory and time.

use crate::custom_op::contiguous_slice;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// One axis of `align_corners=False` bilinear resizing from `n_in` to `n_out` samples, as
/// [`poodle_common::flowmath::linear_axis`] defines it; the identity has one tap per output
/// (the second, of weight 0, would count against the plan's taps per axis).
fn axis_table(n_in: usize, n_out: usize) -> Vec<(usize, usize, f64, f64)> {
    if n_in == n_out {
        return (0..n_out).map(|o| (o, o, 1.0, 0.0)).collect();
    }
    poodle_common::flowmath::linear_axis(n_in, n_out, 0, n_out)
}

/// Taps per axis: 2 for plain sampling, 3 when composed with upsampling (the source rows of
/// two adjacent output rows span at most 3 consecutive input rows), 4 otherwise.
fn taps_per_axis(n_in: usize, n_up: usize) -> usize {
    match n_in.cmp(&n_up) {
        std::cmp::Ordering::Equal => 2,
        std::cmp::Ordering::Less => 3,
        std::cmp::Ordering::Greater => 4,
    }
}

/// Weights over input indices of sampling `up` (an axis of size `table.len()`) at coordinate
/// `p` in `[0, n_up - 1]`: `(1 - f) * row(p0) + f * row(p0 + 1)`, merged by index, padded with
/// zero-weight taps to `k` entries.
fn axis_weights(table: &[(usize, usize, f64, f64)], p: f64, k: usize) -> [(usize, f64); 4] {
    let n_up = table.len();
    let p0 = (p.floor() as usize).min(n_up - 1);
    let p1 = (p0 + 1).min(n_up - 1);
    let f = p - p0 as f64;
    let mut out = [(0usize, 0f64); 4];
    let mut len = 0;
    let (a, b) = (table[p0], table[p1]);
    for (i, w) in [
        (a.0, (1.0 - f) * a.2),
        (a.1, (1.0 - f) * a.3),
        (b.0, f * b.2),
        (b.1, f * b.3),
    ] {
        match out[..len].iter_mut().find(|(j, _)| *j == i) {
            Some(slot) => slot.1 += w,
            None => {
                out[len] = (i, w);
                len += 1;
            }
        }
    }
    assert!(len <= k, "axis_weights: {len} taps > {k}");
    out
}

/// Taps (indices into one input plane, weights), per sample tap-major: `idx[b][t * p + k]`
/// for output pixel `k` of `p`.
#[derive(Debug)]
pub(super) struct TapTable {
    pub(super) idx: Vec<Vec<u32>>,
    pub(super) wts: Vec<Vec<f32>>,
}

/// A sampling plan: the point every output pixel samples, from which its taps follow. The
/// points are what a plan costs to build and to move (8 bytes a pixel, against 8 bytes a tap
/// for the taps: 9 taps for an upsampled lookup); the taps are formed where they are used, on
/// the CPU by [`Plan::cpu_taps`] and on the GPU by a kernel (`plan_taps_f32`) that repeats
/// [`axis_weights`] in the same IEEE double arithmetic, so both devices see the same taps.
#[derive(Debug)]
pub(super) struct Plan {
    pub(super) n: usize,
    pub(super) h_in: usize,
    pub(super) w_in: usize,
    h_up: usize,
    w_up: usize,
    pub(super) h_out: usize,
    pub(super) w_out: usize,
    pub(super) taps: usize,
    /// Per sample, `(x, y)` of each output pixel in `up` pixel coordinates (`[2 * k]`,
    /// `[2 * k + 1]`); NaN where the pixel is invalid (mask 0; its taps have weight 0).
    points: Vec<Vec<f32>>,
    cpu: std::sync::OnceLock<TapTable>,
    /// The taps on the GPU, formed there at first use (crate::cuda::kernels).
    #[cfg(feature = "cuda")]
    device: std::sync::OnceLock<crate::cuda::kernels::DevicePlan>,
}

impl Plan {
    /// Taps per axis (rows, columns).
    fn axis_taps(&self) -> (usize, usize) {
        (
            taps_per_axis(self.h_in, self.h_up),
            taps_per_axis(self.w_in, self.w_up),
        )
    }

    /// The taps on the CPU, formed at first use.
    pub(super) fn cpu_taps(&self) -> &TapTable {
        self.cpu.get_or_init(|| self.form_taps())
    }

    fn form_taps(&self) -> TapTable {
        let (ty, tx) = (
            axis_table(self.h_in, self.h_up),
            axis_table(self.w_in, self.w_up),
        );
        let (ky, kx) = self.axis_taps();
        let p = self.h_out * self.w_out;
        let (idx, wts) = self
            .points
            .par_iter()
            .map(|pts| {
                let mut idx = vec![0u32; self.taps * p];
                let mut wts = vec![0f32; self.taps * p];
                for (k, xy) in pts.chunks_exact(2).enumerate() {
                    let (x, y) = (xy[0] as f64, xy[1] as f64);
                    if x.is_nan() || y.is_nan() {
                        continue;
                    }
                    let (rows, cols) = (axis_weights(&ty, y, ky), axis_weights(&tx, x, kx));
                    for (r, &(iy, wy)) in rows[..ky].iter().enumerate() {
                        for (c, &(ix, wx)) in cols[..kx].iter().enumerate() {
                            let t = r * kx + c;
                            idx[t * p + k] = (iy * self.w_in + ix) as u32;
                            wts[t * p + k] = (wy * wx) as f32;
                        }
                    }
                }
                (idx, wts)
            })
            .unzip();
        TapTable { idx, wts }
    }
}

#[cfg(feature = "cuda")]
impl Plan {
    pub(super) fn device_plan(
        &self,
        dev: &candle_core::CudaDevice,
    ) -> Result<&crate::cuda::kernels::DevicePlan> {
        if let Some(p) = self.device.get() {
            if p.device != dev.id() {
                // Each rank builds its own plans; one plan used on two GPUs is a bug.
                candle_core::bail!(
                    "sampling plan formed on {:?} used on {:?}",
                    p.device,
                    dev.id()
                );
            }
            return Ok(p);
        }
        let (ky, kx) = self.axis_taps();
        let shape = crate::cuda::kernels::PlanShape {
            n: self.n,
            p_out: self.h_out * self.w_out,
            input: (self.h_in, self.w_in),
            up: (self.h_up, self.w_up),
            taps: (ky, kx),
        };
        let p = crate::cuda::kernels::DevicePlan::from_points(dev, &shape, &self.points)?;
        // Another thread may have set it meanwhile; either copy is the same plan.
        let _ = self.device.set(p);
        Ok(self.device.get().expect("set above"))
    }
}

/// A precomputed bilinear sampling plan: for each of `n` samples and each output pixel, the
/// point it samples in an `h_in x w_in` map (or in that map's bilinear upsampling) and a
/// validity mask. Build it once on the CPU from coordinates (affines, flow), then
/// [`SampleGrid::sample`] any `(n, C, h_in, w_in)` tensor, differentiably w.r.t. that tensor.
///
/// On the CPU (f32/f64) sampling is a candle custom op whose backward is the exact adjoint
/// (scatter-add of the tap weights), parallel over `(n, C)` planes; with the `cuda` feature the
/// same op runs on CUDA (f32, src/cuda/kernels.cu); on other devices or dtypes
/// it falls back to `index_select` + weighted sum (same values, autograd through
/// `index_select`). Both forms are tested against each other and against PyTorch.
#[derive(Clone, Debug)]
pub struct SampleGrid {
    plan: Arc<Plan>,
    /// Per sample, `h_out * w_out` entries of 0.0 / 1.0.
    mask: Vec<Vec<f32>>,
}

impl SampleGrid {
    /// Plain bilinear sampling of an `h_in x w_in` map: `point(n, y_out, x_out)` returns the
    /// pixel coordinates `(x, y)` to sample for output pixel `(x_out, y_out)` of sample `n`, or
    /// `None` to mark it invalid. The mask is 1 exactly where a point is returned and lies in
    /// `[0, w_in-1] x [0, h_in-1]`; everywhere else the sample is 0.
    pub fn from_fn<F>(n: usize, input: (usize, usize), out: (usize, usize), point: F) -> Self
    where
        F: Fn(usize, usize, usize) -> Option<(f64, f64)> + Sync,
    {
        Self::from_fn_upsampled(n, input, input, out, point)
    }

    /// Bilinear sampling of `up(x)`, the `align_corners=False` bilinear upsampling of a `low =
    /// (h, w)` map `x` to `up = (H, W)`, without materialising `up(x)`: the plan's taps index
    /// `x` itself. Points and the mask are in `up` pixel coordinates (`[0, W-1] x [0, H-1]`).
    /// [`SampleGrid::sample`] then takes the low-resolution `(n, C, h, w)` tensor.
    ///
    /// Points are kept in f32 (as PyTorch's `grid_sample` grid): an in-bounds f64 point stays
    /// in bounds when rounded, since the bounds are integers.
    pub fn from_fn_upsampled<F>(
        n: usize,
        (h_lo, w_lo): (usize, usize),
        (h_up, w_up): (usize, usize),
        (h_out, w_out): (usize, usize),
        point: F,
    ) -> Self
    where
        F: Fn(usize, usize, usize) -> Option<(f64, f64)> + Sync,
    {
        assert!(
            h_lo > 0 && w_lo > 0 && h_up > 0 && w_up > 0,
            "SampleGrid: empty map"
        );
        assert!(
            h_lo * w_lo <= u32::MAX as usize,
            "SampleGrid: input too large for u32 indices"
        );
        let (hf, wf) = (h_up as f64 - 1.0, w_up as f64 - 1.0);
        let p = h_out * w_out;
        let mut points = vec![vec![f32::NAN; 2 * p]; n];
        let mut mask = vec![vec![0f32; p]; n];
        // Parallel over every row of every sample (a sample alone would keep n cores busy).
        let rows = points
            .iter_mut()
            .zip(mask.iter_mut())
            .enumerate()
            .flat_map(|(b, (pts, m))| {
                pts.chunks_mut(2 * w_out.max(1))
                    .zip(m.chunks_mut(w_out.max(1)))
                    .enumerate()
                    .map(move |(yo, row)| (b, yo, row))
            })
            .collect::<Vec<_>>();
        rows.into_par_iter().for_each(|(b, yo, (pts, m))| {
            for xo in 0..w_out {
                let Some((x, y)) = point(b, yo, xo) else {
                    continue;
                };
                if !(x >= 0.0 && y >= 0.0 && x <= wf && y <= hf) {
                    continue; // also rejects NaN
                }
                pts[2 * xo] = x as f32;
                pts[2 * xo + 1] = y as f32;
                m[xo] = 1.0;
            }
        });
        let taps = taps_per_axis(h_lo, h_up) * taps_per_axis(w_lo, w_up);
        SampleGrid {
            plan: Arc::new(Plan {
                n,
                h_in: h_lo,
                w_in: w_lo,
                h_up,
                w_up,
                h_out,
                w_out,
                taps,
                points,
                cpu: std::sync::OnceLock::new(),
                #[cfg(feature = "cuda")]
                device: std::sync::OnceLock::new(),
            }),
            mask,
        }
    }

    /// Plain sampling at explicit pixel coordinates: `points[n][y_out * w_out + x_out] = (x, y)`.
    pub fn from_points(
        input: (usize, usize),
        (h_out, w_out): (usize, usize),
        points: &[Vec<(f32, f32)>],
    ) -> Result<Self> {
        for (b, p) in points.iter().enumerate() {
            if p.len() != h_out * w_out {
                candle_core::bail!(
                    "SampleGrid::from_points: sample {b} has {} points, expected {}",
                    p.len(),
                    h_out * w_out
                );
            }
        }
        Ok(Self::from_fn(
            points.len(),
            input,
            (h_out, w_out),
            |b, y, x| {
                let (px, py) = points[b][y * w_out + x];
                Some((px as f64, py as f64))
            },
        ))
    }

    /// The taps, for the fused dense comparison ([`super::fused`]).
    pub(super) fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// Output size `(h_out, w_out)`.
    pub fn out_size(&self) -> (usize, usize) {
        (self.plan.h_out, self.plan.w_out)
    }

    /// The validity mask on the host, per sample `h_out * w_out` values of 0 / 1.
    pub fn mask_host(&self) -> &[Vec<f32>] {
        &self.mask
    }

    /// The validity mask as an `(n, 1, h_out, w_out)` f32 tensor of 0 / 1.
    pub fn mask(&self, device: &Device) -> Result<Tensor> {
        let flat: Vec<f32> = self.mask.iter().flatten().copied().collect();
        let p = &self.plan;
        Tensor::from_vec(flat, (p.n, 1, p.h_out, p.w_out), device)
    }

    /// Fraction of valid output pixels over all samples.
    pub fn valid_fraction(&self) -> f64 {
        let p = &self.plan;
        let total = (p.n * p.h_out * p.w_out).max(1) as f64;
        self.mask.iter().flatten().map(|&m| m as f64).sum::<f64>() / total
    }

    fn check_input(&self, x: &Tensor) -> Result<()> {
        let (n, _c, h, w) = x.dims4()?;
        let p = &self.plan;
        if (n, h, w) != (p.n, p.h_in, p.w_in) {
            candle_core::bail!(
                "SampleGrid::sample: input {:?} does not match the plan (n {}, {}x{})",
                x.dims(),
                p.n,
                p.h_in,
                p.w_in
            );
        }
        Ok(())
    }

    /// Samples `x` (`(n, C, h_in, w_in)`) at the plan's points: `(n, C, h_out, w_out)`, 0 where
    /// the mask is 0. Differentiable w.r.t. `x`.
    pub fn sample(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let cpu = x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
        let cuda = cfg!(feature = "cuda") && x.device().is_cuda() && x.dtype() == DType::F32;
        if cpu || cuda {
            x.contiguous()?.apply_op1(Taps {
                plan: self.plan.clone(),
                adjoint: false,
            })
        } else {
            self.sample_index_select(x)
        }
    }

    /// The same sampling with `index_select` + weighted sum (any device; autograd through
    /// `index_select`). Slower on the CPU; kept as the fallback and as a cross-check.
    pub fn sample_index_select(&self, x: &Tensor) -> Result<Tensor> {
        self.check_input(x)?;
        let (n, c, h, w) = x.dims4()?;
        let plan = &self.plan;
        let tt = plan.cpu_taps();
        let (p, k) = (plan.h_out * plan.w_out, plan.taps);
        let dev = x.device();
        let mut outs = Vec::with_capacity(n);
        for b in 0..n {
            let plane = x.get(b)?.reshape((c, h * w))?;
            let idx = Tensor::from_slice(&tt.idx[b], k * p, dev)?;
            let wts = Tensor::from_slice(&tt.wts[b], (1, k, p), dev)?.to_dtype(x.dtype())?;
            let picked = plane.index_select(&idx, 1)?.reshape((c, k, p))?;
            let out = picked.broadcast_mul(&wts)?.sum(1)?;
            outs.push(out.reshape((c, plan.h_out, plan.w_out))?);
        }
        Tensor::stack(&outs, 0)
    }
}

/// gpu-check: the taps the GPU forms for `grid` (kernels.cu `plan_taps_f32`) against the
/// CPU's (`taps_mismatch`).
#[cfg(feature = "cuda")]
pub(crate) fn device_taps_mismatch(
    grid: &SampleGrid,
    dev: &candle_core::CudaDevice,
) -> Result<(usize, usize)> {
    let (idx, wts) = grid.plan.device_plan(dev)?.download(dev)?;
    Ok(taps_mismatch(&grid.plan, &idx, &wts))
}

/// gpu-check on the CPU (`--device cpu`): the taps that the host build of the CUDA kernel's
/// per-pixel code forms for `grid` against the CPU's, so that the check's control flow runs
/// without a GPU.
pub(crate) fn host_taps_mismatch(grid: &SampleGrid) -> (usize, usize) {
    let (idx, wts) = host_kernel_taps(&grid.plan);
    taps_mismatch(&grid.plan, &idx, &wts)
}

/// The number of indices and of weights (in any bit) in which `idx` and `wts`, flattened
/// `[sample][tap][pixel]`, differ from the CPU's taps of `plan`: both 0 when they agree
/// exactly, as the GPU's should.
fn taps_mismatch(plan: &Plan, idx: &[u32], wts: &[f32]) -> (usize, usize) {
    let cpu = plan.cpu_taps();
    let bad_idx = (idx.iter().zip(cpu.idx.concat()))
        .filter(|(a, b)| **a != *b)
        .count();
    let bad_wts = (wts.iter().zip(cpu.wts.concat()))
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    (bad_idx, bad_wts)
}

extern "C" {
    /// src/cuda/plan_taps_host.c: the CUDA kernel `plan_taps_f32`'s per-pixel code, built
    /// for the host by build.rs.
    fn poodle_plan_taps_host(
        pts: *const f32,
        idx: *mut u32,
        wts: *mut f32,
        n: i32,
        p_out: i64,
        h_in: i32,
        w_in: i32,
        h_up: i32,
        w_up: i32,
        ky: i32,
        kx: i32,
    );
}

/// The taps of `plan` as the CUDA kernel forms them, from its host build, flattened
/// `[sample][tap][pixel]`. Entries start as `u32::MAX` / NaN, so one the code leaves
/// unwritten shows.
fn host_kernel_taps(plan: &Plan) -> (Vec<u32>, Vec<f32>) {
    let (ky, kx) = plan.axis_taps();
    let p = plan.h_out * plan.w_out;
    let pts: Vec<f32> = plan.points.concat();
    let len = plan.n * plan.taps * p;
    let (mut idx, mut wts) = (vec![u32::MAX; len], vec![f32::NAN; len]);
    // SAFETY: the buffers hold 2 n p points and n taps p entries, as the C code reads and
    // writes.
    unsafe {
        poodle_plan_taps_host(
            pts.as_ptr(),
            idx.as_mut_ptr(),
            wts.as_mut_ptr(),
            plan.n as i32,
            p as i64,
            plan.h_in as i32,
            plan.w_in as i32,
            plan.h_up as i32,
            plan.w_up as i32,
            ky as i32,
            kx as i32,
        )
    };
    (idx, wts)
}

/// Element types of the CPU kernels.
trait Elem:
    Copy + Send + Sync + Default + From<f32> + std::ops::Mul<Output = Self> + std::ops::AddAssign
{
}
impl Elem for f32 {}
impl Elem for f64 {}

/// Channels per work item and output positions per inner block of the kernels: the plan's
/// taps for one block stay in cache while all channels of the work item use them.
const CH_BLOCK: usize = 16;
const POS_BLOCK: usize = 1024;

/// `out[b, c, p] = sum_t w[b][t, p] * x[b, c, idx[b][t, p]]`, parallel over channel blocks.
fn gather_kernel<T: Elem>(plan: &Plan, c: usize, x: &[T]) -> Vec<T> {
    let (hw_in, p) = (plan.h_in * plan.w_in, plan.h_out * plan.w_out);
    let mut out = vec![T::default(); plan.n * c * p];
    if p == 0 || c == 0 {
        return out;
    }
    let tt = plan.cpu_taps();
    out.par_chunks_mut(c * p).enumerate().for_each(|(b, ob)| {
        let (idx, wts) = (&tt.idx[b], &tt.wts[b]);
        ob.par_chunks_mut(CH_BLOCK * p)
            .enumerate()
            .for_each(|(blk, o)| {
                let c0 = blk * CH_BLOCK;
                let nch = o.len() / p;
                for p0 in (0..p).step_by(POS_BLOCK) {
                    let p1 = (p0 + POS_BLOCK).min(p);
                    for ch in 0..nch {
                        let src = &x[(b * c + c0 + ch) * hw_in..][..hw_in];
                        let dst = &mut o[ch * p + p0..ch * p + p1];
                        for t in 0..plan.taps {
                            let (it, wt) =
                                (&idx[t * p + p0..t * p + p1], &wts[t * p + p0..t * p + p1]);
                            for ((d, &i), &w) in dst.iter_mut().zip(it).zip(wt) {
                                *d += T::from(w) * src[i as usize];
                            }
                        }
                    }
                }
            });
    });
    out
}

/// The adjoint: `out[b, c, idx[b][t, p]] += w[b][t, p] * g[b, c, p]`, parallel over channel
/// blocks (each owns its output planes, so there are no write conflicts).
fn scatter_kernel<T: Elem>(plan: &Plan, c: usize, g: &[T]) -> Vec<T> {
    let (hw_in, p) = (plan.h_in * plan.w_in, plan.h_out * plan.w_out);
    let mut out = vec![T::default(); plan.n * c * hw_in];
    if p == 0 || c == 0 {
        return out;
    }
    let tt = plan.cpu_taps();
    out.par_chunks_mut(c * hw_in)
        .enumerate()
        .for_each(|(b, ob)| {
            let (idx, wts) = (&tt.idx[b], &tt.wts[b]);
            ob.par_chunks_mut(CH_BLOCK * hw_in)
                .enumerate()
                .for_each(|(blk, o)| {
                    let c0 = blk * CH_BLOCK;
                    let nch = o.len() / hw_in;
                    for p0 in (0..p).step_by(POS_BLOCK) {
                        let p1 = (p0 + POS_BLOCK).min(p);
                        for t in 0..plan.taps {
                            let (it, wt) =
                                (&idx[t * p + p0..t * p + p1], &wts[t * p + p0..t * p + p1]);
                            for ch in 0..nch {
                                let src = &g[(b * c + c0 + ch) * p + p0..][..p1 - p0];
                                let dst = &mut o[ch * hw_in..(ch + 1) * hw_in];
                                for ((&gv, &i), &w) in src.iter().zip(it).zip(wt) {
                                    dst[i as usize] += T::from(w) * gv;
                                }
                            }
                        }
                    }
                });
        });
    out
}

/// The tap gather `(n, C, h_in, w_in) -> (n, C, h_out, w_out)` (`adjoint: false`) or its
/// adjoint, the scatter back `(n, C, h_out, w_out) -> (n, C, h_in, w_in)` (`adjoint: true`);
/// the backward of each is the other.
struct Taps {
    plan: Arc<Plan>,
    adjoint: bool,
}

impl Taps {
    fn kernel<T: Elem>(&self, c: usize, x: &[T]) -> Vec<T> {
        if self.adjoint {
            scatter_kernel(&self.plan, c, x)
        } else {
            gather_kernel(&self.plan, c, x)
        }
    }
}

impl CustomOp1 for Taps {
    fn name(&self) -> &'static str {
        if self.adjoint {
            "bilinear-scatter"
        } else {
            "bilinear-gather"
        }
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, c, _, _) = layout.shape().dims4()?;
        let p = &self.plan;
        let (h, w) = if self.adjoint {
            (p.h_in, p.w_in)
        } else {
            (p.h_out, p.w_out)
        };
        let name = self.name();
        let out = match storage {
            CpuStorage::F32(v) => {
                CpuStorage::F32(self.kernel(c, contiguous_slice(v, layout, name)?))
            }
            CpuStorage::F64(v) => {
                CpuStorage::F64(self.kernel(c, contiguous_slice(v, layout, name)?))
            }
            _ => candle_core::bail!("{name}: f32 or f64 only"),
        };
        Ok((out, Shape::from((n, c, h, w))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, _, _) = l.shape().dims4()?;
        let p = &self.plan;
        let dims = (p.h_in * p.w_in, p.h_out * p.w_out, p.taps);
        let out = crate::cuda::kernels::taps(s, l, p.device_plan(&s.device)?, dims, self.adjoint)?;
        let (h, w) = if self.adjoint {
            (p.h_in, p.w_in)
        } else {
            (p.h_out, p.w_out)
        };
        Ok((out, Shape::from((n, c, h, w))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let adjoint = Taps {
            plan: self.plan.clone(),
            adjoint: !self.adjoint,
        };
        Ok(Some(grad.contiguous()?.apply_op1(adjoint)?))
    }
}

/// Bilinear sampling of `x` (`(N, C, H, W)`) at pixel coordinates `coords` (`(N, H_out, W_out,
/// 2)`, last axis `(x, y)`, any float dtype). Returns the samples `(N, C, H_out, W_out)` and the
/// in-bounds mask `(N, 1, H_out, W_out)` (f32, 1 where the point lies in `[0, W-1] x [0, H-1]`).
///
/// Equals `F.grid_sample(x, 2 * coords / (size - 1) - 1, mode='bilinear', padding_mode='zeros',
/// align_corners=True)` at in-bounds points; out-of-bounds points give exactly 0 (see the
/// module docs). Gradients flow to `x` only; the coordinates are constants.
pub fn sample_bilinear(x: &Tensor, coords: &Tensor) -> Result<(Tensor, Tensor)> {
    let (n, _c, h, w) = x.dims4()?;
    let (cn, h_out, w_out, two) = coords.dims4()?;
    if cn != n || two != 2 {
        candle_core::bail!(
            "sample_bilinear: coords {:?} must be (N={n}, H_out, W_out, 2)",
            coords.dims()
        );
    }
    let flat: Vec<f64> = coords.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let grid = SampleGrid::from_fn(n, (h, w), (h_out, w_out), |b, y, xo| {
        let k = ((b * h_out + y) * w_out + xo) * 2;
        Some((flat[k], flat[k + 1]))
    });
    Ok((grid.sample(x)?, grid.mask(x.device())?))
}

/// Explicit bilinear resize `(N, C, h, w) -> (N, C, out_h, out_w)`, identical to
/// `F.interpolate(x, size=(out_h, out_w), mode='bilinear', align_corners=False)`, as two
/// matmuls with constant interpolation matrices. The loss does not need it (it samples through
/// [`SampleGrid::from_fn_upsampled`]); it is the reference the composed plan is tested against.
#[cfg(test)]
pub(crate) fn upsample_bilinear(x: &Tensor, out_h: usize, out_w: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    let dev = x.device();
    let dt = x.dtype();
    let matrix = |n_in: usize, n_out: usize| -> Result<Tensor> {
        let mut m = vec![0f32; n_out * n_in];
        for (o, &(i0, i1, w0, w1)) in axis_table(n_in, n_out).iter().enumerate() {
            m[o * n_in + i0] += w0 as f32;
            m[o * n_in + i1] += w1 as f32;
        }
        // Transposed: (n_in, n_out).
        Tensor::from_vec(m, (n_out, n_in), dev)?
            .to_dtype(dt)?
            .t()?
            .contiguous()
    };
    let (ry_t, rx_t) = (matrix(h, out_h)?, matrix(w, out_w)?);
    // Height pass on the small map: (N*C, w, h) x Ry^T -> (N*C, w, out_h).
    let t = x
        .reshape((n * c, h, w))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * c * w, h))?
        .matmul(&ry_t)?;
    // Width pass: (N*C, out_h, w) x Rx^T -> (N*C, out_h, out_w).
    let t = t
        .reshape((n * c, w, out_h))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((n * c * out_h, w))?
        .matmul(&rx_t)?;
    t.reshape((n, c, out_h, out_w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use poodle_common::flowmath::{self, Map};

    fn ramp(n: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
        (0..n * c * h * w)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
            .collect()
    }

    #[test]
    fn upsample_matches_flowmath_resize() {
        // flowmath::resize_bilinear is an independent loop implementation of the same
        // F.interpolate(align_corners=False) rule.
        for &(h, w, oh, ow) in &[(4, 6, 16, 24), (5, 7, 13, 17), (3, 3, 3, 8), (6, 4, 3, 2)] {
            let data = ramp(1, 2, h, w);
            let x = Tensor::from_vec(data.clone(), (1, 2, h, w), &Device::Cpu).unwrap();
            let up = upsample_bilinear(&x, oh, ow).unwrap();
            let got: Vec<f32> = up.flatten_all().unwrap().to_vec1().unwrap();
            let want = flowmath::resize_bilinear(&Map::from_vec(2, h, w, data), oh, ow);
            assert_eq!(got.len(), want.data.len());
            for (a, b) in got.iter().zip(want.data.iter()) {
                assert!((a - b).abs() < 1e-5, "{h}x{w}->{oh}x{ow}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn axis_table_weights_sum_to_one() {
        for &(i, o) in &[(4, 16), (5, 13), (7, 3), (1, 5), (6, 6)] {
            for &(i0, i1, w0, w1) in &axis_table(i, o) {
                assert!(i0 < i && i1 < i && i1 >= i0);
                assert!((w0 + w1 - 1.0).abs() < 1e-12 && w0 >= 0.0 && w1 >= 0.0);
            }
        }
    }

    #[test]
    fn composed_plan_equals_upsample_then_sample() {
        // Exactness of from_fn_upsampled against the explicit two-step form, forward and
        // backward, for upsampling (3x3 taps), downsampling (4x4) and equal sizes (2x2).
        for &((h, w), (uh, uw)) in &[
            ((4, 6), (16, 24)),
            ((5, 7), (13, 17)),
            ((6, 9), (4, 5)),
            ((4, 6), (4, 6)),
        ] {
            let (n, c) = (2, 3);
            let xv = Var::from_vec(ramp(n, c, h, w), (n, c, h, w), &Device::Cpu).unwrap();
            let point = |b: usize, y: usize, x: usize| {
                let (xf, yf) = (x as f64 * 1.07 - 0.3, y as f64 * 0.93 + 0.2);
                Some((xf + 0.4 * b as f64 + 0.05 * yf, yf - 0.03 * xf))
            };
            let comp = SampleGrid::from_fn_upsampled(n, (h, w), (uh, uw), (uh, uw), point);
            let plain = SampleGrid::from_fn(n, (uh, uw), (uh, uw), point);
            assert_eq!(comp.mask, plain.mask);
            assert!(comp.valid_fraction() > 0.5 && comp.valid_fraction() < 1.0);
            let g = Tensor::from_vec(ramp(n, c, uh, uw), (n, c, uh, uw), &Device::Cpu).unwrap();
            let a = comp.sample(xv.as_tensor()).unwrap();
            let up = upsample_bilinear(xv.as_tensor(), uh, uw).unwrap();
            let b = plain.sample(&up).unwrap();
            let av: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
            let bv: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
            for (x, y) in av.iter().zip(&bv) {
                assert!((x - y).abs() < 1e-5, "{h}x{w}->{uh}x{uw}: {x} vs {y}");
            }
            let ga = a.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = b.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            let ga: Vec<f32> = ga
                .get(xv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let gb: Vec<f32> = gb
                .get(xv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for (x, y) in ga.iter().zip(&gb) {
                assert!((x - y).abs() < 1e-4, "grad {h}x{w}->{uh}x{uw}: {x} vs {y}");
            }
            assert!(ga.iter().any(|v| v.abs() > 0.1));
        }
    }

    #[test]
    fn cuda_tap_formation_equals_cpu_taps_bit_for_bit() {
        // The GPU forms a plan's taps from its points (kernels.cu `plan_taps_f32`, code in
        // plan_taps.cuh); its host build must give exactly the CPU's indices and weights, for
        // upsampling (3 taps an axis), downsampling (4) and equal sizes (2), at points on the
        // borders, on integers, just below integers and invalid ones.
        for &((h, w), (uh, uw), (oh, ow)) in &[
            ((64, 128), (512, 1024), (37, 53)),
            ((5, 7), (13, 17), (13, 17)),
            ((6, 9), (4, 5), (7, 6)),
            ((4, 6), (4, 6), (9, 11)),
            ((1, 3), (5, 8), (4, 4)),
        ] {
            let n = 3;
            let (hf, wf) = (uh as f64 - 1.0, uw as f64 - 1.0);
            let point = |b: usize, y: usize, x: usize| -> Option<(f64, f64)> {
                let k = (b * oh + y) * ow + x;
                let frac = |v: f64| v - v.floor();
                let (u, v) = (frac(k as f64 * 0.6180339887), frac(k as f64 * 0.7548776662));
                match k % 7 {
                    0 => None,
                    1 => Some((wf, hf)),
                    2 => Some((0.0, (v * hf).round())),
                    3 => Some(((u * wf).floor() - 1e-9, (v * hf).ceil())),
                    4 => Some((u * (wf + 2.0) - 1.0, v * hf)), // some outside
                    _ => Some((u * wf, v * hf)),
                }
            };
            let g = SampleGrid::from_fn_upsampled(n, (h, w), (uh, uw), (oh, ow), point);
            let plan = &g.plan;
            let (idx, wts) = host_kernel_taps(plan);
            let cpu = plan.cpu_taps();
            assert_eq!(idx, cpu.idx.concat(), "indices {h}x{w} -> {uh}x{uw}");
            let (a, b): (Vec<u32>, Vec<u32>) = (
                wts.iter().map(|v| v.to_bits()).collect(),
                cpu.wts.concat().iter().map(|v| v.to_bits()).collect(),
            );
            assert_eq!(a, b, "weights {h}x{w} -> {uh}x{uw}");
            assert!(g.valid_fraction() > 0.5 && g.valid_fraction() < 0.95);
        }
    }

    #[test]
    fn sampler_matches_flowmath_point_sampling_and_masks_outside() {
        let (c, h, w) = (3, 5, 7);
        let data = ramp(1, c, h, w);
        let map = Map::from_vec(c, h, w, data.clone());
        let x = Tensor::from_vec(data, (1, c, h, w), &Device::Cpu).unwrap();
        let pts: Vec<(f32, f32)> = (0..4 * 6)
            .map(|k| (k as f32 * 0.37 - 1.3, (k % 5) as f32 * 1.21 - 0.4))
            .collect();
        let grid = SampleGrid::from_points((h, w), (4, 6), std::slice::from_ref(&pts)).unwrap();
        let out: Vec<f32> = grid
            .sample(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mask: Vec<f32> = grid
            .mask(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (mut inside, mut outside) = (0, 0);
        for (k, &(px, py)) in pts.iter().enumerate() {
            let want = (0..c).map(|ch| flowmath::sample_bilinear(&map, ch, px, py));
            for (ch, wv) in want.enumerate() {
                let got = out[ch * 24 + k];
                match wv {
                    Some(v) => {
                        assert!((got - v).abs() < 1e-5, "point {k} ch {ch}: {got} vs {v}");
                        assert_eq!(mask[k], 1.0);
                    }
                    None => {
                        assert_eq!(got, 0.0);
                        assert_eq!(mask[k], 0.0);
                    }
                }
            }
            if mask[k] == 1.0 {
                inside += 1
            } else {
                outside += 1
            }
        }
        assert!(inside > 5 && outside > 3, "test points cover both cases");
    }

    #[test]
    fn sampler_gradient_is_the_transpose_of_sampling() {
        // d/dx sum(g * sample(x)) scatters g with the corner weights: check against a dense
        // finite form built from the forward pass on unit vectors.
        let (h, w) = (3, 4);
        let pts = vec![vec![
            (0.25f32, 0.5f32),
            (2.7, 1.9),
            (3.0, 2.0),
            (-0.1, 1.0),
            (1.5, 0.0),
            (0.0, 0.0),
        ]];
        let grid = SampleGrid::from_points((h, w), (2, 3), &pts).unwrap();
        let g = [0.3f32, -1.2, 0.7, 2.0, 0.9, -0.4];
        let xv = Var::from_vec(ramp(1, 1, h, w), (1, 1, h, w), &Device::Cpu).unwrap();
        let gt = Tensor::from_vec(g.to_vec(), (1, 1, 2, 3), &Device::Cpu).unwrap();
        let loss = grid
            .sample(xv.as_tensor())
            .unwrap()
            .mul(&gt)
            .unwrap()
            .sum_all()
            .unwrap();
        let grads = loss.backward().unwrap();
        let got: Vec<f32> = grads
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (i, &gi) in got.iter().enumerate() {
            let mut e = vec![0f32; h * w];
            e[i] = 1.0;
            let et = Tensor::from_vec(e, (1, 1, h, w), &Device::Cpu).unwrap();
            let s: Vec<f32> = grid
                .sample(&et)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let want: f32 = s.iter().zip(g.iter()).map(|(a, b)| a * b).sum();
            assert!((gi - want).abs() < 1e-6, "pixel {i}: {gi} vs {want}");
        }
        assert!(got.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn custom_op_equals_index_select_path_forward_and_backward() {
        let (n, c, h, w) = (2, 3, 6, 8);
        let xv = Var::from_vec(ramp(n, c, h, w), (n, c, h, w), &Device::Cpu).unwrap();
        let grid = SampleGrid::from_fn(n, (h, w), (5, 7), |b, y, x| {
            let (xf, yf) = (x as f64, y as f64);
            Some((
                1.3 * xf - 0.4 * yf + b as f64 * 0.7 - 0.5,
                0.3 * xf + 1.1 * yf - 0.6,
            ))
        });
        assert!(grid.valid_fraction() > 0.3 && grid.valid_fraction() < 1.0);
        let g = Tensor::from_vec(ramp(n, c, 5, 7), (n, c, 5, 7), &Device::Cpu).unwrap();
        let run = |fast: bool| {
            let s = if fast {
                grid.sample(xv.as_tensor()).unwrap()
            } else {
                grid.sample_index_select(xv.as_tensor()).unwrap()
            };
            let gr = s.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            let gx: Vec<f32> = gr
                .get(xv.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            (s.flatten_all().unwrap().to_vec1::<f32>().unwrap(), gx)
        };
        let ((s1, g1), (s2, g2)) = (run(true), run(false));
        for (a, b) in s1.iter().zip(&s2).chain(g1.iter().zip(&g2)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        assert!(g1.iter().any(|v| *v != 0.0));
        // f64 and a non-contiguous input take the same path.
        let x64 = xv.as_tensor().to_dtype(DType::F64).unwrap();
        let s64: Vec<f64> = grid
            .sample(&x64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in s64.iter().zip(&s1) {
            assert!((*a as f32 - b).abs() < 1e-5);
        }
        let xt = xv
            .as_tensor()
            .transpose(0, 1)
            .unwrap()
            .contiguous()
            .unwrap()
            .transpose(0, 1)
            .unwrap();
        assert!(!xt.is_contiguous());
        let st: Vec<f32> = grid
            .sample(&xt)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(st, s1);
    }

    #[test]
    fn sample_bilinear_tensor_coords() {
        let x = Tensor::from_vec(ramp(2, 2, 4, 5), (2, 2, 4, 5), &Device::Cpu).unwrap();
        // Integer coordinates reproduce pixels exactly; one point out of bounds.
        let coords: Vec<f32> = vec![1.0, 2.0, 4.0, 3.0, 0.0, 0.0, 5.5, 1.0];
        let ct = Tensor::from_vec(coords, (2, 1, 2, 2), &Device::Cpu).unwrap();
        let (s, m) = sample_bilinear(&x, &ct).unwrap();
        assert_eq!(s.dims(), &[2, 2, 1, 2]);
        let xs: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
        let sv: Vec<f32> = s.flatten_all().unwrap().to_vec1().unwrap();
        let mv: Vec<f32> = m.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(mv, vec![1.0, 1.0, 1.0, 0.0]);
        let px = |n: usize, c: usize, y: usize, xx: usize| xs[((n * 2 + c) * 4 + y) * 5 + xx];
        assert_eq!(sv[0], px(0, 0, 2, 1));
        assert_eq!(sv[1], px(0, 0, 3, 4));
        assert_eq!(sv[2], px(0, 1, 2, 1));
        assert_eq!(sv[4], px(1, 0, 0, 0));
        assert_eq!(sv[5], 0.0);
    }
}
