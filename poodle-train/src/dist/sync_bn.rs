//! Synchronised BatchNorm statistics (PyTorch's `SyncBatchNorm`): the per-channel mean and
//! biased variance of a training batch are taken over the union of every rank's batch.
//!
//! The sums go through [`AllReduceSum`], a candle custom op whose backward is again an
//! all-reduce of the incoming gradient: rank `r`'s local sum feeds every rank's loss, so its
//! gradient is the sum over ranks of their gradients for the global sum. With DDP's gradient
//! average on top, W ranks of B images compute exactly the gradients of one process with
//! W x B images.
//!
//! The group is set per thread with [`scope`] by the training loop (data-parallel runs with
//! `dist.sync_bn = true`); BatchNorm layers outside a scope, or in a world of one, use their
//! own batch.

use super::{Collective, SumOverRanks};
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::cell::RefCell;
use std::sync::Arc;

thread_local! {
    static GROUP: RefCell<Option<Arc<dyn Collective>>> = const { RefCell::new(None) };
}

/// Restores the previous group of this thread when dropped.
pub struct Scope {
    prev: Option<Arc<dyn Collective>>,
}

impl Drop for Scope {
    fn drop(&mut self) {
        let prev = self.prev.take();
        GROUP.with(|g| *g.borrow_mut() = prev);
    }
}

/// BatchNorm layers run by this thread synchronise over `group` until the scope is dropped
/// (`None`: they use their own batch).
pub fn scope(group: Option<Arc<dyn Collective>>) -> Scope {
    let prev = GROUP.with(|g| std::mem::replace(&mut *g.borrow_mut(), group));
    Scope { prev }
}

/// The group this thread's BatchNorm layers synchronise over (only a world above one).
pub fn current() -> Option<Arc<dyn Collective>> {
    GROUP.with(|g| g.borrow().clone().filter(|g| g.world() > 1))
}

/// Sum over ranks, differentiable: the backward is the same all-reduce of the gradient.
pub struct AllReduceSum {
    group: Arc<dyn Collective>,
}

impl AllReduceSum {
    pub fn apply(x: &Tensor, group: &Arc<dyn Collective>) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1(AllReduceSum {
            group: group.clone(),
        })
    }
}

impl CustomOp1 for AllReduceSum {
    fn name(&self) -> &'static str {
        "all-reduce-sum"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        SumOverRanks(self.group.as_ref()).cpu_fwd(storage, layout)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        SumOverRanks(self.group.as_ref()).cuda_fwd(storage, layout)
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(AllReduceSum::apply(grad_res, &self.group)?))
    }
}

/// Values per channel over all ranks (each rank's `local` count, summed; gathered as
/// integers because an f32 sum is inexact past 2^24, a count the paper's 32 ranks exceed).
pub fn global_count(local: usize, group: &dyn Collective) -> candle_core::Result<usize> {
    let all = group
        .all_gather_u64(local as u64)
        .map_err(|e| candle_core::Error::Msg(format!("SyncBatchNorm count: {e}")))?;
    Ok(all.iter().sum::<u64>() as usize)
}
