//! Synchronised BatchNorm in training as fused passes, PyTorch's `SyncBatchNorm` algorithm:
//! the per-channel sums of this rank's batch, all-reduced, give the mean; the sums of the
//! centred squares, all-reduced, the variance; one pass applies the affine. The backward takes
//! the local sums of the upstream gradient and of its product with the centred input,
//! all-reduces them, and forms the input gradient in one more pass.
//!
//! Why: cuDNN's training BatchNorm (`crate::cuda`) takes its statistics from one device's
//! batch, so a synchronised BatchNorm on CUDA ran the composed candle ops of
//! `layers::BatchNorm` (a materialised map for every subtraction, square, product and cast,
//! forward and backward). This reads the activation three times and writes once forward,
//! reads it and the gradient twice each and writes once backward (CUDA kernels in
//! src/cuda/sync_bn.cuh, f32 and bf16 activations, f32 statistics and sums).
//!
//! The CPU implementation (f32, sums in f64) is the same algorithm, checked against the
//! composed path by the tests below; `layers::BatchNorm` keeps the composed ops on the CPU as
//! the reference. Gradients match the composed path's: the input gradient uses the global
//! sums (the backward of its all-reduce), the scale and shift gradients this rank's batch
//! only, which data parallel then averages as for any parameter.

use crate::custom_op::f32_part;
use crate::dist::sync_bn::global_count;
use crate::dist::{Collective, SumOverRanks};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use std::sync::Arc;

/// Which per-channel sums [`channel_sums`] forms over a channel's `n x positions` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SumKind {
    /// `sum x`.
    Values = 0,
    /// `sum (x - mean)^2`.
    CentredSquares = 1,
    /// `sum dy` and `sum dy (x - mean)`, two rows.
    Grad = 2,
}

impl SumKind {
    /// Sums per channel: 2 for `Grad`, else 1.
    pub fn rows(self) -> usize {
        if self == SumKind::Grad {
            2
        } else {
            1
        }
    }
}

/// One training forward: the output and the batch statistics (over every rank), f32.
pub struct SyncBnTrain {
    pub y: Tensor,
    pub mean: Tensor,
    /// Biased (divided by the count), the one used for normalising.
    pub var: Tensor,
    /// Values per channel over every rank.
    pub count: usize,
}

/// Training-mode BatchNorm of an `(N, C)` or `(N, C, H, W)` tensor over the union of every
/// rank's batch (`group`; `None`: this batch). `y` keeps x's dtype and is differentiable in
/// `x`, `weight` and `bias` (f32).
pub fn sync_batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
    group: Option<&Arc<dyn Collective>>,
) -> Result<SyncBnTrain> {
    let dims = x.dims().to_vec();
    let (n, c, hw) = match *dims.as_slice() {
        [n, c] => (n, c, 1),
        [n, c, h, w] => (n, c, h * w),
        _ => candle_core::bail!("BatchNorm expects a rank 2 or 4 tensor, got {dims:?}"),
    };
    let x3 = x.reshape((n, c, hw))?.contiguous()?;
    let count = match group {
        Some(g) => global_count(n * hw, g.as_ref())?,
        None => n * hw,
    };
    if count < 2 {
        candle_core::bail!("BatchNorm in training needs more than one value per channel");
    }
    let inv = 1.0 / count as f64;
    let mean = (over_ranks(channel_sums(SumKind::Values, &x3, None, None)?, group)? * inv)?;
    let squares = channel_sums(SumKind::CentredSquares, &x3, None, Some(&mean))?;
    let var = (over_ranks(squares, group)? * inv)?;
    let inv_std = (&var + eps)?.sqrt()?.recip()?;
    let op = SyncBnApply {
        coef: Tensor::stack(&[&mean, &inv_std], 0)?,
        inv_count: inv,
        group: group.cloned(),
    };
    let (w, b) = (
        weight.to_dtype(DType::F32)?.contiguous()?,
        bias.to_dtype(DType::F32)?.contiguous()?,
    );
    let y = x3.apply_op3(&w, &b, op)?.reshape(dims)?;
    Ok(SyncBnTrain {
        y,
        mean,
        var,
        count,
    })
}

/// Sums over ranks (forward only: the backward below all-reduces its own sums).
fn over_ranks(t: Tensor, group: Option<&Arc<dyn Collective>>) -> Result<Tensor> {
    match group {
        Some(g) => SumOverRanks(g.as_ref()).apply(&t),
        None => Ok(t),
    }
}

/// This rank's per-channel sums of a contiguous `(n, c, hw)` map, `(c)` (`(2, c)` for
/// [`SumKind::Grad`]), f32. `dy` for `Grad`, `mean` (f32 `(c)`) for all but `Values`.
pub fn channel_sums(
    kind: SumKind,
    x3: &Tensor,
    dy: Option<&Tensor>,
    mean: Option<&Tensor>,
) -> Result<Tensor> {
    if (dy.is_some(), mean.is_some()) != (kind == SumKind::Grad, kind != SumKind::Values) {
        candle_core::bail!("channel sums {kind:?}: dy only for Grad, mean for all but Values");
    }
    // Inputs the kind does not read are passed as x (never read), so that one op serves all.
    let (dy, mean) = (dy.unwrap_or(x3), mean.unwrap_or(x3));
    let parts = x3.apply_op3_no_bwd(dy, mean, &ChannelSums { kind })?;
    // (rows, c, slices): the CUDA kernel's slices of a channel, added in a fixed order.
    let sums = parts.sum(2)?;
    match kind {
        SumKind::Grad => Ok(sums),
        _ => sums.squeeze(0),
    }
}

fn dims3(l: &Layout) -> Result<(usize, usize, usize)> {
    l.shape().dims3()
}

/// A per-channel f32 table held by an op (`coef`), as a CUDA storage.
#[cfg(feature = "cuda")]
fn with_cuda_table<T>(
    t: &Tensor,
    f: impl FnOnce(&candle_core::CudaStorage, &Layout) -> Result<T>,
) -> Result<T> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        candle_core::Storage::Cuda(s) => f(s, layout),
        _ => candle_core::bail!("sync BatchNorm: per-channel table not on the CUDA device"),
    }
}

struct ChannelSums {
    kind: SumKind,
}

impl CustomOp3 for ChannelSums {
    fn name(&self) -> &'static str {
        "bn-channel-sums"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
        sm: &CpuStorage,
        lm: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, c, hw) = dims3(lx)?;
        let x = f32_part(self.name(), sx, lx)?;
        let dy = f32_part(self.name(), sd, ld)?;
        let mean = f32_part(self.name(), sm, lm)?;
        let rows = self.kind.rows();
        let mut out = vec![0f32; rows * c];
        for ch in 0..c {
            let m = if self.kind == SumKind::Values {
                0.0
            } else {
                f64::from(mean[ch])
            };
            let (mut a0, mut a1) = (0f64, 0f64);
            for b in 0..n {
                let base = (b * c + ch) * hw;
                for i in base..base + hw {
                    let v = f64::from(x[i]);
                    match self.kind {
                        SumKind::Values => a0 += v,
                        SumKind::CentredSquares => a0 += (v - m) * (v - m),
                        SumKind::Grad => {
                            let g = f64::from(dy[i]);
                            a0 += g;
                            a1 += g * (v - m);
                        }
                    }
                }
            }
            out[ch] = a0 as f32;
            if rows == 2 {
                out[c + ch] = a1 as f32;
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows, c, 1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sd: &candle_core::CudaStorage,
        ld: &Layout,
        sm: &candle_core::CudaStorage,
        lm: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (n, c, hw) = dims3(lx)?;
        let dy = (self.kind == SumKind::Grad).then_some((sd, ld));
        let mean = (self.kind != SumKind::Values).then_some((sm, lm));
        let (parts, splits) =
            crate::cuda::kernels::bn_sums(self.kind, (sx, lx), dy, mean, (n, c, hw))?;
        Ok((parts, Shape::from((self.kind.rows(), c, splits))))
    }
}

/// `y = (x - mean) w inv_std + b` on `(x, w, b)`, with the statistics of the forward; its
/// backward is synchronised BatchNorm's.
struct SyncBnApply {
    /// `[mean; inv_std]`, `(2, c)` f32: the kernel's table; its rows serve the backward.
    coef: Tensor,
    inv_count: f64,
    group: Option<Arc<dyn Collective>>,
}

impl CustomOp3 for SyncBnApply {
    fn name(&self) -> &'static str {
        "sync-batch-norm"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, hw) = dims3(lx)?;
        let x = f32_part(self.name(), sx, lx)?;
        let (w, b) = (
            f32_part(self.name(), sw, lw)?,
            f32_part(self.name(), sb, lb)?,
        );
        let coef = self.coef.to_vec2::<f32>()?;
        let (mean, inv_std) = (&coef[0], &coef[1]);
        let y = (x.iter().enumerate())
            .map(|(i, &v)| {
                let ch = (i / hw) % c;
                (v - mean[ch]) * (w[ch] * inv_std[ch]) + b[ch]
            })
            .collect();
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sb: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let geo = dims3(lx)?;
        let y = with_cuda_table(&self.coef, |sc, lc| {
            crate::cuda::kernels::bn_apply((sx, lx), (sc, lc), (sw, lw), (sb, lb), geo)
        })?;
        Ok((y, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, dy) = (x.detach(), dy.contiguous()?);
        let (mean, inv_std) = (self.coef.get(0)?, self.coef.get(1)?);
        let local = channel_sums(SumKind::Grad, &x, Some(&dy), Some(&mean))?;
        let dbias = local.get(0)?;
        let dweight = (local.get(1)? * &inv_std)?;
        let global = (over_ranks(local, self.group.as_ref())? * self.inv_count)?;
        let coef = Tensor::stack(
            &[
                &mean,
                &(w.detach() * &inv_std)?,
                &global.get(0)?,
                &(global.get(1)? * inv_std.sqr()?)?,
            ],
            0,
        )?;
        let dx = x.apply_op3_no_bwd(&dy, &coef, &SyncBnInputGrad)?;
        Ok((Some(dx), Some(dweight), Some(dbias)))
    }
}

/// `dx = scale (dy - k1 - (x - mean) k2)` on `(x, dy, coef)`, coef = `[mean; scale; k1; k2]`
/// `(4, c)`: scale = w inv_std, k1 = mean of dy, k2 = inv_std^2 mean of dy (x - mean), the
/// means over every rank.
struct SyncBnInputGrad;

impl CustomOp3 for SyncBnInputGrad {
    fn name(&self) -> &'static str {
        "sync-batch-norm-input-grad"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sd: &CpuStorage,
        ld: &Layout,
        sc: &CpuStorage,
        lc: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, c, hw) = dims3(lx)?;
        let x = f32_part(self.name(), sx, lx)?;
        let (dy, k) = (
            f32_part(self.name(), sd, ld)?,
            f32_part(self.name(), sc, lc)?,
        );
        let dx = (x.iter().zip(dy).enumerate())
            .map(|(i, (&v, &g))| {
                let ch = (i / hw) % c;
                k[c + ch] * (g - k[2 * c + ch] - (v - k[ch]) * k[3 * c + ch])
            })
            .collect();
        Ok((CpuStorage::F32(dx), lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sd: &candle_core::CudaStorage,
        ld: &Layout,
        sc: &candle_core::CudaStorage,
        lc: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let geo = dims3(lx)?;
        let dx = crate::cuda::kernels::bn_input_grad((sx, lx), (sd, ld), (sc, lc), geo)?;
        Ok((dx, lx.shape().clone()))
    }
}
