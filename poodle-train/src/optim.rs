//! Optimisation: AdamW with a no-decay parameter group, gradient clipping and accumulation,
//! the warm-up + cosine learning-rate schedule, and the EMA (target network) update.
//!
//! Parameters are named candle [`Var`]s (`(String, Var)`, torchvision-style dotted names).
//! Gradients are carried by name in [`Grads`], built from a candle [`GradStore`].

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use rayon::prelude::*;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

mod inplace;
use inplace::{AdamMoment, AdamWParam, Ema};

/// Whether `t` is updated in place ([`inplace`]): f32 on CUDA, or on the CPU when asked (the
/// tests comparing the in-place updates with the composed ops).
fn in_place(t: &Tensor, on_cpu: bool) -> bool {
    t.dtype() == DType::F32 && (t.device().is_cuda() || on_cpu)
}

/// AdamW hyper-parameters other than the per-step learning rate.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    /// Added after the square root of the bias-corrected second moment (PyTorch semantics).
    pub eps: f64,
    /// Decoupled weight decay for the decay group (the no-decay group always uses 0).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The paper's settings: betas (0.9, 0.999), eps 1e-6 (docs/method.md), weight decay 0.01.
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
        }
    }
}

/// Whether a parameter is excluded from weight decay, by name (torchvision naming).
///
/// True for
/// - biases: the name is `bias` or ends in `.bias`;
/// - normalisation parameters: the owning module (the component before the last) is named like
///   a norm layer: starts with `bn`, `norm`, `gn` or `ln` (`bn1`, `bn3`, `norm`, `ln_f`), ends
///   with `norm` or `_bn` (`batchnorm`, `layernorm`, `proj_bn`), or is torchvision's
///   downsample BatchNorm `downsample.1`;
/// - BatchNorm buffers if they are ever passed (`running_mean`, `running_var`,
///   `num_batches_tracked`).
///
/// Heads must therefore name their BatchNorm modules accordingly (e.g. `dense_proj.bn1.weight`);
/// a BatchNorm inside an index-named `Sequential` (`proj.1.weight`) is *not* recognised. Check
/// [`AdamW::no_decay_names`] once after building the model.
pub fn is_no_decay(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    let last = parts[parts.len() - 1];
    if matches!(
        last,
        "bias" | "running_mean" | "running_var" | "num_batches_tracked"
    ) {
        return true;
    }
    if parts.len() < 2 {
        return false;
    }
    let module = parts[parts.len() - 2].to_ascii_lowercase();
    if parts.len() >= 3 && module == "1" && parts[parts.len() - 3] == "downsample" {
        return true;
    }
    ["bn", "norm", "gn", "ln"]
        .iter()
        .any(|p| module.starts_with(p))
        || module.ends_with("norm")
        || module.ends_with("_bn")
}

/// Gradients by parameter name (detached tensors).
#[derive(Clone, Debug, Default)]
pub struct Grads {
    map: BTreeMap<String, Tensor>,
}

impl Grads {
    /// The gradients of `params` found in `store` (parameters without a gradient are absent).
    pub fn from_store(store: &GradStore, params: &[(String, Var)]) -> Grads {
        let map = params
            .iter()
            .filter_map(|(n, v)| store.get(v.as_tensor()).map(|g| (n.clone(), g.detach())))
            .collect();
        Grads { map }
    }

    pub fn insert(&mut self, name: impl Into<String>, grad: Tensor) {
        self.map.insert(name.into(), grad.detach());
    }

    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.map.get(name)
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &Tensor)> {
        self.map.iter()
    }

    /// Global L2 norm over all gradients, accumulated in f64, as an f64 scalar tensor on the
    /// gradients' device (0 on the CPU when there are none), not read back: on CUDA a read
    /// waits for everything queued, so the caller reads it once, after queuing what it can
    /// (run::train queues the optimiser step first).
    pub fn global_norm_tensor(&self) -> Result<Tensor> {
        let mut total: Option<Tensor> = None;
        for g in self.map.values() {
            let s = g.to_dtype(DType::F64)?.sqr()?.sum_all()?;
            total = Some(match total {
                Some(t) => (t + s)?,
                None => s,
            });
        }
        match total {
            Some(t) => t.sqrt(),
            None => Tensor::zeros((), DType::F64, &Device::Cpu),
        }
    }

    /// [`Grads::global_norm_tensor`] read back (one device synchronisation on CUDA).
    pub fn global_norm(&self) -> Result<f64> {
        self.global_norm_tensor()?.to_scalar::<f64>()
    }

    /// Multiplies every gradient by `s` (nothing to do for 1).
    pub fn scale(&mut self, s: f64) -> Result<()> {
        if s == 1.0 {
            return Ok(());
        }
        for g in self.map.values_mut() {
            *g = g.affine(s, 0.0)?;
        }
        Ok(())
    }

    /// `torch.nn.utils.clip_grad_norm_` semantics: with `total` the global norm, multiplies all
    /// gradients by `max_norm / (total + 1e-6)` when that is below 1. Returns `total` (before
    /// clipping; may be NaN/inf, in which case the gradients are scaled by NaN/0 like PyTorch's
    /// default `error_if_nonfinite=False` — check it).
    pub fn clip_global_norm(&mut self, max_norm: f64) -> Result<f64> {
        let total = self.global_norm()?;
        self.clip_to_norm(max_norm, total)?;
        Ok(total)
    }

    /// [`Grads::clip_global_norm`] with the global norm `total` already known.
    pub fn clip_to_norm(&mut self, max_norm: f64, total: f64) -> Result<()> {
        let coef = max_norm / (total + 1e-6);
        if coef < 1.0 || !coef.is_finite() {
            self.scale(coef)?;
        }
        Ok(())
    }

    /// Adds `other` by name (names missing on one side are taken from the other).
    pub fn add_assign(&mut self, other: &Grads) -> Result<()> {
        for (n, g) in &other.map {
            let sum = match self.map.get(n) {
                Some(a) => a.add(g)?,
                None => g.clone(),
            };
            self.map.insert(n.clone(), sum);
        }
        Ok(())
    }
}

/// Gradient accumulation over micro-batches: sums the gradients of each `backward()`, then
/// [`GradAccumulator::finish`] scales the sum (use `1 / micro_batches` when each micro-batch
/// loss is a mean over its own samples, so the result equals the full-batch mean's gradient).
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sum: Grads,
    count: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one micro-batch's gradients (dropping the `GradStore` afterwards frees its graph).
    pub fn add(&mut self, store: &GradStore, params: &[(String, Var)]) -> Result<()> {
        self.sum.add_assign(&Grads::from_store(store, params))?;
        self.count += 1;
        Ok(())
    }

    /// Number of micro-batches added so far.
    pub fn micro_batches(&self) -> usize {
        self.count
    }

    /// The summed gradients times `scale`.
    pub fn finish(mut self, scale: f64) -> Result<Grads> {
        self.sum.scale(scale)?;
        Ok(self.sum)
    }
}

struct ParamState {
    name: String,
    var: Var,
    decay: bool,
    m: Tensor,
    v: Tensor,
}

/// AdamW with PyTorch `torch.optim.AdamW` semantics (`amsgrad=False`, `maximize=False`):
///
/// ```text
/// t += 1
/// p  <- p * (1 - lr * wd)                     (decay group only; wd = 0 otherwise)
/// m  <- b1 m + (1 - b1) g
/// v  <- b2 v + (1 - b2) g^2
/// p  <- p - (lr / (1 - b1^t)) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
/// ```
///
/// Two groups: parameters for which the no-decay predicate holds get no weight decay. A
/// parameter without a gradient in a step is skipped entirely (no decay, moments unchanged),
/// as in PyTorch; unlike PyTorch the step count `t` is global, so bias correction differs only
/// for a parameter that missed gradients in earlier steps (never in PooDLe, where every
/// optimised parameter gets a gradient each step).
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    step: u64,
    in_place_on_cpu: bool,
}

impl AdamW {
    /// Groups by [`is_no_decay`] on the names.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        Self::new_with(params, cfg, |name, _| is_no_decay(name))
    }

    /// Groups by a custom predicate on `(name, tensor)`: true = no weight decay.
    pub fn new_with(
        params: Vec<(String, Var)>,
        cfg: AdamWConfig,
        no_decay: impl Fn(&str, &Tensor) -> bool,
    ) -> Result<Self> {
        let mut seen = std::collections::HashSet::new();
        let mut states = Vec::with_capacity(params.len());
        for (name, var) in params {
            if !seen.insert(name.clone()) {
                candle_core::bail!("AdamW: duplicate parameter name {name}");
            }
            let t = var.as_tensor();
            if !t.dtype().is_float() {
                candle_core::bail!("AdamW: parameter {name} is not floating point");
            }
            states.push(ParamState {
                decay: !no_decay(&name, t),
                m: t.zeros_like()?,
                v: t.zeros_like()?,
                name,
                var,
            });
        }
        Ok(AdamW {
            cfg,
            params: states,
            step: 0,
            in_place_on_cpu: false,
        })
    }

    /// Updates CPU parameters in place too, as CUDA ones always are (3 launches a parameter
    /// instead of 14 composed ops; same arithmetic): for tests of the CUDA path's control flow.
    pub fn with_in_place_on_cpu(mut self, on: bool) -> Self {
        self.in_place_on_cpu = on;
        self
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Number of steps taken (`t` of the last step).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Names of the parameters in the no-decay group, in registration order.
    pub fn no_decay_names(&self) -> Vec<&str> {
        self.params
            .iter()
            .filter(|p| !p.decay)
            .map(|p| p.name.as_str())
            .collect()
    }

    /// One AdamW step with learning rate `lr` and the configured weight decay.
    pub fn step(&mut self, grads: &Grads, lr: f64) -> Result<()> {
        let wd = self.cfg.weight_decay;
        self.step_with(grads, lr, wd)
    }

    /// One AdamW step with learning rate `lr` and weight decay `wd` for the decay group.
    pub fn step_with(&mut self, grads: &Grads, lr: f64, wd: f64) -> Result<()> {
        for n in grads.map.keys() {
            if !self.params.iter().any(|p| &p.name == n) {
                candle_core::bail!("AdamW: gradient for unknown parameter {n}");
            }
        }
        self.step += 1;
        let t = self.step as i32;
        let AdamWConfig {
            beta1: b1,
            beta2: b2,
            eps,
            ..
        } = self.cfg;
        let bc1 = 1.0 - b1.powi(t);
        let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
        let step_size = lr / bc1;
        let on_cpu = self.in_place_on_cpu;
        self.params.par_iter_mut().try_for_each(|p| -> Result<()> {
            let Some(g) = grads.map.get(&p.name) else {
                return Ok(());
            };
            let theta = p.var.as_tensor();
            if g.dims() != theta.dims() {
                candle_core::bail!(
                    "AdamW: gradient {:?} for {} of shape {:?}",
                    g.dims(),
                    p.name,
                    theta.dims()
                );
            }
            let g = g.to_dtype(theta.dtype())?;
            if in_place(theta, on_cpu) {
                let g = g.contiguous()?;
                p.m.inplace_op2(
                    &g,
                    &AdamMoment {
                        beta: b1,
                        squared: false,
                    },
                )?;
                p.v.inplace_op2(
                    &g,
                    &AdamMoment {
                        beta: b2,
                        squared: true,
                    },
                )?;
                let decay = if p.decay && wd != 0.0 {
                    1.0 - lr * wd
                } else {
                    1.0
                };
                let update = AdamWParam {
                    decay,
                    step_size,
                    inv_bc2_sqrt: 1.0 / bc2_sqrt,
                    eps,
                };
                return theta.inplace_op3(&p.m, &p.v, &update);
            }
            let mut new = theta.detach();
            if p.decay && wd != 0.0 {
                new = new.affine(1.0 - lr * wd, 0.0)?;
            }
            p.m = (p.m.affine(b1, 0.0)? + g.affine(1.0 - b1, 0.0)?)?;
            p.v = (p.v.affine(b2, 0.0)? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let denom = p.v.sqrt()?.affine(1.0 / bc2_sqrt, eps)?;
            new = (new - p.m.div(&denom)?.affine(step_size, 0.0)?)?;
            p.var.set(&new)
        })
    }

    /// Optimiser state as named tensors for checkpoints: `adam.m.<name>`, `adam.v.<name>` and
    /// `adam.step` (an i64 scalar). Copies: the moments are updated in place on CUDA.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("adam.m.{}", p.name), p.m.copy()?);
            out.insert(format!("adam.v.{}", p.name), p.v.copy()?);
        }
        let dev = self
            .params
            .first()
            .map(|p| p.m.device().clone())
            .unwrap_or(Device::Cpu);
        out.insert(
            "adam.step".to_string(),
            Tensor::new(self.step as i64, &dev)?,
        );
        Ok(out)
    }

    /// Restores state written by [`AdamW::state_tensors`]. Keys not starting with `adam.` are
    /// ignored (a checkpoint may hold the model too); every parameter must have both moments
    /// of its own shape, and `adam.*` keys for unknown parameters are an error.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let step = state
            .get("adam.step")
            .ok_or_else(|| candle_core::Error::Msg("AdamW state: adam.step missing".into()))?;
        if step.elem_count() != 1 {
            candle_core::bail!("AdamW state: adam.step has shape {:?}", step.dims());
        }
        let step = step.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?[0];
        if step < 0.0 || step.fract() != 0.0 {
            candle_core::bail!("AdamW state: bad adam.step {step}");
        }
        for key in state
            .keys()
            .filter(|k| k.starts_with("adam.") && *k != "adam.step")
        {
            let name = key
                .strip_prefix("adam.m.")
                .or_else(|| key.strip_prefix("adam.v."))
                .ok_or_else(|| candle_core::Error::Msg(format!("AdamW state: bad key {key}")))?;
            if !self.params.iter().any(|p| p.name == name) {
                candle_core::bail!("AdamW state: {key} names no parameter");
            }
        }
        let mut loaded = Vec::with_capacity(self.params.len());
        for p in &self.params {
            let get = |k: String| -> Result<Tensor> {
                let t = state
                    .get(&k)
                    .ok_or_else(|| candle_core::Error::Msg(format!("AdamW state: {k} missing")))?;
                if t.dims() != p.var.as_tensor().dims() {
                    candle_core::bail!(
                        "AdamW state: {k} has shape {:?}, parameter {:?}",
                        t.dims(),
                        p.var.as_tensor().dims()
                    );
                }
                // A copy of its own: the moments are updated in place on CUDA.
                t.to_dtype(p.var.dtype())?.to_device(p.var.device())?.copy()
            };
            loaded.push((
                get(format!("adam.m.{}", p.name))?,
                get(format!("adam.v.{}", p.name))?,
            ));
        }
        for (p, (m, v)) in self.params.iter_mut().zip(loaded) {
            p.m = m;
            p.v = v;
        }
        self.step = step as u64;
        Ok(())
    }
}

/// Learning rate at optimiser step `step` (0-based: the step about to be taken):
///
/// ```text
/// step < W:       base_lr * step / W                                  (linear from 0)
/// W <= step < T:  base_lr * (1 + cos(pi * (step - W) / (T - W))) / 2  (cosine to 0)
/// step >= T:      0
/// ```
///
/// with `W = warmup_steps`, `T = total_steps` (`W = 0`: pure cosine). Continuous at `W`.
pub fn lr_at(step: u64, total_steps: u64, warmup_steps: u64, base_lr: f64) -> f64 {
    if step >= total_steps {
        return 0.0;
    }
    if step < warmup_steps {
        return base_lr * step as f64 / warmup_steps as f64;
    }
    let progress = (step - warmup_steps) as f64 / (total_steps - warmup_steps) as f64;
    base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// The paper's base EMA momentum.
pub const EMA_M0: f64 = 0.996;

/// The pre-training schedules in **paper epochs**, as the authors compute them: a pass over
/// the videos that draws R pairs per video counts as R epochs, and optimiser step `s` of a
/// pass of `steps_per_pass` steps sits at epoch `pass * R + R * i / steps_per_pass` (their
/// `epoch + repeat_sample * data_iter_step / len(data_loader)`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Schedule {
    pub steps_per_pass: u64,
    /// R: paper epochs per pass.
    pub epochs_per_pass: u64,
    /// ceil(epochs / R) passes (the authors' `range(0, epochs, repeat_sample)`).
    pub passes: u64,
    pub total_steps: u64,
    pub epochs: f64,
    pub warmup_epochs: f64,
    pub base_lr: f64,
    pub ema_m0: f64,
}

impl Schedule {
    pub fn new(
        steps_per_pass: u64,
        epochs_per_pass: u64,
        epochs: usize,
        warmup_epochs: f64,
        base_lr: f64,
        ema_m0: f64,
    ) -> Self {
        let r = epochs_per_pass.max(1);
        let passes = (epochs as u64).div_ceil(r);
        Schedule {
            steps_per_pass: steps_per_pass.max(1),
            epochs_per_pass: r,
            passes,
            total_steps: passes * steps_per_pass.max(1),
            epochs: epochs as f64,
            warmup_epochs,
            base_lr,
            ema_m0,
        }
    }

    /// Paper epoch (fractional) at the start of optimiser step `step` (0-based).
    pub fn paper_epoch(&self, step: u64) -> f64 {
        step as f64 * self.epochs_per_pass as f64 / self.steps_per_pass as f64
    }

    /// Linear warm-up from 0 over `warmup_epochs`, then a half cosine to 0 at `epochs`
    /// (MAE's `adjust_learning_rate`, which the authors use with min_lr = 0).
    pub fn lr(&self, step: u64) -> f64 {
        let e = self.paper_epoch(step).min(self.epochs);
        if e < self.warmup_epochs {
            return self.base_lr * e / self.warmup_epochs;
        }
        let span = (self.epochs - self.warmup_epochs).max(f64::MIN_POSITIVE);
        let progress = (e - self.warmup_epochs) / span;
        self.base_lr * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }

    /// EMA momentum `1 - (1 - m0) (cos(pi e / epochs) + 1) / 2` at paper epoch `e` of step
    /// `step`: m0 at the start, 1 at the end (BYOL; the authors' routine).
    pub fn momentum(&self, step: u64) -> f64 {
        let e = self.paper_epoch(step).min(self.epochs);
        let t = e / self.epochs.max(f64::MIN_POSITIVE);
        1.0 - (1.0 - self.ema_m0) * ((std::f64::consts::PI * t).cos() + 1.0) / 2.0
    }
}

/// EMA momentum at step `t` of `T`: `1 - (1 - m0) * (cos(pi t / T) + 1) / 2` (`t` clamped to
/// `T`): `m0` at the start, 1 at the end.
pub fn ema_momentum(step: u64, total_steps: u64, m0: f64) -> f64 {
    let t = step.min(total_steps) as f64 / total_steps.max(1) as f64;
    1.0 - (1.0 - m0) * ((std::f64::consts::PI * t).cos() + 1.0) / 2.0
}

fn match_by_name<'a>(
    target: &'a [(String, Var)],
    online: &'a [(String, Var)],
    what: &str,
) -> Result<Vec<(&'a str, &'a Var, &'a Var)>> {
    let by_name: HashMap<&str, &Var> = online.iter().map(|(n, v)| (n.as_str(), v)).collect();
    target
        .iter()
        .map(|(n, tv)| {
            let ov = by_name
                .get(n.as_str())
                .ok_or_else(|| candle_core::Error::Msg(format!("{what}: {n} not in online")))?;
            if tv.dims() != ov.dims() {
                candle_core::bail!(
                    "{what}: {n} is {:?} in target, {:?} online",
                    tv.dims(),
                    ov.dims()
                );
            }
            Ok((n.as_str(), tv, *ov))
        })
        .collect()
}

/// EMA update of the target network: for every `(name, var)` in `target`, the `online` entry
/// of the same name (which must exist, with the same shape; extra online names such as the
/// predictors are ignored) gives `target <- m * target + (1 - m) * online`.
///
/// Accepts any name -> Var lists: pass the parameters, and BatchNorm running statistics too if
/// they are Vars and should follow the online ones. Non-float Vars (e.g. an i64
/// `num_batches_tracked`) are copied. BYOL/solo-learn apply the EMA to parameters only and let
/// the target's BN buffers come from its own train-mode forward passes.
pub fn ema_update(target: &[(String, Var)], online: &[(String, Var)], m: f64) -> Result<()> {
    ema_update_with(target, online, m, false)
}

/// [`ema_update`], in place on the CPU too when `in_place_on_cpu` (it always is for f32 on
/// CUDA: one launch a parameter instead of four).
pub fn ema_update_with(
    target: &[(String, Var)],
    online: &[(String, Var)],
    m: f64,
    in_place_on_cpu: bool,
) -> Result<()> {
    let pairs = match_by_name(target, online, "ema_update")?;
    pairs.par_iter().try_for_each(|(_, tv, ov)| {
        let o = ov.as_tensor().detach();
        if !tv.dtype().is_float() {
            return tv.set(&o.to_dtype(tv.dtype())?.copy()?);
        }
        if in_place(tv.as_tensor(), in_place_on_cpu) && o.dtype() == DType::F32 {
            return tv.as_tensor().inplace_op2(&o.contiguous()?, &Ema { m });
        }
        let new =
            (tv.as_tensor().affine(m, 0.0)? + o.to_dtype(tv.dtype())?.affine(1.0 - m, 0.0)?)?;
        tv.set(&new)
    })
}

/// Copies `online` into `target` by name (same rules as [`ema_update`]); use it to initialise
/// the target network, or to copy buffers.
pub fn copy_vars(target: &[(String, Var)], online: &[(String, Var)]) -> Result<()> {
    let pairs = match_by_name(target, online, "copy_vars")?;
    pairs
        .iter()
        .try_for_each(|(_, tv, ov)| tv.set(&ov.as_tensor().detach().to_dtype(tv.dtype())?.copy()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn var(v: &[f32]) -> Var {
        Var::from_vec(v.to_vec(), v.len(), &Device::Cpu).unwrap()
    }

    fn vals(v: &Var) -> Vec<f32> {
        v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn no_decay_predicate_on_torchvision_names() {
        for n in [
            "bn1.weight",
            "bn1.bias",
            "layer1.0.bn1.weight",
            "layer3.5.bn3.weight",
            "layer2.0.downsample.1.weight",
            "layer2.0.downsample.1.bias",
            "fc.bias",
            "decoder.0.lateral.bias",
            "dense_proj.bn1.weight",
            "pooled_pred.norm.weight",
            "head.batchnorm.weight",
            "head.proj_bn.weight",
            "bn1.running_mean",
            "bias",
        ] {
            assert!(is_no_decay(n), "{n} should have no decay");
        }
        for n in [
            "conv1.weight",
            "layer1.0.conv1.weight",
            "layer2.0.downsample.0.weight",
            "fc.weight",
            "dense_proj.conv1.weight",
            "pooled_pred.linear1.weight",
            "weight",
            "subnet.1.weight",
            "abnormal.weight",
        ] {
            assert!(!is_no_decay(n), "{n} should decay");
        }
    }

    #[test]
    fn adamw_matches_hand_computed_pytorch_update() {
        // One scalar parameter with decay, one bias without; two steps by hand.
        let (w0, b0) = (0.5f64, -0.25f64);
        let w = var(&[w0 as f32]);
        let b = var(&[b0 as f32]);
        let cfg = AdamWConfig::default();
        let mut opt = AdamW::new(
            vec![("l.weight".into(), w.clone()), ("l.bias".into(), b.clone())],
            cfg,
        )
        .unwrap();
        assert_eq!(opt.no_decay_names(), vec!["l.bias"]);
        let gs = [(0.3f64, -0.7f64), (-0.1, 0.2)];
        let lrs = [1e-3, 5e-4];
        let (mut pw, mut pb) = (w0, b0);
        let (mut mw, mut vw, mut mb, mut vb) = (0.0, 0.0, 0.0, 0.0);
        for (t, ((gw, gb), lr)) in gs.iter().zip(lrs).enumerate() {
            let mut g = Grads::default();
            g.insert(
                "l.weight",
                Tensor::new(&[*gw as f32], &Device::Cpu).unwrap(),
            );
            g.insert("l.bias", Tensor::new(&[*gb as f32], &Device::Cpu).unwrap());
            opt.step(&g, lr).unwrap();
            let t = (t + 1) as i32;
            let upd = |p: &mut f64, m: &mut f64, v: &mut f64, gr: f64, wd: f64| {
                *p *= 1.0 - lr * wd;
                *m = 0.9 * *m + 0.1 * gr;
                *v = 0.999 * *v + 0.001 * gr * gr;
                let mh = *m / (1.0 - 0.9f64.powi(t));
                let vh = *v / (1.0 - 0.999f64.powi(t));
                *p -= lr * mh / (vh.sqrt() + 1e-6);
            };
            upd(&mut pw, &mut mw, &mut vw, *gw, 0.01);
            upd(&mut pb, &mut mb, &mut vb, *gb, 0.0);
            assert!((vals(&w)[0] as f64 - pw).abs() < 1e-7, "w step {t}");
            assert!((vals(&b)[0] as f64 - pb).abs() < 1e-7, "b step {t}");
        }
        assert_eq!(opt.step_count(), 2);
        // Decay mattered for w: without it the result would differ by about lr * wd * w.
        assert!(((pw - w0) - (-1e-3 - 5e-4)).abs() > 1e-7);
    }

    #[test]
    fn param_without_grad_is_untouched_and_unknown_grad_is_an_error() {
        let w = var(&[1.0, 2.0]);
        let mut opt =
            AdamW::new(vec![("a.weight".into(), w.clone())], AdamWConfig::default()).unwrap();
        opt.step(&Grads::default(), 1e-2).unwrap();
        assert_eq!(vals(&w), vec![1.0, 2.0]);
        let mut g = Grads::default();
        g.insert(
            "b.weight",
            Tensor::new(&[1.0f32, 1.0], &Device::Cpu).unwrap(),
        );
        assert!(opt.step(&g, 1e-2).is_err());
        assert!(AdamW::new(
            vec![("x".into(), w.clone()), ("x".into(), w.clone())],
            AdamWConfig::default()
        )
        .is_err());
    }

    #[test]
    fn state_round_trip_continues_identically() {
        let mk = || {
            let w = var(&[0.1, -0.2, 0.3]);
            let opt =
                AdamW::new(vec![("p.weight".into(), w.clone())], AdamWConfig::default()).unwrap();
            (w, opt)
        };
        let grad = |s: f32| {
            let mut g = Grads::default();
            g.insert(
                "p.weight",
                Tensor::new(&[s, -2.0 * s, 0.5], &Device::Cpu).unwrap(),
            );
            g
        };
        let (w1, mut o1) = mk();
        o1.step(&grad(1.0), 1e-2).unwrap();
        let after_one = w1.as_tensor().copy().unwrap();
        let state = o1.state_tensors().unwrap();
        assert!(state.contains_key("adam.m.p.weight") && state.contains_key("adam.v.p.weight"));
        let (w2, mut o2) = mk();
        w2.set(&after_one).unwrap();
        o2.load_state(&state).unwrap();
        assert_eq!(o2.step_count(), 1);
        o1.step(&grad(0.3), 1e-2).unwrap();
        o2.step(&grad(0.3), 1e-2).unwrap();
        assert_eq!(vals(&w1), vals(&w2));
        // A fresh optimiser from the same weights (bias correction at t = 1, zero moments)
        // would land elsewhere.
        let (w3, mut o3) = mk();
        w3.set(&after_one).unwrap();
        o3.step(&grad(0.3), 1e-2).unwrap();
        assert_ne!(vals(&w3), vals(&w2));
        // Mismatched or foreign state is refused.
        let mut bad = state.clone();
        bad.insert(
            "adam.m.other".into(),
            Tensor::new(&[0f32], &Device::Cpu).unwrap(),
        );
        assert!(o2.load_state(&bad).is_err());
        let mut bad = state.clone();
        bad.remove("adam.v.p.weight");
        assert!(o2.load_state(&bad).is_err());
    }

    #[test]
    fn clipping_and_accumulation() {
        let mut g = Grads::default();
        g.insert("a", Tensor::new(&[3.0f32], &Device::Cpu).unwrap());
        g.insert("b", Tensor::new(&[0.0f32, 4.0], &Device::Cpu).unwrap());
        assert!((g.global_norm().unwrap() - 5.0).abs() < 1e-12);
        let total = g.clip_global_norm(1.0).unwrap();
        assert!((total - 5.0).abs() < 1e-12);
        assert!((g.global_norm().unwrap() - 5.0 / (5.0 + 1e-6)).abs() < 1e-6);
        let before: Vec<f32> = g.get("b").unwrap().to_vec1().unwrap();
        g.clip_global_norm(10.0).unwrap(); // below the limit: unchanged
        assert_eq!(g.get("b").unwrap().to_vec1::<f32>().unwrap(), before);

        // Accumulating two half-batches with scale 1/2 equals the full-batch mean gradient.
        let w = var(&[0.5, -1.0]);
        let params = vec![("w".to_string(), w.clone())];
        let xs = [[1.0f32, 2.0], [-0.5, 3.0], [2.0, 0.1], [0.3, -0.7]];
        let loss = |rows: &[[f32; 2]]| {
            let flat: Vec<f32> = rows.iter().flatten().copied().collect();
            let x = Tensor::from_vec(flat, (rows.len(), 2), &Device::Cpu).unwrap();
            x.broadcast_mul(w.as_tensor())
                .unwrap()
                .sum(1)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
        };
        let full = Grads::from_store(&loss(&xs).backward().unwrap(), &params);
        let mut acc = GradAccumulator::new();
        acc.add(&loss(&xs[..2]).backward().unwrap(), &params)
            .unwrap();
        acc.add(&loss(&xs[2..]).backward().unwrap(), &params)
            .unwrap();
        assert_eq!(acc.micro_batches(), 2);
        let got = acc.finish(0.5).unwrap();
        let a: Vec<f32> = got.get("w").unwrap().to_vec1().unwrap();
        let b: Vec<f32> = full.get("w").unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
        assert!(b.iter().any(|v| v.abs() > 0.1));
    }

    #[test]
    fn lr_schedule_formula() {
        let base = 5e-4;
        assert_eq!(lr_at(0, 100, 10, base), 0.0);
        assert!((lr_at(5, 100, 10, base) - base * 0.5).abs() < 1e-15);
        assert!((lr_at(10, 100, 10, base) - base).abs() < 1e-15);
        // Halfway through the cosine part: base / 2.
        assert!((lr_at(55, 100, 10, base) - base * 0.5).abs() < 1e-15);
        let s = 73u64;
        let want = base * 0.5 * (1.0 + (std::f64::consts::PI * (s - 10) as f64 / 90.0).cos());
        assert!((lr_at(s, 100, 10, base) - want).abs() < 1e-18);
        assert!(lr_at(99, 100, 10, base) > 0.0 && lr_at(99, 100, 10, base) < 1e-6);
        assert_eq!(lr_at(100, 100, 10, base), 0.0);
        assert_eq!(lr_at(1000, 100, 10, base), 0.0);
        assert_eq!(lr_at(0, 100, 0, base), base);
        // Monotone: up during warm-up, down afterwards.
        let v: Vec<f64> = (0..100).map(|s| lr_at(s, 100, 10, base)).collect();
        assert!(v[..=10].windows(2).all(|w| w[1] > w[0]));
        assert!(v[10..].windows(2).all(|w| w[1] < w[0]));
    }

    #[test]
    fn ema_momentum_schedule() {
        assert!((ema_momentum(0, 1000, EMA_M0) - 0.996).abs() < 1e-15);
        assert!((ema_momentum(500, 1000, EMA_M0) - 0.998).abs() < 1e-15);
        assert!((ema_momentum(1000, 1000, EMA_M0) - 1.0).abs() < 1e-15);
        assert!((ema_momentum(5000, 1000, EMA_M0) - 1.0).abs() < 1e-15);
        let t = 250.0 / 1000.0;
        let want = 1.0 - 0.004 * ((std::f64::consts::PI * t).cos() + 1.0) / 2.0;
        assert!((ema_momentum(250, 1000, EMA_M0) - want).abs() < 1e-15);
    }

    #[test]
    fn ema_update_by_name() {
        let t_w = var(&[1.0, 2.0]);
        let t_b = var(&[0.0]);
        let o_w = var(&[3.0, -2.0]);
        let o_b = var(&[1.0]);
        let o_pred = var(&[9.0]);
        let target = vec![
            ("w".to_string(), t_w.clone()),
            ("b".to_string(), t_b.clone()),
        ];
        // Online in a different order, with an extra (predictor) entry.
        let online = vec![
            ("pred".to_string(), o_pred),
            ("b".to_string(), o_b),
            ("w".to_string(), o_w.clone()),
        ];
        ema_update(&target, &online, 0.75).unwrap();
        assert_eq!(vals(&t_w), vec![1.5, 1.0]);
        assert_eq!(vals(&t_b), vec![0.25]);
        // Integer buffers are copied.
        let t_n = Var::from_tensor(&Tensor::new(&[3i64], &Device::Cpu).unwrap()).unwrap();
        let o_n = Var::from_tensor(&Tensor::new(&[8i64], &Device::Cpu).unwrap()).unwrap();
        ema_update(&[("n".into(), t_n.clone())], &[("n".into(), o_n)], 0.9).unwrap();
        assert_eq!(t_n.as_tensor().to_vec1::<i64>().unwrap(), vec![8]);
        // Missing names and shape mismatches are errors.
        assert!(ema_update(&[("zz".into(), var(&[1.0]))], &online, 0.9).is_err());
        assert!(ema_update(&[("w".into(), var(&[1.0]))], &online, 0.9).is_err());
        copy_vars(&target, &online).unwrap();
        assert_eq!(vals(&t_w), vals(&o_w));
    }

    #[test]
    fn schedule_counts_a_pass_as_r_paper_epochs() {
        // 300 epochs, R = 2: 150 passes; 100 steps per pass = 2 epochs.
        let s = Schedule::new(100, 2, 300, 2.0, 5e-4, 0.996);
        assert_eq!((s.passes, s.total_steps), (150, 15_000));
        assert!((s.paper_epoch(50) - 1.0).abs() < 1e-12);
        // Warm-up: half-way through the 2 warm-up epochs at step 50.
        assert!((s.lr(50) - 2.5e-4).abs() < 1e-12);
        assert!((s.lr(100) - 5e-4).abs() < 1e-12);
        // Cosine: half-way between epoch 2 and 300 (epoch 151 = step 7550) gives lr / 2.
        assert!((s.lr(7550) - 2.5e-4).abs() < 1e-12);
        assert!(s.lr(15_000).abs() < 1e-15);
        // The same paper epochs whatever R: R = 10 with 20 steps per pass also reaches
        // epoch 1 after 2 steps.
        let r10 = Schedule::new(20, 10, 40, 3.0, 1e-3, 0.996);
        assert_eq!((r10.passes, r10.total_steps), (4, 80));
        assert!((r10.paper_epoch(2) - 1.0).abs() < 1e-12);
        assert!((r10.lr(3) - 1e-3 * 1.5 / 3.0).abs() < 1e-12);
        // EMA: 0.996 at the start, (1 + 0.996) / 2 half-way, 1 at the end.
        assert!((s.momentum(0) - 0.996).abs() < 1e-12);
        assert!((s.momentum(7500) - 0.998).abs() < 1e-9);
        assert!((s.momentum(15_000) - 1.0).abs() < 1e-12);
        // 40 epochs with R = 3: 14 passes (the last one stops the schedules at epoch 40).
        let odd = Schedule::new(10, 3, 40, 0.0, 1.0, 0.996);
        assert_eq!(odd.passes, 14);
        assert!(odd.lr(139).abs() < 1e-15);
    }

    /// The CUDA path's in-place updates (AdamW's moments and parameters, the EMA) give what
    /// the composed ops give, value for value, over three steps of both weight-decay groups.
    #[test]
    fn in_place_updates_equal_the_composed_ops() {
        let dev = Device::Cpu;
        let vars = || -> Vec<(String, Var)> {
            let w = Tensor::arange(0f32, 15., &dev)
                .unwrap()
                .reshape((3, 5))
                .unwrap();
            let w = ((w * 0.37).unwrap().sin().unwrap() * 2.0).unwrap();
            let b = Tensor::new(&[0.5f32, -0.25, 0.0, 1e-3, -3.0], &dev).unwrap();
            vec![
                ("l.weight".into(), Var::from_tensor(&w).unwrap()),
                ("l.bias".into(), Var::from_tensor(&b).unwrap()),
            ]
        };
        let (pa, pb) = (vars(), vars());
        let cfg = AdamWConfig::default();
        let mut composed = AdamW::new(pa.clone(), cfg).unwrap();
        let mut in_place = AdamW::new(pb.clone(), cfg)
            .unwrap()
            .with_in_place_on_cpu(true);
        for (t, lr) in [1e-2, 5e-3, 2e-3].into_iter().enumerate() {
            let mut g = Grads::default();
            for (i, (n, v)) in pa.iter().enumerate() {
                let r = Tensor::randn(0f32, 1., v.dims(), &dev).unwrap();
                // A zero gradient somewhere: the moments' update must still run.
                let r = if t == 1 && i == 1 {
                    r.zeros_like().unwrap()
                } else {
                    r
                };
                g.insert(n.clone(), r);
            }
            composed.step(&g, lr).unwrap();
            in_place.step(&g, lr).unwrap();
        }
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for ((n, a), (_, b)) in pa.iter().zip(&pb) {
            assert_eq!(flat(a.as_tensor()), flat(b.as_tensor()), "{n}");
        }
        let (sa, sb) = (
            composed.state_tensors().unwrap(),
            in_place.state_tensors().unwrap(),
        );
        for (k, a) in &sa {
            if k != "adam.step" {
                assert_eq!(flat(a), flat(&sb[k]), "{k}");
            }
        }
        // The parameters moved: the comparison is not between two untouched copies.
        assert_ne!(flat(pa[0].1.as_tensor()), flat(vars()[0].1.as_tensor()));

        let (ta, tb) = (vars(), vars());
        ema_update(&ta, &pa, 0.996).unwrap();
        ema_update_with(&tb, &pa, 0.996, true).unwrap();
        for ((n, a), (_, b)) in ta.iter().zip(&tb) {
            assert_eq!(flat(a.as_tensor()), flat(b.as_tensor()), "ema {n}");
        }
        assert_ne!(flat(ta[0].1.as_tensor()), flat(vars()[0].1.as_tensor()));
    }
}
