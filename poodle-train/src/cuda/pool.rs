//! ResNet's stem max-pool (3x3, stride 2, padding 1) through cuDNN, with its backward
//! (candle has none for kernel != stride). cuDNN's max pooling never selects padding, which
//! is PyTorch's `-inf` padding; the deterministic mode gives a window's gradient to one
//! element, as PyTorch does (the CPU reference splits ties, see `layers::max_pool_3x3_s2`).

use super::handle::{with_ctx, PoolDesc, TensorDesc};
use super::{alloc, ck, cpu_refused, cudnn_dtype, dptr, dptr_mut, one, unsupported, zero};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
use cudarc::cudnn::sys;

/// `nn.MaxPool2d(kernel_size=3, stride=2, padding=1)` on an NCHW tensor.
pub fn max_pool_3x3_s2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(MaxPoolOp)
}

fn dims(op: &'static str, l: &Layout) -> Result<([usize; 4], [usize; 4])> {
    match *l.dims() {
        [n, c, h, w] if h > 0 && w > 0 => {
            Ok(([n, c, h, w], [n, c, (h - 1) / 2 + 1, (w - 1) / 2 + 1]))
        }
        ref d => {
            Err(unsupported(op, format!("expected a non-empty NCHW tensor, got {d:?}")).into())
        }
    }
}

struct MaxPoolOp;

impl CustomOp1 for MaxPoolOp {
    fn name(&self) -> &'static str {
        "poodle-cudnn-maxpool3x3s2"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        Err(cpu_refused(self.name()))
    }

    fn cuda_fwd(&self, x: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (xd, yd) = dims(op, xl)?;
        let dt = cudnn_dtype(op, x.dtype())?;
        let mut y = alloc(&x.device, x.dtype(), yd.iter().product())?;
        let (xdesc, ydesc) = (TensorDesc::nchw(op, dt, xd)?, TensorDesc::nchw(op, dt, yd)?);
        let pool = PoolDesc::max(3, 1, 2)?;
        with_ctx(&x.device, |ctx| {
            let stream = ctx.stream.clone();
            let (xp, _g1) = dptr(op, x, xl, &stream)?;
            let (yp, _g2) = dptr_mut(op, &mut y, &stream)?;
            // SAFETY: descriptors match the buffers.
            unsafe {
                ck(
                    "cudnnPoolingForward",
                    sys::cudnnPoolingForward(
                        ctx.handle,
                        pool.0,
                        one(),
                        xdesc.0,
                        xp as _,
                        zero(),
                        ydesc.0,
                        yp as _,
                    ),
                )
            }
        })?;
        Ok((y, Shape::from(yd.to_vec())))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op3_no_bwd(
            y,
            &dy.contiguous()?,
            &MaxPoolBwdOp,
        )?))
    }
}

/// `dx` from `(x, y, dy)`: cuDNN finds each window's maximum again by comparing `x` with `y`.
struct MaxPoolBwdOp;

impl CustomOp3 for MaxPoolBwdOp {
    fn name(&self) -> &'static str {
        "poodle-cudnn-maxpool3x3s2-bwd"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(cpu_refused(self.name()))
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        y: &CudaStorage,
        yl: &Layout,
        dy: &CudaStorage,
        dyl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (xd, yd) = dims(op, xl)?;
        if yl.dims() != yd || dyl.dims() != yd {
            return Err(
                unsupported(op, "output or gradient shape differs from the forward").into(),
            );
        }
        if y.dtype() != x.dtype() || dy.dtype() != x.dtype() {
            return Err(unsupported(op, "output or gradient dtype differs from the input").into());
        }
        let dt = cudnn_dtype(op, x.dtype())?;
        let mut dx = alloc(&x.device, x.dtype(), xd.iter().product())?;
        let (xdesc, ydesc) = (TensorDesc::nchw(op, dt, xd)?, TensorDesc::nchw(op, dt, yd)?);
        let pool = PoolDesc::max(3, 1, 2)?;
        with_ctx(&x.device, |ctx| {
            let stream = ctx.stream.clone();
            let (xp, _g1) = dptr(op, x, xl, &stream)?;
            let (yp, _g2) = dptr(op, y, yl, &stream)?;
            let (dyp, _g3) = dptr(op, dy, dyl, &stream)?;
            let (dxp, _g4) = dptr_mut(op, &mut dx, &stream)?;
            // SAFETY: descriptors match the buffers; y is the forward's output on x.
            unsafe {
                ck(
                    "cudnnPoolingBackward",
                    sys::cudnnPoolingBackward(
                        ctx.handle,
                        pool.0,
                        one(),
                        ydesc.0,
                        yp as _,
                        ydesc.0,
                        dyp as _,
                        xdesc.0,
                        xp as _,
                        zero(),
                        xdesc.0,
                        dxp as _,
                    ),
                )
            }
        })?;
        Ok((dx, Shape::from(xd.to_vec())))
    }
}
