//! The MPI engine for CPU processes (`--features mpi`; Open MPI or any MPI the `mpi` crate
//! builds against). Launch with `mpirun -np N poodle-train train ...` or Slurm's
//! `srun --mpi=pmix`.

use super::{Collective, DistError, LaunchEnv, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Threading;
use std::thread::ThreadId;

/// `MPI_COMM_WORLD`, initialised with `MPI_THREAD_FUNNELED`: every MPI call comes from the
/// thread that initialised MPI (the training loop; candle runs custom ops and backward on
/// the calling thread), which [`MpiGroup`] checks on every call.
pub struct MpiGroup {
    // Dropping the universe finalises MPI: it lives as long as the group.
    _universe: Universe,
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    thread: ThreadId,
}

// SAFETY: the communicator is a handle that MPI allows any thread to use under
// MPI_THREAD_FUNNELED as long as only the initialising thread makes calls; `check_thread`
// refuses calls from any other thread before they reach MPI.
unsafe impl Send for MpiGroup {}
unsafe impl Sync for MpiGroup {}

impl MpiGroup {
    /// Initialises MPI and checks that MPI's rank and size agree with the launcher's
    /// variables (a mismatch means the processes were not started by one MPI launch).
    pub fn init(env: &LaunchEnv) -> Result<Self> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| DistError::Unavailable("MPI was initialised already".into()))?;
        if level < Threading::Funneled {
            return Err(DistError::Unavailable(format!(
                "the MPI library offers thread level {level:?}, poodle needs Funneled"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        if env.source != "none" && (rank, size) != (env.rank, env.world) {
            return Err(DistError::Env(format!(
                "MPI says rank {rank} of {size}, the launcher ({}) rank {} of {}: start \
                 every rank with one mpirun/srun",
                env.source, env.rank, env.world
            )));
        }
        Ok(MpiGroup {
            _universe: universe,
            world,
            rank,
            size,
            thread: std::thread::current().id(),
        })
    }

    fn check_thread(&self, op: &'static str) -> Result<()> {
        if std::thread::current().id() == self.thread {
            Ok(())
        } else {
            Err(DistError::Collective {
                op,
                msg: "called from a thread other than the one that initialised MPI".into(),
            })
        }
    }
}

impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.size
    }
    fn engine(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.check_thread("all_reduce_sum")?;
        let send = buf.to_vec();
        self.world
            .all_reduce_into(&send[..], buf, SystemOperation::sum());
        Ok(())
    }
    fn all_gather_u64(&self, v: u64) -> Result<Vec<u64>> {
        self.check_thread("all_gather_u64")?;
        let mut all = vec![0u64; self.size];
        self.world.all_gather_into(&v, &mut all[..]);
        Ok(all)
    }
    fn barrier(&self) -> Result<()> {
        self.check_thread("barrier")?;
        self.world.barrier();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
