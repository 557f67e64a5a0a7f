//! AdamW's and the EMA's updates in place on CUDA (kernels in src/cuda/optim.cuh).
//!
//! The composed candle ops of [`super::AdamW::step_with`] take 14 launches a parameter, each
//! writing a new tensor, and [`super::ema_update`] 4; on CUDA every one of them is a tiny
//! kernel, about 3,500 a ResNet-50 PooDLe step, queued one by one by the host. In place they
//! are 3 (the two moments, then the parameter) and 1. The CPU keeps the composed ops, the
//! reference; the ops' CPU sides repeat the composed arithmetic in its order and f32
//! roundings, so the test can ask for equal results.

use crate::custom_op::f32_part;
use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result};

/// `s = s beta + t (1 - beta)` with `t = g` or `g^2` (`squared`): an AdamW moment, in place.
pub(super) struct AdamMoment {
    pub beta: f64,
    pub squared: bool,
}

/// `p = p decay - (m / (sqrt(v) inv_bc2_sqrt + eps)) step_size`, in place.
pub(super) struct AdamWParam {
    pub decay: f64,
    pub step_size: f64,
    pub inv_bc2_sqrt: f64,
    pub eps: f64,
}

/// The EMA `t = t m + o (1 - m)`, in place.
pub(super) struct Ema {
    pub m: f64,
}

fn f32_mut<'a>(op: &str, s: &'a mut CpuStorage, l: &Layout) -> Result<&'a mut [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&mut v[a..b]),
        _ => candle_core::bail!("{op}: a contiguous f32 tensor to update"),
    }
}

fn f32_ref<'a>(op: &str, s: &'a CpuStorage, l: &Layout, n: usize) -> Result<&'a [f32]> {
    let v = f32_part(op, s, l)?;
    if v.len() != n {
        candle_core::bail!("{op}: an operand of {} values for {n}", v.len());
    }
    Ok(v)
}

/// `dst[i] = f(dst[i], src[i])` over a contiguous f32 tensor and an operand of its size.
fn zip_in_place(
    op: &str,
    (s1, l1): (&mut CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f: impl Fn(f32, f32) -> f32,
) -> Result<()> {
    let dst = f32_mut(op, s1, l1)?;
    let src = f32_ref(op, s2, l2, dst.len())?;
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = f(*d, s);
    }
    Ok(())
}

impl InplaceOp2 for AdamMoment {
    fn name(&self) -> &'static str {
        "adam-moment"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (b, omb) = (self.beta as f32, (1.0 - self.beta) as f32);
        zip_in_place(self.name(), (s1, l1), (s2, l2), |s, g| {
            let t = if self.squared { g * g } else { g };
            s * b + t * omb
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda::kernels::adam_moment((s1, l1), (s2, l2), self.beta, self.squared)
    }
}

impl InplaceOp3 for AdamWParam {
    fn name(&self) -> &'static str {
        "adamw-param"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<()> {
        let p = f32_mut(self.name(), s1, l1)?;
        let m = f32_ref(self.name(), s2, l2, p.len())?;
        let v = f32_ref(self.name(), s3, l3, p.len())?;
        let [d, s, ib, e] =
            [self.decay, self.step_size, self.inv_bc2_sqrt, self.eps].map(|x| x as f32);
        for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
            *p = *p * d - (m / (v.sqrt() * ib + e)) * s;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<()> {
        let k = [self.decay, self.step_size, self.inv_bc2_sqrt, self.eps];
        crate::cuda::kernels::adamw_param((s1, l1), (s2, l2), (s3, l3), k)
    }
}

impl InplaceOp2 for Ema {
    fn name(&self) -> &'static str {
        "ema"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let (m, omm) = (self.m as f32, (1.0 - self.m) as f32);
        zip_in_place(self.name(), (s1, l1), (s2, l2), |t, o| t * m + o * omm)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<()> {
        crate::cuda::kernels::ema((s1, l1), (s2, l2), self.m)
    }
}
