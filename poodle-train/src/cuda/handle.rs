//! One cuDNN handle per device (per thread: cuDNN handles are not thread-safe) bound to
//! candle's stream, with the convolution algorithm cache and the one workspace that every
//! call reuses.

use super::{ck, CudaOpError};
use candle_core::cuda_backend::DeviceId;
use candle_core::CudaDevice;
use cudarc::cudnn::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtrMut};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

static TF32: AtomicBool = AtomicBool::new(false);

/// Allow TF32 tensor cores for f32 convolutions (cuDNN) and f32 matmuls (candle's cuBLAS
/// path). Off by default: f32 then means IEEE f32, as on the CPU reference.
pub fn set_tf32(on: bool) {
    TF32.store(on, Ordering::Relaxed);
    candle_core::cuda_backend::set_gemm_reduced_precision_f32(on);
}

pub fn tf32() -> bool {
    TF32.load(Ordering::Relaxed)
}

/// Which convolution pass an algorithm was chosen for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum Pass {
    Forward,
    BackwardData,
    BackwardFilter,
}

/// Everything that decides which algorithm is fastest: cuDNN's benchmark results are only
/// valid for the exact shapes, dtype, geometry and math mode they were measured with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct ConvKey {
    pub pass: Pass,
    pub dtype: sys::cudnnDataType_t,
    pub x: [usize; 4],
    pub w: [usize; 4],
    pub pad: usize,
    pub stride: usize,
    pub dilation: usize,
    pub tf32: bool,
    /// The buffers' common pointer alignment (log2 bytes, at most 8): cuDNN measures with
    /// the real pointers, and a kernel found on 256-byte aligned buffers may need an
    /// alignment that an offset view (`narrow`, `chunk`) lacks. PyTorch keys on it too.
    pub align: u32,
}

/// The alignment class of a call's device pointers, [`ConvKey::align`].
pub(super) fn align_class(ptrs: &[u64]) -> u32 {
    ptrs.iter()
        .map(|p| p.trailing_zeros().min(8))
        .min()
        .unwrap_or(8)
}

/// A chosen algorithm of one of the three passes.
#[derive(Clone, Copy, Debug)]
pub(super) enum AlgoId {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    BackwardData(sys::cudnnConvolutionBwdDataAlgo_t),
    BackwardFilter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// The chosen algorithm, its workspace size and the math type it was measured with.
#[derive(Clone, Copy, Debug)]
pub(super) struct Algo {
    pub id: AlgoId,
    pub workspace: usize,
    pub math: sys::cudnnMathType_t,
}

pub(super) struct Ctx {
    pub handle: sys::cudnnHandle_t,
    pub stream: Arc<CudaStream>,
    pub algos: HashMap<ConvKey, Algo>,
    workspace: Option<CudaSlice<u8>>,
}

impl Ctx {
    fn new(dev: &CudaDevice) -> Result<Self, CudaOpError> {
        let stream = dev.cuda_stream();
        // cuDNN uses the runtime API: the device's primary context must be current here.
        stream.context().bind_to_thread()?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: plain handle creation and binding to candle's live stream.
        unsafe {
            ck("cudnnCreate", sys::cudnnCreate(&mut handle))?;
            ck(
                "cudnnSetStream",
                sys::cudnnSetStream(handle, stream.cu_stream() as sys::cudaStream_t),
            )?;
        }
        Ok(Self {
            handle,
            stream,
            algos: HashMap::new(),
            workspace: None,
        })
    }

    /// The shared workspace, grown (never shrunk) to at least `bytes`; returns its address
    /// and size. Freed and reallocated on candle's stream, so earlier users are ordered
    /// before the free.
    pub fn workspace(&mut self, bytes: usize) -> Result<(u64, usize), CudaOpError> {
        if bytes == 0 {
            return Ok((0, 0));
        }
        let have = self.workspace.as_ref().map_or(0, |w| w.len());
        if have < bytes {
            self.workspace = None;
            self.workspace = Some(self.stream.alloc_zeros::<u8>(bytes)?);
        }
        let ws = self.workspace.as_mut().expect("allocated above");
        let len = ws.len();
        let (p, _guard) = ws.device_ptr_mut(&self.stream);
        Ok((p, len))
    }
}

impl Drop for Ctx {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once. A failure here has nowhere to go.
        unsafe {
            sys::cudnnDestroy(self.handle);
        }
    }
}

thread_local! {
    static CTX: RefCell<HashMap<DeviceId, Ctx>> = RefCell::new(HashMap::new());
}

/// Runs `f` with this thread's cuDNN context for `dev` (created on first use).
pub(super) fn with_ctx<R>(
    dev: &CudaDevice,
    f: impl FnOnce(&mut Ctx) -> Result<R, CudaOpError>,
) -> Result<R, CudaOpError> {
    CTX.with(|map| {
        let mut map = map.borrow_mut();
        let ctx = match map.entry(dev.id()) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => e.insert(Ctx::new(dev)?),
        };
        ctx.stream.context().bind_to_thread()?;
        f(ctx)
    })
}

/// Number of cached convolution algorithms on this thread (all devices): one per shape and
/// pass, so a steady-state training step adds none.
pub fn algo_cache_len() -> usize {
    CTX.with(|m| m.borrow().values().map(|c| c.algos.len()).sum())
}

/// Upper bound for the workspace that the algorithm search may offer cuDNN, in bytes:
/// `POODLE_CUDNN_WORKSPACE_MIB` (default 1024, as a bound on what one fast algorithm may
/// cost; PyTorch lets cuDNN take what is free, which this keeps predictable).
pub(super) fn search_limit() -> usize {
    std::env::var("POODLE_CUDNN_WORKSPACE_MIB")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(1024)
        << 20
}

/// RAII cuDNN descriptors.
pub(super) struct TensorDesc(pub sys::cudnnTensorDescriptor_t);
pub(super) struct FilterDesc(pub sys::cudnnFilterDescriptor_t);
pub(super) struct ConvDesc(pub sys::cudnnConvolutionDescriptor_t);
pub(super) struct PoolDesc(pub sys::cudnnPoolingDescriptor_t);

fn dims_i32(op: &'static str, d: [usize; 4]) -> Result<[i32; 4], CudaOpError> {
    let mut out = [0i32; 4];
    for (o, v) in out.iter_mut().zip(d) {
        *o = i32::try_from(v).map_err(|_| super::unsupported(op, format!("dimension {v}")))?;
    }
    Ok(out)
}

impl TensorDesc {
    /// A packed NCHW tensor.
    pub fn nchw(
        op: &'static str,
        dt: sys::cudnnDataType_t,
        d: [usize; 4],
    ) -> Result<Self, CudaOpError> {
        let [n, c, h, w] = dims_i32(op, d)?;
        let mut desc = std::ptr::null_mut();
        // SAFETY: created, then set; destroyed in Drop.
        unsafe {
            ck(
                "cudnnCreateTensorDescriptor",
                sys::cudnnCreateTensorDescriptor(&mut desc),
            )?;
            let me = Self(desc);
            ck(
                "cudnnSetTensor4dDescriptor",
                sys::cudnnSetTensor4dDescriptor(
                    desc,
                    sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                    dt,
                    n,
                    c,
                    h,
                    w,
                ),
            )?;
            Ok(me)
        }
    }
}

impl Drop for TensorDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateTensorDescriptor, destroyed once.
        unsafe {
            sys::cudnnDestroyTensorDescriptor(self.0);
        }
    }
}

impl FilterDesc {
    pub fn kcrs(
        op: &'static str,
        dt: sys::cudnnDataType_t,
        d: [usize; 4],
    ) -> Result<Self, CudaOpError> {
        let [k, c, r, s] = dims_i32(op, d)?;
        let mut desc = std::ptr::null_mut();
        // SAFETY: as for TensorDesc.
        unsafe {
            ck(
                "cudnnCreateFilterDescriptor",
                sys::cudnnCreateFilterDescriptor(&mut desc),
            )?;
            let me = Self(desc);
            ck(
                "cudnnSetFilter4dDescriptor",
                sys::cudnnSetFilter4dDescriptor(
                    desc,
                    dt,
                    sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW,
                    k,
                    c,
                    r,
                    s,
                ),
            )?;
            Ok(me)
        }
    }
}

impl Drop for FilterDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateFilterDescriptor, destroyed once.
        unsafe {
            sys::cudnnDestroyFilterDescriptor(self.0);
        }
    }
}

impl ConvDesc {
    /// Cross-correlation (PyTorch's convolution), f32 accumulation for every data type (as
    /// PyTorch does for half and bfloat16).
    pub fn new(
        pad: usize,
        stride: usize,
        dilation: usize,
        math: sys::cudnnMathType_t,
    ) -> Result<Self, CudaOpError> {
        let mut desc = std::ptr::null_mut();
        // SAFETY: as for TensorDesc.
        unsafe {
            ck(
                "cudnnCreateConvolutionDescriptor",
                sys::cudnnCreateConvolutionDescriptor(&mut desc),
            )?;
            let me = Self(desc);
            ck(
                "cudnnSetConvolution2dDescriptor",
                sys::cudnnSetConvolution2dDescriptor(
                    desc,
                    pad as i32,
                    pad as i32,
                    stride as i32,
                    stride as i32,
                    dilation as i32,
                    dilation as i32,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
            )?;
            ck(
                "cudnnSetConvolutionMathType",
                sys::cudnnSetConvolutionMathType(desc, math),
            )?;
            Ok(me)
        }
    }

    pub fn set_math(&self, math: sys::cudnnMathType_t) -> Result<(), CudaOpError> {
        // SAFETY: live descriptor.
        unsafe {
            ck(
                "cudnnSetConvolutionMathType",
                sys::cudnnSetConvolutionMathType(self.0, math),
            )
        }
    }
}

impl Drop for ConvDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreateConvolutionDescriptor, destroyed once.
        unsafe {
            sys::cudnnDestroyConvolutionDescriptor(self.0);
        }
    }
}

impl PoolDesc {
    /// Max pooling, `k x k` window, symmetric padding, NaN propagated (as PyTorch).
    /// The deterministic mode sends each window's gradient to one element.
    pub fn max(k: usize, pad: usize, stride: usize) -> Result<Self, CudaOpError> {
        let mut desc = std::ptr::null_mut();
        // SAFETY: as for TensorDesc.
        unsafe {
            ck(
                "cudnnCreatePoolingDescriptor",
                sys::cudnnCreatePoolingDescriptor(&mut desc),
            )?;
            let me = Self(desc);
            ck(
                "cudnnSetPooling2dDescriptor",
                sys::cudnnSetPooling2dDescriptor(
                    desc,
                    sys::cudnnPoolingMode_t::CUDNN_POOLING_MAX_DETERMINISTIC,
                    sys::cudnnNanPropagation_t::CUDNN_PROPAGATE_NAN,
                    k as i32,
                    k as i32,
                    pad as i32,
                    pad as i32,
                    stride as i32,
                    stride as i32,
                ),
            )?;
            Ok(me)
        }
    }
}

impl Drop for PoolDesc {
    fn drop(&mut self) {
        // SAFETY: created by cudnnCreatePoolingDescriptor, destroyed once.
        unsafe {
            sys::cudnnDestroyPoolingDescriptor(self.0);
        }
    }
}
