//! Building blocks with PyTorch semantics and a candle backward pass: convolution (with a fix
//! for candle's conv2d input gradient on odd sizes), BatchNorm with running statistics, the
//! ResNet stem max-pool, bilinear resizing and PyTorch's default initialisations.

use candle_core::{DType, Device, Module, ModuleT, Result, Tensor, Var, D};
use candle_nn::{Init, VarBuilder};

#[cfg(feature = "cuda")]
#[path = "layers_cuda.rs"]
mod cuda_dispatch;

/// Kaiming-normal, `mode="fan_out"`, `nonlinearity="relu"`: torchvision's ResNet conv init.
pub(crate) fn kaiming_normal_fan_out(out_ch: usize, k: usize) -> Init {
    Init::Randn {
        mean: 0.,
        stdev: (2.0 / (out_ch * k * k) as f64).sqrt(),
    }
}

/// PyTorch's default for `nn.Linear` / `nn.Conv2d` weights and biases
/// (`kaiming_uniform_(a=sqrt(5))`): uniform in `+-1/sqrt(fan_in)`.
pub(crate) fn torch_default_uniform(fan_in: usize) -> Init {
    let bound = 1.0 / (fan_in as f64).sqrt();
    Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// A 2-D convolution, NCHW, weight `(out, in, k, k)` named `weight`, optional `bias`
/// (groups 1). 1x1 convolutions without padding run as matmuls (see `forward_1x1`), the
/// others through candle's conv2d.
///
/// candle 0.11's conv2d backward derives the `output_padding` of its transposed convolution
/// from the height alone and applies it to both axes, so a strided convolution whose height
/// and width leave different remainders fails in backward (or returns a wrongly shaped
/// gradient). The forward here pads the input with zero rows or columns at the bottom/right
/// until both remainders agree; these extra zeros fall where the convolution's own zero
/// padding would be, so the output is unchanged and the gradient is narrowed back.
#[derive(Clone, Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
    dilation: usize,
}

impl Conv2d {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_ch: usize,
        out_ch: usize,
        k: usize,
        stride: usize,
        padding: usize,
        dilation: usize,
        bias: bool,
        init: Init,
        vb: VarBuilder,
    ) -> Result<Self> {
        let weight = super::init::get(&vb, (out_ch, in_ch, k, k), "weight", init)?;
        let bias = if bias {
            Some(super::init::get(
                &vb,
                out_ch,
                "bias",
                torch_default_uniform(in_ch * k * k),
            )?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
            dilation,
        })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Remainder that candle's backward turns into `output_padding` along an axis of `size`.
    fn remainder(&self, size: usize, k: usize) -> usize {
        (size + 2 * self.padding - self.dilation * (k - 1) - 1) % self.stride
    }

    /// A 1x1 convolution as a batched matmul (`W @ x` per image): candle's conv2d computes
    /// the weight gradient as a convolution with the gradient map as kernel, which is several
    /// times slower than the matmul's backward. A stride is a subsampling first.
    fn forward_1x1(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.stride > 1 {
            let (_, _, h, w) = x.dims4()?;
            let every = |len: usize| -> Result<Tensor> {
                let idx: Vec<u32> = (0..len).step_by(self.stride).map(|i| i as u32).collect();
                Tensor::new(idx.as_slice(), x.device())
            };
            x.index_select(&every(h)?, 2)?.index_select(&every(w)?, 3)?
        } else {
            x.clone()
        };
        let (n, c, h, w) = x.dims4()?;
        let o = self.weight.dim(0)?;
        let wb = repeat_batch(&self.weight.reshape((o, c))?, n)?;
        wb.matmul(&x.reshape((n, c, h * w))?)?.reshape((n, o, h, w))
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return self.forward_cuda(x);
        }
        let (_, _, kh, kw) = self.weight.dims4()?;
        let y = if (kh, kw) == (1, 1) && self.padding == 0 {
            self.forward_1x1(x)?
        } else {
            let (_, _, h, w) = x.dims4()?;
            let mut x = x.clone();
            if self.stride > 1 {
                let (rh, rw) = (self.remainder(h, kh), self.remainder(w, kw));
                if rh < rw {
                    x = x.pad_with_zeros(2, 0, rw - rh)?;
                } else if rw < rh {
                    x = x.pad_with_zeros(3, 0, rh - rw)?;
                }
            }
            x.conv2d(&self.weight, self.padding, self.stride, self.dilation, 1)?
        };
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(&per_channel(b, &y)?),
        }
    }
}

/// `t` repeated along a new leading axis of size `n`, as `ones(n, 1) @ t`: its backward
/// sums over the copies with a matmul; the backward of `broadcast_left` would sum over a
/// leading axis, which candle's CPU reduction does element by element (tens of times
/// slower).
pub(crate) fn repeat_batch(t: &Tensor, n: usize) -> Result<Tensor> {
    let mut dims = vec![n];
    dims.extend_from_slice(t.dims());
    if n == 1 {
        return t.reshape(dims);
    }
    let ones = Tensor::ones((n, 1), t.dtype(), t.device())?;
    ones.matmul(&t.reshape((1, t.elem_count()))?)?.reshape(dims)
}

/// A per-channel vector `(C)` shaped for broadcasting against `x`: `(N, C, 1, 1)` for an
/// NCHW `x` (explicitly broadcast over N, so that the backward of the final broadcast sums
/// over the trailing spatial axes, candle's fast reduction), `(1, C)` for `(N, C)`.
pub(crate) fn per_channel(v: &Tensor, x: &Tensor) -> Result<Tensor> {
    match x.rank() {
        4 => {
            let (n, c, _, _) = x.dims4()?;
            v.reshape((1, c, 1, 1))?.broadcast_as((n, c, 1, 1))
        }
        2 => v.reshape((1, ())),
        r => candle_core::bail!("per-channel broadcast expects rank 2 or 4, got {r}"),
    }
}

/// A fully connected layer, weight `(out, in)`, bias `(out)`, PyTorch default init.
#[derive(Clone, Debug)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn new(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Self> {
        let init = torch_default_uniform(in_dim);
        let weight = super::init::get(&vb, (out_dim, in_dim), "weight", init)?;
        let bias = super::init::get(&vb, out_dim, "bias", init)?;
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    /// Parameters follow `x`'s dtype (f32 master weights under bf16 activations; a no-op in
    /// f32).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = (
            self.weight.to_dtype(x.dtype())?,
            self.bias.to_dtype(x.dtype())?,
        );
        x.matmul(&w.t()?)?.broadcast_add(&b)
    }
}

/// BatchNorm over dim 1 of an `(N, C)` or `(N, C, H, W)` tensor with PyTorch's semantics:
/// training uses the batch statistics (biased variance for normalising, gradients flow
/// through mean and variance) and updates the running statistics with
/// `r = (1 - momentum) r + momentum s`, using the unbiased variance for `running_var`;
/// evaluation uses the running statistics. Eps 1e-5, momentum 0.1.
///
/// Names: `weight`, `bias` (trainable) and `running_mean`, `running_var` (buffers). The
/// buffers are [`Var`]s fetched through the same [`VarBuilder`], so with a `VarMap` they live
/// in the map beside the parameters (and are saved/loaded/copied with it) and the update in
/// `forward_t(_, true)` writes straight into the map. They never receive gradients. PyTorch's
/// `num_batches_tracked` is not kept (only used when momentum is None).
#[derive(Clone, Debug)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Var,
    running_var: Var,
    eps: f64,
    momentum: f64,
}

impl BatchNorm {
    pub const EPS: f64 = 1e-5;
    pub const MOMENTUM: f64 = 0.1;

    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        let weight = super::init::get(&vb, channels, "weight", Init::Const(1.))?;
        let bias = super::init::get(&vb, channels, "bias", Init::Const(0.))?;
        let running_mean = super::init::get(&vb, channels, "running_mean", Init::Const(0.))?;
        let running_var = super::init::get(&vb, channels, "running_var", Init::Const(1.))?;
        Ok(Self {
            weight,
            bias,
            // Shares storage with the VarMap entry when the tensor is a variable; a copy when
            // the VarBuilder reads from a file (then updates stay inside this module).
            running_mean: Var::from_tensor(&running_mean)?,
            running_var: Var::from_tensor(&running_var)?,
            eps: Self::EPS,
            momentum: Self::MOMENTUM,
        })
    }

    pub fn running_mean(&self) -> &Tensor {
        self.running_mean.as_tensor()
    }

    pub fn running_var(&self) -> &Tensor {
        self.running_var.as_tensor()
    }

    /// Per-channel mean over all but dim 1, shaped `(1, C, 1, 1)` or `(1, C)`. For NCHW the
    /// spatial axes are summed first (contiguous, fast) and then the batch.
    fn channel_mean(x: &Tensor) -> Result<Tensor> {
        let count = (x.elem_count() / x.dim(1)?) as f64;
        Self::channel_sum(x)? * (1.0 / count)
    }

    /// Per-channel sums over all but dim 1, shaped as [`Self::channel_mean`].
    fn channel_sum(x: &Tensor) -> Result<Tensor> {
        match x.rank() {
            4 => x.sum_keepdim((2, 3))?.sum_keepdim(0),
            2 => x.sum_keepdim(0),
            r => candle_core::bail!("BatchNorm expects a rank 2 or 4 tensor, got rank {r}"),
        }
    }

    /// The running statistics after a training batch with this `mean` and biased `var`
    /// over `count` values per channel, outside the graph: `r = (1 - momentum) r + momentum
    /// s`, with the unbiased variance for `running_var` as in PyTorch.
    pub(crate) fn update_running(&self, mean: &Tensor, var: &Tensor, count: usize) -> Result<()> {
        let m = self.momentum;
        let unbias = count as f64 / (count as f64 - 1.0);
        let mean = mean.detach().flatten_all()?;
        let var = var.detach().flatten_all()?;
        let new_mean = ((self.running_mean.as_tensor() * (1.0 - m))? + (mean * m)?)?;
        let new_var = ((self.running_var.as_tensor() * (1.0 - m))? + (var * (m * unbias))?)?;
        self.running_mean.set(&new_mean)?;
        self.running_var.set(&new_var)
    }

    /// Training-mode BatchNorm through [`super::sync_bn_fused`], synchronised over `group`
    /// (`None`: this batch alone): CUDA's synchronised BatchNorm (f32 or bf16 activations);
    /// on the CPU (f32) the tests compare it with the composed path of `forward_t`.
    pub fn forward_train_fused(
        &self,
        x: &Tensor,
        group: Option<&std::sync::Arc<dyn crate::dist::Collective>>,
    ) -> Result<Tensor> {
        let out = super::sync_bn_fused::sync_batch_norm_train(
            x,
            &self.weight,
            &self.bias,
            self.eps,
            group,
        )?;
        self.update_running(&out.mean, &out.var, out.count)?;
        Ok(out.y)
    }

    /// Batch mean, centred input, biased variance and the number of values per channel;
    /// over every rank's batch inside a synchronised-BatchNorm scope (`dist::sync_bn`), two
    /// passes as in the local case (mean first, then centred squares), so one rank with the
    /// whole batch and W ranks with its parts compute the same statistics.
    fn batch_stats(x: &Tensor) -> Result<(Tensor, Tensor, Tensor, usize)> {
        let local = x.elem_count() / x.dim(1)?;
        let Some(group) = crate::dist::sync_bn::current() else {
            if local < 2 {
                candle_core::bail!("BatchNorm in training needs more than one value per channel");
            }
            let mean = Self::channel_mean(x)?;
            let xc = x.broadcast_sub(&per_channel(&mean, x)?)?;
            let var = Self::channel_mean(&xc.sqr()?)?;
            return Ok((mean, xc, var, local));
        };
        use crate::dist::sync_bn::{global_count, AllReduceSum};
        let count = global_count(local, group.as_ref())?;
        if count < 2 {
            candle_core::bail!("BatchNorm in training needs more than one value per channel");
        }
        let inv = 1.0 / count as f64;
        let mean = (AllReduceSum::apply(&Self::channel_sum(x)?, &group)? * inv)?;
        let xc = x.broadcast_sub(&per_channel(&mean, x)?)?;
        let var = (AllReduceSum::apply(&Self::channel_sum(&xc.sqr()?)?, &group)? * inv)?;
        Ok((mean, xc, var, count))
    }
}

impl ModuleT for BatchNorm {
    fn forward_t(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        // cuDNN's training BatchNorm takes its statistics from this device's batch only:
        // synchronised BatchNorm runs the fused passes of `sync_bn_fused` instead.
        #[cfg(feature = "cuda")]
        if train && x.device().is_cuda() {
            return match crate::dist::sync_bn::current() {
                None => self.forward_train_cuda(x),
                Some(group) => self.forward_train_fused(x, Some(&group)),
            };
        }
        // The path below (statistics, their all-reduce, the affine) is f32, as the parameters
        // and statistics are: a bf16 activation (synchronised BatchNorm, or eval) runs through
        // it in f32 and gets its dtype back, the gradient flowing through both casts.
        if x.dtype() != DType::F32 {
            return self
                .forward_t(&x.to_dtype(DType::F32)?, train)?
                .to_dtype(x.dtype());
        }
        let weight = per_channel(&self.weight, x)?;
        let bias = per_channel(&self.bias, x)?;
        if train {
            let (mean, xc, var, count) = Self::batch_stats(x)?;
            self.update_running(&mean, &var, count)?;
            let inv_std = per_channel(&(var + self.eps)?.sqrt()?.recip()?, x)?;
            xc.broadcast_mul(&weight.broadcast_mul(&inv_std)?)?
                .broadcast_add(&bias)
        } else {
            let mean = per_channel(&self.running_mean.as_detached_tensor(), x)?;
            let var = per_channel(&self.running_var.as_detached_tensor(), x)?;
            let scale = weight.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
            let shift = bias.broadcast_sub(&mean.broadcast_mul(&scale)?)?;
            x.broadcast_mul(&scale)?.broadcast_add(&shift)
        }
    }
}

/// ResNet's stem max-pool (`nn.MaxPool2d(kernel_size=3, stride=2, padding=1)`, `-inf`
/// padding), built from differentiable ops because candle has no max-pool backward for
/// kernel != stride: pad with `-inf`, gather the three strided column shifts with
/// `index_select` and take their elementwise maximum, then the same along rows. The gradient
/// goes to the maximum of each window (a tie splits it, where PyTorch picks one element;
/// after a ReLU, ties are zeros whose gradient the ReLU drops anyway).
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() {
        return crate::cuda::max_pool_3x3_s2(x);
    }
    let (n, c, h, w) = x.dims4()?;
    let (ho, wo) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
    let dev = x.device();
    let ninf = |hh: usize, ww: usize| Tensor::full(f32::NEG_INFINITY, (n, c, hh, ww), dev);
    let ninf = |hh, ww| ninf(hh, ww)?.to_dtype(x.dtype());
    // Padded width w + 2 always covers 2 * (wo - 1) + 2.
    let xp = Tensor::cat(&[&ninf(h, 1)?, x, &ninf(h, 1)?], 3)?;
    let xp = Tensor::cat(&[&ninf(1, w + 2)?, &xp, &ninf(1, w + 2)?], 2)?;
    let shifts = |len: usize, d: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..len).map(|i| (2 * i + d) as u32).collect();
        Tensor::from_vec(idx, len, dev)
    };
    let mut cols: Option<Tensor> = None;
    for d in 0..3 {
        let s = xp.index_select(&shifts(wo, d)?, 3)?;
        cols = Some(match cols {
            None => s,
            Some(m) => m.maximum(&s)?,
        });
    }
    let cols = cols.expect("three shifts");
    let mut out: Option<Tensor> = None;
    for d in 0..3 {
        let s = cols.index_select(&shifts(ho, d)?, 2)?;
        out = Some(match out {
            None => s,
            Some(m) => m.maximum(&s)?,
        });
    }
    Ok(out.expect("three shifts"))
}

/// The `(out, in)` matrix of 1-D linear interpolation with PyTorch's `align_corners=False`
/// (no antialiasing): output `i` samples input `(i + 0.5) * in / out - 0.5`, clamped at 0,
/// between `floor` and `floor + 1` (clamped at `in - 1`).
pub fn interp_matrix(out_len: usize, in_len: usize, dtype: DType, dev: &Device) -> Result<Tensor> {
    let mut m = vec![0f32; out_len * in_len];
    let table = poodle_common::flowmath::linear_axis(in_len, out_len, 0, out_len);
    for (i, (i0, i1, w0, w1)) in table.into_iter().enumerate() {
        m[i * in_len + i0] += w0 as f32;
        m[i * in_len + i1] += w1 as f32;
    }
    Tensor::from_vec(m, (out_len, in_len), dev)?.to_dtype(dtype)
}

/// Bilinear resize of an NCHW tensor to `h x w`, equal to PyTorch's
/// `F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)` (without
/// antialiasing, so also for downsampling). Two matmuls with fixed interpolation matrices,
/// hence differentiable in candle: `out = Ry @ x @ Rx^T`.
pub fn upsample_bilinear(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (n, c, hi, wi) = x.dims4()?;
    if (h, w) == (hi, wi) {
        return Ok(x.clone());
    }
    let (dt, dev) = (x.dtype(), x.device());
    // Columns: (N*C*Hi, Wi) @ (Wi, w).
    let rx_t = interp_matrix(w, wi, dt, dev)?.t()?;
    let x = x.reshape((n * c * hi, wi))?.matmul(&rx_t)?;
    let x = x.reshape((n * c, hi, w))?;
    // Rows: (h, Hi) @ (Hi, w), batched over N*C.
    let ry = interp_matrix(h, hi, dt, dev)?;
    let x = ry.broadcast_left(n * c)?.matmul(&x)?;
    x.reshape((n, c, h, w))
}

/// Spatial mean of an NCHW tensor: `(N, C)`.
pub fn global_avg_pool(x: &Tensor) -> Result<Tensor> {
    x.mean((D::Minus2, D::Minus1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn max_pool_matches_candle_forward_and_has_a_gradient() {
        let dev = Device::Cpu;
        for (h, w) in [(8, 8), (7, 10), (9, 5), (1, 2)] {
            let x = Var::randn(0f32, 1., (2, 3, h, w), &dev).unwrap();
            let y = max_pool_3x3_s2(x.as_tensor()).unwrap();
            // Reference: candle's forward-only max-pool on an explicitly -inf padded input.
            let big = Tensor::full(-1e30f32, (2, 3, h + 2, w + 2), &dev).unwrap();
            let xp = big
                .slice_assign(&[0..2, 0..3, 1..h + 1, 1..w + 1], x.as_tensor())
                .unwrap();
            let r = xp.max_pool2d_with_stride(3, 2).unwrap();
            assert_eq!(y.dims(), &[2, 3, (h - 1) / 2 + 1, (w - 1) / 2 + 1]);
            assert_eq!(y.dims(), r.dims());
            assert_eq!(max_abs_diff(&y, &r), 0.0);
            // Gradient of sum: each window's maximum gets 1 per window it wins.
            let g = y.sum_all().unwrap().backward().unwrap();
            let g = g.get(x.as_tensor()).unwrap();
            let total = g.sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert_eq!(total as usize, y.elem_count());
        }
    }

    #[test]
    fn interp_matrix_rows_sum_to_one_and_identity_for_same_size() {
        let dev = Device::Cpu;
        let m = interp_matrix(12, 5, DType::F32, &dev).unwrap();
        let s = m.sum(1).unwrap().to_vec1::<f32>().unwrap();
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-6));
        let i = interp_matrix(4, 4, DType::F32, &dev).unwrap();
        assert_eq!(
            max_abs_diff(&i, &Tensor::eye(4, DType::F32, &dev).unwrap()),
            0.0
        );
        // 2x upsampling: output 0 is input 0 (clamped), output 1 is 0.75 x0 + 0.25 x1.
        let u = interp_matrix(4, 2, DType::F32, &dev)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(u[0], vec![1.0, 0.0]);
        assert_eq!(u[1], vec![0.75, 0.25]);
        assert_eq!(u[2], vec![0.25, 0.75]);
        assert_eq!(u[3], vec![0.0, 1.0]);
    }

    #[test]
    fn strided_conv_backward_on_mixed_parity_sizes() {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let conv = Conv2d::new(2, 3, 3, 2, 1, 1, true, Init::Const(0.1), vb).unwrap();
        for (h, w) in [(6, 5), (5, 6), (7, 7), (3, 8)] {
            let x = Var::randn(0f32, 1., (1, 2, h, w), &dev).unwrap();
            let y = conv.forward(x.as_tensor()).unwrap();
            let bias = conv.bias().unwrap().reshape((1, 3, 1, 1)).unwrap();
            let r = x.as_tensor().conv2d(conv.weight(), 1, 2, 1, 1).unwrap();
            let r = r.broadcast_add(&bias).unwrap();
            assert_eq!(y.dims(), r.dims());
            assert!(max_abs_diff(&y, &r) < 1e-6);
            let g = y.sum_all().unwrap().backward().unwrap();
            assert_eq!(g.get(x.as_tensor()).unwrap().dims(), &[1, 2, h, w]);
        }
    }

    #[test]
    fn batch_norm_updates_running_stats_like_pytorch() {
        let dev = Device::Cpu;
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let bn = BatchNorm::new(2, vb).unwrap();
        // Channel 0 holds 1..=4, channel 1 holds 2, 4, 6, 8 (N=2, H=1, W=2).
        let x = Tensor::new(
            &[[[[1f32, 2.]], [[2., 4.]]], [[[3., 4.]], [[6., 8.]]]],
            &dev,
        )
        .unwrap();
        let y = bn.forward_t(&x, true).unwrap();
        let rm = bn.running_mean().to_vec1::<f32>().unwrap();
        let rv = bn.running_var().to_vec1::<f32>().unwrap();
        // mean 2.5 / 5, unbiased var 5/3 / 20/3.
        assert!((rm[0] - 0.25).abs() < 1e-6 && (rm[1] - 0.5).abs() < 1e-6);
        assert!((rv[0] - (0.9 + 0.1 * 5.0 / 3.0)).abs() < 1e-6);
        assert!((rv[1] - (0.9 + 0.1 * 20.0 / 3.0)).abs() < 1e-5);
        // The map entry is the same storage.
        let stored = vm.data().lock().unwrap()["running_mean"]
            .as_tensor()
            .clone();
        assert_eq!(stored.to_vec1::<f32>().unwrap(), rm);
        // Normalised with the biased variance: channel 0 -> (x - 2.5) / sqrt(1.25 + eps).
        let y0 = y.get(0).unwrap().get(0).unwrap().get(0).unwrap();
        let want = (1.0 - 2.5) / (1.25f32 + 1e-5).sqrt();
        assert!((y0.get(0).unwrap().to_scalar::<f32>().unwrap() - want).abs() < 1e-5);
        // Eval uses the running statistics.
        let e = bn.forward_t(&x, false).unwrap();
        let e0 = e
            .flatten_all()
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = (1.0 - rm[0]) / (rv[0] + 1e-5).sqrt();
        assert!((e0 - want).abs() < 1e-5);
    }

    /// `run(rank, group)` on two thread ranks of one local group; the results in rank order.
    fn on_two_ranks<T: Send>(
        run: impl Fn(usize, std::sync::Arc<dyn crate::dist::Collective>) -> T + Sync,
    ) -> Vec<T> {
        use crate::dist::{local::LocalGroup, Collective};
        use std::sync::Arc;
        let groups = LocalGroup::new(2)
            .into_iter()
            .map(|g| Arc::new(g) as Arc<dyn Collective>);
        std::thread::scope(|s| {
            let run = &run;
            let hs: Vec<_> = (groups.enumerate())
                .map(|(r, g)| s.spawn(move || run(r, g)))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// A bf16 activation (the bf16 precision) through synchronised BatchNorm over two ranks:
    /// computed in f32 and returned in bf16, equal to the f32 result on the same values.
    #[test]
    fn sync_batch_norm_takes_bf16_activations() {
        use crate::dist::{sync_bn, Collective};
        use std::sync::Arc;
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1., (4, 3, 2, 5), &dev).unwrap() * 3.0)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let run = |x: Tensor, g: Option<Arc<dyn Collective>>| {
            let _scope = sync_bn::scope(g);
            let vm = candle_nn::VarMap::new();
            let bn = BatchNorm::new(3, VarBuilder::from_varmap(&vm, DType::F32, &dev)).unwrap();
            let xv = Var::from_tensor(&x).unwrap();
            let y = bn.forward_t(xv.as_tensor(), true).unwrap();
            let grads = y
                .to_dtype(DType::F32)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward();
            let dx = grads.unwrap().get(xv.as_tensor()).unwrap().dtype();
            (y, dx)
        };
        let outs = on_two_ranks(|r, g| run(x.narrow(0, 2 * r, 2).unwrap(), Some(g)));
        let (whole, _) = run(x.to_dtype(DType::F32).unwrap(), None);
        for (r, (y, dx)) in outs.iter().enumerate() {
            assert_eq!((y.dtype(), *dx), (DType::BF16, DType::BF16), "rank {r}");
            let want = whole.narrow(0, 2 * r, 2).unwrap();
            let d = max_abs_diff(&y.to_dtype(DType::F32).unwrap(), &want);
            assert!(d < 0.05, "rank {r}: bf16 output off by {d}");
        }
    }

    /// One BatchNorm (3 channels, weight `gamma`) on `x` with the loss `sum(y * probe)`: y,
    /// d/dx, d/dweight, d/dbias, running mean and var. `fused`: through
    /// `forward_train_fused` over this thread's synchronised-BatchNorm group (if any), else
    /// `forward_t`.
    fn bn_outputs(x: &Tensor, probe: &Tensor, gamma: &Tensor, fused: bool) -> Vec<Tensor> {
        let dev = x.device();
        let vm = candle_nn::VarMap::new();
        let bn = BatchNorm::new(
            gamma.dim(0).unwrap(),
            VarBuilder::from_varmap(&vm, DType::F32, dev),
        )
        .unwrap();
        vm.data().lock().unwrap()["weight"].set(gamma).unwrap();
        let xv = Var::from_tensor(x).unwrap();
        let y = if fused {
            let group = crate::dist::sync_bn::current();
            bn.forward_train_fused(xv.as_tensor(), group.as_ref())
        } else {
            bn.forward_t(xv.as_tensor(), true)
        }
        .unwrap();
        let g = (&y * probe).unwrap().sum_all().unwrap().backward().unwrap();
        let data = vm.data().lock().unwrap();
        let grad = |n: &str| g.get(data[n].as_tensor()).unwrap().clone();
        vec![
            y.clone(),
            g.get(xv.as_tensor()).unwrap().clone(),
            grad("weight"),
            grad("bias"),
            bn.running_mean().clone(),
            bn.running_var().clone(),
        ]
    }

    /// One BatchNorm over a batch of 4 against two ranks (threads) with 2 each, synchronised:
    /// the same outputs, input gradients, summed parameter gradients and running statistics.
    /// Without synchronisation the statistics differ.
    #[test]
    fn sync_batch_norm_over_two_ranks_equals_one_batch() {
        use crate::dist::sync_bn;
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 1., (4, 3, 2, 5), &dev).unwrap() * 3.0).unwrap();
        let probe = Tensor::randn(0f32, 1., (4, 3, 2, 5), &dev).unwrap();
        let gamma = Tensor::new(&[0.5f32, 1.5, -2.0], &dev).unwrap();
        let run = |x: Tensor, probe: Tensor| bn_outputs(&x, &probe, &gamma, false);
        let whole = run(x.clone(), probe.clone());
        let parts = |sync: bool| -> Vec<Vec<Tensor>> {
            on_two_ranks(|r, g| {
                let _scope = sync_bn::scope(sync.then_some(g));
                run(
                    x.narrow(0, 2 * r, 2).unwrap(),
                    probe.narrow(0, 2 * r, 2).unwrap(),
                )
            })
        };
        let synced = parts(true);
        let cat = |i: usize| Tensor::cat(&[&synced[0][i], &synced[1][i]], 0).unwrap();
        assert!(max_abs_diff(&cat(0), &whole[0]) < 1e-5, "outputs");
        assert!(max_abs_diff(&cat(1), &whole[1]) < 1e-5, "input gradients");
        for (i, what) in [(2, "weight grad"), (3, "bias grad")] {
            let sum = (&synced[0][i] + &synced[1][i]).unwrap();
            assert!(max_abs_diff(&sum, &whole[i]) < 1e-4, "{what}");
        }
        for (i, what) in [(4, "running mean"), (5, "running var")] {
            for rank in &synced {
                assert!(max_abs_diff(&rank[i], &whole[i]) < 1e-5, "{what}");
            }
        }
        let apart = parts(false);
        assert!(
            max_abs_diff(&apart[0][4], &whole[4]) > 1e-3,
            "unsynced running mean"
        );
    }

    /// The fused synchronised BatchNorm (CUDA's path, `sync_bn_fused`) against the composed
    /// one: every output and gradient on two ranks of an NCHW batch, and in one process on an
    /// `(N, C)` input.
    #[test]
    fn fused_sync_batch_norm_equals_composed() {
        use crate::dist::sync_bn;
        let dev = Device::Cpu;
        let names = ["y", "dx", "dweight", "dbias", "running mean", "running var"];
        let check = |what: &str, fused: &[Tensor], composed: &[Tensor]| {
            for ((f, c), name) in fused.iter().zip(composed).zip(names) {
                let d = max_abs_diff(f, c);
                assert!(d < 2e-5, "{what}: {name} off by {d}");
            }
        };
        let x = (Tensor::randn(0f32, 1., (4, 3, 2, 5), &dev).unwrap())
            .affine(3.0, 1.0)
            .unwrap();
        let probe = Tensor::randn(0f32, 1., (4, 3, 2, 5), &dev).unwrap();
        let gamma = Tensor::new(&[0.5f32, 1.5, -2.0], &dev).unwrap();
        let ranks = on_two_ranks(|r, g| {
            let _scope = sync_bn::scope(Some(g));
            let (x, probe) = (
                x.narrow(0, 2 * r, 2).unwrap(),
                probe.narrow(0, 2 * r, 2).unwrap(),
            );
            let fused = bn_outputs(&x, &probe, &gamma, true);
            (fused, bn_outputs(&x, &probe, &gamma, false))
        });
        for (r, (fused, composed)) in ranks.iter().enumerate() {
            check(&format!("rank {r}"), fused, composed);
        }
        let x = (Tensor::randn(0f32, 1., (6, 4), &dev).unwrap())
            .affine(2.0, -0.5)
            .unwrap();
        let probe = Tensor::randn(0f32, 1., (6, 4), &dev).unwrap();
        let gamma = Tensor::new(&[1.0f32, -0.5, 2.0, 0.25], &dev).unwrap();
        let fused = bn_outputs(&x, &probe, &gamma, true);
        check(
            "(N, C), one process",
            &fused,
            &bn_outputs(&x, &probe, &gamma, false),
        );
    }
}
