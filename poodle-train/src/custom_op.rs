//! What the CPU sides of the crate's candle custom ops share.

use candle_core::{CpuStorage, Layout, Result};

/// The part of a CPU storage's data that a contiguous `layout` covers; an error naming the
/// op (`what`) otherwise.
pub(crate) fn contiguous_slice<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

/// The contiguous part of a CPU f32 input; an error naming the op otherwise.
pub(crate) fn f32_part<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        use candle_core::backend::BackendStorage;
        candle_core::bail!("{op}: f32 on the CPU, got {:?}", s.dtype());
    };
    contiguous_slice(v, l, op)
}
