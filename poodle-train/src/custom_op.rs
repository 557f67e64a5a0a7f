//! What the CPU sides of the crate's candle custom ops share.

use candle_core::{Layout, Result};

/// The part of a CPU storage's data that a contiguous `layout` covers; an error naming the
/// op (`what`) otherwise.
pub(crate) fn contiguous_slice<'a, T>(v: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}
