//! cuDNN training ops as candle custom ops (feature `cuda`): 2-D convolution with its data
//! and filter gradients, training-mode BatchNorm forward/backward, and ResNet's 3x3
//! stride-2 max-pool with its backward.
//!
//! Why: candle 0.11's own CUDA convolution backward is 8-17x slower than PyTorch on a
//! ResNet-50 and has no max-pool backward (measurements in ../shared/GPU.md). These ops call
//! cuDNN through cudarc's `cudnn::result`/`sys` layers (the safe wrappers keep their
//! handles private, so they cannot share one handle, workspace and algorithm cache).
//!
//! `model::layers` dispatches CUDA tensors here and keeps its candle code as the CPU
//! reference; the custom ops' `cpu_fwd` therefore refuses CPU tensors instead of
//! duplicating it. Layout: NCHW, contiguous (inputs are made contiguous by the wrappers).

mod batchnorm;
mod conv;
mod handle;
pub mod kernels;
mod pool;

pub use batchnorm::{batch_norm_train, BatchStats};
pub use conv::conv2d;
pub use handle::{algo_cache_len, set_tf32, tf32};
pub use pool::max_pool_3x3_s2;

use candle_core::backend::BackendStorage;
use candle_core::{CudaStorage, DType, Layout};
use cudarc::cudnn::sys;
use cudarc::driver::{CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

/// What went wrong in a cuDNN op; turned into a candle error at the op boundary.
#[derive(Debug, thiserror::Error)]
pub enum CudaOpError {
    #[error("cuDNN {call} failed: {status:?}")]
    Cudnn {
        call: &'static str,
        status: sys::cudnnStatus_t,
    },
    #[error("CUDA driver: {0}")]
    Driver(#[from] cudarc::driver::DriverError),
    #[error("{op}: {what}")]
    Unsupported { op: &'static str, what: String },
    #[error("{op}: no cuDNN algorithm ran within a workspace of {limit} bytes")]
    NoAlgorithm { op: &'static str, limit: usize },
}

impl From<CudaOpError> for candle_core::Error {
    fn from(e: CudaOpError) -> Self {
        candle_core::Error::wrap(e)
    }
}

/// A cuDNN status as a `Result`, naming the call for the error message.
fn ck(call: &'static str, status: sys::cudnnStatus_t) -> Result<(), CudaOpError> {
    match status {
        sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS => Ok(()),
        status => Err(CudaOpError::Cudnn { call, status }),
    }
}

fn unsupported(op: &'static str, what: impl Into<String>) -> CudaOpError {
    CudaOpError::Unsupported {
        op,
        what: what.into(),
    }
}

/// The error of a custom op's `cpu_fwd`: CPU tensors never reach these ops.
fn cpu_refused(op: &'static str) -> candle_core::Error {
    unsupported(
        op,
        "CPU tensor: model::layers keeps the candle reference path for the CPU",
    )
    .into()
}

/// cuDNN's name for a candle dtype (float types only).
fn cudnn_dtype(op: &'static str, dt: DType) -> Result<sys::cudnnDataType_t, CudaOpError> {
    match dt {
        DType::F32 => Ok(sys::cudnnDataType_t::CUDNN_DATA_FLOAT),
        DType::BF16 => Ok(sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16),
        DType::F16 => Ok(sys::cudnnDataType_t::CUDNN_DATA_HALF),
        other => Err(unsupported(op, format!("dtype {other:?}"))),
    }
}

/// A per-channel f32 parameter or table of `len` values (BatchNorm's scale and shift, the
/// synchronised BatchNorm kernels' coefficients), or the error saying what came instead.
fn check_f32_table(
    op: &'static str,
    s: &CudaStorage,
    l: &Layout,
    len: usize,
) -> Result<(), CudaOpError> {
    if s.dtype() != DType::F32 || l.shape().elem_count() != len {
        let what = format!(
            "f32 of {len} values expected, got {:?} {:?}",
            s.dtype(),
            l.dims()
        );
        return Err(unsupported(op, what));
    }
    Ok(())
}

/// Device address of the first element of a contiguous tensor, with cudarc's event guard
/// (it records the use on `stream` when dropped, so keep it alive across the cuDNN call).
fn dptr<'a>(
    op: &'static str,
    s: &'a CudaStorage,
    l: &Layout,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>), CudaOpError> {
    use candle_core::cuda_backend::CudaStorageSlice as S;
    if !l.is_contiguous() {
        return Err(unsupported(op, "non-contiguous input"));
    }
    let off = l.start_offset();
    let (base, guard, size) = match &s.slice {
        S::F32(v) => {
            let (p, g) = v.device_ptr(stream);
            (p, g, 4)
        }
        S::BF16(v) => {
            let (p, g) = v.device_ptr(stream);
            (p, g, 2)
        }
        S::F16(v) => {
            let (p, g) = v.device_ptr(stream);
            (p, g, 2)
        }
        _ => return Err(unsupported(op, format!("dtype {:?}", s.dtype()))),
    };
    Ok((base + (off * size) as u64, guard))
}

/// Device address of a freshly allocated (whole) output storage.
fn dptr_mut<'a>(
    op: &'static str,
    s: &'a mut CudaStorage,
    stream: &'a CudaStream,
) -> Result<(u64, SyncOnDrop<'a>), CudaOpError> {
    use candle_core::cuda_backend::CudaStorageSlice as S;
    let dt = s.dtype();
    Ok(match &mut s.slice {
        S::F32(v) => v.device_ptr_mut(stream),
        S::BF16(v) => v.device_ptr_mut(stream),
        S::F16(v) => v.device_ptr_mut(stream),
        _ => return Err(unsupported(op, format!("dtype {dt:?}"))),
    })
}

/// An uninitialised output of `n` elements (every op here writes all of it).
fn alloc(dev: &candle_core::CudaDevice, dt: DType, n: usize) -> candle_core::Result<CudaStorage> {
    use candle_core::backend::BackendDevice;
    // SAFETY: the cuDNN call that follows overwrites every element before anyone reads it.
    unsafe { dev.alloc_uninit(&candle_core::Shape::from(n), dt) }
}

/// An f32 vector of `n` elements on `dev`, owned by cudarc (saved BatchNorm statistics).
fn alloc_f32(
    dev: &candle_core::CudaDevice,
    n: usize,
) -> candle_core::Result<cudarc::driver::CudaSlice<f32>> {
    // SAFETY: written by cuDNN before being read.
    unsafe { dev.alloc::<f32>(n) }
}

/// cuDNN's scaling factors (alpha = 1, beta = 0: overwrite the output); f32 for every data
/// type used here.
const ONE: f32 = 1.0;
const ZERO: f32 = 0.0;

fn one() -> *const std::ffi::c_void {
    &ONE as *const f32 as *const std::ffi::c_void
}

fn zero() -> *const std::ffi::c_void {
    &ZERO as *const f32 as *const std::ffi::c_void
}

/// Reads (`set = None`) or writes a `u64` attribute of the device's default memory pool, the
/// one cudarc's stream-ordered allocations come from; returns the value read (or `set`).
pub fn pool_attr(
    dev: &candle_core::Device,
    attr: cudarc::driver::sys::CUmemPool_attribute,
    set: Option<u64>,
) -> candle_core::Result<u64> {
    use cudarc::driver::sys;
    let candle_core::Device::Cuda(d) = dev else {
        candle_core::bail!("memory pool attribute of a non-CUDA device");
    };
    let stream = d.cuda_stream();
    let ctx = stream.context();
    ctx.bind_to_thread().map_err(CudaOpError::from)?;
    let mut pool = std::ptr::null_mut();
    let mut value = set.unwrap_or(0);
    // SAFETY: the device handle comes from candle's live context; `value` outlives the calls.
    let r = unsafe {
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        if r != sys::CUresult::CUDA_SUCCESS {
            r
        } else if set.is_some() {
            sys::cuMemPoolSetAttribute(pool, attr, &mut value as *mut u64 as *mut _)
        } else {
            sys::cuMemPoolGetAttribute(pool, attr, &mut value as *mut u64 as *mut _)
        }
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        return Err(CudaOpError::from(cudarc::driver::DriverError(r)).into());
    }
    Ok(value)
}

/// Keeps freed memory in the pool instead of returning it to the driver at every
/// synchronisation (the default release threshold is 0), as PyTorch's caching allocator
/// does: a training step reallocates the same sizes every time.
pub fn keep_pool_memory(dev: &candle_core::Device) -> candle_core::Result<()> {
    pool_attr(
        dev,
        cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
        Some(u64::MAX),
    )
    .map(|_| ())
}
