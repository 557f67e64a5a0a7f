//! The CUDA kernels of src/cuda/kernels.cu run on the CPU: the host emulation in
//! tests/cuda_emulation compiles the kernel text itself with the system's C++ compiler, runs
//! each block's threads as fibers (barriers, warp shuffles, random thread speeds) and
//! compares every output with double-precision references: synchronised BatchNorm's kernels
//! (sync_bn.cuh, `sync_bn_harness.cpp`), the dense loss's (tap formation, gather/scatter,
//! normalised difference, the fused compare; `dense_harness.cpp`), and the elementwise ones
//! (ReLU, relu.cuh; AdamW and the EMA, optim.cuh; `elementwise_harness.cpp`, against PyTorch's
//! rules). CI has no GPU, so this is
//! where the kernels' indexing, reductions and rounding are checked on every run;
//! `gpu-check` checks them on a GPU.

mod common;

use std::process::Command;

/// The harness `name` (tests/cuda_emulation/`name`.cpp), compiled into `dir`; `None` (skip;
/// a failure under `CI=true`) without a C++ compiler.
fn build_harness(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
    let here = common::repo().join("poodle-train");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let bin = dir.join(name);
    let out = Command::new(&cxx)
        .args(["-O1", "-std=c++20", "-ffp-contract=off", "-I"])
        .arg(here.join("src/cuda"))
        .arg("-o")
        .arg(&bin)
        .arg(here.join(format!("tests/cuda_emulation/{name}.cpp")))
        .output();
    match out {
        Err(e) => {
            poodle_common::testenv::missing(&format!("a C++ compiler ({cxx}: {e}; set CXX)"));
            None
        }
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(o.status.success(), "{cxx} failed on the harness:\n{err}");
            Some(bin)
        }
    }
}

fn run(bin: &std::path::Path, mode: &str, random: bool) -> String {
    let mut cmd = Command::new(bin);
    cmd.arg(mode);
    if random {
        cmd.env("EMU_RANDOM", "1");
    }
    let o = cmd.output().unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "harness {mode} failed:\n{out}\n{err}");
    out
}

#[test]
fn sync_batch_norm_kernels_match_references_under_emulation() {
    let dir = common::tmpdir("cuda-emulation");
    let Some(bin) = build_harness(&dir, "sync_bn_harness") else {
        return;
    };
    // Three shapes (several slices a channel, n hw not a multiple of 256, 2 channels), both
    // dtypes, threads at random speeds; then every f32 bit pattern through the bf16 store.
    let small = run(&bin, "small", true);
    let summary = small.lines().last().unwrap_or_default();
    assert!(summary.ends_with("failures 0"), "{small}");
    assert!(summary.contains("bf16 elementwise mismatches 0"), "{small}");
    let conv = run(&bin, "conv", false);
    assert!(
        conv.contains("f32 patterns: 0 mismatches (vs half crate 0)"),
        "{conv}"
    );
    eprintln!("{summary}");
}

#[test]
fn dense_loss_kernels_match_references_under_emulation() {
    let dir = common::tmpdir("cuda-emulation-dense");
    let Some(bin) = build_harness(&dir, "dense_harness") else {
        return;
    };
    // kernels.cu itself: tap formation bit for bit against the CPU's taps, gather/scatter,
    // normalised difference and the fused compare (C = 3 to 256, chains of up to 36 taps,
    // zero and sub-eps vectors, invalid pixels) on the launchers' grids and others, threads
    // at random speeds.
    let out = run(&bin, "small", true);
    let summary = out.lines().last().unwrap_or_default();
    assert!(summary.ends_with("failures 0"), "{out}");
    assert!(summary.contains("plan_taps: 0 of "), "{out}");
    eprintln!("{summary}");
}

#[test]
fn elementwise_kernels_follow_pytorch_under_emulation() {
    let dir = common::tmpdir("cuda-emulation-elementwise");
    let Some(bin) = build_harness(&dir, "elementwise_harness") else {
        return;
    };
    // relu.cuh: forward and backward on f32 special values and random bit patterns, and on
    // every bf16 pattern; optim.cuh: three AdamW steps of both weight-decay groups and the
    // EMA against PyTorch's formulas in double; the launcher's grid and smaller ones, guards
    // around each buffer.
    let out = run(&bin, "all", false);
    let summary = out.lines().last().unwrap_or_default();
    assert!(summary.ends_with("failures 0"), "{out}");
    assert!(
        summary.contains("relu.cuh: 1986468 values checked"),
        "{out}"
    );
    assert!(
        summary.contains("optim.cuh: 160096 values checked"),
        "{out}"
    );
    eprintln!("{summary}");
}
