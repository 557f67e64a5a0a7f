//! ReLU with PyTorch's backward on CUDA.
//!
//! candle's ReLU backward forms the mask from the input in four full-size passes (a tensor of
//! zeros, the comparison, its cast to the activation's dtype, the product), 30 bytes an f32
//! value; PyTorch's `threshold_backward(dy, y, 0)` is one pass over the output and its
//! gradient, 12 bytes. ResNet-50 applies ReLU to about 7.6e8 values a trunk pass at batch 8 x
//! 512x1024, so the fused backward saves about 14 GB of memory traffic a pass in f32 (half of
//! it in bf16) and three launches a ReLU. [`relu`] uses [`Relu`] on CUDA (kernels in
//! src/cuda/relu.cuh) and keeps candle's `Tensor::relu` on the CPU, the reference.
//!
//! Semantics are PyTorch's: NaN passes through the forward, and the gradient is 0 where the
//! output is <= 0 (candle's passes the gradient at exactly 0, where the input is >= 0); the
//! two agree everywhere else.

use crate::custom_op::f32_part;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};

/// `max(x, 0)`: the fused op on CUDA, candle's `relu` on the CPU.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cuda() && x.elem_count() > 0 {
        x.contiguous()?.apply_op1(Relu)
    } else {
        x.relu()
    }
}

/// ReLU as a custom op whose backward reads the output ([`ReluGrad`]); f32 on the CPU, f32
/// and bf16 on CUDA.
#[derive(Clone, Copy, Debug)]
pub struct Relu;

/// `dx = y <= 0 ? 0 : dy` from ReLU's output `y` (first) and its gradient `dy` (second).
#[derive(Clone, Copy, Debug)]
pub struct ReluGrad;

impl CustomOp1 for Relu {
    fn name(&self) -> &'static str {
        "relu-torch"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_part(self.name(), s, l)?;
        let y = x
            .iter()
            .map(|&v| if v > 0.0 || v.is_nan() { v } else { 0.0 })
            .collect();
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::kernels::relu_fwd((s, l))?, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            y.detach().apply_op2_no_bwd(&dy.contiguous()?, &ReluGrad)?,
        ))
    }
}

impl CustomOp2 for ReluGrad {
    fn name(&self) -> &'static str {
        "relu-torch-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = f32_part(self.name(), s1, l1)?;
        let dy = f32_part(self.name(), s2, l2)?;
        if y.len() != dy.len() {
            candle_core::bail!(
                "{}: {} outputs, {} gradients",
                self.name(),
                y.len(),
                dy.len()
            );
        }
        let dx = y
            .iter()
            .zip(dy)
            .map(|(&y, &g)| if y <= 0.0 { 0.0 } else { g })
            .collect();
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((
            crate::cuda::kernels::relu_bwd((s1, l1), (s2, l2))?,
            l1.shape().clone(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// The op against candle's ReLU away from 0 (forward and gradient equal), then PyTorch's
    /// choices where they differ: gradient 0 at exactly 0, NaN kept in the forward.
    #[test]
    fn relu_op_matches_candle_away_from_zero_and_pytorch_at_zero() -> Result<()> {
        let dev = Device::Cpu;
        // No exact zeros; some values tiny on either side of 0.
        let vals: Vec<f32> = (0..600)
            .map(|i| {
                let t = (i as f32 * 0.7371).sin() * 3.0;
                if t == 0.0 {
                    1e-30
                } else {
                    t * if i % 7 == 0 { 1e-30 } else { 1.0 }
                }
            })
            .collect();
        let x = Var::from_vec(vals, (2, 3, 10, 10), &dev)?;
        let r = Tensor::randn(0f32, 1., (2, 3, 10, 10), &dev)?;
        // A non-contiguous input goes through the op too.
        let xt = x.as_tensor().transpose(2, 3)?;
        let ours = xt.contiguous()?.apply_op1(Relu)?;
        let theirs = xt.relu()?;
        assert_eq!(
            ours.flatten_all()?.to_vec1::<f32>()?,
            theirs.flatten_all()?.to_vec1::<f32>()?
        );
        let g_ours = (ours * &r)?.sum_all()?.backward()?;
        let g_theirs = (theirs * &r)?.sum_all()?.backward()?;
        let (a, b) = (
            g_ours.get(x.as_tensor()).expect("gradient of x"),
            g_theirs.get(x.as_tensor()).expect("gradient of x"),
        );
        let (a, b) = (
            a.flatten_all()?.to_vec1::<f32>()?,
            b.flatten_all()?.to_vec1::<f32>()?,
        );
        assert_eq!(a, b);
        assert!(
            a.iter().filter(|&&v| v == 0.0).count() > 100,
            "half the mask is 0"
        );

        let x = Var::new(&[0f32, -0.0, f32::NAN, 2.0, -2.0], &dev)?;
        let y = x.as_tensor().apply_op1(Relu)?;
        let yv = y.to_vec1::<f32>()?;
        assert_eq!(&yv[..2], &[0.0, 0.0]);
        assert!(yv[2].is_nan(), "NaN kept: {yv:?}");
        assert_eq!(&yv[3..], &[2.0, 0.0]);
        let g = y.sum_all()?.backward()?;
        let gv = g.get(x.as_tensor()).expect("gradient").to_vec1::<f32>()?;
        assert_eq!(
            gv,
            vec![0.0, 0.0, 1.0, 1.0, 0.0],
            "PyTorch's threshold_backward"
        );
        // candle's own passes the gradient at exactly 0.
        let gc = x.as_tensor().relu()?.sum_all()?.backward()?;
        assert_eq!(
            gc.get(x.as_tensor()).expect("gradient").to_vec1::<f32>()?[0],
            1.0
        );
        Ok(())
    }
}
