//! Data-parallel training with PyTorch DDP + SyncBatchNorm semantics, over existing engines:
//! MPI for CPU processes (`mpi` cargo feature, Open MPI through the `mpi` crate) and, on
//! CUDA, NCCL (the CUDA build, `nccl`; its ranks meet through [`rendezvous`]).
//!
//! - [`LaunchEnv`]: rank, world size and local rank from the launcher's environment
//!   (`mpirun`, Slurm's `srun`, torchrun).
//! - [`Collective`]: the few collectives training needs (sum all-reduce, gather of a word,
//!   barrier, abort), one implementation per engine, [`SingleProcess`] for one process and
//!   [`local::LocalGroup`] for threads of one process (tests).
//! - [`sync_bn`]: BatchNorm statistics over all ranks, differentiable (the backward of an
//!   all-reduce is an all-reduce), as `torch.nn.SyncBatchNorm`.
//! - [`average_gradients`]: DDP's gradient average, one collective per bucket.

pub mod local;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;
pub mod sync_bn;

use crate::optim::Grads;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum DistError {
    #[error("launch environment: {0}")]
    Env(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("collective {op}: {msg}")]
    Collective { op: &'static str, msg: String },
    #[error("{0}")]
    Rendezvous(String),
    #[error("ranks disagree: {0}")]
    Diverged(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DistError>;

/// Which engine joins the processes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// One process: no launcher variables, or a world of one. Several ranks in the
    /// environment: MPI on CPU, NCCL on CUDA.
    #[default]
    Auto,
    /// One process, whatever the environment says (a launcher's world size > 1 is refused).
    None,
    /// MPI (CPU tensors; a build with `--features mpi`).
    Mpi,
    /// NCCL (CUDA tensors; the CUDA build).
    Nccl,
}

/// Data-parallel settings (`dist.*` in the training config).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DistConfig {
    pub backend: Backend,
    /// BatchNorm statistics over all ranks (the paper's synchronised BatchNorm; PyTorch's
    /// SyncBatchNorm). Off: each rank normalises with its own batch, as plain DDP does.
    pub sync_bn: bool,
    /// Gradient bucket size in MiB (PyTorch DDP's `bucket_cap_mb` default, 25): one
    /// all-reduce per bucket.
    pub bucket_mb: f64,
    /// Every this many steps, check that the online and target weights are bit-identical on
    /// every rank (a debugging aid; null: never).
    pub check_every: Option<u64>,
    /// NCCL: how long the ranks wait for each other at start (rank 0's id, every rank's
    /// arrival) before the job stops naming the ranks missing. Slurm may start the tasks of
    /// a large job a minute apart; a stuck node should not hold 32 GPUs for long.
    pub rendezvous_timeout_s: u64,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            backend: Backend::Auto,
            sync_bn: true,
            bucket_mb: 25.0,
            check_every: None,
            rendezvous_timeout_s: 300,
        }
    }
}

/// Where this process stands in the job, as its launcher describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world: usize,
    /// Rank on this node: the CUDA device index.
    pub local_rank: usize,
    /// Which variables said so (`mpirun`, `slurm`, `torchrun`, or `none`).
    pub source: &'static str,
}

impl LaunchEnv {
    pub fn single() -> Self {
        LaunchEnv {
            rank: 0,
            world: 1,
            local_rank: 0,
            source: "none",
        }
    }

    /// From the process environment.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// From a variable lookup. MPI's own variables come first (they are right even when Slurm
    /// or torchrun variables leak in from an outer job), then torchrun's, then srun's (a
    /// Slurm batch script outside `srun` sets no `SLURM_STEP_NUM_TASKS` and is one process).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        const SOURCES: [(&str, [&str; 3]); 4] = [
            (
                "mpirun",
                [
                    "OMPI_COMM_WORLD_RANK",
                    "OMPI_COMM_WORLD_SIZE",
                    "OMPI_COMM_WORLD_LOCAL_RANK",
                ],
            ),
            ("mpirun", ["PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"]),
            ("torchrun", ["RANK", "WORLD_SIZE", "LOCAL_RANK"]),
            (
                "slurm",
                ["SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"],
            ),
        ];
        for (source, [rank, world, local]) in SOURCES {
            let (Some(r), Some(w)) = (get(rank), get(world)) else {
                continue;
            };
            let num = |name: &str, v: &str| {
                v.trim()
                    .parse::<usize>()
                    .map_err(|_| DistError::Env(format!("{name}={v:?} ({source}) is not a number")))
            };
            let (rank_v, world_v) = (num(rank, &r)?, num(world, &w)?);
            let local_v = match get(local) {
                Some(l) => num(local, &l)?,
                None => 0,
            };
            if world_v == 0 || rank_v >= world_v {
                return Err(DistError::Env(format!(
                    "{rank}={rank_v} is not a rank of {world}={world_v} ({source})"
                )));
            }
            return Ok(LaunchEnv {
                rank: rank_v,
                world: world_v,
                local_rank: local_v,
                source,
            });
        }
        Ok(Self::single())
    }
}

/// The collectives data-parallel training uses. Every rank calls them in the same order
/// (the training step and candle's backward traverse the same graph on every rank).
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The engine's name for logs.
    fn engine(&self) -> &'static str;
    /// Element-wise sum over ranks, in place; every rank gets the same result.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()>;
    /// Every rank's `v`, by rank.
    fn all_gather_u64(&self, v: u64) -> Result<Vec<u64>>;
    fn barrier(&self) -> Result<()>;
    /// Stops every rank of the job (after this rank printed the cause).
    fn abort(&self, code: i32) -> !;
    /// [`Collective::all_reduce_sum`] of a contiguous f32 buffer in GPU memory. This default
    /// goes through host memory; NCCL reduces on the GPU.
    #[cfg(feature = "cuda")]
    fn all_reduce_sum_cuda(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<candle_core::CudaStorage> {
        use candle_core::backend::{BackendDevice, BackendStorage};
        let CpuStorage::F32(host) = s.to_cpu_storage()? else {
            return Err(DistError::Collective {
                op: "all_reduce_sum",
                msg: format!("f32 tensors only, got {:?}", s.dtype()),
            });
        };
        let mut buf = contiguous_part(&host, l)?.to_vec();
        self.all_reduce_sum(&mut buf)?;
        Ok(s.device().storage_from_slice(&buf)?)
    }
}

fn contiguous_part<'a>(data: &'a [f32], l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((lo, hi)) => Ok(&data[lo..hi]),
        None => Err(DistError::Collective {
            op: "all_reduce_sum",
            msg: "the input must be contiguous".into(),
        }),
    }
}

/// Sum over ranks of an f32 tensor, as a candle op so that it runs where the tensor lives
/// (GPU tensors stay on the GPU under NCCL). Forward only: [`sync_bn::AllReduceSum`] gives it
/// a backward.
pub struct SumOverRanks<'a>(pub &'a dyn Collective);

impl SumOverRanks<'_> {
    pub fn apply(self, t: &Tensor) -> candle_core::Result<Tensor> {
        t.contiguous()?.apply_op1_no_bwd(&self)
    }
}

fn op_err(e: DistError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl CustomOp1 for SumOverRanks<'_> {
    fn name(&self) -> &'static str {
        "sum-over-ranks"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = s else {
            use candle_core::backend::BackendStorage;
            candle_core::bail!("sum-over-ranks: f32 tensors only, got {:?}", s.dtype());
        };
        let mut buf = contiguous_part(data, l).map_err(op_err)?.to_vec();
        self.0.all_reduce_sum(&mut buf).map_err(op_err)?;
        Ok((CpuStorage::F32(buf), l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = self.0.all_reduce_sum_cuda(s, l).map_err(op_err)?;
        Ok((out, l.shape().clone()))
    }
}

/// A world of one.
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn engine(&self) -> &'static str {
        "none"
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&self, v: u64) -> Result<Vec<u64>> {
        Ok(vec![v])
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// A collective that counts what it moves (bytes of all-reduce payload and calls), for the
/// per-step traffic in the metrics.
pub struct Counted {
    inner: Arc<dyn Collective>,
    bytes: std::sync::atomic::AtomicU64,
    calls: std::sync::atomic::AtomicU64,
}

impl Counted {
    pub fn new(inner: Arc<dyn Collective>) -> Self {
        Counted {
            inner,
            bytes: 0.into(),
            calls: 0.into(),
        }
    }

    /// (bytes, calls) since the last call.
    pub fn take(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.bytes.swap(0, Relaxed), self.calls.swap(0, Relaxed))
    }

    /// One collective moving `bytes`.
    fn count(&self, bytes: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        self.bytes.fetch_add(bytes as u64, Relaxed);
        self.calls.fetch_add(1, Relaxed);
    }
}

impl Collective for Counted {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world(&self) -> usize {
        self.inner.world()
    }
    fn engine(&self) -> &'static str {
        self.inner.engine()
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.count(4 * buf.len());
        self.inner.all_reduce_sum(buf)
    }
    fn all_gather_u64(&self, v: u64) -> Result<Vec<u64>> {
        self.count(8);
        self.inner.all_gather_u64(v)
    }
    fn barrier(&self) -> Result<()> {
        self.inner.barrier()
    }
    fn abort(&self, code: i32) -> ! {
        self.inner.abort(code)
    }
    #[cfg(feature = "cuda")]
    fn all_reduce_sum_cuda(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> Result<candle_core::CudaStorage> {
        self.count(4 * l.shape().elem_count());
        self.inner.all_reduce_sum_cuda(s, l)
    }
}

/// Joins the job this process was launched into, per `cfg.backend` and the environment, on
/// the training device `dev`. NCCL's ranks meet in `run_dir` (on a filesystem every node
/// sees).
pub fn connect(
    cfg: &DistConfig,
    env: &LaunchEnv,
    dev: &Device,
    run_dir: &Path,
) -> Result<Arc<dyn Collective>> {
    let backend = match cfg.backend {
        Backend::Auto if env.world == 1 => return Ok(Arc::new(SingleProcess)),
        Backend::Auto if dev.is_cuda() => Backend::Nccl,
        Backend::Auto => Backend::Mpi,
        b => b,
    };
    match backend {
        Backend::None if env.world > 1 => Err(DistError::Env(format!(
            "the launcher ({}) started {} ranks but dist.backend = none",
            env.source, env.world
        ))),
        Backend::None | Backend::Auto => Ok(Arc::new(SingleProcess)),
        Backend::Mpi => connect_mpi(env),
        Backend::Nccl => connect_nccl(env, dev, run_dir, cfg.rendezvous_timeout_s),
    }
}

#[cfg(feature = "cuda")]
fn connect_nccl(
    env: &LaunchEnv,
    dev: &Device,
    run_dir: &Path,
    secs: u64,
) -> Result<Arc<dyn Collective>> {
    let Device::Cuda(cuda) = dev else {
        return Err(DistError::Unavailable(format!(
            "rank {} of {} ({}): the NCCL backend needs a CUDA device, not {dev:?}; CPU \
             processes use dist.backend = mpi",
            env.rank, env.world, env.source
        )));
    };
    let timeout = std::time::Duration::from_secs(secs);
    Ok(Arc::new(nccl::NcclGroup::connect(
        env, cuda, run_dir, timeout,
    )?))
}

#[cfg(not(feature = "cuda"))]
fn connect_nccl(env: &LaunchEnv, _: &Device, _: &Path, _: u64) -> Result<Arc<dyn Collective>> {
    Err(DistError::Unavailable(format!(
        "rank {} of {} ({}): the NCCL backend is in the CUDA build only (make build-cuda); \
         CPU processes use dist.backend = mpi (a build with --features mpi)",
        env.rank, env.world, env.source
    )))
}

#[cfg(feature = "mpi")]
fn connect_mpi(env: &LaunchEnv) -> Result<Arc<dyn Collective>> {
    Ok(Arc::new(mpi::MpiGroup::init(env)?))
}

#[cfg(not(feature = "mpi"))]
fn connect_mpi(env: &LaunchEnv) -> Result<Arc<dyn Collective>> {
    Err(DistError::Unavailable(format!(
        "rank {} of {} ({}): the MPI backend needs a poodle-train built with --features mpi \
         (Open MPI: apt-get install libopenmpi-dev openmpi-bin)",
        env.rank, env.world, env.source
    )))
}

/// What one gradient average moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReduceStats {
    pub bytes: usize,
    pub collectives: usize,
}

/// Averages `grads` over ranks in place, DDP style: parameters in name order packed into
/// buckets of at most `bucket_bytes` (a parameter larger than a bucket gets one of its own),
/// one all-reduce per bucket, then divided by the world size. Every rank holds the same
/// parameter set (the same graph), so the buckets line up.
pub fn average_gradients(
    grads: &mut Grads,
    group: &dyn Collective,
    bucket_bytes: usize,
) -> Result<ReduceStats> {
    let mut stats = ReduceStats::default();
    if group.world() == 1 {
        return Ok(stats);
    }
    let entries: Vec<(String, Tensor)> =
        grads.iter().map(|(n, t)| (n.clone(), t.clone())).collect();
    let cap = (bucket_bytes / 4).max(1);
    let scale = 1.0 / group.world() as f32;
    let mut start = 0;
    while start < entries.len() {
        let mut end = start;
        let mut len = 0;
        while end < entries.len() && (end == start || len + entries[end].1.elem_count() <= cap) {
            len += entries[end].1.elem_count();
            end += 1;
        }
        // One flat bucket on the gradients' own device (GPU memory under NCCL).
        let parts = entries[start..end]
            .iter()
            .map(|(_, t)| t.to_dtype(DType::F32)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let flat = (SumOverRanks(group).apply(&Tensor::cat(&parts, 0)?)? * scale as f64)?;
        stats.bytes += len * 4;
        stats.collectives += 1;
        let mut off = 0;
        for (name, t) in &entries[start..end] {
            let n = t.elem_count();
            let avg = flat
                .narrow(0, off, n)?
                .reshape(t.shape())?
                .to_dtype(t.dtype())?;
            grads.insert(name.clone(), avg);
            off += n;
        }
        start = end;
    }
    Ok(stats)
}

/// Averages a few scalars (loss terms, health signals) over ranks.
pub fn mean_over_ranks(values: &mut [f32], group: &dyn Collective) -> Result<()> {
    if group.world() > 1 {
        group.all_reduce_sum(values)?;
        let w = group.world() as f32;
        values.iter_mut().for_each(|v| *v /= w);
    }
    Ok(())
}

/// FNV-1a over the bits of every variable, in name order: equal on two ranks exactly when
/// their weights are bit-identical (up to a 2^-64 collision).
pub fn fingerprint(vars: &[(String, Var)]) -> Result<u64> {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    for (name, v) in vars {
        name.bytes().for_each(&mut eat);
        let vals = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
        vals.iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .for_each(&mut eat);
    }
    Ok(h)
}

/// Fails, naming the ranks that differ from rank 0, unless every rank holds the same weights.
pub fn check_identical(vars: &[(String, Var)], group: &dyn Collective, what: &str) -> Result<()> {
    let all = group.all_gather_u64(fingerprint(vars)?)?;
    let odd: Vec<usize> = (0..all.len()).filter(|&r| all[r] != all[0]).collect();
    if odd.is_empty() {
        Ok(())
    } else {
        Err(DistError::Diverged(format!(
            "{what}: the weights of ranks {odd:?} differ from rank 0's"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<LaunchEnv> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_lookup(|k| m.get(k).cloned())
    }

    #[test]
    fn launch_env_from_each_launcher() {
        assert_eq!(env(&[]).unwrap(), LaunchEnv::single());
        let slurm = env(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_STEP_NUM_TASKS", "32"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NTASKS", "32"),
        ])
        .unwrap();
        assert_eq!((slurm.rank, slurm.world, slurm.local_rank), (5, 32, 1));
        assert_eq!(slurm.source, "slurm");
        // A batch script outside srun: SLURM_NTASKS alone is not a launch.
        assert_eq!(
            env(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "8")]).unwrap(),
            LaunchEnv::single()
        );
        let torch = env(&[("RANK", "3"), ("WORLD_SIZE", "4"), ("LOCAL_RANK", "3")]).unwrap();
        assert_eq!((torch.rank, torch.world, torch.local_rank), (3, 4, 3));
        // MPI's own variables win over leaked outer ones.
        let mpi = env(&[
            ("OMPI_COMM_WORLD_RANK", "1"),
            ("OMPI_COMM_WORLD_SIZE", "2"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("RANK", "7"),
            ("WORLD_SIZE", "8"),
        ])
        .unwrap();
        assert_eq!((mpi.rank, mpi.world, mpi.source), (1, 2, "mpirun"));
    }

    #[test]
    fn launch_env_errors_name_the_variable() {
        let e = env(&[("RANK", "4"), ("WORLD_SIZE", "4")]).unwrap_err();
        assert!(e.to_string().contains("RANK=4"), "{e}");
        let e = env(&[("RANK", "x"), ("WORLD_SIZE", "4")]).unwrap_err();
        assert!(e.to_string().contains("RANK=\"x\""), "{e}");
    }

    #[test]
    fn connect_refuses_what_is_not_built() {
        let two = LaunchEnv {
            rank: 0,
            world: 2,
            local_rank: 0,
            source: "torchrun",
        };
        let cfg = DistConfig::default();
        let run = std::env::temp_dir();
        let cpu = Device::Cpu;
        // Without the CUDA build (CI), a CUDA job's backend says where it lives.
        let nccl = DistConfig {
            backend: Backend::Nccl,
            ..cfg.clone()
        };
        let e = connect(&nccl, &two, &cpu, &run).err().unwrap();
        assert!(e.to_string().contains("NCCL"), "{e}");
        let none = DistConfig {
            backend: Backend::None,
            ..cfg.clone()
        };
        let e = connect(&none, &two, &cpu, &run).err().unwrap();
        assert!(e.to_string().contains("dist.backend = none"), "{e}");
        let one = connect(&cfg, &LaunchEnv::single(), &cpu, &run).unwrap();
        assert_eq!(one.world(), 1);
    }

    #[test]
    fn gradient_average_in_buckets_matches_the_mean() {
        let groups = local::LocalGroup::new(2);
        let dev = candle_core::Device::Cpu;
        let shapes: [(&str, &[usize]); 3] = [("a", &[3, 2]), ("b", &[5]), ("c", &[2, 2])];
        let grads_for = |r: usize| {
            let mut g = Grads::default();
            for (i, (n, s)) in shapes.iter().enumerate() {
                let len: usize = s.iter().product();
                let v: Vec<f32> = (0..len).map(|k| (r * 100 + i * 10 + k) as f32).collect();
                g.insert(*n, Tensor::from_vec(v, *s, &dev).unwrap());
            }
            g
        };
        let results: Vec<(Grads, ReduceStats)> = std::thread::scope(|s| {
            let hs: Vec<_> = groups
                .iter()
                .enumerate()
                .map(|(r, grp)| {
                    let mut g = grads_for(r);
                    // 7 floats per bucket: a+b do not fit together, b+c do not either.
                    s.spawn(move || {
                        let st = average_gradients(&mut g, grp, 28).unwrap();
                        (g, st)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let (g0, g1) = (grads_for(0), grads_for(1));
        for (n, _) in shapes {
            let want: Vec<f32> = g0.get(n).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let other: Vec<f32> = g1.get(n).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let want: Vec<f32> = want
                .iter()
                .zip(&other)
                .map(|(a, b)| (a + b) / 2.0)
                .collect();
            for (g, _) in &results {
                let got: Vec<f32> = g.get(n).unwrap().flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(got, want, "{n}");
            }
        }
        assert_eq!(results[0].1.collectives, 3);
        assert_eq!(results[0].1.bytes, (6 + 5 + 4) * 4);
    }
}
