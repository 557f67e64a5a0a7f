//! The training loop, in one place: data -> online and target forward passes on both frame
//! orders -> dense and pooled losses -> AdamW step -> EMA update; JSON-lines metrics,
//! atomic checkpoints, exact resume, and a stop on a non-finite loss that names the term.

use crate::checkpoint::{self, Progress};
use crate::config::TrainConfig;
use crate::data::loader::{Batch, Loader, LoaderConfig, Shard};
use crate::dist::{self, Collective, LaunchEnv};
use crate::loss::dense::{dense_loss_with_plans, Correspondence, DensePlans};
use crate::loss::{check_finite, pooled::pooled_loss, total, LossTerms};
use crate::model::{copy_vars, trainable_vars, Encoder, Online};
use crate::optim::{ema_update, is_no_decay, AdamW, AdamWConfig, GradAccumulator, Grads, Schedule};
use crate::progress::StepReporter;
use crate::tensorboard::EventWriter;
use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use serde::Serialize;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// One JSON line of `metrics.jsonl`.
#[derive(Debug, Serialize)]
pub struct StepMetrics {
    pub step: u64,
    /// Pass over the data (each counts as R paper epochs).
    pub pass: u64,
    /// Paper epochs done after this step (fractional).
    pub epoch: f64,
    /// Pairs trained on so far (all ranks).
    pub pairs_seen: u64,
    pub lr: f64,
    pub momentum: f64,
    #[serde(flatten)]
    pub loss: LossTerms,
    pub dense_mask_fraction: f32,
    /// Std over the batch of the L2-normalised online projections, mean over dimensions:
    /// about 1/sqrt(D) when healthy, near 0 when the representation collapses.
    pub proj_std: f32,
    pub grad_norm: f64,
    /// Payload this rank all-reduced in the step (gradients, SyncBN statistics, metrics),
    /// bytes, and the number of collectives; 0 in a world of one.
    pub allreduce_bytes: u64,
    pub allreduce_calls: u64,
    /// All ranks together.
    pub pairs_per_s: f64,
    /// Rank 0's wait for its loader.
    pub data_wait_s: f64,
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Serialize)]
pub struct RunSummary {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    pub paper_epochs: f64,
    pub pairs_seen: u64,
    pub first_loss: Option<f32>,
    pub last_loss: Option<f32>,
    pub checkpoint: Option<String>,
}

/// The device of this rank: `cuda` means this rank's GPU (one process per GPU, see
/// [`gpu_index`]); an explicit `cuda:N` or `cpu` is taken as given.
pub fn device_for_rank(spec: &str, env: &LaunchEnv) -> Result<Device> {
    if spec == "cuda" {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        return device(&format!("cuda:{}", gpu_index(env, visible.as_deref())?));
    }
    device(spec)
}

/// `LOCAL_RANK` among the GPUs this process sees, except where the launcher already gave
/// each task its own GPU (`srun --gpus-per-task=1`, `--gpu-bind=single:1`: one entry in
/// `CUDA_VISIBLE_DEVICES`), which is then device 0.
pub fn gpu_index(env: &LaunchEnv, visible: Option<&str>) -> Result<usize> {
    let Some(list) = visible.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(env.local_rank);
    };
    let count = list.split(',').count();
    match count {
        1 => Ok(0),
        n if env.local_rank < n => Ok(env.local_rank),
        n => bail!(
            "rank {} ({}): local rank {} but CUDA_VISIBLE_DEVICES={list} shows {n} GPUs: start \
             one task per GPU",
            env.rank,
            env.source,
            env.local_rank
        ),
    }
}

pub fn device(spec: &str) -> Result<Device> {
    if spec == "cpu" {
        return Ok(Device::Cpu);
    }
    let id = spec
        .strip_prefix("cuda:")
        .or_else(|| (spec == "cuda").then_some("0"))
        .with_context(|| format!("device {spec:?}: use cpu or cuda:N"))?;
    let dev = Device::new_cuda(id.parse().with_context(|| format!("device {spec:?}"))?)
        .with_context(|| {
            format!("device {spec}: build poodle-train with --features cuda on a CUDA machine")
        })?;
    #[cfg(feature = "cuda")]
    crate::cuda::keep_pool_memory(&dev)?;
    Ok(dev)
}

/// Online network, EMA target and optimiser, built from a config.
pub struct Learner {
    pub cfg: TrainConfig,
    pub online_map: VarMap,
    pub target_map: VarMap,
    pub online: Online,
    pub target: Encoder,
    pub opt: AdamW,
    pub(crate) online_params: Vec<(String, candle_core::Var)>,
    pub(crate) target_params: Vec<(String, candle_core::Var)>,
}

impl Learner {
    pub fn new(cfg: &TrainConfig, dev: &Device) -> Result<Self> {
        ensure!(
            cfg.precision.is_f32() || dev.is_cuda(),
            "precision {:?} needs a CUDA device (the CPU computes in f32)",
            cfg.precision
        );
        // A process-wide switch of cuDNN and candle's cuBLAS path; bf16 runs allow TF32 for
        // what stays f32, as PyTorch's autocast runs do.
        #[cfg(feature = "cuda")]
        if dev.is_cuda() {
            crate::cuda::set_tf32(!cfg.precision.is_f32());
        }
        let online_map = VarMap::new();
        let target_map = VarMap::new();
        let online = Online::new(
            &cfg.model,
            VarBuilder::from_varmap(&online_map, DType::F32, dev),
        )?;
        let target = Encoder::new(
            &cfg.model,
            VarBuilder::from_varmap(&target_map, DType::F32, dev),
        )?;
        crate::model::init::reseed(&online_map, cfg.seed)?;
        if let Some(path) = &cfg.init {
            crate::export::load_init_with(&online_map, path, cfg.init_network)
                .with_context(|| format!("init {}", path.display()))?;
        }
        copy_vars(&online_map, &target_map)?;
        let online_params = trainable_vars(&online_map);
        let target_params = trainable_vars(&target_map);
        let opt = AdamW::new_with(
            online_params.clone(),
            AdamWConfig {
                beta1: cfg.optim.betas[0],
                beta2: cfg.optim.betas[1],
                eps: cfg.optim.eps,
                weight_decay: cfg.optim.weight_decay,
            },
            // Biases and BatchNorm parameters (rank 1) get no weight decay.
            |name, t| t.rank() <= 1 || is_no_decay(name),
        )?;
        Ok(Learner {
            cfg: cfg.clone(),
            online_map,
            target_map,
            online,
            target,
            opt,
            online_params,
            target_params,
        })
    }

    /// The optimised parameters of the online network, by name.
    pub fn online_params(&self) -> &[(String, candle_core::Var)] {
        &self.online_params
    }

    /// One optimiser step with `grads` (already averaged over micro-batches and ranks), then
    /// the EMA update of the target with momentum `mom`.
    pub fn apply(&mut self, grads: &Grads, lr: f64, mom: f64) -> Result<()> {
        self.opt.step_with(grads, lr, self.cfg.optim.weight_decay)?;
        ema_update(&self.target_params, &self.online_params, mom)?;
        Ok(())
    }

    /// Forward both frame orders and return the differentiable total with its terms, the
    /// dense mask fraction and the projection std (read from the device: see
    /// [`Self::queue_losses`] for the form that does not wait).
    pub fn losses(&self, b: &Batch) -> Result<(Tensor, LossTerms, f32, f32)> {
        let q = self.queue_losses(b)?;
        let (terms, proj_std) = read_logged(&q.logged)?;
        Ok((q.total, terms, q.mask_fraction, proj_std))
    }

    /// Forward both frame orders; the losses as queued on the device, nothing read back.
    pub fn queue_losses(&self, b: &Batch) -> Result<QueuedLosses> {
        let m = &self.cfg.method;
        let (h, w) = (b.views[0].dim(2)?, b.views[0].dim(3)?);
        let zero = Tensor::zeros((), DType::F32, b.views[0].device())?;
        let (mut d_ab, mut d_ba, mut p_ab, mut p_ba) =
            (zero.clone(), zero.clone(), zero.clone(), zero);
        let mut mask_fraction = 0.0;
        // Rows of the collapse metric: the pooled projections, else the dense targets' means.
        let mut collapse_rows = None;
        // Both directions go through each network as one batch, as the authors concatenate
        // [frame t, frame t+dt]: BatchNorm sees 2N images (2NK subcrops).
        let halves = |x: Tensor| -> Result<Vec<Tensor>> { Ok(x.chunk(2, 0)?) };
        // Networks run in the activation dtype, the losses in f32.
        let act = self.cfg.precision.activation_dtype();
        let to_f32 = |x: Tensor| x.to_dtype(DType::F32);
        // Both branches' forward passes first, then the losses: on a GPU the forwards run
        // while the host builds the dense loss's sampling plans.
        let dense = if m.dense {
            let online_in = Tensor::cat(&[&b.views[0], &b.views[1]], 0)?.to_dtype(act)?;
            let target_in = Tensor::cat(&[&b.target_views[0], &b.target_views[1]], 0)?;
            let p = self.online.encoder.dense(&online_in, true)?;
            let q = halves(to_f32(self.online.predictors.dense(&p, true)?)?)?;
            let t = self.target.dense(&target_in.to_dtype(act)?, true)?;
            Some((q, halves(to_f32(t)?.detach())?))
        } else {
            None
        };
        let pooled = if m.pooled {
            // subcrops[d][0] online, subcrops[d][1] target of direction d (t online, then
            // t+dt online): each direction has its own K pairs.
            let sc = &b.subcrops;
            let online_in = Tensor::cat(&[&sc[0][0], &sc[1][0]], 0)?.to_dtype(act)?;
            let target_in = Tensor::cat(&[&sc[0][1], &sc[1][1]], 0)?.to_dtype(act)?;
            let proj = self.online.encoder.pooled(&online_in, true)?;
            let q = halves(to_f32(self.online.predictors.pooled(&proj, true)?)?)?;
            let z = halves(to_f32(self.target.pooled(&target_in, true)?)?.detach())?;
            Some((q, z, proj))
        } else {
            None
        };
        if let Some((q, t)) = dense {
            let corr = |d: usize| Correspondence {
                a_online: &b.affines[d],
                a_target: &b.target_affines[1 - d],
                flow: &b.flow[d],
                occluded: &b.occluded[d],
                crop: (h, w),
                order: m.dense_order,
            };
            // Both frame orders' plans (host work) before either loss uploads anything: an
            // upload waits for the queued forward passes, and the second order's host work
            // would then run while the GPU idles.
            let plans = [
                DensePlans::new(&q[0], &t[1], &corr(0))?,
                DensePlans::new(&q[1], &t[0], &corr(1))?,
            ];
            let (l, s) = dense_loss_with_plans(&q[0], &t[1], &plans[0])?;
            let (l2, s2) = dense_loss_with_plans(&q[1], &t[0], &plans[1])?;
            d_ab = l;
            d_ba = l2;
            mask_fraction = (s.mask_fraction + s2.mask_fraction) / 2.0;
            collapse_rows = Some(t[0].mean((2, 3))?);
        }
        if let Some((q, z, proj)) = pooled {
            p_ab = pooled_loss(&q[0], &z[0])?;
            p_ba = pooled_loss(&q[1], &z[1])?;
            collapse_rows = Some(halves(proj.detach())?.swap_remove(0));
        }
        let (wd, wp) = (
            if m.dense { m.w_dense } else { 0.0 },
            if m.pooled { m.w_pooled } else { 0.0 },
        );
        let (tot, terms) = total(&d_ab, &d_ba, &p_ab, &p_ba, wd, wp)?;
        let proj_std = match collapse_rows {
            Some(rows) => collapse_std(&rows)?,
            None => Tensor::zeros((), DType::F32, tot.device())?,
        };
        Ok(QueuedLosses {
            total: tot,
            logged: Tensor::cat(&[terms, proj_std.reshape(1)?], 0)?,
            mask_fraction,
        })
    }
}

/// One micro-batch's losses as queued on the device. On CUDA, reading a value waits for
/// everything queued before it; the training loop reads these once the whole step (backward
/// pass and update included) is queued, so the device never idles while the host walks the
/// backward graph.
pub struct QueuedLosses {
    /// The differentiable total.
    pub total: Tensor,
    /// Detached f32: the 7 terms in [`LossTerms::named`] order, then the projection std.
    logged: Tensor,
    /// Of the dense loss's mask (computed on the host).
    pub mask_fraction: f32,
}

/// The terms and the projection std of a [`QueuedLosses::logged`] vector (or a sum of them).
fn read_logged(v: &Tensor) -> Result<(LossTerms, f32)> {
    let v: Vec<f32> = v.to_vec1()?;
    ensure!(v.len() == 8, "logged loss values: {} of 8", v.len());
    let terms: [f32; 7] = v[..7].try_into().expect("7 terms");
    Ok((LossTerms::from_values(terms), v[7]))
}

/// Clips the gradients if `clip` says so, then takes the optimiser step; returns the global
/// gradient norm where it was computed: for clipping, or when `want_norm` (a logged step).
/// Other steps skip it, since on CUDA it is a few small launches a gradient tensor, and it is
/// read once the step is queued: on CUDA a read waits for the backward pass, and the
/// optimiser's launches would wait with it.
fn clip_and_apply(
    learner: &mut Learner,
    grads: &mut Grads,
    clip: Option<f64>,
    want_norm: bool,
    lr: f64,
    mom: f64,
) -> Result<Option<f64>> {
    let norm = (clip.is_some() || want_norm)
        .then(|| grads.global_norm_tensor())
        .transpose()?;
    let mut read = None;
    if let (Some(c), Some(n)) = (clip, &norm) {
        let total = n.to_scalar::<f64>()?;
        grads.clip_to_norm(c, total)?;
        read = Some(total);
    }
    learner.apply(grads, lr, mom)?;
    Ok(match (read, norm) {
        (Some(v), _) => Some(v),
        (None, Some(n)) => Some(n.to_scalar::<f64>()?),
        (None, None) => None,
    })
}

/// Std over the batch of L2-normalised rows, averaged over dimensions. In a data-parallel
/// job with synchronised BatchNorm the batch is every rank's, as BatchNorm's statistics are:
/// a std of each rank's 2-4 rows alone is biased low by the batch split, so runs with other
/// world sizes would log other values for the same training.
fn collapse_std(x: &Tensor) -> Result<Tensor> {
    let z = crate::loss::l2_normalize(&x.to_dtype(DType::F32)?, 1)?;
    let (n, d) = z.dims2()?;
    let mut sums = Tensor::cat(&[z.sum(0)?, z.sqr()?.sum(0)?], 0)?;
    let mut count = n;
    if let Some(group) = dist::sync_bn::current() {
        sums = dist::SumOverRanks(group.as_ref()).apply(&sums)?;
        count = dist::sync_bn::global_count(n, group.as_ref())?;
    }
    let mean = (sums.narrow(0, 0, d)? / count as f64)?;
    let mean_sq = (sums.narrow(0, d, d)? / count as f64)?;
    let var = (mean_sq - mean.sqr()?)?.relu()?;
    Ok(var.sqrt()?.mean_all()?.detach())
}

/// The git commit this binary was built from (recorded at build time by build.rs, so a job
/// run outside the source tree still knows it).
pub const GIT_SHA: &str = env!("POODLE_GIT_SHA");

/// What a run folder holds before the run starts.
struct RunDirState {
    /// Where the checkpoint being continued stands (its weights are loaded already).
    resume: Option<Progress>,
}

/// Writes `config.json` (the resolved config, accepted by `--config`) and `run.json`, and
/// decides whether the run continues a checkpoint. `resume = false` refuses a folder that
/// already holds a run instead of appending to it.
///
/// Every rank reads the checkpoint; only the rank that `writes` (rank 0) touches the folder.
fn open_run_dir(
    cfg: &TrainConfig,
    resume: bool,
    learner: &mut Learner,
    dev: &Device,
    group: &dyn Collective,
) -> Result<RunDirState> {
    let dir = &cfg.run.dir;
    let writes = group.rank() == 0;
    if writes {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    }
    let metrics = dir.join("metrics.jsonl");
    let holds_run =
        dir.join("latest.json").exists() || std::fs::metadata(&metrics).is_ok_and(|m| m.len() > 0);
    if holds_run && !resume {
        bail!(
            "{} already holds a run (checkpoints or metrics.jsonl): continue it (the default of \
             `poodle-train train`), or choose another run.dir",
            dir.display()
        );
    }
    let mut state = RunDirState { resume: None };
    if let Some((p, optim_state)) =
        checkpoint::load(dir, &learner.online_map, &learner.target_map, dev)?
    {
        ensure!(
            p.config_json == identity_json(cfg)?,
            "{}: the checkpoint was written with another config; resume with the same config \
             (RUN_DIR/config.json) or use another run.dir",
            dir.display()
        );
        ensure!(
            p.world_size == group.world(),
            "{}: the checkpoint was written by {} ranks, this job has {}: a pass is split into \
             batches per world size, so resume with {} ranks (or use another run.dir)",
            dir.display(),
            p.world_size,
            group.world(),
            p.world_size
        );
        learner.opt.load_state(&optim_state)?;
        state.resume = Some(p);
    }
    if !writes {
        return Ok(state);
    }
    // Steps after the checkpoint were lost with the process: drop their metric lines, so
    // that no step is logged twice.
    let keep_until = state.resume.as_ref().map_or(0, |p| p.step);
    truncate_metrics(&metrics, keep_until)?;
    poodle_common::atomic::write_json_atomic(&dir.join("config.json"), cfg)?;
    poodle_common::atomic::write_json_atomic(
        &dir.join("run.json"),
        &serde_json::json!({
            "git_sha": GIT_SHA,
            "version": env!("CARGO_PKG_VERSION"),
            "resumed_from_step": state.resume.as_ref().map(|p| p.step),
            "world_size": group.world(),
            "dist_engine": group.engine(),
        }),
    )?;
    Ok(state)
}

/// A run's identity is its config, except where it stops and how often it draws: resuming
/// with a later run.max_steps or another run.picture_every continues the same run.
fn identity_json(cfg: &TrainConfig) -> Result<String> {
    let mut ident = cfg.clone();
    ident.run.max_steps = None;
    ident.run.picture_every = None;
    Ok(serde_json::to_string(&ident)?)
}

/// Keeps the metric lines of steps `<= step` (all lines when the file is absent).
fn truncate_metrics(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept.len() != text.len() {
        poodle_common::atomic::write_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

/// The loader a run with `cfg` reads (also what `bench-loader` measures).
pub fn open_loader(cfg: &TrainConfig, dev: &Device) -> Result<Loader> {
    open_loader_shard(cfg, dev, Shard::default())
}

/// The loader of one rank of a data-parallel run: its share of every pass.
pub fn open_loader_shard(cfg: &TrainConfig, dev: &Device, shard: Shard) -> Result<Loader> {
    let mut aug = cfg.augment.clone();
    if !cfg.method.pooled {
        aug.subcrops.k = 0; // no subcrops to cut when the pooled objective is off
    }
    Loader::open(
        LoaderConfig {
            stores: cfg.data.stores.clone(),
            flow_group: cfg.data.flow_group.clone(),
            batch_size: cfg.data.batch_size,
            workers: cfg.data.workers,
            prefetch: cfg.data.prefetch,
            seed: cfg.seed,
            drop_last: true,
            sampling: cfg.data.sampling.clone(),
            augment: aug,
            shard,
        },
        dev.clone(),
    )
}

/// Sums of one optimiser step's micro-batches.
#[derive(Default)]
struct StepSums {
    /// Of the micro-batches' [`QueuedLosses::logged`] vectors, on the device.
    logged: Option<Tensor>,
    mask: f32,
    wait_s: f64,
    pairs: usize,
}

impl StepSums {
    /// Adds one micro-batch: its queued loss values (summed on the device, not read), its
    /// mask fraction, its loader wait and its pairs.
    fn add(&mut self, q: &QueuedLosses, b: &Batch) -> Result<()> {
        self.logged = Some(match self.logged.take() {
            Some(sum) => (sum + &q.logged)?,
            None => q.logged.clone(),
        });
        self.mask += q.mask_fraction;
        self.wait_s += b.wait.as_secs_f64();
        self.pairs += b.len();
        Ok(())
    }

    /// The step's loss terms, mask fraction and projection std: the mean over its `n`
    /// micro-batches, then over ranks (one small all-reduce). Reading the summed values is,
    /// on CUDA, the step's one wait for the device (with the logged gradient norm's).
    fn mean_over_ranks(&self, n: f32, group: &dyn Collective) -> Result<(LossTerms, f32, f32)> {
        let logged = self
            .logged
            .as_ref()
            .context("a step without micro-batches")?;
        let (terms, proj_std) = read_logged(logged)?;
        let mut v = [0f32; 9];
        v[..7].copy_from_slice(&terms.values());
        (v[7], v[8]) = (self.mask, proj_std);
        v.iter_mut().for_each(|x| *x /= n);
        dist::mean_over_ranks(&mut v, group)?;
        let terms = LossTerms::from_values(v[..7].try_into().expect("7 terms"));
        Ok((terms, v[7], v[8]))
    }
}

/// Trains per `cfg`. With `resume`, a run folder that holds a checkpoint continues from it
/// (DINO-style auto-resume; a folder with metrics but no checkpoint restarts); without it,
/// a folder that holds a run is refused.
///
/// Launched as several processes (`mpirun`, `srun`, torchrun; see [`LaunchEnv`]), each is
/// one rank of a data-parallel job with DDP semantics: its own share of every pass,
/// gradients averaged over ranks, BatchNorm statistics over all ranks (`dist.sync_bn`), the
/// same optimiser and EMA step everywhere; rank 0 alone logs and checkpoints. An error on one
/// rank stops every rank.
pub fn train(cfg: &TrainConfig, resume: bool, quiet: bool) -> Result<RunSummary> {
    let env = LaunchEnv::from_env()?;
    let dev = device_for_rank(&cfg.device, &env)?;
    let group = Arc::new(dist::Counted::new(dist::connect(
        &cfg.dist,
        &env,
        &dev,
        &cfg.run.dir,
    )?));
    let res = train_rank(cfg, resume, quiet, &dev, group.clone());
    if let (Err(e), true) = (&res, group.world() > 1) {
        eprintln!(
            "poodle-train rank {} of {}: {e:#}; stopping every rank",
            group.rank(),
            group.world()
        );
        group.abort(1);
    }
    res
}

/// One rank's training: set-up (loader, learner, run folder, schedule, resume point), then
/// the loop.
fn train_rank(
    cfg: &TrainConfig,
    resume: bool,
    quiet: bool,
    dev: &Device,
    counted: Arc<dist::Counted>,
) -> Result<RunSummary> {
    let group: Arc<dyn Collective> = counted.clone();
    let (rank, world) = (group.rank(), group.world());
    let quiet = quiet || rank > 0;
    if !quiet {
        eprintln!("poodle-train {} (git {GIT_SHA})", env!("CARGO_PKG_VERSION"));
        eprintln!("{}", serde_json::to_string_pretty(cfg)?);
        if world > 1 {
            eprintln!("data parallel: {world} ranks over {}", group.engine());
        }
    }
    let loader = open_loader_shard(cfg, dev, Shard { rank, world })?;
    let _sync_bn = dist::sync_bn::scope(cfg.dist.sync_bn.then(|| group.clone()));
    let mut learner = Learner::new(cfg, dev)?;
    let state = open_run_dir(cfg, resume, &mut learner, dev, group.as_ref())?;
    if world > 1 {
        // Same seed, same init, same checkpoint: check once that it is so.
        dist::check_identical(&learner.online_params, group.as_ref(), "start")?;
    }
    let steps_per_pass = (loader.batches_per_epoch() / cfg.optim.accumulate).max(1) as u64;
    let sched = Schedule::new(
        steps_per_pass,
        loader.epochs_per_pass() as u64,
        cfg.optim.epochs,
        cfg.optim.warmup_epochs,
        cfg.optim.lr,
        cfg.optim.ema_m0,
    );
    if !quiet {
        eprintln!("{}", loader.summary());
        eprintln!(
            "{} passes x {} steps = {} steps = {} paper epochs ({} per pass)",
            sched.passes,
            sched.steps_per_pass,
            sched.total_steps,
            cfg.optim.epochs,
            sched.epochs_per_pass
        );
    }
    let (mut step, mut pass, mut start_batch, mut resumed_from) = (0u64, 0u64, 0usize, None);
    if let Some(p) = &state.resume {
        (step, pass, start_batch, resumed_from) = (p.step, p.epoch, p.batch, Some(p.step));
        if !quiet {
            eprintln!("resuming at step {step} (pass {pass}, batch {start_batch})");
        }
    }
    let max_steps = cfg
        .run
        .max_steps
        .unwrap_or(sched.total_steps)
        .min(sched.total_steps);
    let mut t = Trainer {
        cfg,
        config_json: identity_json(cfg)?,
        learner,
        out: (rank == 0).then(|| RunOutputs::open(cfg)).transpose()?,
        reporter: StepReporter::new(max_steps, step, quiet),
        quiet,
        group: counted,
        sched,
        max_steps,
        step,
        first_loss: None,
        last_loss: None,
        last_ckpt: None,
    };
    t.group.take(); // the start-up check is not a step's traffic
    t.run(&loader, pass, start_batch)?;
    t.reporter.finish();
    // The other ranks wait until rank 0 has written the last checkpoint.
    t.group.barrier()?;
    Ok(RunSummary {
        steps: t.step,
        resumed_from,
        paper_epochs: t.sched.paper_epoch(t.step),
        pairs_seen: t.step * t.pairs_per_step(),
        first_loss: t.first_loss,
        last_loss: t.last_loss,
        checkpoint: t.last_ckpt,
    })
}

/// What one rank's training loop carries from step to step.
struct Trainer<'a> {
    cfg: &'a TrainConfig,
    /// The resolved config as checkpoints record it.
    config_json: String,
    learner: Learner,
    /// Rank 0's metric lines and TensorBoard events; `None` on the other ranks.
    out: Option<RunOutputs>,
    reporter: StepReporter,
    quiet: bool,
    /// This rank's group, counting each step's all-reduce traffic.
    group: Arc<dist::Counted>,
    sched: Schedule,
    max_steps: u64,
    /// Optimiser steps done.
    step: u64,
    first_loss: Option<f32>,
    last_loss: Option<f32>,
    last_ckpt: Option<String>,
}

impl Trainer<'_> {
    fn pairs_per_step(&self) -> u64 {
        (self.cfg.data.batch_size * self.cfg.optim.accumulate * self.group.world()) as u64
    }

    /// Passes over the loader from `pass`, batch `start_batch`, until `max_steps`: each
    /// micro-batch's forward and backward passes are queued, and every `accumulate` of them
    /// make an optimiser step.
    fn run(&mut self, loader: &Loader, mut pass: u64, mut start_batch: usize) -> Result<()> {
        while pass < self.sched.passes && self.step < self.max_steps {
            let mut acc = GradAccumulator::new();
            let mut sums = StepSums::default();
            let mut t_step = Instant::now();
            for (bi, batch) in (start_batch..).zip(loader.epoch_from(pass, start_batch)) {
                let b = batch?;
                if acc.micro_batches() == 0 {
                    t_step = Instant::now();
                }
                let q = self.learner.queue_losses(&b)?;
                acc.add(&q.total.backward()?, &self.learner.online_params)?;
                sums.add(&q, &b)?;
                if acc.micro_batches() < self.cfg.optim.accumulate {
                    continue;
                }
                let (acc, sums) = (std::mem::take(&mut acc), std::mem::take(&mut sums));
                self.finish_step(loader, acc, sums, (pass, bi), t_step)?;
                if self.step >= self.max_steps {
                    return Ok(());
                }
            }
            pass += 1;
            start_batch = 0;
        }
        Ok(())
    }

    /// Ends an optimiser step at batch `bi` of `pass`: averages the gradients over
    /// micro-batches and ranks and queues the update; then reads the step's loss values,
    /// stops on a non-finite one (before anything is logged or saved), and on rank 0 logs,
    /// draws and checkpoints.
    fn finish_step(
        &mut self,
        loader: &Loader,
        acc: GradAccumulator,
        sums: StepSums,
        (pass, bi): (u64, usize),
        t_step: Instant,
    ) -> Result<()> {
        let cfg = self.cfg;
        let n = acc.micro_batches() as f32;
        let mut grads = acc.finish(1.0 / f64::from(n))?;
        let bucket_bytes = (cfg.dist.bucket_mb * 1024.0 * 1024.0) as usize;
        dist::average_gradients(&mut grads, self.group.as_ref(), bucket_bytes)?;
        let (lr, mom) = (self.sched.lr(self.step), self.sched.momentum(self.step));
        let logs = self.out.is_some()
            && ((self.step + 1).is_multiple_of(cfg.run.log_every)
                || self.step + 1 == self.max_steps);
        let grad_norm = clip_and_apply(
            &mut self.learner,
            &mut grads,
            cfg.optim.grad_clip,
            logs,
            lr,
            mom,
        )?;
        self.step += 1;
        let loss = sums.mean_over_ranks(n, self.group.as_ref())?;
        // On the mean over ranks, which every rank holds: all stop together, with one message.
        check_finite(self.step, &loss.0).map_err(|e| anyhow::anyhow!("{e}; stopping"))?;
        let (allreduce_bytes, allreduce_calls) = self.group.take();
        self.first_loss.get_or_insert(loss.0.total);
        self.last_loss = Some(loss.0.total);
        if cfg
            .dist
            .check_every
            .is_some_and(|e| self.step.is_multiple_of(e))
        {
            let g = self.group.as_ref();
            dist::check_identical(&self.learner.online_params, g, "online")?;
            dist::check_identical(&self.learner.target_params, g, "target")?;
        }
        // Rank 0 logs, draws and checkpoints; the other ranks go on to the next step.
        if self.out.is_none() {
            return Ok(());
        }
        if logs {
            let m = StepMetrics {
                step: self.step,
                pass,
                epoch: self.sched.paper_epoch(self.step),
                pairs_seen: self.step * self.pairs_per_step(),
                lr,
                momentum: mom,
                loss: loss.0,
                dense_mask_fraction: loss.1,
                proj_std: loss.2,
                grad_norm: grad_norm.context("no gradient norm for a logged step")?,
                allreduce_bytes,
                allreduce_calls,
                pairs_per_s: (sums.pairs * self.group.world()) as f64
                    / t_step.elapsed().as_secs_f64().max(1e-9),
                data_wait_s: sums.wait_s,
            };
            self.log(&m)?;
        }
        if cfg
            .run
            .picture_every
            .is_some_and(|e| e > 0 && self.step.is_multiple_of(e))
        {
            let pos = loader.position(bi, 0);
            step_picture(cfg, loader, pass, pos, self.step, self.quiet)?;
        }
        if self.step.is_multiple_of(cfg.run.checkpoint_every) || self.step == self.max_steps {
            self.checkpoint(pass, bi)?;
        }
        Ok(())
    }

    /// Rank 0: one metrics line, its TensorBoard scalars and the progress report.
    fn log(&mut self, m: &StepMetrics) -> Result<()> {
        let out = self.out.as_mut().context("only rank 0 logs")?;
        let line = serde_json::to_string(m)?;
        writeln!(out.log, "{line}")?;
        out.tb.scalars(m.step, &tb_scalars(m))?;
        self.reporter.report(m, &line);
        Ok(())
    }

    /// Rank 0: an atomic checkpoint after batch `bi` of `pass`, where a resumed run
    /// continues.
    fn checkpoint(&mut self, pass: u64, bi: usize) -> Result<()> {
        let p = Progress {
            step: self.step,
            epoch: pass,
            batch: bi + 1,
            file: String::new(),
            config_json: self.config_json.clone(),
            world_size: self.group.world(),
        };
        let l = &self.learner;
        let path = checkpoint::save(
            &self.cfg.run.dir,
            &l.online_map,
            &l.target_map,
            l.opt.state_tensors()?,
            p,
        )?;
        self.last_ckpt = Some(path.display().to_string());
        Ok(())
    }
}

/// What rank 0 writes while training: metric lines and TensorBoard events.
struct RunOutputs {
    log: std::fs::File,
    tb: EventWriter,
}

impl RunOutputs {
    fn open(cfg: &TrainConfig) -> Result<Self> {
        Ok(RunOutputs {
            log: std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(cfg.run.dir.join("metrics.jsonl"))?,
            tb: EventWriter::create(&cfg.run.dir.join("tb"))?,
        })
    }
}

/// Draws pair `pos` of pass `pass` (the first of the step's last batch) into
/// `RUN_DIR/pictures/step-<step>.png`. It re-augments one pair on this thread: a few
/// milliseconds at the demo size, well under a second at the paper's, every
/// `run.picture_every` steps.
fn step_picture(
    cfg: &TrainConfig,
    loader: &Loader,
    pass: u64,
    pos: usize,
    step: u64,
    quiet: bool,
) -> Result<()> {
    let dir = cfg.run.dir.join("pictures");
    std::fs::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
    let path = dir.join(format!("step-{step:08}.png"));
    let meta = crate::pictures::write_pair_picture(loader, cfg, pass, pos, &path)?;
    if let (Some(m), false) = (meta, quiet) {
        eprintln!(
            "picture {}: {} pair {} ({}, t {}, dt {})",
            path.display(),
            m.store.display(),
            m.pair,
            m.video,
            m.t,
            m.dt
        );
    }
    Ok(())
}

/// The TensorBoard scalars of one logged step: every loss term and the run's health signals.
fn tb_scalars(m: &StepMetrics) -> Vec<(&'static str, f32)> {
    let l = &m.loss;
    vec![
        ("loss/total", l.total),
        ("loss/dense", l.dense),
        ("loss/pooled", l.pooled),
        ("loss/dense_ab", l.dense_ab),
        ("loss/dense_ba", l.dense_ba),
        ("loss/pooled_ab", l.pooled_ab),
        ("loss/pooled_ba", l.pooled_ba),
        ("optim/lr", m.lr as f32),
        ("optim/ema_momentum", m.momentum as f32),
        ("optim/grad_norm", m.grad_norm as f32),
        ("train/paper_epoch", m.epoch as f32),
        ("train/dense_mask_fraction", m.dense_mask_fraction),
        ("train/proj_std", m.proj_std),
        ("speed/pairs_per_s", m.pairs_per_s as f32),
        ("speed/data_wait_s", m.data_wait_s as f32),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_finds_its_own_gpu() {
        let env = |local_rank| LaunchEnv {
            rank: 8 + local_rank,
            world: 16,
            local_rank,
            source: "slurm",
        };
        // All eight GPUs of the node visible (or no variable): the local rank picks one.
        assert_eq!(gpu_index(&env(5), None).unwrap(), 5);
        assert_eq!(gpu_index(&env(5), Some("0,1,2,3,4,5,6,7")).unwrap(), 5);
        // Slurm bound one GPU to the task: it is device 0 whatever the local rank.
        assert_eq!(gpu_index(&env(5), Some("5")).unwrap(), 0);
        let e = gpu_index(&env(5), Some("0,1")).unwrap_err().to_string();
        assert!(
            e.contains("rank 13") && e.contains("CUDA_VISIBLE_DEVICES=0,1"),
            "{e}"
        );
    }
}
