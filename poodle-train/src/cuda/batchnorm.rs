//! Training-mode BatchNorm through cuDNN (spatial mode: per channel over N, H, W), forward
//! and backward. The scale, shift and statistics are f32 whatever the activation dtype
//! (cuDNN's rule for 16-bit inputs, and the precision the issue asks for).
//!
//! The running statistics are not updated by cuDNN: the op returns the batch mean and
//! (biased) variance and `layers::BatchNorm` applies the same momentum update as on the CPU
//! (cuDNN's own update would write into the running-statistics `Var`s behind candle's back).

use super::handle::{with_ctx, TensorDesc};
use super::{
    alloc, alloc_f32, check_f32_table, ck, cpu_refused, cudnn_dtype, dptr, dptr_mut, one,
    unsupported, zero,
};
use candle_core::backend::BackendStorage;
use candle_core::op::BackpropOp;
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use cudarc::cudnn::sys;
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};
use std::sync::{Arc, Mutex};

/// The batch statistics of one training forward, per channel, f32, outside the graph.
pub struct BatchStats {
    pub mean: Tensor,
    /// Biased (divide by the count) variance, the one used for normalising.
    pub var: Tensor,
}

/// BatchNorm in training mode on an `(N, C)` or `(N, C, H, W)` tensor: `y` (same dtype as
/// `x`, differentiable in `x`, `weight` and `bias`) and the batch statistics.
pub fn batch_norm_train(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<(Tensor, BatchStats)> {
    let dims = x.dims().to_vec();
    let x4 = match *dims.as_slice() {
        [n, c] => x.reshape((n, c, 1, 1))?,
        [_, _, _, _] => x.contiguous()?,
        _ => candle_core::bail!("BatchNorm expects a rank 2 or 4 tensor, got {dims:?}"),
    };
    if x4.elem_count() / dims[1] < 2 {
        candle_core::bail!("BatchNorm in training needs more than one value per channel");
    }
    let saved = Arc::new(Mutex::new(None));
    let op = BnFwdOp {
        eps,
        saved: saved.clone(),
    };
    let (w, b) = (
        weight.to_dtype(DType::F32)?.contiguous()?,
        bias.to_dtype(DType::F32)?.contiguous()?,
    );
    let y = x4.apply_op3(&w, &b, op)?.reshape(dims)?;
    let guard = saved.lock().expect("BatchNorm statistics lock");
    let s: &Saved = guard
        .as_ref()
        .expect("the CUDA forward stores the statistics");
    let stream = s.dev.cuda_stream();
    let mean = wrap(
        stream
            .clone_dtod(&s.mean)
            .map_err(super::CudaOpError::from)?,
        &s.dev,
    );
    let inv_std = wrap(
        stream
            .clone_dtod(&s.inv_std)
            .map_err(super::CudaOpError::from)?,
        &s.dev,
    );
    // cuDNN saves 1 / sqrt(var + eps); the running update wants var.
    let var = (inv_std.sqr()?.recip()? - eps)?;
    Ok((y, BatchStats { mean, var }))
}

/// A candle tensor (outside any graph) owning `s`.
fn wrap(s: CudaSlice<f32>, dev: &CudaDevice) -> Tensor {
    let n = s.len();
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone()));
    Tensor::from_storage(storage, n, BackpropOp::none(), false)
}

/// cuDNN's saved batch mean and inverse standard deviation, kept for the backward.
struct Saved {
    mean: CudaSlice<f32>,
    inv_std: CudaSlice<f32>,
    dev: CudaDevice,
}

type SavedCell = Arc<Mutex<Option<Saved>>>;

fn dims4(l: &Layout) -> [usize; 4] {
    let d = l.dims();
    [d[0], d[1], d[2], d[3]]
}

struct BnFwdOp {
    eps: f64,
    saved: SavedCell,
}

impl CustomOp3 for BnFwdOp {
    fn name(&self) -> &'static str {
        "poodle-cudnn-batchnorm"
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
        w: &CudaStorage,
        wl: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let xd = dims4(xl);
        let c = xd[1];
        check_f32_table(op, w, wl, c)?;
        check_f32_table(op, b, bl, c)?;
        let dev = &x.device;
        let dt = cudnn_dtype(op, x.dtype())?;
        let mut y = alloc(dev, x.dtype(), xl.shape().elem_count())?;
        let mut mean = alloc_f32(dev, c)?;
        let mut inv_std = alloc_f32(dev, c)?;
        let xdesc = TensorDesc::nchw(op, dt, xd)?;
        let pdesc = TensorDesc::nchw(op, sys::cudnnDataType_t::CUDNN_DATA_FLOAT, [1, c, 1, 1])?;
        with_ctx(dev, |ctx| {
            let stream = ctx.stream.clone();
            let (xp, _g1) = dptr(op, x, xl, &stream)?;
            let (wp, _g2) = dptr(op, w, wl, &stream)?;
            let (bp, _g3) = dptr(op, b, bl, &stream)?;
            let (yp, _g4) = dptr_mut(op, &mut y, &stream)?;
            let (mp, _g5) = mean.device_ptr_mut(&stream);
            let (ip, _g6) = inv_std.device_ptr_mut(&stream);
            // SAFETY: descriptors match the buffers. The running statistics are passed as
            // null (allowed by cuDNN: both or neither), see the module doc.
            unsafe {
                ck(
                    "cudnnBatchNormalizationForwardTraining",
                    sys::cudnnBatchNormalizationForwardTraining(
                        ctx.handle,
                        sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                        one(),
                        zero(),
                        xdesc.0,
                        xp as _,
                        xdesc.0,
                        yp as _,
                        pdesc.0,
                        wp as _,
                        bp as _,
                        0.0,
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        self.eps,
                        mp as _,
                        ip as _,
                    ),
                )
            }
        })?;
        *self.saved.lock().expect("BatchNorm statistics lock") = Some(Saved {
            mean,
            inv_std,
            dev: dev.clone(),
        });
        Ok((y, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = BnBwdOp {
            eps: self.eps,
            saved: self.saved.clone(),
            grads: Mutex::new(None),
        };
        let dx = x.apply_op3_no_bwd(&dy.contiguous()?, w, &op)?;
        let (dw, db) = op
            .grads
            .lock()
            .expect("BatchNorm gradient lock")
            .take()
            .expect("the CUDA backward stores the parameter gradients");
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `dx` from `(x, dy, weight)`; the scale and shift gradients land in `grads` (cuDNN computes
/// all three in one call, a custom op returns one tensor).
struct BnBwdOp {
    eps: f64,
    saved: SavedCell,
    grads: Mutex<Option<(Tensor, Tensor)>>,
}

impl CustomOp3 for BnBwdOp {
    fn name(&self) -> &'static str {
        "poodle-cudnn-batchnorm-bwd"
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
        dy: &CudaStorage,
        dyl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let xd = dims4(xl);
        let c = xd[1];
        check_f32_table(op, w, wl, c)?;
        if dyl.dims() != xl.dims() || dy.dtype() != x.dtype() {
            return Err(unsupported(op, "gradient shape or dtype differs from the input").into());
        }
        let dev = &x.device;
        let dt = cudnn_dtype(op, x.dtype())?;
        let mut dx = alloc(dev, x.dtype(), xl.shape().elem_count())?;
        let mut dw = alloc_f32(dev, c)?;
        let mut db = alloc_f32(dev, c)?;
        let xdesc = TensorDesc::nchw(op, dt, xd)?;
        let pdesc = TensorDesc::nchw(op, sys::cudnnDataType_t::CUDNN_DATA_FLOAT, [1, c, 1, 1])?;
        let guard = self.saved.lock().expect("BatchNorm statistics lock");
        let saved = guard
            .as_ref()
            .ok_or_else(|| unsupported(op, "backward before a CUDA forward"))?;
        with_ctx(dev, |ctx| {
            let stream = ctx.stream.clone();
            let (xp, _g1) = dptr(op, x, xl, &stream)?;
            let (dyp, _g2) = dptr(op, dy, dyl, &stream)?;
            let (wp, _g3) = dptr(op, w, wl, &stream)?;
            let (dxp, _g4) = dptr_mut(op, &mut dx, &stream)?;
            let (dwp, _g5) = dw.device_ptr_mut(&stream);
            let (dbp, _g6) = db.device_ptr_mut(&stream);
            let (mp, _g7) = saved.mean.device_ptr(&stream);
            let (ip, _g8) = saved.inv_std.device_ptr(&stream);
            // SAFETY: descriptors match the buffers; mean/inv_std come from the forward on
            // this input.
            unsafe {
                ck(
                    "cudnnBatchNormalizationBackward",
                    sys::cudnnBatchNormalizationBackward(
                        ctx.handle,
                        sys::cudnnBatchNormMode_t::CUDNN_BATCHNORM_SPATIAL,
                        one(),
                        zero(),
                        one(),
                        zero(),
                        xdesc.0,
                        xp as _,
                        xdesc.0,
                        dyp as _,
                        xdesc.0,
                        dxp as _,
                        pdesc.0,
                        wp as _,
                        dwp as _,
                        dbp as _,
                        self.eps,
                        mp as _,
                        ip as _,
                    ),
                )
            }
        })?;
        *self.grads.lock().expect("BatchNorm gradient lock") = Some((wrap(dw, dev), wrap(db, dev)));
        Ok((dx, xl.shape().clone()))
    }
}
