//! The NCCL engine for CUDA ranks (the CUDA build): one communicator per process on this
//! rank's GPU, formed through a [`FileRendezvous`] in the run directory, on candle's own
//! stream so that every collective is ordered after the kernels that produced its input.
//! Tensors already on the GPU (gradient buckets, SyncBatchNorm statistics) are reduced in
//! GPU memory; the few host values (loss terms, counts) take a small copy each way.
//!
//! A failing rank exits; NCCL has no job-wide abort, so the launcher stops the others
//! (`srun --kill-on-bad-exit=1`, torchrun's default), as with PyTorch.

use super::rendezvous::{job_key, FileRendezvous};
use super::{Collective, DistError, LaunchEnv, Result};
use candle_core::{CudaDevice, CudaStorage, Layout};
use cudarc::driver::DriverError;
use cudarc::nccl::result::NcclError;
use cudarc::nccl::safe::{Comm, Id, ReduceOp};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

pub struct NcclGroup {
    comm: Mutex<Comm>,
    dev: CudaDevice,
    rank: usize,
    world: usize,
}

// SAFETY: an NCCL communicator is a handle any thread may use as long as calls on it do not
// overlap; every call goes through the mutex. Ordering is another matter: candle queues work
// on the calling thread's own stream, so a collective is ordered after the kernels that made
// its input only when it is called from the thread that launched them (the training thread,
// as every call is today).
unsafe impl Send for NcclGroup {}
unsafe impl Sync for NcclGroup {}

fn nccl(op: &'static str) -> impl Fn(NcclError) -> DistError {
    move |e| DistError::Collective {
        op,
        msg: format!("NCCL: {e:?}"),
    }
}

fn cuda(op: &'static str) -> impl Fn(DriverError) -> DistError {
    move |e| DistError::Collective {
        op,
        msg: format!("CUDA: {e}"),
    }
}

impl NcclGroup {
    /// Joins the job: rank 0 makes the NCCL id, the rendezvous under `run_dir` hands it to
    /// every rank (or names the ranks that did not come within `timeout`), then the
    /// communicator forms on `dev`.
    pub fn connect(
        env: &LaunchEnv,
        dev: &CudaDevice,
        run_dir: &Path,
        timeout: Duration,
    ) -> Result<Self> {
        check_library()?;
        let key = job_key(|k| std::env::var(k).ok())?;
        let rdv = FileRendezvous::new(run_dir, &key, env.rank, env.world, timeout);
        let id = match env.rank {
            0 => Some(Id::new().map_err(nccl("unique id"))?),
            _ => None,
        };
        let mine: Option<Vec<u8>> = id.map(|id| id.internal().iter().map(|&c| c as u8).collect());
        let bytes = rdv.exchange(mine.as_deref())?;
        let internal: [std::ffi::c_char; 128] = bytes
            .iter()
            .map(|&b| b as std::ffi::c_char)
            .collect::<Vec<_>>()
            .try_into()
            .map_err(|v: Vec<_>| {
                DistError::Rendezvous(format!(
                    "{}: the NCCL id has {} bytes, not 128",
                    rdv.dir().display(),
                    v.len()
                ))
            })?;
        // ncclCommInitRank joins on the thread's current device: make it this rank's GPU.
        let stream = dev.cuda_stream();
        stream
            .context()
            .bind_to_thread()
            .map_err(cuda("bind device"))?;
        let comm = Comm::from_rank(stream, env.rank, env.world, Id::uninit(internal))
            .map_err(nccl("communicator init"))?;
        let group = NcclGroup {
            comm: Mutex::new(comm),
            dev: dev.clone(),
            rank: env.rank,
            world: env.world,
        };
        group.barrier()?;
        rdv.finish();
        Ok(group)
    }

    fn comm(&self) -> std::sync::MutexGuard<'_, Comm> {
        // A panic while holding the lock leaves the communicator usable (no state of ours).
        self.comm.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// cudarc opens NCCL as `libnccl.so`, while NVIDIA's wheel (`nvidia-nccl-cu13`, the one
/// PyTorch brings) and some installs have only `libnccl.so.2`: say so, naming the fix, where
/// cudarc's loader would panic.
fn check_library() -> Result<()> {
    // SAFETY: opening NCCL runs only its own initialisers, as cudarc's loading of it would.
    let opens = |name: &str| unsafe { libloading::Library::new(name) }.is_ok();
    if opens("libnccl.so") {
        return Ok(());
    }
    let hint = if opens("libnccl.so.2") {
        "only libnccl.so.2 is on the library path and cudarc opens libnccl.so: link it \
         (ln -s /path/to/libnccl.so.2 DIR/libnccl.so) and put DIR on LD_LIBRARY_PATH"
    } else {
        "libnccl.so is not on LD_LIBRARY_PATH (the CUDA toolkit's, a cluster module's, or the \
         nvidia-nccl-cu13 wheel's nvidia/nccl/lib with a libnccl.so link beside libnccl.so.2)"
    };
    Err(DistError::Unavailable(format!("NCCL backend: {hint}")))
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn engine(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        let stream = self.dev.cuda_stream();
        let mut d = stream.clone_htod(buf).map_err(cuda("all_reduce_sum"))?;
        self.comm()
            .all_reduce_in_place(&mut d, &ReduceOp::Sum)
            .map_err(nccl("all_reduce_sum"))?;
        stream
            .memcpy_dtoh(&d, buf)
            .map_err(cuda("all_reduce_sum"))?;
        Ok(())
    }

    fn all_gather_u64(&self, v: u64) -> Result<Vec<u64>> {
        let stream = self.dev.cuda_stream();
        let send = stream.clone_htod(&[v]).map_err(cuda("all_gather_u64"))?;
        let mut all = stream
            .alloc_zeros::<u64>(self.world)
            .map_err(cuda("all_gather_u64"))?;
        self.comm()
            .all_gather(&send, &mut all)
            .map_err(nccl("all_gather_u64"))?;
        stream.clone_dtoh(&all).map_err(cuda("all_gather_u64"))
    }

    fn barrier(&self) -> Result<()> {
        // NCCL has no barrier: a one-value all-reduce, waited for on the host.
        self.all_reduce_sum(&mut [0.0])
    }

    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }

    fn all_reduce_sum_cuda(&self, s: &CudaStorage, l: &Layout) -> Result<CudaStorage> {
        let op = "all_reduce_sum (GPU)";
        let src = crate::cuda::kernels::f32_view(op, s, l)?;
        // SAFETY: the all-reduce writes every element.
        let mut dst =
            unsafe { self.dev.cuda_stream().alloc::<f32>(src.len()) }.map_err(cuda(op))?;
        self.comm()
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(nccl(op))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, self.dev.clone()))
    }
}
