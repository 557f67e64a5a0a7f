//! `poodle-train gpu-check`: what `make gpu-check` runs on a GPU machine. CUDA-versus-CPU
//! parity of every cuDNN op (through the `layers` dispatch, so the CPU side is the reference
//! code) and of one whole training step at small size; then the ResNet-50 trunk (batch 8 at
//! 512x1024, forward + backward, training-mode BatchNorm) and the full PooDLe step in the
//! paper's configuration, per precision, with peak GPU memory. One JSON object per line on
//! stdout and in `OUT/candle.jsonl`; bench/gpu_check_report.py turns them into a table.
//!
//! Compiled in every build: `--device cpu --tiny` runs the same control flow with the CPU on
//! both sides of each comparison and shrunk benchmarks (the test `gpu_check_runs_on_the_cpu`),
//! so that the one GPU run is not spent on a logic error. The CUDA-only calls go through
//! `gpu`, which is a no-op (or a skipped row) on the CPU.

use crate::config::{Precision, TrainConfig};
use crate::data::loader::Batch;
use crate::geom::Affine;
use crate::model::layers::{max_pool_3x3_s2, BatchNorm, Conv2d};
use crate::model::resnet::{ResNet, ResNetConfig};
use crate::optim::{ema_update, GradAccumulator, Grads};
use crate::run::Learner;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Module, ModuleT, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use poodle_common::rng::SplitMix64;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Arguments of `poodle-train gpu-check`.
#[derive(clap::Args, Debug)]
pub struct GpuCheckArgs {
    /// Folder for candle.jsonl.
    #[arg(long, default_value = "gpu-check")]
    pub out: PathBuf,
    /// CUDA device ordinal, or `cpu`: the CPU on both sides of each comparison, which runs
    /// the check's control flow without a GPU (the tests do, with --tiny).
    #[arg(long, default_value = "0")]
    pub device: String,
    /// Parts to run: parity, dense, batchnorm, nccl, trunk, step (comma-separated).
    #[arg(
        long,
        default_value = "parity,dense,batchnorm,nccl,trunk,step",
        value_delimiter = ','
    )]
    pub only: Vec<String>,
    /// Precisions for the benchmarks: f32, tf32, bf16.
    #[arg(long, default_value = "f32,tf32,bf16", value_delimiter = ',')]
    pub precisions: Vec<String>,
    /// Timed iterations per benchmark (after 2 untimed).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Benchmarks at `Sizes::tiny` instead of the paper's sizes (for the CPU test).
    #[arg(long, hide = true)]
    pub tiny: bool,
}

/// Every benchmark size in one place: `paper()` is what the GPU run measures, `tiny()` what
/// the CPU test of the control flow runs in seconds.
#[derive(Clone, Debug)]
pub struct Sizes {
    /// Dense loss: samples, channels and crop (the maps are its stride-8 grid).
    pub dense: (usize, usize, (usize, usize)),
    /// Trunk: network, batch and input size.
    pub trunk: (ResNetConfig, usize, (usize, usize)),
    /// One BatchNorm's input `(n, c, h, w)`.
    pub batchnorm: [usize; 4],
    /// Full step: the configuration, which gives pairs, crop, subcrops and network.
    pub step: TrainConfig,
}

impl Sizes {
    /// The paper's sizes: 4 samples of 256 channels at 512x1024 for the dense loss, ResNet-50
    /// with batch 8 at 512x1024 (and a BatchNorm of its layer1), and the paper's training
    /// configuration.
    pub fn paper() -> Self {
        Self {
            dense: (4, 256, (512, 1024)),
            trunk: (ResNetConfig::resnet50(), 8, (512, 1024)),
            // layer1's output of the trunk above (stride 4, 256 channels): 256 MiB in f32.
            batchnorm: [8, 256, 128, 256],
            step: TrainConfig::paper(),
        }
    }

    /// Seconds on a CPU: 2 x 32 channels at 64x128, ResNet-50 with batch 1 at 64x128, and the
    /// `tiny` preset (ResNet-18 sizes, 64x128 crops, K = 2 subcrops of 32 px) with 2 pairs.
    pub fn tiny() -> Self {
        let mut step = TrainConfig::tiny();
        step.data.batch_size = 2;
        Self {
            dense: (2, 32, (64, 128)),
            trunk: (ResNetConfig::resnet50(), 1, (64, 128)),
            batchnorm: [2, 8, 6, 10],
            step,
        }
    }
}

/// The device of `--device`: `cpu`, or a CUDA ordinal (`N` or `cuda:N`).
fn device(spec: &str) -> Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal: usize = (spec.strip_prefix("cuda:").unwrap_or(spec).parse())
        .with_context(|| format!("--device {spec:?}: a CUDA ordinal or cpu"))?;
    Device::new_cuda(ordinal).context("CUDA device")
}

/// Why a precision cannot run on `dev` (the CPU computes in f32, as `Learner::new` says).
fn refused(dev: &Device, p: Precision) -> Option<&'static str> {
    (!dev.is_cuda() && !p.is_f32()).then_some("tf32 and bf16 need a CUDA device")
}

/// A row for a check that cannot run here, with the reason; it counts as passed.
fn skipped(kind: &str, op: &str, p: Precision, why: &str) -> Value {
    json!({"kind": kind, "op": op, "precision": p.name(), "tensor": "-", "skipped": why,
        "ok": true})
}

/// The CUDA-only calls, and what the CPU does instead: nothing, or no value.
#[cfg(feature = "cuda")]
mod gpu {
    use anyhow::Result;
    use candle_core::Device;
    use cudarc::driver::sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH as USED_HIGH;

    pub fn set_tf32(on: bool) {
        crate::cuda::set_tf32(on);
    }

    pub fn keep_pool_memory(dev: &Device) -> Result<()> {
        if dev.is_cuda() {
            crate::cuda::keep_pool_memory(dev)?;
        }
        Ok(())
    }

    pub fn cudnn_version(dev: &Device) -> Option<usize> {
        dev.is_cuda()
            .then(|| cudarc::cudnn::result::get_version() as usize)
    }

    /// Entries of the cuDNN algorithm cache (this thread's); None without cuDNN.
    pub fn algo_cache_len(dev: &Device) -> Option<usize> {
        dev.is_cuda().then(crate::cuda::algo_cache_len)
    }

    /// Resets the high-water mark of the device's default memory pool (cudarc allocates
    /// stream-ordered from it) to the current use.
    pub fn reset_peak(dev: &Device) -> Result<()> {
        if dev.is_cuda() {
            crate::cuda::pool_attr(dev, USED_HIGH, Some(0))?;
        }
        Ok(())
    }

    /// The high-water mark in bytes; None on the CPU.
    pub fn peak_bytes(dev: &Device) -> Result<Option<u64>> {
        if !dev.is_cuda() {
            return Ok(None);
        }
        Ok(Some(crate::cuda::pool_attr(dev, USED_HIGH, None)?))
    }

    /// Differing indices and weights of the plan taps formed on `dev` against the CPU's: the
    /// GPU's on a CUDA device, else the host build of the kernel code.
    pub fn taps_mismatch(grid: &crate::loss::SampleGrid, dev: &Device) -> Result<(usize, usize)> {
        match dev {
            Device::Cuda(d) => Ok(crate::loss::sample::device_taps_mismatch(grid, d)?),
            _ => Ok(crate::loss::sample::host_taps_mismatch(grid)),
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use anyhow::Result;
    use candle_core::Device;

    pub fn set_tf32(_on: bool) {}

    pub fn keep_pool_memory(_dev: &Device) -> Result<()> {
        Ok(())
    }

    pub fn cudnn_version(_dev: &Device) -> Option<usize> {
        None
    }

    pub fn algo_cache_len(_dev: &Device) -> Option<usize> {
        None
    }

    pub fn reset_peak(_dev: &Device) -> Result<()> {
        Ok(())
    }

    pub fn peak_bytes(_dev: &Device) -> Result<Option<u64>> {
        Ok(None)
    }

    /// Only the CPU exists here: the host build of the CUDA kernel code against the CPU.
    pub fn taps_mismatch(grid: &crate::loss::SampleGrid, _dev: &Device) -> Result<(usize, usize)> {
        Ok(crate::loss::sample::host_taps_mismatch(grid))
    }
}

/// Collects result lines, printing each as it comes (a killed run keeps what it had).
struct Out {
    file: std::fs::File,
    failed: usize,
}

impl Out {
    fn emit(&mut self, v: Value) -> Result<()> {
        if v.get("ok") == Some(&Value::Bool(false)) || v.get("error").is_some() {
            self.failed += 1;
        }
        let line = v.to_string();
        println!("{line}");
        writeln!(self.file, "{line}")?;
        self.file.flush()?;
        Ok(())
    }
}

pub fn run(args: &GpuCheckArgs) -> Result<()> {
    std::fs::create_dir_all(&args.out)?;
    // Appended to: tools/cuda/gpu-check.sh runs each part as its own process.
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.out.join("candle.jsonl"))?;
    let mut out = Out { file, failed: 0 };
    let dev = device(&args.device)?;
    let sizes = if args.tiny {
        Sizes::tiny()
    } else {
        Sizes::paper()
    };
    gpu::keep_pool_memory(&dev)?;
    let mut info = json!({"kind": "info", "git_sha": crate::run::GIT_SHA,
        "cudnn_version": gpu::cudnn_version(&dev)});
    // The CUDA run's line stays as it was; a CPU or tiny run says so.
    if !dev.is_cuda() {
        info["device"] = json!("cpu");
    }
    if args.tiny {
        info["sizes"] = json!("tiny");
    }
    out.emit(info)?;
    let wants = |p: &str| args.only.iter().any(|o| o == p);
    if wants("parity") {
        // Each op reports its own error row; these catch what escapes the per-op guards, so
        // that the step's parity still runs after a failed op.
        guarded(&mut out, "ops (aborted)", Precision::F32, |o| {
            parity_ops(&dev, o)
        })?;
        guarded(&mut out, "train step (tiny)", Precision::F32, |o| {
            parity_step(&dev, o)
        })?;
    }
    if wants("dense") {
        let r = bench_dense(&dev, &sizes, args.iters);
        out.emit(result_line("dense", Precision::F32, r))?;
    }
    if wants("batchnorm") {
        for p in [Precision::F32, Precision::Bf16] {
            let r = match refused(&dev, p) {
                Some(why) => skipped("batchnorm", "batchnorm", p, why),
                None => result_line("batchnorm", p, bench_batchnorm(&dev, &sizes, p, args.iters)),
            };
            out.emit(r)?;
        }
    }
    if wants("nccl") {
        if dev.is_cuda() {
            #[cfg(feature = "cuda")]
            {
                // Rendezvous files outside --out: the device tool returns at most 8 files from
                // there.
                let rdv =
                    std::env::temp_dir().join(format!("poodle-gpu-check-{}", std::process::id()));
                std::fs::create_dir_all(&rdv).with_context(|| format!("{}", rdv.display()))?;
                let r = nccl_world_of_one(&dev, &rdv);
                out.emit(result_line("nccl", Precision::F32, r))?;
                std::fs::remove_dir_all(&rdv).ok();
            }
        } else {
            let why = "NCCL needs a CUDA device";
            out.emit(skipped("nccl", "world of one", Precision::F32, why))?;
        }
    }
    for p in &args.precisions {
        let prec = Precision::parse(p)?;
        for part in ["trunk", "step"].into_iter().filter(|p| wants(p)) {
            if let Some(why) = refused(&dev, prec) {
                out.emit(skipped(part, part, prec, why))?;
                continue;
            }
            let r = if part == "trunk" {
                bench_trunk(&dev, &sizes, prec, args.iters)
            } else {
                bench_step(&dev, &sizes, prec, args.iters)
            };
            out.emit(result_line(part, prec, r))?;
        }
    }
    anyhow::ensure!(out.failed == 0, "{} check(s) failed", out.failed);
    Ok(())
}

/// The NCCL engine through training's own join (`dist::connect`: file rendezvous in `dir`,
/// communicator on candle's stream) in a world of one, the most one GPU allows (NCCL refuses
/// two ranks on one device): the SyncBatchNorm sum forward and backward and the host-side
/// collectives must give back what went in.
#[cfg(feature = "cuda")]
fn nccl_world_of_one(dev: &Device, dir: &std::path::Path) -> Result<Value> {
    use crate::dist::{self, sync_bn::AllReduceSum, Backend, Collective, DistConfig, LaunchEnv};
    std::env::set_var("POODLE_RENDEZVOUS_KEY", "gpu-check");
    let cfg = DistConfig {
        backend: Backend::Nccl,
        rendezvous_timeout_s: 30,
        ..DistConfig::default()
    };
    let t0 = Instant::now();
    let group: std::sync::Arc<dyn Collective> =
        dist::connect(&cfg, &LaunchEnv::single(), dev, dir)?;
    let join_s = t0.elapsed().as_secs_f64();
    anyhow::ensure!(group.engine() == "nccl", "engine {}", group.engine());
    let x = Var::from_tensor(&randn(&[4, 64, 3], 7, dev)?)?;
    let y = AllReduceSum::apply(x.as_tensor(), &group)?;
    let fwd = rel_err(&y, x.as_tensor())?;
    let w = randn(&[4, 64, 3], 8, dev)?;
    let grads = (y * &w)?.sum_all()?.backward()?;
    let bwd = rel_err(grads.get(&x).context("no gradient")?, &w)?;
    let mut host = [1.5f32, -2.0];
    group.all_reduce_sum(&mut host)?;
    let gathered = group.all_gather_u64(u64::MAX - 3)?;
    group.barrier()?;
    // Rank 0 removes the rendezvous folder once the communicator has formed.
    let left = dir.join("rendezvous-gpu-check").exists();
    let ok = fwd == 0.0 && bwd == 0.0 && host == [1.5, -2.0] && gathered == [u64::MAX - 3] && !left;
    Ok(
        json!({"ok": ok, "join_s": join_s, "fwd_rel_err": fwd, "bwd_rel_err": bwd,
        "host": host.to_vec(), "gathered": gathered, "rendezvous_left": left}),
    )
}

/// Parsing and applying a precision here; the training step reads it from the config.
trait PrecisionExt: Sized {
    fn parse(s: &str) -> Result<Self>;
    fn name(self) -> &'static str;
    fn apply(self);
    fn dtype(self) -> DType;
}

impl PrecisionExt for Precision {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" | "fp32" => Self::F32,
            "tf32" => Self::Tf32,
            "bf16" => Self::Bf16,
            o => anyhow::bail!("precision {o:?}: f32, tf32 or bf16"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Tf32 => "tf32",
            Self::Bf16 => "bf16",
        }
    }

    /// TF32 is on for tf32 and bf16 (PyTorch's bf16 autocast run also allows it), as
    /// `Learner::new` sets it.
    fn apply(self) {
        gpu::set_tf32(!self.is_f32());
    }

    fn dtype(self) -> DType {
        self.activation_dtype()
    }
}

/// Runs one check: an error or a panic (cudarc panics when a library fails to load) becomes
/// the check's own failed row, which the report shows, and the checks after it still run.
fn guarded(
    out: &mut Out,
    op: &str,
    p: Precision,
    f: impl FnOnce(&mut Out) -> Result<()>,
) -> Result<()> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut *out)));
    let msg = match r {
        Ok(Ok(())) => return Ok(()),
        Ok(Err(e)) => format!("{e:#}"),
        Err(panic) => {
            let m = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
            format!("panic: {}", m.unwrap_or_default())
        }
    };
    out.emit(
        json!({"kind": "parity", "op": op, "precision": p.name(), "tensor": "-",
        "error": msg, "ok": false}),
    )
}

fn result_line(kind: &str, p: Precision, r: Result<Value>) -> Value {
    let mut v = match r {
        Ok(v) => v,
        Err(e) => json!({"error": format!("{e:#}")}),
    };
    v["kind"] = json!(kind);
    v["precision"] = json!(p.name());
    v
}

// ---------------------------------------------------------------------------------------
// Parity

/// Seeded normal values (Box-Muller on SplitMix64), so CPU and CUDA see the same numbers.
fn randn(shape: &[usize], seed: u64, dev: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut rng = SplitMix64::new(seed);
    let u = |rng: &mut SplitMix64| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let (a, b) = (1.0 - u(&mut rng), u(&mut rng));
            ((-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, dev)?)
}

/// Distinct values that bf16 represents exactly (`1 + k/128` times a power of two, alternating
/// sign), shuffled: max-pool's arg-max is the same in f32 and bf16 and never tied.
fn distinct_bf16(shape: &[usize], seed: u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut v: Vec<f32> = (0..n)
        .map(|j| {
            let m = (1.0 + (j % 128) as f32 / 128.0) * 2f32.powi((j / 128) as i32 - 4);
            if j % 2 == 0 {
                m
            } else {
                -m
            }
        })
        .collect();
    let mut rng = SplitMix64::new(seed);
    for i in (1..n).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// `|a - b| / |b|` (L2 over all elements, on the CPU in f32).
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let den = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((num / den.max(1e-30)).sqrt())
}

/// Tolerances on the relative L2 error against the f32 CPU reference: cuDNN's fast
/// algorithms (Winograd, FFT) differ from direct f32 in the 1e-6..1e-5 range; TF32 keeps
/// 10 mantissa bits, bf16 7.
fn tolerance(p: Precision) -> f64 {
    match p {
        Precision::F32 => 1e-4,
        Precision::Tf32 => 5e-3,
        Precision::Bf16 => 3e-2,
    }
}

/// Sets every variable of `dst` to the same-named one of `src` (across devices).
fn copy_map(src: &VarMap, dst: &VarMap, dev: &Device) -> Result<()> {
    let s = src.data().lock().expect("VarMap lock");
    for (name, var) in dst.data().lock().expect("VarMap lock").iter() {
        let v = s.get(name).with_context(|| format!("{name} missing"))?;
        var.set(&v.as_tensor().to_device(dev)?)?;
    }
    Ok(())
}

/// One op's comparison: forward and the gradients of `sum(y * r)` for a fixed random `r`.
fn compare(out: &mut Out, op: &str, p: Precision, pairs: &[(&str, Tensor, Tensor)]) -> Result<()> {
    for (what, cuda, cpu) in pairs {
        let rel = rel_err(cuda, cpu)?;
        let tol = tolerance(p);
        out.emit(
            json!({"kind": "parity", "op": op, "precision": p.name(), "tensor": what,
            "rel_err": rel, "tol": tol, "ok": rel.is_finite() && rel <= tol}),
        )?;
    }
    Ok(())
}

/// [`compare`] of named tensors: `cuda[i]` against `cpu[i]` under `names[i]`.
fn compare_named(
    out: &mut Out,
    op: &str,
    p: Precision,
    names: &[&str],
    cuda: Vec<Tensor>,
    cpu: Vec<Tensor>,
) -> Result<()> {
    let pairs: Vec<_> = (names.iter().zip(cuda.into_iter().zip(cpu)))
        .map(|(nm, (g, c))| (*nm, g, c))
        .collect();
    compare(out, op, p, &pairs)
}

/// What [`batch_norm_outputs`] returns, in order.
const BN_OUTPUTS: [&str; 6] = ["y", "dx", "dweight", "dbias", "running_mean", "running_var"];

/// A training BatchNorm over `x` (non-trivial scale and shift) on `dev` in `dt`, loss
/// `sum(y * probe)`: the [`BN_OUTPUTS`]. Synchronised if this thread is in a group.
fn batch_norm_outputs(x: &Tensor, probe: &Tensor, dev: &Device, dt: DType) -> Result<Vec<Tensor>> {
    let c = x.dim(1)?;
    let vm = VarMap::new();
    let bn = BatchNorm::new(c, VarBuilder::from_varmap(&vm, DType::F32, dev))?;
    for (nm, seed) in [("weight", 31u64), ("bias", 32)] {
        let v = vm.data().lock().expect("VarMap lock")[nm].clone();
        v.set(&randn(&[c], seed, dev)?.affine(0.5, 1.0)?)?;
    }
    let xv = Var::from_tensor(&x.to_device(dev)?.to_dtype(dt)?)?;
    let y = bn.forward_t(xv.as_tensor(), true)?;
    let g = (y.to_dtype(DType::F32)? * probe.to_device(dev)?)?
        .sum_all()?
        .backward()?;
    let m = vm.data().lock().expect("VarMap lock").clone();
    Ok(vec![
        y,
        g.get(xv.as_tensor()).context("dx")?.clone(),
        g.get(m["weight"].as_tensor()).context("dweight")?.clone(),
        g.get(m["bias"].as_tensor()).context("dbias")?.clone(),
        bn.running_mean().clone(),
        bn.running_var().clone(),
    ])
}

/// [`batch_norm_outputs`] of `x` split over two ranks (threads in one synchronised-BatchNorm
/// group) on `dev`, put together as one batch's: outputs and input gradients concatenated,
/// scale and shift gradients summed (data parallel's average of the per-rank losses' sums),
/// rank 0's running statistics (both ranks hold the same).
///
/// Each rank copies its results to the host before handing them over (its kernels run on
/// its own thread's stream, which nothing orders with this thread's). A rank that fails
/// leaves the other waiting in a collective for ever: the ranks are detached threads and
/// this returns the first error, or gives up after a minute, so the parity rows after this
/// one still run.
fn sync_batch_norm_two_ranks(
    x: &Tensor,
    probe: &Tensor,
    dev: &Device,
    dt: DType,
) -> Result<Vec<Tensor>> {
    use crate::dist::{local::LocalGroup, sync_bn, Collective};
    let half = x.dim(0)? / 2;
    anyhow::ensure!(half >= 1 && 2 * half == x.dim(0)?, "an even batch");
    let (tx, rx) = std::sync::mpsc::channel();
    for (r, g) in LocalGroup::new(2).into_iter().enumerate() {
        let (x, probe, dev, tx) = (x.clone(), probe.clone(), dev.clone(), tx.clone());
        std::thread::spawn(move || {
            let rank = || -> Result<Vec<Tensor>> {
                let _scope = sync_bn::scope(Some(
                    std::sync::Arc::new(g) as std::sync::Arc<dyn Collective>
                ));
                let part = |t: &Tensor| t.narrow(0, r * half, half);
                let outs = batch_norm_outputs(&part(&x)?, &part(&probe)?, &dev, dt)?;
                Ok(outs
                    .iter()
                    .map(|t| t.to_device(&Device::Cpu))
                    .collect::<candle_core::Result<_>>()?)
            };
            let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(rank))
                .unwrap_or_else(|_| Err(anyhow::anyhow!("rank {r} panicked")));
            let _ = tx.send((r, res));
        });
    }
    let mut ranks: [Vec<Tensor>; 2] = Default::default();
    for _ in 0..2 {
        let (r, res) = rx.recv_timeout(Duration::from_secs(60)).map_err(|_| {
            anyhow::anyhow!("a rank took over a minute (waiting for a failed one?)")
        })?;
        ranks[r] = res.with_context(|| format!("rank {r}"))?;
    }
    let [a, b] = ranks;
    let cat = |i: usize| Tensor::cat(&[&a[i], &b[i]], 0);
    let sum = |i: usize| &a[i] + &b[i];
    Ok(vec![
        cat(0)?,
        cat(1)?,
        sum(2)?,
        sum(3)?,
        a[4].clone(),
        a[5].clone(),
    ])
}

/// Every custom op's CUDA forward and input gradients against the CPU reference, in each
/// precision the device allows; then the dense loss's ops in f32.
fn parity_ops(cuda: &Device, out: &mut Out) -> Result<()> {
    for p in [Precision::F32, Precision::Tf32, Precision::Bf16] {
        if let Some(why) = refused(cuda, p) {
            out.emit(skipped("parity", "cuDNN ops", p, why))?;
            continue;
        }
        p.apply();
        parity_convs(cuda, p, out)?;
        parity_batch_norms(cuda, p, out)?;
        parity_max_pool(cuda, p, out)?;
        // model::relu's op (PyTorch's backward) against candle's ReLU on the CPU; randn has
        // no exact zeros, where the two gradients differ by design.
        guarded(out, "relu", p, |out| {
            let x = randn(&[2, 8, 9, 11], 600, &Device::Cpu)?;
            let f = |x: &Tensor| Ok(crate::model::relu::relu(x)?);
            let (yc, dxc) = value_and_input_grad(&x, &Device::Cpu, DType::F32, 19, f)?;
            let (yg, dxg) = value_and_input_grad(&x, cuda, p.dtype(), 19, f)?;
            compare(out, "relu", p, &[("y", yg, yc), ("dx", dxg, dxc)])
        })?;
    }
    Precision::F32.apply();
    parity_loss_ops(cuda, out)?;
    parity_dense(cuda, out)
}

/// `f(x)` on `dev` in `dt` and the gradient of `sum(f(x) * r)` with respect to `x`, `r`
/// drawn from `seed` (f32): what each op's parity row compares.
fn value_and_input_grad(
    x: &Tensor,
    dev: &Device,
    dt: DType,
    seed: u64,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Tensor)> {
    let xv = Var::from_tensor(&x.to_device(dev)?.to_dtype(dt)?)?;
    let y = f(xv.as_tensor())?;
    let r = randn(y.dims(), seed, dev)?;
    let g = (y.to_dtype(DType::F32)? * r)?.sum_all()?.backward()?;
    let dx = g.get(xv.as_tensor()).context("dx")?.clone();
    Ok((y, dx))
}

/// cuDNN's convolution forward, data and filter gradients against candle's CPU path.
fn parity_convs(cuda: &Device, p: Precision, out: &mut Out) -> Result<()> {
    let cpu = Device::Cpu;
    // (batch, in, out, h, w, k, stride, pad, dilation, bias): the stem, 3x3 same, a strided
    // 3x3 on mixed-parity sizes (candle's CPU backward needs padding there), 1x1 plain and
    // strided (the CPU path runs them as matmuls), a dilated 3x3.
    let convs = [
        (2, 3, 8, 17, 23, 7, 2, 3, 1, false),
        (2, 16, 16, 15, 16, 3, 1, 1, 1, false),
        (2, 16, 24, 15, 16, 3, 2, 1, 1, false),
        (2, 32, 16, 9, 9, 1, 1, 0, 1, true),
        (2, 32, 16, 9, 10, 1, 2, 0, 1, false),
        (2, 16, 16, 12, 12, 3, 1, 2, 2, true),
    ];
    for (i, &(n, ci, co, h, w, k, s, pad, d, bias)) in convs.iter().enumerate() {
        let name = format!("conv2d {n}x{ci}x{h}x{w} k{k} s{s} p{pad} d{d}");
        guarded(out, &name, p, |out| {
            let mk = |dev: &Device, vm: &VarMap| {
                let vb = VarBuilder::from_varmap(vm, DType::F32, dev);
                let init = Init::Randn {
                    mean: 0.,
                    stdev: 0.2,
                };
                Conv2d::new(ci, co, k, s, pad, d, bias, init, vb)
            };
            let (vm_c, vm_g) = (VarMap::new(), VarMap::new());
            let (lc, lg) = (mk(&cpu, &vm_c)?, mk(cuda, &vm_g)?);
            copy_map(&vm_c, &vm_g, cuda)?;
            let x = randn(&[n, ci, h, w], 100 + i as u64, &cpu)?;
            let run = |layer: &Conv2d, dev: &Device, dt: DType| -> Result<[Tensor; 3]> {
                let xv = Var::from_tensor(&x.to_device(dev)?.to_dtype(dt)?)?;
                let y = layer.forward(xv.as_tensor())?;
                let r = randn(y.dims(), 7, dev)?.to_dtype(dt)?;
                let g = (y.to_dtype(DType::F32)? * r.to_dtype(DType::F32)?)?
                    .sum_all()?
                    .backward()?;
                let dx = g.get(xv.as_tensor()).context("dx")?.clone();
                let dw = g.get(layer.weight()).context("dw")?.clone();
                Ok([y, dx, dw])
            };
            let [yc, dxc, dwc] = run(&lc, &cpu, DType::F32)?;
            let [yg, dxg, dwg] = run(&lg, cuda, p.dtype())?;
            let pairs = [("y", yg, yc), ("dx", dxg, dxc), ("dw", dwg, dwc)];
            compare(out, &name, p, &pairs)
        })?;
    }
    Ok(())
}

/// cuDNN's training BatchNorm, and the synchronised BatchNorm's fused passes over two thread
/// ranks on the device, against the composed CPU path; 4-D and 2-D inputs.
fn parity_batch_norms(cuda: &Device, p: Precision, out: &mut Out) -> Result<()> {
    let cpu = Device::Cpu;
    for (i, dims) in [vec![4, 8, 5, 6], vec![6, 16]].into_iter().enumerate() {
        let x = randn(&dims, 200 + i as u64, &cpu)?.affine(3.0, 0.5)?;
        let probe = randn(&dims, 9, &cpu)?;
        let reference = batch_norm_outputs(&x, &probe, &cpu, DType::F32)?;
        let name = format!("batchnorm {dims:?}");
        guarded(out, &name, p, |out| {
            let cuda_run = batch_norm_outputs(&x, &probe, cuda, p.dtype())?;
            compare_named(out, &name, p, &BN_OUTPUTS, cuda_run, reference.clone())
        })?;
        let name = format!("sync batchnorm {dims:?} (2 ranks)");
        guarded(out, &name, p, |out| {
            let cuda_run = sync_batch_norm_two_ranks(&x, &probe, cuda, p.dtype())?;
            compare_named(out, &name, p, &BN_OUTPUTS, cuda_run, reference.clone())
        })?;
    }
    Ok(())
}

/// cuDNN's 3x3 stride-2 max-pool and its backward against the CPU path.
fn parity_max_pool(cuda: &Device, p: Precision, out: &mut Out) -> Result<()> {
    for (i, dims) in [[2, 4, 9, 12], [2, 4, 8, 8], [1, 2, 1, 2]]
        .into_iter()
        .enumerate()
    {
        let name = format!("maxpool3x3s2 {dims:?}");
        guarded(out, &name, p, |out| {
            // Not randn: rounding to bf16 can tie a window's two largest values, and cuDNN
            // then may route the gradient to another element than the f32 reference does.
            let x = distinct_bf16(&dims, 300 + i as u64)?;
            let f = |x: &Tensor| Ok(max_pool_3x3_s2(x)?);
            let (yc, dxc) = value_and_input_grad(&x, &Device::Cpu, DType::F32, 11, f)?;
            let (yg, dxg) = value_and_input_grad(&x, cuda, p.dtype(), 11, f)?;
            compare(out, &name, p, &[("y", yg, yc), ("dx", dxg, dxc)])
        })?;
    }
    Ok(())
}

/// The dense loss's own ops (src/cuda/kernels.cu), f32: bilinear sampling (some points
/// outside the map) and the normalised squared difference.
fn parity_loss_ops(cuda: &Device, out: &mut Out) -> Result<()> {
    let cpu = Device::Cpu;
    let f32 = Precision::F32;
    guarded(out, "bilinear sample (taps)", f32, |out| {
        let x = randn(&[2, 5, 7, 9], 400, &cpu)?;
        let pts: Vec<f32> = (0..2 * 6 * 11 * 2)
            .map(|i| ((i as f32 * 0.37).sin() * 0.6 + 0.5) * if i % 2 == 0 { 10.0 } else { 8.0 })
            .collect();
        let coords = Tensor::from_vec(pts, (2, 6, 11, 2), &cpu)?;
        let run = |dev: &Device| {
            let f = |x: &Tensor| Ok(crate::loss::sample_bilinear(x, &coords.to_device(dev)?)?.0);
            value_and_input_grad(&x, dev, DType::F32, 13, f)
        };
        let ((yc, dxc), (yg, dxg)) = (run(&cpu)?, run(cuda)?);
        let pairs = [("y", yg, yc), ("dx", dxg, dxc)];
        compare(out, "bilinear sample (taps)", f32, &pairs)
    })?;
    guarded(out, "normalized sq diff", f32, |out| {
        let (a, b) = (
            randn(&[2, 16, 5, 6], 500, &cpu)?,
            randn(&[2, 16, 5, 6], 501, &cpu)?,
        );
        let run = |dev: &Device| -> Result<Vec<Tensor>> {
            let (av, bv) = (
                Var::from_tensor(&a.to_device(dev)?)?,
                Var::from_tensor(&b.to_device(dev)?)?,
            );
            let d = crate::loss::normdiff::normalized_sq_diff(av.as_tensor(), bv.as_tensor())?;
            let r = randn(d.dims(), 17, dev)?;
            let g = (&d * r)?.sum_all()?.backward()?;
            Ok(vec![
                d,
                g.get(av.as_tensor()).context("da")?.clone(),
                g.get(bv.as_tensor()).context("db")?.clone(),
            ])
        };
        let (rc, rg) = (run(&cpu)?, run(cuda)?);
        let names = ["d", "da", "db"];
        compare_named(out, "normalized sq diff", f32, &names, rg, rc)
    })
}

/// Rotated, zoomed and flipped views, random flow and occlusion for `n` samples of an
/// `h x w` crop (the dense loss's inputs besides the maps).
struct DenseCase {
    a_online: Vec<Affine>,
    a_target: Vec<Affine>,
    flow: Tensor,
    occluded: Tensor,
    crop: (usize, usize),
}

impl DenseCase {
    fn new(n: usize, (h, w): (usize, usize)) -> Result<Self> {
        let aff = |i: usize, sign: f64| {
            Affine::about_centre(
                w,
                h,
                sign * 7.0 * i as f64,
                0.9 + 0.1 * i as f64,
                i % 2 == 1,
            )
        };
        // Flow and occlusion on the CPU, as the loader hands them over.
        let cpu = Device::Cpu;
        let occ = (randn(&[n, 1, h, w], 31, &cpu)?.ge(1.0)?).to_dtype(DType::F32)?;
        Ok(Self {
            a_online: (0..n).map(|i| aff(i, 1.0)).collect(),
            a_target: (0..n).map(|i| aff(i + 1, -1.0)).collect(),
            flow: (randn(&[n, 2, h, w], 30, &cpu)? * 3.0)?,
            occluded: occ,
            crop: (h, w),
        })
    }

    fn corr(
        &self,
        order: crate::loss::dense::TargetOrder,
    ) -> crate::loss::dense::Correspondence<'_> {
        crate::loss::dense::Correspondence::new(
            &self.a_online,
            &self.a_target,
            &self.flow,
            &self.occluded,
            self.crop,
            order,
        )
    }
}

/// The dense loss through the fused compare (loss/fused.rs) on CUDA against the CPU, in both
/// target orders: loss and the gradients of both maps.
fn parity_dense(cuda: &Device, out: &mut Out) -> Result<()> {
    use crate::loss::dense::{dense_loss_with_target_grad, TargetOrder};
    let cpu = Device::Cpu;
    guarded(out, "plan taps (exact)", Precision::F32, |out| {
        parity_plan_taps(cuda, out)
    })?;
    // 8 channels (a lane each) and 40 (more than a warp's 32 lanes: the kernels' channel loop
    // runs twice, as at the training's 256).
    for (c, order) in [
        (8, TargetOrder::Authors),
        (8, TargetOrder::Paper),
        (40, TargetOrder::Authors),
    ] {
        let (o, t) = (
            randn(&[3, c, 5, 7], 600, &cpu)?,
            randn(&[3, c, 5, 7], 601, &cpu)?,
        );
        let name = format!("dense loss, fused ({order:?} order, C = {c})");
        guarded(out, &name, Precision::F32, |out| {
            let run = |dev: &Device| -> Result<Vec<Tensor>> {
                let case = DenseCase::new(3, (19, 30))?;
                let (ov, tv) = (
                    Var::from_tensor(&o.to_device(dev)?)?,
                    Var::from_tensor(&t.to_device(dev)?)?,
                );
                let (l, _) =
                    dense_loss_with_target_grad(ov.as_tensor(), tv.as_tensor(), &case.corr(order))?;
                let g = l.backward()?;
                Ok(vec![
                    l,
                    g.get(ov.as_tensor()).context("do")?.clone(),
                    g.get(tv.as_tensor()).context("dt")?.clone(),
                ])
            };
            let (rc, rg) = (run(&cpu)?, run(cuda)?);
            let names = ["loss", "d_online", "d_target"];
            compare_named(out, &name, Precision::F32, &names, rg, rc)
        })?;
    }
    Ok(())
}

/// The taps the GPU forms from a plan's points against the CPU's, bit for bit: a rotated,
/// zoomed, flipped view of a stride-8 map upsampled to a 256x512 crop (3x3 taps a pixel, some
/// pixels outside the view).
fn parity_plan_taps(cuda: &Device, out: &mut Out) -> Result<()> {
    let (h, w) = (256, 512);
    let inv: Vec<Affine> = (0..2)
        .map(|i| Affine::about_centre(w, h, 9.0 + i as f64, 0.8, i == 1).inverse())
        .collect();
    let grid =
        crate::loss::SampleGrid::from_fn_upsampled(2, (h / 8, w / 8), (h, w), (h, w), |b, y, x| {
            Some(inv[b].apply(x as f64, y as f64))
        });
    let (bad_idx, bad_wts) = gpu::taps_mismatch(&grid, cuda)?;
    for (what, bad) in [("idx", bad_idx), ("wts", bad_wts)] {
        out.emit(
            json!({"kind": "parity", "op": "plan taps (exact)", "precision": "f32",
            "tensor": what, "rel_err": bad as f64, "tol": 0.0, "ok": bad == 0}),
        )?;
    }
    Ok(())
}

/// One dense-loss call at the paper's size (4 samples, 256 channels, stride-8 maps of a
/// 512x1024 crop, the authors' order), forward and backward, in the fused form and the
/// composed one (aligned (N, 256, 512, 1024) maps): seconds and peak memory of each.
fn bench_dense(dev: &Device, sizes: &Sizes, iters: usize) -> Result<Value> {
    use crate::loss::dense::{dense_loss, dense_loss_composed, TargetOrder};
    let (n, c, (h, w)) = sizes.dense;
    let case = DenseCase::new(n, (h, w))?;
    let corr = case.corr(TargetOrder::Authors);
    let o = Var::from_tensor(&randn(&[n, c, h / 8, w / 8], 700, dev)?)?;
    let t = randn(&[n, c, h / 8, w / 8], 701, dev)?;
    let mut rows = Vec::new();
    for fused in [true, false] {
        let mut loss = f32::NAN;
        let secs = time_it(dev, iters, PeakFrom::Start, || {
            let (l, _) = if fused {
                dense_loss(o.as_tensor(), &t, &corr)?
            } else {
                dense_loss_composed(o.as_tensor(), &t, &corr, false)?
            };
            loss = l.to_scalar::<f32>()?;
            drop(l.backward()?);
            Ok(())
        })?;
        rows.push(
            json!({"form": if fused { "fused" } else { "composed" }, "s": secs,
            "peak_gib": peak_gib(dev)?, "loss": loss}),
        );
    }
    let (pf, pc) = (rows[0]["peak_gib"].as_f64(), rows[1]["peak_gib"].as_f64());
    let (lf, lc) = (rows[0]["loss"].as_f64(), rows[1]["loss"].as_f64());
    let same = matches!((lf, lc), (Some(a), Some(b)) if (a - b).abs() <= 1e-4 * b.abs());
    Ok(
        json!({"n": n, "c": c, "crop": [h, w], "forms": rows, "ok": same,
        "peak_ratio": pf.zip(pc).map(|(a, b)| a / b)}),
    )
}

/// One training BatchNorm, forward and backward of `sum(y)`, on layer1's activation: the
/// unsynchronised path (cuDNN on CUDA; the composed ops on the CPU) against the fused passes
/// that synchronised BatchNorm runs (`model::sync_bn_fused`, here in a world of one, so the
/// all-reduces are absent: the figure is the passes' cost against cuDNN's).
fn bench_batchnorm(dev: &Device, sizes: &Sizes, p: Precision, iters: usize) -> Result<Value> {
    p.apply();
    let dims = sizes.batchnorm;
    // Generated on the device (67 M values at the paper's size: slow with the host's randn).
    let x = Var::from_tensor(&Tensor::randn(0f32, 1., &dims, dev)?.to_dtype(p.dtype())?)?;
    let bn = BatchNorm::new(
        dims[1],
        VarBuilder::from_varmap(&VarMap::new(), DType::F32, dev),
    )?;
    let mut rows = Vec::new();
    let mut ys = Vec::new();
    for fused in [false, true] {
        let forward = || -> Result<Tensor> {
            Ok(if fused {
                bn.forward_train_fused(x.as_tensor(), None)?
            } else {
                bn.forward_t(x.as_tensor(), true)?
            })
        };
        let secs = time_it(dev, iters, PeakFrom::Start, || {
            drop(forward()?.to_dtype(DType::F32)?.sum_all()?.backward()?);
            Ok(())
        })?;
        ys.push(forward()?);
        rows.push(
            json!({"form": if fused { "fused" } else { "unsynchronised" }, "s": secs,
            "peak_gib": peak_gib(dev)?}),
        );
    }
    let err = rel_err(&ys[1], &ys[0])?;
    let ratio = rows[1]["s"]
        .as_f64()
        .zip(rows[0]["s"].as_f64())
        .map(|(f, u)| f / u);
    Ok(json!({"shape": dims, "forms": rows, "y_rel_err": err,
        "ok": err <= tolerance(p), "fused_over_unsynchronised": ratio}))
}

/// A batch of random content with identity geometry (the loss still samples, warps and
/// masks: flow is small random motion), `n` pairs at `h x w`, `k` subcrops of `s` px. Seeded:
/// every call and every build see the same numbers (examples/backward_check.rs relies on it).
pub fn synthetic_batch(
    n: usize,
    h: usize,
    w: usize,
    k: usize,
    s: usize,
    dev: &Device,
) -> Result<Batch> {
    let img = |seed| randn(&[n, 3, h, w], seed, dev);
    let sub = |seed| randn(&[n * k, 3, s, s], seed, dev);
    // Flow and occlusion on the CPU, as the loader hands them over (data::loader::Batch).
    let flow = |seed| -> Result<Tensor> { Ok((randn(&[n, 2, h, w], seed, &Device::Cpu)? * 2.0)?) };
    let ids = || vec![Affine::IDENTITY; n];
    Ok(Batch {
        epoch: 0,
        index: 0,
        views: [img(1)?, img(2)?],
        affines: [ids(), ids()],
        target_views: [img(3)?, img(4)?],
        target_affines: [ids(), ids()],
        flow: [flow(5)?, flow(6)?],
        occluded: [
            Tensor::zeros((n, 1, h, w), DType::F32, &Device::Cpu)?,
            Tensor::zeros((n, 1, h, w), DType::F32, &Device::Cpu)?,
        ],
        subcrops: [[sub(7)?, sub(8)?], [sub(9)?, sub(10)?]],
        meta: vec![],
        wait: Duration::ZERO,
    })
}

/// One optimiser step as `run::train` takes it: both frame orders, backward, AdamW, EMA.
fn train_step(l: &mut Learner, b: &Batch) -> Result<(crate::loss::LossTerms, Grads)> {
    let (tot, terms, _, _) = l.losses(b)?;
    let mut acc = GradAccumulator::new();
    acc.add(&tot.backward()?, &l.online_params)?;
    let grads = acc.finish(1.0)?;
    l.opt
        .step_with(&grads, l.cfg.optim.lr, l.cfg.optim.weight_decay)?;
    ema_update(&l.target_params, &l.online_params, l.cfg.optim.ema_m0)?;
    Ok((terms, grads))
}

/// Sum of squares on the CPU, in f64.
fn sq_sum(t: &Tensor) -> Result<f64> {
    let t = t.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    Ok(t.sqr()?.sum_all()?.to_scalar::<f64>()?)
}

/// The tiny configuration's whole step on CPU and CUDA from the same weights and batch:
/// every loss term, every parameter gradient, the online weights after AdamW and the target
/// after the EMA; and the algorithm cache must grow on the first step and not on a second.
fn parity_step(cuda: &Device, out: &mut Out) -> Result<()> {
    Precision::F32.apply();
    let cfg = TrainConfig::tiny();
    let (h, w) = (cfg.augment.out_height, cfg.augment.out_width);
    let (k, s) = (cfg.augment.subcrops.k, cfg.augment.subcrops.size);
    let mut lc = Learner::new(&cfg, &Device::Cpu)?;
    let mut lg = Learner::new(&cfg, cuda)?;
    let bc = synthetic_batch(2, h, w, k, s, &Device::Cpu)?;
    let bg = synthetic_batch(2, h, w, k, s, cuda)?;
    let (tc, gc) = train_step(&mut lc, &bc)?;
    // parity_ops has filled the cache already: the first step must add its own shapes.
    let before = gpu::algo_cache_len(cuda);
    let (tg, gg) = train_step(&mut lg, &bg)?;
    let cached = gpu::algo_cache_len(cuda);
    let tol = tolerance(Precision::F32);
    let terms = [
        ("dense_ab", tg.dense_ab, tc.dense_ab),
        ("dense_ba", tg.dense_ba, tc.dense_ba),
        ("pooled_ab", tg.pooled_ab, tc.pooled_ab),
        ("pooled_ba", tg.pooled_ba, tc.pooled_ba),
        ("total", tg.total, tc.total),
    ];
    for (nm, g, c) in terms {
        let rel = ((g - c) / c.abs().max(1e-12)).abs() as f64;
        out.emit(step_row(format!("loss {nm}"), rel, tol, true, Value::Null))?;
    }
    let floored = step_gradient_parity(out, &lc, &gc, &gg, tol)?;
    step_update_parity(out, &lc, &lg, &floored)?;
    train_step(&mut lg, &bg)?;
    let again = gpu::algo_cache_len(cuda);
    let Some(((before, cached), again)) = before.zip(cached).zip(again) else {
        let why = "no cuDNN algorithm cache on this device";
        return out.emit(skipped("parity", "algorithm cache", Precision::F32, why));
    };
    out.emit(
        json!({"kind": "parity", "op": "algorithm cache", "precision": "f32",
        "tensor": "entries before step 1, after steps 1 and 2", "cached": [before, cached, again],
        "ok": cached > before && again == cached}),
    )?;
    Ok(())
}

/// One row of the training step's parity, with the `extra` fields.
fn step_row(tensor: String, rel: f64, tol: f64, ok: bool, extra: Value) -> Value {
    let mut v = json!({"kind": "parity", "op": "train step (tiny)", "precision": "f32",
        "tensor": tensor, "rel_err": rel, "tol": tol, "ok": ok && rel <= tol});
    if let (Some(v), Value::Object(e)) = (v.as_object_mut(), extra) {
        v.extend(e);
    }
    v
}

/// The worst parameter gradient of the step, CUDA (`gg`) against the CPU (`gc`), as one
/// row; returns the parameters whose gradient is below the floor (rounding noise).
///
/// Per-parameter relative L2 error, the denominator floored at (1e-3 x the RMS gradient of
/// the whole network)^2 an element. The bias of each head's first layer has an exact
/// gradient of 0 (BatchNorm follows it), so both devices hold rounding noise there, whose
/// relative error is of order 1. A gradient on one side only fails the check.
fn step_gradient_parity(
    out: &mut Out,
    lc: &Learner,
    gc: &Grads,
    gg: &Grads,
    tol: f64,
) -> Result<HashSet<String>> {
    let (mut rows, mut one_sided, mut unused) = (Vec::new(), Vec::new(), 0usize);
    let (mut sum_sq, mut n_all) = (0f64, 0usize);
    for (name, _) in &lc.online_params {
        match (gg.get(name), gc.get(name)) {
            (Some(g), Some(c)) => {
                let g = g.to_device(&Device::Cpu)?;
                let den = sq_sum(c)?;
                rows.push((name.clone(), sq_sum(&(&g - c)?)?, den, c.elem_count()));
                sum_sq += den;
                n_all += c.elem_count();
            }
            (None, None) => unused += 1,
            _ => one_sided.push(name.clone()),
        }
    }
    let floor = 1e-6 * sum_sq / n_all.max(1) as f64;
    let (mut worst, mut worst_name) = (0f64, String::new());
    let mut floored = HashSet::new();
    for (name, num, den, n) in &rows {
        let floor_n = floor * *n as f64;
        if *den < floor_n {
            floored.insert(name.clone());
        }
        let rel = (num / den.max(floor_n).max(1e-30)).sqrt();
        // The first row names the worst even when every error is 0 (the CPU on both sides).
        if rel.is_nan() || rel > worst || worst_name.is_empty() {
            (worst, worst_name) = (rel, name.clone());
        }
    }
    // BatchNorm of small batches amplifies differences over ~20 layers: 10x the op tolerance.
    out.emit(step_row(
        format!("worst gradient ({worst_name})"),
        worst,
        10.0 * tol,
        one_sided.is_empty() && !rows.is_empty(),
        json!({"compared": rows.len(), "floored": floored.len(), "missing": one_sided,
            "unused": unused}),
    ))?;
    Ok(floored)
}

/// The weights after AdamW and the target after the EMA, CUDA (`lg`) against the CPU
/// (`lc`), one row each: the RMS difference in units of the step (lr, and (1 - m) lr for
/// the target). AdamW's first step is about lr sign(g) an element, so an element whose
/// gradient is within its rounding error of 0 moves by +lr on one device and -lr on the
/// other: the `floored` parameters are left out, and elsewhere a gradient at the gradient
/// tolerance flips ~0.1% of the elements, ~0.06 step RMS.
fn step_update_parity(
    out: &mut Out,
    lc: &Learner,
    lg: &Learner,
    floored: &HashSet<String>,
) -> Result<()> {
    let lr = lc.cfg.optim.lr;
    let wtol = 0.1;
    let target_step = (1.0 - lc.cfg.optim.ema_m0) * lr;
    let sets = [
        (
            &lc.online_params,
            &lg.online_params,
            "weights after AdamW",
            lr,
        ),
        (
            &lc.target_params,
            &lg.target_params,
            "target after EMA",
            target_step,
        ),
    ];
    for (pc, pg, what, step) in sets {
        let pg: std::collections::HashMap<&str, &Var> =
            pg.iter().map(|(n, v)| (n.as_str(), v)).collect();
        let (mut sq, mut n, mut missing) = (0f64, 0usize, Vec::new());
        let (mut worst, mut worst_name) = (0f64, String::new());
        for (name, vc) in pc.iter().filter(|(n, _)| !floored.contains(n)) {
            let Some(vg) = pg.get(name.as_str()) else {
                missing.push(name.clone());
                continue;
            };
            let d = sq_sum(&(vg.as_tensor().to_device(&Device::Cpu)? - vc.as_tensor())?)?;
            let rms = (d / vc.elem_count() as f64).sqrt() / step;
            if rms.is_nan() || rms > worst || worst_name.is_empty() {
                (worst, worst_name) = (rms, name.clone());
            }
            sq += d;
            n += vc.elem_count();
        }
        let rms = (sq / n.max(1) as f64).sqrt() / step;
        out.emit(step_row(
            format!("{what}, RMS difference / step"),
            rms,
            wtol,
            missing.is_empty() && n > 0 && step > 0.0,
            json!({"worst": worst_name, "worst_rms": worst, "elements": n, "missing": missing,
                "left_out": floored.len()}),
        ))?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Benchmarks

/// Peak device memory since the last `gpu::reset_peak`, in GiB (null on the CPU).
fn peak_gib(dev: &Device) -> Result<Option<f64>> {
    Ok(gpu::peak_bytes(dev)?.map(|b| b as f64 / (1u64 << 30) as f64))
}

/// When the peak-memory mark is reset, as the PyTorch counterpart does it.
#[derive(Clone, Copy, PartialEq)]
enum PeakFrom {
    /// Before the untimed calls (bench/torch_poodle_step.py's `bench_train`).
    Start,
    /// After them (bench/torch_trunk.py).
    Timed,
}

/// Seconds per call of `f`, after 2 untimed calls (algorithm search, PTX JIT), synchronised.
fn time_it(
    dev: &Device,
    iters: usize,
    peak: PeakFrom,
    mut f: impl FnMut() -> Result<()>,
) -> Result<f64> {
    if peak == PeakFrom::Start {
        gpu::reset_peak(dev)?;
    }
    for _ in 0..2 {
        f()?;
    }
    dev.synchronize()?;
    if peak == PeakFrom::Timed {
        gpu::reset_peak(dev)?;
    }
    let t = Instant::now();
    for _ in 0..iters {
        f()?;
    }
    dev.synchronize()?;
    Ok(t.elapsed().as_secs_f64() / iters.max(1) as f64)
}

/// The trunk (ResNet-50, batch 8 at 512x1024 in `Sizes::paper`), training-mode BatchNorm,
/// forward and backward of the mean of C5 (weights stay f32; bf16 runs cast them per use, as
/// autocast does).
fn bench_trunk(dev: &Device, sizes: &Sizes, p: Precision, iters: usize) -> Result<Value> {
    p.apply();
    let (net_cfg, batch, (h, w)) = &sizes.trunk;
    let (batch, h, w) = (*batch, *h, *w);
    let vm = VarMap::new();
    let net = ResNet::new(net_cfg, VarBuilder::from_varmap(&vm, DType::F32, dev))?;
    let x = randn(&[batch, 3, h, w], 1, dev)?.to_dtype(p.dtype())?;
    let s = time_it(dev, iters, PeakFrom::Timed, || {
        let c5 = net.forward_stages(&x, true)?.c5;
        let g = c5.to_dtype(DType::F32)?.mean_all()?.backward()?;
        drop(g);
        Ok(())
    })?;
    Ok(
        json!({"batch": batch, "res": [h, w], "step_s": s, "img_per_s": batch as f64 / s,
        "peak_gib": peak_gib(dev)?}),
    )
}

/// The full step at `sizes.step`, in `Sizes::paper` the paper's: 4 pairs at 512x1024, K = 6 subcrops of 192 px, ResNet-50 + decoder,
/// symmetric dense and pooled losses, AdamW, EMA. The decoder runs in the paper's order
/// (upsample, then bottleneck), as the PyTorch baseline (torch_poodle_step.py) does: the
/// training default, the authors' order, does about 4x less decoder work, which would flatter
/// candle's throughput. The dense loss keeps the default (authors' order, fused).
fn bench_step(dev: &Device, sizes: &Sizes, p: Precision, iters: usize) -> Result<Value> {
    use crate::model::decoder::DecoderOrder;
    let mut cfg = sizes.step.clone();
    cfg.device = if dev.is_cuda() { "cuda" } else { "cpu" }.into();
    cfg.precision = p;
    cfg.model.decoder.order = DecoderOrder::Paper;
    let (h, w) = (cfg.augment.out_height, cfg.augment.out_width);
    let (k, s) = (cfg.augment.subcrops.k, cfg.augment.subcrops.size);
    let n = cfg.data.batch_size;
    let mut l = Learner::new(&cfg, dev)?;
    let b = synthetic_batch(n, h, w, k, s, dev)?;
    let mut loss = f32::NAN;
    let secs = time_it(dev, iters, PeakFrom::Start, || {
        loss = train_step(&mut l, &b)?.0.total;
        Ok(())
    })?;
    // A non-finite loss fails the check (bf16 overflow, a broken op), however fast.
    Ok(json!({"pairs": n, "res": [h, w], "k": k, "subcrop": s,
        "decoder_order": format!("{:?}", cfg.model.decoder.order).to_lowercase(),
        "dense_order": format!("{:?} (fused)", cfg.method.dense_order).to_lowercase(),
        "step_s": secs,
        "pairs_per_s": n as f64 / secs, "peak_gib": peak_gib(dev)?, "loss": loss,
        "ok": loss.is_finite()}))
}
