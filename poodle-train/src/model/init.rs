//! Seeded initialisation. candle's CPU random generator cannot be seeded, so every
//! parameter is created through [`get`], which records its initialiser by full name, and
//! [`reseed`] then redraws all random parameters of a map from a seeded stream derived from
//! (seed, name): the same seed gives the same network on any machine and thread count.

use candle_core::{Result, Shape, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use poodle_common::rng::SplitMix64;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    static INITS: RefCell<HashMap<String, Init>> = RefCell::new(HashMap::new());
}

/// `vb.get_with_hints`, remembering the initialiser of the parameter's full name.
pub(crate) fn get<S: Into<Shape>>(
    vb: &VarBuilder,
    shape: S,
    name: &str,
    init: Init,
) -> Result<Tensor> {
    let prefix = vb.prefix();
    let full = if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    };
    INITS.with(|m| m.borrow_mut().insert(full, init));
    vb.get_with_hints(shape, name, init)
}

fn draw(init: Init, n: usize, rng: &mut SplitMix64) -> Option<Vec<f32>> {
    let u = |rng: &mut SplitMix64| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    match init {
        Init::Const(_) => None,
        Init::Uniform { lo, up } => {
            Some((0..n).map(|_| (lo + (up - lo) * u(rng)) as f32).collect())
        }
        Init::Randn { mean, stdev } => Some(
            (0..n)
                .map(|_| {
                    // Box-Muller; 1 - u keeps the logarithm finite.
                    let (a, b) = (1.0 - u(rng), u(rng));
                    (mean + stdev * (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos())
                        as f32
                })
                .collect(),
        ),
        // Kaiming variants are not used by this crate's layers.
        _ => None,
    }
}

/// Redraws every randomly initialised variable of `map` from (seed, name).
pub fn reseed(map: &VarMap, seed: u64) -> Result<()> {
    let inits = INITS.with(|m| m.borrow().clone());
    for (name, var) in crate::model::named_vars(map) {
        let Some(init) = inits.get(&name) else {
            continue;
        };
        let mut rng = SplitMix64::for_item(seed, &name);
        if let Some(values) = draw(*init, var.elem_count(), &mut rng) {
            let t = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
            var.set(&t)?;
        }
    }
    Ok(())
}
