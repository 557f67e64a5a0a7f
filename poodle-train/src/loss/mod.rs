//! PooDLe's objectives as pure functions of tensors (no model, no optimiser).
//!
//! - [`dense`]: the flow-equivariant dense loss (paper Eq. (1)).
//! - [`pooled`]: the subcrop BYOL loss (paper Eq. (2)).
//! - [`sample`]: the differentiable bilinear sampler (optionally composed with an exact
//!   bilinear upsampling) the dense loss uses.
//! - [`normdiff`]: the per-pixel `|normalize(a) - normalize(b)|^2` of aligned maps.
//! - [`fused`]: the dense loss's compare straight from the stride-8 maps through the sampling
//!   plans (no crop-resolution maps); what [`dense::dense_loss`] uses.
//! - here: the symmetric weighted total, per-term logging values and a finiteness check.
//!
//! Stop-gradient: [`dense::dense_loss`] and [`pooled::pooled_loss`] detach their target
//! arguments themselves. Parity with the PyTorch reference forms is checked by
//! `tests/loss_parity.rs` against fixtures written by `tools/torch_reference_losses.py`.

pub mod dense;
pub mod fused;
pub mod normdiff;
pub mod pooled;
pub mod sample;

pub use dense::{dense_loss, DenseStats};
pub use pooled::pooled_loss;
pub use sample::{sample_bilinear, SampleGrid};

use candle_core::{Result, Tensor};

/// `F.normalize` epsilon: `x / max(|x|, 1e-12)`.
pub const NORM_EPS: f64 = 1e-12;
/// Paper weights: 0.5 dense + 0.5 pooled (docs/method.md).
pub const W_DENSE: f64 = 0.5;
pub const W_POOLED: f64 = 0.5;

/// L2 normalisation along `dim`, equal to `F.normalize(x, dim=dim, eps=1e-12)`:
/// `x / max(|x|, eps)`, computed as `x / sqrt(max(sum x^2, eps^2))` so that an all-zero vector
/// (an out-of-bounds sample) has a finite (zero) gradient instead of the NaN `sqrt'(0)` gives.
pub fn l2_normalize(x: &Tensor, dim: usize) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(dim)?
        .maximum(NORM_EPS * NORM_EPS)?
        .sqrt()?;
    x.broadcast_div(&norm)
}

/// Scalar values of one step's loss terms, for logging (JSON lines) and the finiteness check.
/// `ab` = frame t online / frame t+dt target; `ba` = the swapped order.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossTerms {
    pub dense_ab: f32,
    pub dense_ba: f32,
    pub pooled_ab: f32,
    pub pooled_ba: f32,
    /// Mean of the two dense terms.
    pub dense: f32,
    /// Mean of the two pooled terms.
    pub pooled: f32,
    /// `w_dense * dense + w_pooled * pooled`.
    pub total: f32,
}

impl LossTerms {
    /// `(name, value)` pairs in a fixed order.
    pub fn named(&self) -> [(&'static str, f32); 7] {
        [
            ("dense_ab", self.dense_ab),
            ("dense_ba", self.dense_ba),
            ("pooled_ab", self.pooled_ab),
            ("pooled_ba", self.pooled_ba),
            ("dense", self.dense),
            ("pooled", self.pooled),
            ("total", self.total),
        ]
    }

    /// The values in [`Self::named`]'s order.
    pub fn values(&self) -> [f32; 7] {
        self.named().map(|(_, v)| v)
    }

    /// The inverse of [`Self::values`].
    pub fn from_values(v: [f32; 7]) -> Self {
        let [dense_ab, dense_ba, pooled_ab, pooled_ba, dense, pooled, total] = v;
        LossTerms {
            dense_ab,
            dense_ba,
            pooled_ab,
            pooled_ba,
            dense,
            pooled,
            total,
        }
    }
}

/// The symmetric total: `w_dense * (dense_ab + dense_ba) / 2 + w_pooled * (pooled_ab +
/// pooled_ba) / 2`, each argument a scalar tensor (rank 0 or one element). Returns the
/// differentiable total and the per-term values as one detached f32 vector in
/// [`LossTerms::named`] order ([`LossTerms::from_values`] of its values): nothing here waits for
/// the device, so the training loop reads the values once the whole step is queued. The
/// paper uses `w_dense = w_pooled = 0.5` ([`W_DENSE`], [`W_POOLED`]); a disabled objective
/// can pass zeros with weight 0.
pub fn total(
    dense_ab: &Tensor,
    dense_ba: &Tensor,
    pooled_ab: &Tensor,
    pooled_ba: &Tensor,
    w_dense: f64,
    w_pooled: f64,
) -> Result<(Tensor, Tensor)> {
    let s = |t: &Tensor| -> Result<Tensor> {
        if t.elem_count() != 1 {
            candle_core::bail!("loss::total: term {:?} is not a scalar", t.dims());
        }
        t.flatten_all()?.sum_all()
    };
    let (dab, dba, pab, pba) = (s(dense_ab)?, s(dense_ba)?, s(pooled_ab)?, s(pooled_ba)?);
    let dense = ((&dab + &dba)? * 0.5)?;
    let pooled = ((&pab + &pba)? * 0.5)?;
    let tot = ((&dense * w_dense)? + (&pooled * w_pooled)?)?;
    let terms = Tensor::stack(&[&dab, &dba, &pab, &pba, &dense, &pooled, &tot], 0)?
        .to_dtype(candle_core::DType::F32)?
        .detach();
    Ok((tot, terms))
}

/// A non-finite loss term: which step and which term.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("non-finite loss at step {step}: {term} = {value}")]
pub struct NonFinite {
    pub step: u64,
    pub term: &'static str,
    pub value: f32,
}

/// Fails on the first NaN or infinite term (in [`LossTerms::named`] order), naming it.
pub fn check_finite(step: u64, terms: &LossTerms) -> std::result::Result<(), NonFinite> {
    match terms.named().into_iter().find(|(_, v)| !v.is_finite()) {
        Some((term, value)) => Err(NonFinite { step, term, value }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn total_is_weighted_mean_of_symmetric_terms() {
        let dev = Device::Cpu;
        let da = Var::new(1.0f32, &dev).unwrap();
        let db = Tensor::new(3.0f32, &dev).unwrap();
        let pa = Tensor::new(&[0.5f32], &dev).unwrap();
        let pb = Tensor::new(1.5f32, &dev).unwrap();
        let (t, terms) = total(da.as_tensor(), &db, &pa, &pb, 0.5, 0.5).unwrap();
        assert!(!terms.track_op(), "the logged terms keep no graph");
        let read =
            |t: &Tensor| LossTerms::from_values(t.to_vec1::<f32>().unwrap().try_into().unwrap());
        let terms = read(&terms);
        assert_eq!(terms.dense, 2.0);
        assert_eq!(terms.pooled, 1.0);
        assert_eq!(terms.total, 1.5);
        assert_eq!(t.to_scalar::<f32>().unwrap(), 1.5);
        assert_eq!((terms.dense_ab, terms.pooled_ab), (1.0, 0.5));
        let g = t.backward().unwrap();
        assert_eq!(
            g.get(da.as_tensor()).unwrap().to_scalar::<f32>().unwrap(),
            0.25
        );
        let (_, t2) = total(da.as_tensor(), &db, &pa, &pb, 1.0, 0.0).unwrap();
        assert_eq!(read(&t2).total, 2.0);
        let two = Tensor::new(&[1.0f32, 2.0], &dev).unwrap();
        assert!(total(&two, &db, &pa, &pb, 0.5, 0.5).is_err());
    }

    #[test]
    fn check_finite_names_step_and_term() {
        let ok = LossTerms {
            total: 1.0,
            ..Default::default()
        };
        assert!(check_finite(3, &ok).is_ok());
        let bad = LossTerms {
            pooled_ba: f32::NAN,
            pooled: f32::NAN,
            total: f32::NAN,
            ..ok
        };
        let e = check_finite(17, &bad).unwrap_err();
        assert_eq!((e.step, e.term), (17, "pooled_ba"));
        assert!(e.to_string().contains("step 17") && e.to_string().contains("pooled_ba"));
        let inf = LossTerms {
            dense_ab: f32::INFINITY,
            ..ok
        };
        assert_eq!(check_finite(0, &inf).unwrap_err().term, "dense_ab");
    }

    #[test]
    fn l2_normalize_matches_f_normalize() {
        let x = Tensor::new(&[[3.0f32, 4.0], [0.0, 0.0], [1e-13, 0.0]], &Device::Cpu).unwrap();
        let y: Vec<Vec<f32>> = l2_normalize(&x, 1).unwrap().to_vec2().unwrap();
        assert_eq!(y[0], vec![0.6, 0.8]);
        assert_eq!(y[1], vec![0.0, 0.0]);
        // |x| < eps: divided by eps, not by |x|.
        assert!((y[2][0] - 0.1).abs() < 1e-6);
    }
}
