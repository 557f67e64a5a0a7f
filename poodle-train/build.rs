//! Records the git commit at build time (`POODLE_GIT_SHA`, `git describe --always` with
//! `-dirty` when tracked files other than Cargo.lock differ from it), so that a run launched
//! from a copied binary, outside the source tree, still writes which code it is.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn main() {
    // `git describe --always --dirty`, except that Cargo.lock does not count: `make
    // build-cuda` rewrites it while cargo runs (tools/cuda/build.sh puts it back after), which
    // would mark every CUDA build dirty.
    let sha = git(&["describe", "--always"]).map_or_else(
        || "unknown".into(),
        |s| {
            let clean = git(&[
                "diff",
                "--quiet",
                "HEAD",
                "--",
                ":/",
                ":(top,exclude)Cargo.lock",
            ]);
            if clean.is_some() {
                s
            } else {
                format!("{s}-dirty")
            }
        },
    );
    println!("cargo:rustc-env=POODLE_GIT_SHA={sha}");
    // `-dirty` follows edits of the code compiled into the binary: this crate's and the
    // workspace library's sources (directories: cargo scans them for any change). Edits
    // elsewhere (docs) leave the recorded state as it was at the last rerun.
    for path in [
        "src",
        "Cargo.toml",
        "../poodle-common/src",
        "../poodle-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    // Rebuild when HEAD moves: HEAD itself (branch switches) and the branch's ref file.
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    // (A missing file would rerun this script on every build: fall back to packed-refs.)
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let loose =
            git(&["rev-parse", "--git-path", &r]).filter(|p| std::path::Path::new(p).exists());
        if let Some(p) = loose.or_else(|| git(&["rev-parse", "--git-path", "packed-refs"])) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
    plan_taps_host();
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        cuda_kernels();
    }
}

/// A host build of the CUDA plan kernel's per-pixel code (src/cuda/plan_taps.cuh), which the
/// tests of `loss::sample` compare with the CPU's taps: the kernel's arithmetic is checked on
/// every build, GPU or not. No FMA contraction, as in the kernel.
fn plan_taps_host() {
    for f in ["src/cuda/plan_taps.cuh", "src/cuda/plan_taps_host.c"] {
        println!("cargo:rerun-if-changed={f}");
    }
    cc::Build::new()
        .file("src/cuda/plan_taps_host.c")
        .flag_if_supported("-ffp-contract=off")
        .opt_level(2)
        .compile("poodle_plan_taps_host");
}

/// The `cuda` feature's own kernels (src/cuda/kernels.cu): PTX for compute_80 (the driver
/// JIT-compiles it for any later card), then ptxas for sm_80 and sm_90 so that register or
/// syntax errors fail the build here rather than at load time on a GPU. Uses the nvcc of
/// `make build-cuda` (`NVCC`, else `CUDA_HOME/bin/nvcc`, else `nvcc` on the PATH).
fn cuda_kernels() {
    use std::path::PathBuf;
    let src = "src/cuda/kernels.cu";
    for f in [
        src,
        "src/cuda/sync_bn.cuh",
        "src/cuda/relu.cuh",
        "src/cuda/elem.cuh",
        "src/cuda/optim.cuh",
    ] {
        println!("cargo:rerun-if-changed={f}");
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let nvcc = std::env::var_os("NVCC")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("CUDA_HOME").map(|h| PathBuf::from(h).join("bin/nvcc")))
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let ptx = out.join("poodle_kernels.ptx");
    let run = |cmd: &mut Command, what: &str| {
        let o = cmd
            .output()
            .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?} ({e}); see `make build-cuda`"));
        if !o.status.success() {
            panic!(
                "{what} failed:\n{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
    };
    run(
        Command::new(&nvcc)
            .args(["--ptx", "-arch=compute_80", "-O3", "-o"])
            .arg(&ptx)
            .arg(src),
        "nvcc",
    );
    let ptxas = nvcc.with_file_name("ptxas");
    for arch in ["sm_80", "sm_90"] {
        run(
            Command::new(&ptxas)
                .arg(format!("-arch={arch}"))
                .arg(&ptx)
                .arg("-o")
                .arg(out.join(format!("poodle_kernels_{arch}.cubin"))),
            "ptxas",
        );
    }
}
