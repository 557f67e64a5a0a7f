//! Time and peak memory of one dense-loss call, forward and backward, in the fused form
//! (`loss::fused`: no crop-resolution maps) or the composed one (aligned `(N, C, H, W)` maps,
//! then the normalised difference), on the CPU:
//!
//!     cargo run --release -p poodle-train --example dense_loss_memory -- FORM [N C H W ITERS]
//!
//! FORM is `fused`, `composed` or `plans` (only building the call's sampling plans and mask
//! from the affines and the flow: the host work of a call on the GPU); defaults 2 256 256 512 2 (two samples of the paper's 256
//! channels at half the paper's crop). Maps are stride 8; the target order is the authors';
//! views are rotated, zoomed and flipped, the flow random. Prints seconds per call, the loss
//! and the process's peak resident memory (VmHWM). Run each form in its own process to
//! compare peaks (bench/README.md).

use candle_core::{DType, Device, Tensor, Var};
use poodle_train::geom::Affine;
use poodle_train::loss::dense::{
    dense_loss, dense_loss_composed, Correspondence, DensePlans, TargetOrder,
};
use std::time::Instant;

fn peak_rss_mib() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Deterministic values in [-1, 1) (a hash of the index and seed), so every process sees the
/// same inputs.
fn values(shape: &[usize], seed: u64, dev: &Device) -> candle_core::Result<Tensor> {
    let len: usize = shape.iter().product();
    let v: Vec<f32> = (0..len as u64)
        .map(|i| {
            let mut x = (i ^ (seed << 40)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x ^= x >> 31;
            x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x ^= x >> 29;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, dev)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let form = args.first().map(String::as_str).unwrap_or("fused");
    anyhow::ensure!(
        matches!(form, "fused" | "composed" | "plans"),
        "FORM must be fused, composed or plans, got {form}"
    );
    let num = |i: usize, d: usize| -> anyhow::Result<usize> {
        Ok(args.get(i).map_or(Ok(d), |s| s.parse())?)
    };
    let (n, c, h, w, iters) = (
        num(1, 2)?,
        num(2, 256)?,
        num(3, 256)?,
        num(4, 512)?,
        num(5, 2)?,
    );
    let dev = Device::Cpu;
    let aff =
        |i: usize, s: f64| Affine::about_centre(w, h, s * 8.0, 0.9 + 0.1 * i as f64, i % 2 == 1);
    let a_online: Vec<Affine> = (0..n).map(|i| aff(i, 1.0)).collect();
    let a_target: Vec<Affine> = (0..n).map(|i| aff(i + 1, -1.0)).collect();
    let flow = (values(&[n, 2, h, w], 1, &dev)? * 4.0)?;
    let occluded = values(&[n, 1, h, w], 2, &dev)?
        .ge(0.7)?
        .to_dtype(DType::F32)?;
    let corr = Correspondence::new(
        &a_online,
        &a_target,
        &flow,
        &occluded,
        (h, w),
        TargetOrder::Authors,
    );
    let o = Var::from_tensor(&values(&[n, c, h / 8, w / 8], 3, &dev)?)?;
    let t = values(&[n, c, h / 8, w / 8], 4, &dev)?;
    let mut loss = f32::NAN;
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        if form == "plans" {
            let p = DensePlans::new(o.as_tensor(), &t, &corr)?;
            loss = p.stats().mask_fraction;
            continue;
        }
        let (l, _) = if form == "fused" {
            dense_loss(o.as_tensor(), &t, &corr)?
        } else {
            dense_loss_composed(o.as_tensor(), &t, &corr, false)?
        };
        loss = l.to_scalar::<f32>()?;
        std::hint::black_box(l.backward()?);
    }
    let secs = start.elapsed().as_secs_f64() / iters.max(1) as f64;
    println!(
        "{{\"form\": \"{form}\", \"n\": {n}, \"c\": {c}, \"crop\": [{h}, {w}], \"s_per_call\": {secs:.3}, \
         \"loss\": {loss:.6}, \"peak_rss_mib\": {:.1}}}",
        peak_rss_mib().unwrap_or(f64::NAN)
    );
    Ok(())
}
