//! Launchers of src/cuda/kernels.cu: the dense loss's bilinear tap gather/scatter
//! (`loss::sample`) and normalised squared difference (`loss::normdiff`) on CUDA, f32.
//! Without them those ops fall back to composed candle ops on the GPU, whose `index_select`
//! form of the sampler materialises one copy of the map per tap (9 for the upsampled plan).
//! Also synchronised BatchNorm's per-channel sums, affine and input gradient
//! (`model::sync_bn_fused`) and ReLU with PyTorch's backward (`model::relu`), f32 and bf16.

use super::CudaOpError;
use crate::model::sync_bn_fused::SumKind;
use candle_core::backend::BackendStorage;
use candle_core::{CudaDevice, CudaStorage, Layout, Result};
use cudarc::driver::{CudaSlice, CudaView, LaunchConfig, PushKernelArg};

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/poodle_kernels.ptx"));
const MODULE: &str = "poodle_kernels";
const BLOCK: u32 = 256;

/// Grid-stride kernels: enough blocks to fill any current GPU, one per 256 items at most.
fn launch_cfg(items: usize) -> LaunchConfig {
    let blocks = items.div_ceil(BLOCK as usize).clamp(1, 1 << 16) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (BLOCK, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The contiguous f32 part of `s` that `l` describes (also the NCCL engine's send buffer).
pub(crate) fn f32_view<'a>(
    op: &'static str,
    s: &'a CudaStorage,
    l: &Layout,
) -> Result<CudaView<'a, f32>> {
    let v = s.as_cuda_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(v.slice(a..b)),
        None => Err(super::unsupported(op, "non-contiguous input").into()),
    }
}

fn int(op: &'static str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| super::unsupported(op, format!("size {v} over i32")).into())
}

/// A sampling plan's taps on the device (tap indices and weights, `[sample][tap][pixel]`),
/// formed there from the plan's points by `plan_taps_f32`.
pub struct DevicePlan {
    idx: CudaSlice<u32>,
    wts: CudaSlice<f32>,
    /// The device that holds them (a plan is cached once, for one device).
    pub device: candle_core::cuda_backend::DeviceId,
}

impl std::fmt::Debug for DevicePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DevicePlan({} taps)", self.idx.len())
    }
}

/// What the tap-forming kernel needs to know of a plan (`loss::sample::Plan`).
pub struct PlanShape {
    /// Samples and output pixels per sample.
    pub n: usize,
    pub p_out: usize,
    /// The sampled map `(h, w)` and the upsampled size the points live in.
    pub input: (usize, usize),
    pub up: (usize, usize),
    /// Taps per row and per column.
    pub taps: (usize, usize),
}

impl DevicePlan {
    /// Uploads the points (`[sample][2 * pixel]`, NaN where invalid: 8 bytes a pixel instead
    /// of 8 bytes a tap) and forms the taps on the device.
    pub fn from_points(dev: &CudaDevice, s: &PlanShape, points: &[Vec<f32>]) -> Result<Self> {
        let op = "plan_taps_f32";
        let stream = dev.cuda_stream();
        let up = |e| -> candle_core::Error { CudaOpError::from(e).into() };
        if points.len() != s.n || points.iter().any(|p| p.len() != 2 * s.p_out) {
            return Err(super::unsupported(op, "points do not match the plan's size").into());
        }
        let pts = stream.clone_htod(&points.concat()).map_err(up)?;
        let len = s.n * s.taps.0 * s.taps.1 * s.p_out;
        // SAFETY: the kernel writes every tap of every pixel.
        let (mut idx, mut wts) = unsafe { (dev.alloc::<u32>(len)?, dev.alloc::<f32>(len)?) };
        let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
        let (n, p_out) = (int(op, s.n)?, s.p_out as i64);
        let (h_in, w_in) = (int(op, s.input.0)?, int(op, s.input.1)?);
        let (h_up, w_up) = (int(op, s.up.0)?, int(op, s.up.1)?);
        let (ky, kx) = (int(op, s.taps.0)?, int(op, s.taps.1)?);
        let mut b = f.builder();
        b.arg(&pts)
            .arg(&mut idx)
            .arg(&mut wts)
            .arg(&n)
            .arg(&p_out)
            .arg(&h_in)
            .arg(&w_in)
            .arg(&h_up)
            .arg(&w_up)
            .arg(&ky)
            .arg(&kx);
        // SAFETY: argument order and types match the kernel; `pts` holds 2 n p_out values,
        // `idx` and `wts` n ky kx p_out each.
        unsafe { b.launch(launch_cfg(s.n * s.p_out)) }.map_err(CudaOpError::from)?;
        Ok(Self {
            idx,
            wts,
            device: dev.id(),
        })
    }

    /// The taps back on the host, `[sample][tap][pixel]` flattened (gpu-check compares them
    /// with the CPU's).
    pub fn download(&self, dev: &CudaDevice) -> Result<(Vec<u32>, Vec<f32>)> {
        let stream = dev.cuda_stream();
        let up = |e| -> candle_core::Error { CudaOpError::from(e).into() };
        Ok((
            stream.clone_dtoh(&self.idx).map_err(up)?,
            stream.clone_dtoh(&self.wts).map_err(up)?,
        ))
    }
}

/// The plan's gather `(n, c, hw_in) -> (n, c, p_out)` or, `adjoint`, its scatter back.
pub fn taps(
    x: &CudaStorage,
    l: &Layout,
    plan: &DevicePlan,
    (hw_in, p_out, taps): (usize, usize, usize),
    adjoint: bool,
) -> Result<CudaStorage> {
    let op = if adjoint {
        "taps_scatter_f32"
    } else {
        "taps_gather_f32"
    };
    let d = l.dims();
    let (n, c) = (d[0], d[1]);
    let dev = &x.device;
    let src = f32_view(op, x, l)?;
    let mut out = if adjoint {
        dev.alloc_zeros::<f32>(n * c * hw_in)?
    } else {
        // SAFETY: the gather writes every element.
        unsafe { dev.alloc::<f32>(n * c * p_out)? }
    };
    let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
    let (ni, ci, hi, pi, ti) = (
        int(op, n)?,
        int(op, c)?,
        int(op, hw_in)?,
        int(op, p_out)?,
        int(op, taps)?,
    );
    let mut b = f.builder();
    b.arg(&src)
        .arg(&plan.idx)
        .arg(&plan.wts)
        .arg(&mut out)
        .arg(&ni)
        .arg(&ci)
        .arg(&hi)
        .arg(&pi)
        .arg(&ti);
    // SAFETY: argument order and types match the kernel; buffers hold n*c*hw_in inputs,
    // n*taps*p_out plan entries and the output size allocated above.
    unsafe { b.launch(launch_cfg(n * c * p_out)) }.map_err(CudaOpError::from)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `sum_c |a/|a| - b/|b||^2` per position: `(n, c, hw)` twice -> `(n, hw)`.
pub fn normdiff_fwd(
    a: &CudaStorage,
    la: &Layout,
    b: &CudaStorage,
    lb: &Layout,
    (n, c, hw): (usize, usize, usize),
    eps: f64,
) -> Result<CudaStorage> {
    let op = "normdiff_fwd_f32";
    let dev = &a.device;
    let (av, bv) = (f32_view(op, a, la)?, f32_view(op, b, lb)?);
    // SAFETY: the kernel writes every element.
    let mut out = unsafe { dev.alloc::<f32>(n * hw)? };
    let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
    let (ni, ci, hwi) = (int(op, n)?, int(op, c)?, hw as i64);
    let mut bl = f.builder();
    bl.arg(&av)
        .arg(&bv)
        .arg(&mut out)
        .arg(&ni)
        .arg(&ci)
        .arg(&hwi)
        .arg(&eps);
    // SAFETY: as for `taps`.
    unsafe { bl.launch(launch_cfg(n * hw)) }.map_err(CudaOpError::from)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// `[dd/da; dd/db]` as one `(2, n, c, hw)` buffer, for the upstream gradient `g` `(n, hw)`.
pub fn normdiff_bwd(
    (a, la): (&CudaStorage, &Layout),
    (b, lb): (&CudaStorage, &Layout),
    (g, lg): (&CudaStorage, &Layout),
    (n, c, hw): (usize, usize, usize),
    eps: f64,
) -> Result<CudaStorage> {
    let op = "normdiff_bwd_f32";
    let dev = &a.device;
    let (av, bv, gv) = (
        f32_view(op, a, la)?,
        f32_view(op, b, lb)?,
        f32_view(op, g, lg)?,
    );
    // SAFETY: the kernel writes every element of both halves.
    let mut out = unsafe { dev.alloc::<f32>(2 * n * c * hw)? };
    let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
    let (ni, ci, hwi) = (int(op, n)?, int(op, c)?, hw as i64);
    let mut bl = f.builder();
    bl.arg(&av)
        .arg(&bv)
        .arg(&gv)
        .arg(&mut out)
        .arg(&ni)
        .arg(&ci)
        .arg(&hwi)
        .arg(&eps);
    // SAFETY: as for `taps`.
    unsafe { bl.launch(launch_cfg(n * hw)) }.map_err(CudaOpError::from)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// One plan of the fused dense compare and its taps per pixel.
pub struct PlanRef<'a> {
    pub plan: &'a DevicePlan,
    pub taps: usize,
}

/// Sizes of the fused dense compare (`loss::fused`): batch, channels, low-resolution pixels
/// of the online and target maps, outputs of the inner target plan, crop pixels.
pub struct FusedDims {
    pub n: usize,
    pub c: usize,
    pub hw_o: usize,
    pub hw_t: usize,
    pub p_mid: usize,
    pub p_out: usize,
}

/// Crop pixels per block (one warp each) of the fused kernels; must match FUSED_WARPS.
const FUSED_WARPS: usize = 8;
/// Most taps of one branch, FUSED_MAX_TAPS of kernels.cu.
const FUSED_MAX_TAPS: usize = 36;

/// The fused dense compare: `grads: None` runs the forward (`m` the mask; output the `(n,)`
/// sums), `Some(target)` the backward (`m` = mask x upstream gradient; output the
/// channels-last gradients of `o` and, if `target`, of `t`, one flat buffer).
pub fn fused_dense(
    (o, lo): (&CudaStorage, &Layout),
    (t, lt): (&CudaStorage, &Layout),
    (m, lm): (&CudaStorage, &Layout),
    (online, inner, outer): (PlanRef, PlanRef, Option<PlanRef>),
    d: FusedDims,
    grads: Option<bool>,
    eps: f64,
) -> Result<CudaStorage> {
    let op = if grads.is_some() {
        "fused_dense_bwd_f32"
    } else {
        "fused_dense_fwd_f32"
    };
    let chain = inner.taps * outer.as_ref().map_or(1, |u| u.taps);
    if online.taps > FUSED_MAX_TAPS || chain > FUSED_MAX_TAPS {
        return Err(super::unsupported(op, format!("{} / {chain} taps", online.taps)).into());
    }
    // The grid's y extent is the batch (at most 65535); empty sizes have nothing to launch
    // and cuMemAllocAsync(0) fails.
    if d.n == 0 || d.n > 65535 || d.p_out == 0 || d.c == 0 {
        return Err(
            super::unsupported(op, format!("n {}, c {}, p_out {}", d.n, d.c, d.p_out)).into(),
        );
    }
    let dev = &o.device;
    let (ov, tv, mv) = (
        f32_view(op, o, lo)?,
        f32_view(op, t, lt)?,
        f32_view(op, m, lm)?,
    );
    let len = match grads {
        None => d.n,
        Some(target) => d.n * d.c * (d.hw_o + if target { d.hw_t } else { 0 }),
    };
    let mut out = dev.alloc_zeros::<f32>(len)?;
    let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
    // Without an outer plan the kernel reads none of its buffers (u_taps = 0).
    let u = outer.as_ref().unwrap_or(&inner);
    let (o_taps, t_taps) = (int(op, online.taps)?, int(op, inner.taps)?);
    let u_taps = int(op, outer.as_ref().map_or(0, |u| u.taps))?;
    let (c, p_mid, p_out) = (int(op, d.c)?, int(op, d.p_mid)?, int(op, d.p_out)?);
    let (hw_o, hw_t) = (d.hw_o as i64, d.hw_t as i64);
    let grad_t = i32::from(grads == Some(true));
    let mut b = f.builder();
    b.arg(&ov)
        .arg(&tv)
        .arg(&mv)
        .arg(&mut out)
        .arg(&online.plan.idx)
        .arg(&online.plan.wts)
        .arg(&o_taps)
        .arg(&inner.plan.idx)
        .arg(&inner.plan.wts)
        .arg(&t_taps)
        .arg(&u.plan.idx)
        .arg(&u.plan.wts)
        .arg(&u_taps)
        .arg(&c)
        .arg(&hw_o)
        .arg(&hw_t)
        .arg(&p_mid)
        .arg(&p_out)
        .arg(&eps);
    if grads.is_some() {
        b.arg(&grad_t);
    }
    let blocks = d.p_out.div_ceil(FUSED_WARPS).clamp(1, 2048) as u32;
    let cfg = LaunchConfig {
        grid_dim: (blocks, d.n as u32, 1),
        block_dim: ((32 * FUSED_WARPS) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument order and types match FUSED_ARGS (+ grad_t); the maps hold n*hw*c
    // values, the plans n*taps*pixels entries, m n*p_out, and `out` the length above.
    unsafe { b.launch(cfg) }.map_err(CudaOpError::from)?;
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The kernel of kernels.cu named `stem` for an activation dtype (f32 or bf16): the `bn_*`
/// and `relu_*` kernels.
fn act_kernel(
    stem: &'static str,
    dt: candle_core::DType,
) -> std::result::Result<&'static str, CudaOpError> {
    use candle_core::DType::{BF16, F32};
    Ok(match (stem, dt) {
        ("bn_sums", F32) => "bn_sums_f32",
        ("bn_sums", BF16) => "bn_sums_bf16",
        ("bn_apply", F32) => "bn_apply_f32",
        ("bn_apply", BF16) => "bn_apply_bf16",
        ("bn_input_grad", F32) => "bn_input_grad_f32",
        ("bn_input_grad", BF16) => "bn_input_grad_bf16",
        ("relu_fwd", F32) => "relu_fwd_f32",
        ("relu_fwd", BF16) => "relu_fwd_bf16",
        ("relu_bwd", F32) => "relu_bwd_f32",
        ("relu_bwd", BF16) => "relu_bwd_bf16",
        _ => return Err(super::unsupported(stem, format!("dtype {dt:?}"))),
    })
}

/// The launch of a `bn_*` kernel on an `(n, c, hw)` map: grid `(blocks, c)` of 256 threads,
/// each block taking a share of one channel's `n hw` values; `blocks` fills every SM of a
/// current GPU (about `target` blocks in all) with at least `min_per_block` values a block.
/// Also the sizes as the kernels' ints (a channel's values, plus a grid's stride, fit one).
fn bn_launch(
    op: &'static str,
    (n, c, hw): (usize, usize, usize),
    target: usize,
    min_per_block: usize,
) -> Result<(LaunchConfig, [i32; 3])> {
    let per = n * hw;
    if c == 0 || per == 0 || c > 65535 || per > 1 << 30 {
        let what = format!("n {n}, c {c}, hw {hw}: empty, over 65535 channels or 2^30 values");
        return Err(super::unsupported(op, what).into());
    }
    let blocks = (target / c).clamp(1, per.div_ceil(min_per_block));
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, c as u32, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    Ok((cfg, [int(op, n)?, int(op, c)?, int(op, hw)?]))
}

/// Per-channel sums of an `(n, c, hw)` map for synchronised BatchNorm (`model::sync_bn_fused`):
/// partial sums `(rows, c, slices)` f32 (rows 2 for [`SumKind::Grad`], else 1), which the
/// caller adds along the last axis. `dy` only for `Grad`, `mean` (f32 `(c)`) for all but
/// `Values`.
pub fn bn_sums(
    kind: SumKind,
    (x, lx): (&CudaStorage, &Layout),
    dy: Option<(&CudaStorage, &Layout)>,
    mean: Option<(&CudaStorage, &Layout)>,
    geo: (usize, usize, usize),
) -> Result<(CudaStorage, usize)> {
    let op = act_kernel("bn_sums", x.dtype())?;
    // About 1024 blocks (every SM busy at 2048 channels), at least 2048 values a slice.
    let (cfg, [ni, ci, hwi]) = bn_launch(op, geo, 1024, 2048)?;
    if (dy.is_some(), mean.is_some()) != (kind == SumKind::Grad, kind != SumKind::Values) {
        let what = format!(
            "{kind:?} with dy {} and mean {}",
            dy.is_some(),
            mean.is_some()
        );
        return Err(super::unsupported(op, what).into());
    }
    if dy.is_some_and(|(d, _)| d.dtype() != x.dtype()) {
        return Err(super::unsupported(op, "dy and x differ in dtype").into());
    }
    let (c, splits) = (geo.1, cfg.grid_dim.0 as usize);
    let rows = kind.rows();
    let dev = &x.device;
    let stream = dev.cuda_stream();
    let mut part = dev.alloc_zeros::<f32>(rows * c * splits)?;
    let (xp, _gx) = super::dptr(op, x, lx, &stream)?;
    let (dyp, _gd) = match dy {
        Some((d, l)) => super::dptr(op, d, l, &stream).map(|(p, g)| (p, Some(g)))?,
        None => (0, None),
    };
    let (mp, _gm) = match mean {
        Some(m) => coef_ptr(op, m, c, &stream).map(|(p, g)| (p, Some(g)))?,
        None => (0, None),
    };
    let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
    let (si, mode) = (splits as i32, kind as i32);
    let mut b = f.builder();
    b.arg(&xp)
        .arg(&dyp)
        .arg(&mp)
        .arg(&mut part)
        .arg(&ni)
        .arg(&ci)
        .arg(&hwi)
        .arg(&si)
        .arg(&mode);
    // SAFETY: argument order and types match bn_sums_* (BN_SUM_THREADS = 256 threads, grid
    // (splits, c)); x and dy hold n c hw values, mean c, part rows c splits; the null
    // pointers are never read (mode).
    unsafe { b.launch(cfg) }.map_err(CudaOpError::from)?;
    Ok((CudaStorage::wrap_cuda_slice(part, dev.clone()), splits))
}

/// An f32 per-channel table (`len` values) and its device address.
fn coef_ptr<'a>(
    op: &'static str,
    (s, l): (&'a CudaStorage, &Layout),
    len: usize,
    stream: &'a cudarc::driver::CudaStream,
) -> Result<(u64, cudarc::driver::SyncOnDrop<'a>)> {
    super::check_f32_table(op, s, l, len)?;
    Ok(super::dptr(op, s, l, stream)?)
}

/// Blocks of the elementwise `bn_*` passes: about 8192 in all, at least 1024 values a block
/// (4 a thread).
const BN_PASS: (usize, usize) = (8192, 1024);

/// `y = (x - mean) w inv_std + b` per channel of an `(n, c, hw)` map; `coef` = `[mean;
/// inv_std]` `(2, c)`, `w` and `b` `(c)`, all f32; `y` in x's dtype.
pub fn bn_apply(
    (x, lx): (&CudaStorage, &Layout),
    coef: (&CudaStorage, &Layout),
    w: (&CudaStorage, &Layout),
    b: (&CudaStorage, &Layout),
    geo: (usize, usize, usize),
) -> Result<CudaStorage> {
    let op = act_kernel("bn_apply", x.dtype())?;
    let (cfg, [ni, ci, hwi]) = bn_launch(op, geo, BN_PASS.0, BN_PASS.1)?;
    let (n, c, hw) = geo;
    let dev = &x.device;
    let stream = dev.cuda_stream();
    let mut y = super::alloc(dev, x.dtype(), n * c * hw)?;
    {
        let (xp, _gx) = super::dptr(op, x, lx, &stream)?;
        let (cp, _gc) = coef_ptr(op, coef, 2 * c, &stream)?;
        let (wp, _gw) = coef_ptr(op, w, c, &stream)?;
        let (bp, _gb) = coef_ptr(op, b, c, &stream)?;
        let (yp, _gy) = super::dptr_mut(op, &mut y, &stream)?;
        let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
        let mut bl = f.builder();
        bl.arg(&xp)
            .arg(&yp)
            .arg(&cp)
            .arg(&wp)
            .arg(&bp)
            .arg(&ni)
            .arg(&ci)
            .arg(&hwi);
        // SAFETY: argument order and types match bn_apply_* (grid (blocks, c)); x and y hold
        // n c hw values of one dtype, coef 2 c, w and b c.
        unsafe { bl.launch(cfg) }.map_err(CudaOpError::from)?;
    }
    Ok(y)
}

/// `dx = scale (dy - k1 - (x - mean) k2)` per channel; `coef` = `[mean; scale; k1; k2]`
/// `(4, c)` f32 (`model::sync_bn_fused` forms it); `dx` in x's dtype.
pub fn bn_input_grad(
    (x, lx): (&CudaStorage, &Layout),
    (dy, ldy): (&CudaStorage, &Layout),
    coef: (&CudaStorage, &Layout),
    geo: (usize, usize, usize),
) -> Result<CudaStorage> {
    let op = act_kernel("bn_input_grad", x.dtype())?;
    if dy.dtype() != x.dtype() {
        return Err(super::unsupported(op, "dy and x differ in dtype").into());
    }
    let (cfg, [ni, ci, hwi]) = bn_launch(op, geo, BN_PASS.0, BN_PASS.1)?;
    let (n, c, hw) = geo;
    let dev = &x.device;
    let stream = dev.cuda_stream();
    let mut dx = super::alloc(dev, x.dtype(), n * c * hw)?;
    {
        let (xp, _gx) = super::dptr(op, x, lx, &stream)?;
        let (dyp, _gd) = super::dptr(op, dy, ldy, &stream)?;
        let (cp, _gc) = coef_ptr(op, coef, 4 * c, &stream)?;
        let (dxp, _gdx) = super::dptr_mut(op, &mut dx, &stream)?;
        let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
        let mut bl = f.builder();
        bl.arg(&xp)
            .arg(&dyp)
            .arg(&dxp)
            .arg(&cp)
            .arg(&ni)
            .arg(&ci)
            .arg(&hwi);
        // SAFETY: argument order and types match bn_input_grad_* (grid (blocks, c)); x, dy
        // and dx hold n c hw values of one dtype, coef 4 c.
        unsafe { bl.launch(cfg) }.map_err(CudaOpError::from)?;
    }
    Ok(dx)
}

/// `y = max(x, 0)` (NaN kept) over a contiguous map, in x's dtype (`model::relu`).
pub fn relu_fwd((x, lx): (&CudaStorage, &Layout)) -> Result<CudaStorage> {
    let op = act_kernel("relu_fwd", x.dtype())?;
    let n = lx.shape().elem_count();
    let dev = &x.device;
    let stream = dev.cuda_stream();
    let mut y = super::alloc(dev, x.dtype(), n)?;
    {
        let (xp, _gx) = super::dptr(op, x, lx, &stream)?;
        let (yp, _gy) = super::dptr_mut(op, &mut y, &stream)?;
        let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
        let n = n as i64;
        let mut b = f.builder();
        b.arg(&xp).arg(&yp).arg(&n);
        // SAFETY: argument order and types match relu_fwd_* (grid-stride); x and y hold n
        // values of one dtype.
        unsafe { b.launch(launch_cfg(n as usize)) }.map_err(CudaOpError::from)?;
    }
    Ok(y)
}

/// `dx = y <= 0 ? 0 : dy` from ReLU's output `y` and its gradient, in their dtype.
pub fn relu_bwd(
    (y, ly): (&CudaStorage, &Layout),
    (dy, ldy): (&CudaStorage, &Layout),
) -> Result<CudaStorage> {
    let op = act_kernel("relu_bwd", y.dtype())?;
    let n = ly.shape().elem_count();
    if dy.dtype() != y.dtype() || ldy.shape().elem_count() != n {
        return Err(super::unsupported(op, "y and dy differ in dtype or size").into());
    }
    let dev = &y.device;
    let stream = dev.cuda_stream();
    let mut dx = super::alloc(dev, y.dtype(), n)?;
    {
        let (yp, _gy) = super::dptr(op, y, ly, &stream)?;
        let (dyp, _gd) = super::dptr(op, dy, ldy, &stream)?;
        let (dxp, _gdx) = super::dptr_mut(op, &mut dx, &stream)?;
        let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
        let n = n as i64;
        let mut b = f.builder();
        b.arg(&yp).arg(&dyp).arg(&dxp).arg(&n);
        // SAFETY: argument order and types match relu_bwd_* (grid-stride); y, dy and dx hold
        // n values of one dtype.
        unsafe { b.launch(launch_cfg(n as usize)) }.map_err(CudaOpError::from)?;
    }
    Ok(dx)
}

/// Device address of a contiguous f32 tensor updated in place (the first operand of
/// candle's in-place ops), with cudarc's event guard.
fn f32_ptr_mut<'a>(
    op: &'static str,
    s: &'a mut CudaStorage,
    l: &Layout,
    stream: &'a cudarc::driver::CudaStream,
) -> Result<(u64, cudarc::driver::SyncOnDrop<'a>)> {
    use cudarc::driver::DevicePtrMut;
    if !l.is_contiguous() {
        return Err(super::unsupported(op, "non-contiguous tensor").into());
    }
    let off = l.start_offset();
    let (p, g) = s.as_cuda_slice_mut::<f32>()?.device_ptr_mut(stream);
    Ok((p + (off * std::mem::size_of::<f32>()) as u64, g))
}

/// The f32 read operands of an in-place update: `n` values each, contiguous.
fn f32_inputs<'a, const N: usize>(
    op: &'static str,
    srcs: [(&'a CudaStorage, &Layout); N],
    n: usize,
    stream: &'a cudarc::driver::CudaStream,
) -> Result<Vec<(u64, cudarc::driver::SyncOnDrop<'a>)>> {
    srcs.into_iter()
        .map(|(s, l)| {
            if s.dtype() != candle_core::DType::F32 || l.shape().elem_count() != n {
                let what = format!(
                    "operand {:?} of {:?}, {n} f32 values wanted",
                    s.dtype(),
                    l.shape()
                );
                return Err(super::unsupported(op, what).into());
            }
            Ok(super::dptr(op, s, l, stream)?)
        })
        .collect()
}

/// `s = s beta + t (1 - beta)` in place, `t = g` or `g^2` (`squared`): an AdamW moment.
pub fn adam_moment(
    (s, ls): (&mut CudaStorage, &Layout),
    g: (&CudaStorage, &Layout),
    beta: f64,
    squared: bool,
) -> Result<()> {
    let op = "adam_moment_f32";
    let n = ls.shape().elem_count();
    let dev = s.device.clone();
    let stream = dev.cuda_stream();
    let ins = f32_inputs(op, [g], n, &stream)?;
    let (sp, _gs) = f32_ptr_mut(op, s, ls, &stream)?;
    let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
    let (n64, b, omb, sq) = (
        n as i64,
        beta as f32,
        (1.0 - beta) as f32,
        i32::from(squared),
    );
    let mut bl = f.builder();
    bl.arg(&sp)
        .arg(&ins[0].0)
        .arg(&n64)
        .arg(&b)
        .arg(&omb)
        .arg(&sq);
    // SAFETY: argument order and types match adam_moment_f32 (grid-stride); s and g hold n
    // f32 values.
    unsafe { bl.launch(launch_cfg(n)) }.map_err(CudaOpError::from)?;
    Ok(())
}

/// AdamW's parameter update in place from its moments: `p = p decay - (m / (sqrt(v)
/// inv_bc2_sqrt + eps)) step_size`.
pub fn adamw_param(
    (p, lp): (&mut CudaStorage, &Layout),
    m: (&CudaStorage, &Layout),
    v: (&CudaStorage, &Layout),
    [decay, step_size, inv_bc2_sqrt, eps]: [f64; 4],
) -> Result<()> {
    let op = "adamw_param_f32";
    let n = lp.shape().elem_count();
    let dev = p.device.clone();
    let stream = dev.cuda_stream();
    let ins = f32_inputs(op, [m, v], n, &stream)?;
    let (pp, _gp) = f32_ptr_mut(op, p, lp, &stream)?;
    let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
    let n64 = n as i64;
    let [d, s, ib, e] = [decay, step_size, inv_bc2_sqrt, eps].map(|x| x as f32);
    let mut bl = f.builder();
    bl.arg(&pp)
        .arg(&ins[0].0)
        .arg(&ins[1].0)
        .arg(&n64)
        .arg(&d)
        .arg(&s)
        .arg(&ib)
        .arg(&e);
    // SAFETY: argument order and types match adamw_param_f32 (grid-stride); p, m and v hold n
    // f32 values.
    unsafe { bl.launch(launch_cfg(n)) }.map_err(CudaOpError::from)?;
    Ok(())
}

/// The EMA in place: `t = t m + o (1 - m)`.
pub fn ema((t, lt): (&mut CudaStorage, &Layout), o: (&CudaStorage, &Layout), m: f64) -> Result<()> {
    let op = "ema_f32";
    let n = lt.shape().elem_count();
    let dev = t.device.clone();
    let stream = dev.cuda_stream();
    let ins = f32_inputs(op, [o], n, &stream)?;
    let (tp, _gt) = f32_ptr_mut(op, t, lt, &stream)?;
    let f = dev.get_or_load_custom_func(op, MODULE, PTX)?;
    let (n64, mf, omm) = (n as i64, m as f32, (1.0 - m) as f32);
    let mut bl = f.builder();
    bl.arg(&tp).arg(&ins[0].0).arg(&n64).arg(&mf).arg(&omm);
    // SAFETY: argument order and types match ema_f32 (grid-stride); t and o hold n f32 values.
    unsafe { bl.launch(launch_cfg(n)) }.map_err(CudaOpError::from)?;
    Ok(())
}
