//! cuDNN 2-D convolution: forward, data gradient and filter gradient, each with its
//! algorithm measured once per shape (cuDNN's `Find...Ex`, PyTorch's benchmark mode) and
//! cached, and the context's shared workspace.

use super::handle::{
    align_class, search_limit, tf32, with_ctx, Algo, AlgoId, ConvDesc, ConvKey, Ctx, FilterDesc,
    Pass, TensorDesc,
};
use super::{
    alloc, ck, cpu_refused, cudnn_dtype, dptr, dptr_mut, one, unsupported, zero, CudaOpError,
};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};
use cudarc::cudnn::sys;

/// Padding, stride and dilation (equal on both axes), as `layers::Conv2d` has them.
#[derive(Clone, Copy, Debug)]
struct Geom {
    pad: usize,
    stride: usize,
    dilation: usize,
}

/// `x (N, C, H, W)` convolved with `w (K, C, R, S)`: cross-correlation with PyTorch's
/// semantics (no bias; the caller adds it), differentiable in `x` and `w`.
pub fn conv2d(
    x: &Tensor,
    w: &Tensor,
    pad: usize,
    stride: usize,
    dilation: usize,
) -> Result<Tensor> {
    let geom = Geom {
        pad,
        stride,
        dilation,
    };
    x.contiguous()?
        .apply_op2(&w.contiguous()?, Conv2dOp { geom })
}

fn dims4(op: &'static str, l: &Layout) -> std::result::Result<[usize; 4], CudaOpError> {
    match l.dims() {
        &[a, b, c, d] => Ok([a, b, c, d]),
        d => Err(unsupported(
            op,
            format!("expected an NCHW tensor, got shape {d:?}"),
        )),
    }
}

fn out_dims(
    op: &'static str,
    x: [usize; 4],
    w: [usize; 4],
    g: Geom,
) -> std::result::Result<[usize; 4], CudaOpError> {
    if x[1] != w[1] {
        return Err(unsupported(
            op,
            format!("input has {} channels, filter {}", x[1], w[1]),
        ));
    }
    let axis = |len: usize, k: usize| {
        let eff = g.dilation * (k - 1) + 1;
        (len + 2 * g.pad >= eff).then(|| (len + 2 * g.pad - eff) / g.stride + 1)
    };
    match (axis(x[2], w[2]), axis(x[3], w[3])) {
        (Some(h), Some(wd)) => Ok([x[0], w[0], h, wd]),
        _ => Err(unsupported(
            op,
            format!("input {x:?} smaller than filter {w:?}"),
        )),
    }
}

/// Math mode offered to cuDNN: strict FMA for f32 unless TF32 is allowed (then cuDNN's
/// default, which permits TF32 on Ampere and later), tensor cores for 16-bit types.
/// The same choices as PyTorch's `allow_tf32` switch.
fn math_for(dt: sys::cudnnDataType_t) -> sys::cudnnMathType_t {
    match dt {
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT if tf32() => {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        }
        sys::cudnnDataType_t::CUDNN_DATA_FLOAT => sys::cudnnMathType_t::CUDNN_FMA_MATH,
        _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
    }
}

/// The math type to run a measured result with: under strict f32 the search only offered
/// FMA kernels, but cuDNN may label them with its default math, which would allow TF32 at
/// execution; PyTorch overrides it the same way.
fn exec_math(dt: sys::cudnnDataType_t, measured: sys::cudnnMathType_t) -> sys::cudnnMathType_t {
    if dt == sys::cudnnDataType_t::CUDNN_DATA_FLOAT && !tf32() {
        sys::cudnnMathType_t::CUDNN_FMA_MATH
    } else {
        measured
    }
}

/// A temporary workspace for the algorithm search: as large as allowed, smaller if the
/// device is short of memory (cuDNN then skips the algorithms that need more).
fn search_workspace(
    ctx: &Ctx,
) -> std::result::Result<Option<cudarc::driver::CudaSlice<u8>>, CudaOpError> {
    let mut bytes = search_limit();
    while bytes >= 1 << 20 {
        // SAFETY: scratch memory, only written by cuDNN.
        if let Ok(ws) = unsafe { ctx.stream.alloc::<u8>(bytes) } {
            return Ok(Some(ws));
        }
        bytes /= 4;
    }
    Ok(None)
}

const MAX_ALGOS: usize = 8;

/// Picks the fastest successful result that fits the search workspace; results come sorted
/// by time. Under strict f32 a result measured with FMA math comes first: the run forces FMA
/// math ([`exec_math`]), and a result measured with another math type may be neither the
/// fastest FMA kernel nor need the same workspace (PyTorch asserts FMA results instead).
fn pick<T: Copy>(
    op: &'static str,
    dt: sys::cudnnDataType_t,
    results: &[T],
    limit: usize,
    fields: impl Fn(&T) -> (sys::cudnnStatus_t, usize, sys::cudnnMathType_t, AlgoId),
) -> std::result::Result<Algo, CudaOpError> {
    let strict = dt == sys::cudnnDataType_t::CUDNN_DATA_FLOAT && !tf32();
    let fits: Vec<_> = results
        .iter()
        .map(fields)
        .filter(|(status, mem, _, _)| {
            *status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS && *mem <= limit
        })
        .collect();
    let fma = |r: &&(_, _, sys::cudnnMathType_t, _)| r.2 == sys::cudnnMathType_t::CUDNN_FMA_MATH;
    fits.iter()
        .find(|r| !strict || fma(r))
        .or(fits.first())
        .map(|&(_, workspace, math, id)| Algo {
            id,
            workspace,
            math: exec_math(dt, math),
        })
        .ok_or(CudaOpError::NoAlgorithm { op, limit })
}

/// The two buffers of one cuDNN call share the descriptors' dtype (a mismatch would make
/// cuDNN read the wrong number of bytes).
fn same_dtype(op: &'static str, a: &CudaStorage, b: &CudaStorage) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(unsupported(op, format!("dtypes {:?} and {:?}", a.dtype(), b.dtype())).into());
    }
    Ok(())
}

/// Everything one convolution call needs: descriptors for x, w, y (packed NCHW) and the
/// convolution, plus the cache key.
struct Call {
    dt: sys::cudnnDataType_t,
    x: TensorDesc,
    w: FilterDesc,
    y: TensorDesc,
    conv: ConvDesc,
    key: ConvKey,
}

impl Call {
    /// The algorithm cached for this call's shapes, or else the fastest one `find` measures
    /// (cuDNN's benchmark mode, once per shape) in a temporary search workspace, then cached.
    /// `find(handle, workspace, bytes, results, count)` runs one `cudnnFind*AlgorithmEx` into
    /// MAX_ALGOS result slots; `fields` reads a result.
    fn algo<T: Copy>(
        &self,
        op: &'static str,
        ctx: &mut Ctx,
        ptrs: [u64; 3],
        find: impl FnOnce(
            sys::cudnnHandle_t,
            u64,
            usize,
            *mut T,
            &mut i32,
        ) -> std::result::Result<(), CudaOpError>,
        fields: impl Fn(&T) -> (sys::cudnnStatus_t, usize, sys::cudnnMathType_t, AlgoId),
    ) -> std::result::Result<Algo, CudaOpError> {
        let key = ConvKey {
            align: align_class(&ptrs),
            ..self.key.clone()
        };
        if let Some(a) = ctx.algos.get(&key) {
            return Ok(*a);
        }
        let ws = search_workspace(ctx)?;
        let (wsp, limit) = ws_ptr(&ws, &ctx.stream);
        let mut res = Vec::<T>::with_capacity(MAX_ALGOS);
        let mut n = 0;
        find(ctx.handle, wsp, limit, res.as_mut_ptr(), &mut n)?;
        // SAFETY: cuDNN filled the first n <= MAX_ALGOS slots.
        unsafe { res.set_len(n as usize) };
        let mut a = pick(op, self.dt, &res, limit, fields)?;
        // The workspace the algorithm needs under the math type it will run with, which may
        // differ from the measured one (the measured size alone failed elsewhere:
        // sony/nnabla-ext-cuda#118).
        self.conv.set_math(a.math)?;
        a.workspace = a.workspace.max(self.workspace_size(ctx.handle, a.id)?);
        ctx.algos.insert(key, a);
        Ok(a)
    }

    /// cuDNN's workspace size for running `id` on this call's descriptors.
    fn workspace_size(
        &self,
        handle: sys::cudnnHandle_t,
        id: AlgoId,
    ) -> std::result::Result<usize, CudaOpError> {
        let mut bytes = 0usize;
        // SAFETY: live descriptors of this call; `bytes` outlives the calls.
        unsafe {
            match id {
                AlgoId::Forward(a) => ck(
                    "cudnnGetConvolutionForwardWorkspaceSize",
                    sys::cudnnGetConvolutionForwardWorkspaceSize(
                        handle,
                        self.x.0,
                        self.w.0,
                        self.conv.0,
                        self.y.0,
                        a,
                        &mut bytes,
                    ),
                ),
                AlgoId::BackwardData(a) => ck(
                    "cudnnGetConvolutionBackwardDataWorkspaceSize",
                    sys::cudnnGetConvolutionBackwardDataWorkspaceSize(
                        handle,
                        self.w.0,
                        self.y.0,
                        self.conv.0,
                        self.x.0,
                        a,
                        &mut bytes,
                    ),
                ),
                AlgoId::BackwardFilter(a) => ck(
                    "cudnnGetConvolutionBackwardFilterWorkspaceSize",
                    sys::cudnnGetConvolutionBackwardFilterWorkspaceSize(
                        handle,
                        self.x.0,
                        self.y.0,
                        self.conv.0,
                        self.w.0,
                        a,
                        &mut bytes,
                    ),
                ),
            }?;
        }
        Ok(bytes)
    }

    fn new(
        op: &'static str,
        pass: Pass,
        dtype: candle_core::DType,
        xd: [usize; 4],
        wd: [usize; 4],
        g: Geom,
    ) -> std::result::Result<Self, CudaOpError> {
        let dt = cudnn_dtype(op, dtype)?;
        let yd = out_dims(op, xd, wd, g)?;
        Ok(Self {
            dt,
            x: TensorDesc::nchw(op, dt, xd)?,
            w: FilterDesc::kcrs(op, dt, wd)?,
            y: TensorDesc::nchw(op, dt, yd)?,
            conv: ConvDesc::new(g.pad, g.stride, g.dilation, math_for(dt))?,
            key: ConvKey {
                pass,
                dtype: dt,
                x: xd,
                w: wd,
                pad: g.pad,
                stride: g.stride,
                dilation: g.dilation,
                tf32: tf32(),
                // Set from the pointers at the call (`Call::algo`).
                align: 8,
            },
        })
    }
}

struct Conv2dOp {
    geom: Geom,
}

impl CustomOp2 for Conv2dOp {
    fn name(&self) -> &'static str {
        "poodle-cudnn-conv2d"
    }

    fn cpu_fwd(
        &self,
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
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        let (xd, wd) = (dims4(op, xl)?, dims4(op, wl)?);
        same_dtype(op, x, w)?;
        let yd = out_dims(op, xd, wd, self.geom)?;
        let mut y = alloc(&x.device, x.dtype(), yd.iter().product())?;
        let c = Call::new(op, Pass::Forward, x.dtype(), xd, wd, self.geom)?;
        with_ctx(&x.device, |ctx| {
            let stream = ctx.stream.clone();
            let (xp, _gx) = dptr(op, x, xl, &stream)?;
            let (wp, _gw) = dptr(op, w, wl, &stream)?;
            let (yp, _gy) = dptr_mut(op, &mut y, &stream)?;
            let algo = c.algo(
                op,
                ctx,
                [xp, wp, yp],
                |handle, wsp, limit, res, n| {
                    // SAFETY: descriptors match the buffers; `res` has MAX_ALGOS slots.
                    unsafe {
                        ck(
                            "cudnnFindConvolutionForwardAlgorithmEx",
                            sys::cudnnFindConvolutionForwardAlgorithmEx(
                                handle,
                                c.x.0,
                                xp as _,
                                c.w.0,
                                wp as _,
                                c.conv.0,
                                c.y.0,
                                yp as _,
                                MAX_ALGOS as i32,
                                n,
                                res,
                                wsp as _,
                                limit,
                            ),
                        )
                    }
                },
                |r: &sys::cudnnConvolutionFwdAlgoPerf_t| {
                    (r.status, r.memory, r.mathType, AlgoId::Forward(r.algo))
                },
            )?;
            let AlgoId::Forward(id) = algo.id else {
                unreachable!("forward key holds a forward algorithm")
            };
            c.conv.set_math(algo.math)?;
            let (wsp, wsl) = ctx.workspace(algo.workspace)?;
            // SAFETY: as above; the workspace holds at least `algo.workspace` bytes.
            unsafe {
                ck(
                    "cudnnConvolutionForward",
                    sys::cudnnConvolutionForward(
                        ctx.handle,
                        one(),
                        c.x.0,
                        xp as _,
                        c.w.0,
                        wp as _,
                        c.conv.0,
                        id,
                        wsp as _,
                        wsl,
                        zero(),
                        c.y.0,
                        yp as _,
                    ),
                )
            }
        })?;
        Ok((y, Shape::from(yd.to_vec())))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        if dy.dtype() != x.dtype() {
            return Err(unsupported(
                self.name(),
                format!("gradient {:?} for input {:?}", dy.dtype(), x.dtype()),
            )
            .into());
        }
        let (xd, wd) = (x.dims4()?, w.dims4()?);
        // Only what the graph needs: the stem's input is the image, whose gradient (a 7x7
        // backward-data pass at full resolution) nobody reads.
        let (geom, x_dims, w_dims) = (
            self.geom,
            [xd.0, xd.1, xd.2, xd.3],
            [wd.0, wd.1, wd.2, wd.3],
        );
        let dx = (x.track_op())
            .then(|| dy.apply_op2_no_bwd(w, &ConvBwdDataOp { geom, x: x_dims }))
            .transpose()?;
        let dw = (w.track_op())
            .then(|| x.apply_op2_no_bwd(&dy, &ConvBwdFilterOp { geom, w: w_dims }))
            .transpose()?;
        Ok((dx, dw))
    }
}

/// The workspace pointer and size of an optional scratch buffer.
fn ws_ptr(
    ws: &Option<cudarc::driver::CudaSlice<u8>>,
    stream: &cudarc::driver::CudaStream,
) -> (u64, usize) {
    use cudarc::driver::DevicePtr;
    match ws {
        Some(w) => (w.device_ptr(stream).0, w.len()),
        None => (0, 0),
    }
}

/// `dx` from `(dy, w)`: the input gradient (cuDNN's backward data).
struct ConvBwdDataOp {
    geom: Geom,
    x: [usize; 4],
}

impl CustomOp2 for ConvBwdDataOp {
    fn name(&self) -> &'static str {
        "poodle-cudnn-conv2d-bwd-data"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Err(cpu_refused(self.name()))
    }

    fn cuda_fwd(
        &self,
        dy: &CudaStorage,
        dyl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        same_dtype(op, dy, w)?;
        let wd = dims4(op, wl)?;
        let c = Call::new(op, Pass::BackwardData, dy.dtype(), self.x, wd, self.geom)?;
        if dims4(op, dyl)? != out_dims(op, self.x, wd, self.geom)? {
            return Err(unsupported(op, format!("gradient shape {:?}", dyl.dims())).into());
        }
        let mut dx = alloc(&dy.device, dy.dtype(), self.x.iter().product())?;
        with_ctx(&dy.device, |ctx| {
            let stream = ctx.stream.clone();
            let (dyp, _g1) = dptr(op, dy, dyl, &stream)?;
            let (wp, _g2) = dptr(op, w, wl, &stream)?;
            let (dxp, _g3) = dptr_mut(op, &mut dx, &stream)?;
            let algo = c.algo(
                op,
                ctx,
                [dyp, wp, dxp],
                |handle, wsp, limit, res, n| {
                    // SAFETY: as for the forward search.
                    unsafe {
                        ck(
                            "cudnnFindConvolutionBackwardDataAlgorithmEx",
                            sys::cudnnFindConvolutionBackwardDataAlgorithmEx(
                                handle,
                                c.w.0,
                                wp as _,
                                c.y.0,
                                dyp as _,
                                c.conv.0,
                                c.x.0,
                                dxp as _,
                                MAX_ALGOS as i32,
                                n,
                                res,
                                wsp as _,
                                limit,
                            ),
                        )
                    }
                },
                |r: &sys::cudnnConvolutionBwdDataAlgoPerf_t| {
                    (r.status, r.memory, r.mathType, AlgoId::BackwardData(r.algo))
                },
            )?;
            let AlgoId::BackwardData(id) = algo.id else {
                unreachable!("backward-data key holds a backward-data algorithm")
            };
            c.conv.set_math(algo.math)?;
            let (wsp, wsl) = ctx.workspace(algo.workspace)?;
            // SAFETY: as for the forward call.
            unsafe {
                ck(
                    "cudnnConvolutionBackwardData",
                    sys::cudnnConvolutionBackwardData(
                        ctx.handle,
                        one(),
                        c.w.0,
                        wp as _,
                        c.y.0,
                        dyp as _,
                        c.conv.0,
                        id,
                        wsp as _,
                        wsl,
                        zero(),
                        c.x.0,
                        dxp as _,
                    ),
                )
            }
        })?;
        Ok((dx, Shape::from(self.x.to_vec())))
    }
}

/// `dw` from `(x, dy)`: the filter gradient (cuDNN's backward filter).
struct ConvBwdFilterOp {
    geom: Geom,
    w: [usize; 4],
}

impl CustomOp2 for ConvBwdFilterOp {
    fn name(&self) -> &'static str {
        "poodle-cudnn-conv2d-bwd-filter"
    }

    fn cpu_fwd(
        &self,
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
    ) -> Result<(CudaStorage, Shape)> {
        let op = self.name();
        same_dtype(op, x, dy)?;
        let xd = dims4(op, xl)?;
        let c = Call::new(op, Pass::BackwardFilter, x.dtype(), xd, self.w, self.geom)?;
        if dims4(op, dyl)? != out_dims(op, xd, self.w, self.geom)? {
            return Err(unsupported(op, format!("gradient shape {:?}", dyl.dims())).into());
        }
        let mut dw = alloc(&x.device, x.dtype(), self.w.iter().product())?;
        with_ctx(&x.device, |ctx| {
            let stream = ctx.stream.clone();
            let (xp, _g1) = dptr(op, x, xl, &stream)?;
            let (dyp, _g2) = dptr(op, dy, dyl, &stream)?;
            let (dwp, _g3) = dptr_mut(op, &mut dw, &stream)?;
            let algo = c.algo(
                op,
                ctx,
                [xp, dyp, dwp],
                |handle, wsp, limit, res, n| {
                    // SAFETY: as for the forward search.
                    unsafe {
                        ck(
                            "cudnnFindConvolutionBackwardFilterAlgorithmEx",
                            sys::cudnnFindConvolutionBackwardFilterAlgorithmEx(
                                handle,
                                c.x.0,
                                xp as _,
                                c.y.0,
                                dyp as _,
                                c.conv.0,
                                c.w.0,
                                dwp as _,
                                MAX_ALGOS as i32,
                                n,
                                res,
                                wsp as _,
                                limit,
                            ),
                        )
                    }
                },
                |r: &sys::cudnnConvolutionBwdFilterAlgoPerf_t| {
                    (
                        r.status,
                        r.memory,
                        r.mathType,
                        AlgoId::BackwardFilter(r.algo),
                    )
                },
            )?;
            let AlgoId::BackwardFilter(id) = algo.id else {
                unreachable!("backward-filter key holds a backward-filter algorithm")
            };
            c.conv.set_math(algo.math)?;
            let (wsp, wsl) = ctx.workspace(algo.workspace)?;
            // SAFETY: as for the forward call.
            unsafe {
                ck(
                    "cudnnConvolutionBackwardFilter",
                    sys::cudnnConvolutionBackwardFilter(
                        ctx.handle,
                        one(),
                        c.x.0,
                        xp as _,
                        c.y.0,
                        dyp as _,
                        c.conv.0,
                        id,
                        wsp as _,
                        wsl,
                        zero(),
                        c.w.0,
                        dwp as _,
                    ),
                )
            }
        })?;
        Ok((dw, Shape::from(self.w.to_vec())))
    }
}
