//! A group of threads in one process as ranks: the collectives of [`super::Collective`]
//! through shared memory and a barrier. For tests of the data-parallel maths (SyncBN,
//! gradient averages) without launching processes; the sums are taken in rank order on every
//! rank, so every rank gets bit-identical results, as MPI's and NCCL's all-reduce give.

use super::{Collective, Result};
use std::sync::{Arc, Barrier, Mutex};

struct Shared {
    barrier: Barrier,
    slots: Mutex<Vec<Vec<f32>>>,
    words: Mutex<Vec<u64>>,
}

pub struct LocalGroup {
    rank: usize,
    world: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// One handle per rank; hand each to its own thread.
    pub fn new(world: usize) -> Vec<LocalGroup> {
        let shared = Arc::new(Shared {
            barrier: Barrier::new(world),
            slots: Mutex::new(vec![Vec::new(); world]),
            words: Mutex::new(vec![0; world]),
        });
        (0..world)
            .map(|rank| LocalGroup {
                rank,
                world,
                shared: shared.clone(),
            })
            .collect()
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn engine(&self) -> &'static str {
        "threads"
    }
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        self.shared.slots.lock().expect("slots")[self.rank] = buf.to_vec();
        self.shared.barrier.wait();
        {
            let slots = self.shared.slots.lock().expect("slots");
            for (i, v) in buf.iter_mut().enumerate() {
                *v = slots.iter().map(|s| s[i]).sum();
            }
        }
        // Nobody may overwrite a slot before every rank has read them all.
        self.shared.barrier.wait();
        Ok(())
    }
    fn all_gather_u64(&self, v: u64) -> Result<Vec<u64>> {
        self.shared.words.lock().expect("words")[self.rank] = v;
        self.shared.barrier.wait();
        let all = self.shared.words.lock().expect("words").clone();
        self.shared.barrier.wait();
        Ok(all)
    }
    fn barrier(&self) -> Result<()> {
        self.shared.barrier.wait();
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
