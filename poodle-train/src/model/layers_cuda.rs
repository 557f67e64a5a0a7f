//! The CUDA side of `layers`: cuDNN ops from `crate::cuda` behind the layers' CPU reference
//! code. Kept in its own file (a child module, so it sees the layers' fields) to leave
//! layers.rs almost untouched.

use super::{per_channel, BatchNorm, Conv2d};
use candle_core::{Result, Tensor};

impl Conv2d {
    /// cuDNN convolution; no 1x1-as-matmul or odd-size padding detours (those work around
    /// candle's CPU/CUDA conv backward, which cuDNN replaces). Weights and bias follow the
    /// activations' dtype (f32 master weights under bf16 activations).
    pub(super) fn forward_cuda(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?;
        let y = crate::cuda::conv2d(x, &w, self.padding, self.stride, self.dilation)?;
        match &self.bias {
            None => Ok(y),
            Some(b) => y.broadcast_add(&per_channel(&b.to_dtype(y.dtype())?, &y)?),
        }
    }
}

impl BatchNorm {
    /// Training-mode BatchNorm through cuDNN, then the same running-statistics update as the
    /// CPU path (momentum, unbiased variance for `running_var`).
    pub(super) fn forward_train_cuda(&self, x: &Tensor) -> Result<Tensor> {
        let (y, stats) = crate::cuda::batch_norm_train(x, &self.weight, &self.bias, self.eps)?;
        let count = x.elem_count() / x.dim(1)?;
        self.update_running(&stats.mean, &stats.var, count)?;
        Ok(y)
    }
}
