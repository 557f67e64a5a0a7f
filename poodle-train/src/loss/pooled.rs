//! The pooled subcrop loss (paper Eq. (2)): BYOL's normalised squared error between the online
//! prediction of each pooled subcrop projection and the target projection of its pair.

use super::l2_normalize;
use candle_core::{Result, Tensor};

/// `mean_k |normalize(q_k) - normalize(z_k)|^2` (= `mean_k (2 - 2 cos(q_k, z_k))`) over the
/// `M = N * K` subcrop pairs. `q_online` is the online predictor output `(M, D)`, `z_target`
/// the target projector output `(M, D)` (both already average-pooled); `z_target` is detached
/// inside (stop-gradient). Normalisation is `F.normalize(dim=1, eps=1e-12)`.
pub fn pooled_loss(q_online: &Tensor, z_target: &Tensor) -> Result<Tensor> {
    pooled_loss_with_target_grad(q_online, &z_target.detach())
}

/// [`pooled_loss`] without the stop-gradient on `z_target` (for gradient checks).
pub fn pooled_loss_with_target_grad(q_online: &Tensor, z_target: &Tensor) -> Result<Tensor> {
    let (m, d) = q_online.dims2()?;
    if z_target.dims() != [m, d] {
        candle_core::bail!(
            "pooled_loss: q_online {:?} and z_target {:?} differ",
            q_online.dims(),
            z_target.dims()
        );
    }
    (l2_normalize(q_online, 1)? - l2_normalize(z_target, 1)?)?
        .sqr()?
        .sum(1)?
        .mean_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn equals_two_minus_two_cos() {
        let q = [[1.0f32, 2.0, -0.5], [0.3, -1.0, 4.0]];
        let z = [[-2.0f32, 0.5, 1.0], [0.3, -1.0, 4.0]];
        let qt = Tensor::new(&q, &Device::Cpu).unwrap();
        let zt = Tensor::new(&z, &Device::Cpu).unwrap();
        let l = pooled_loss(&qt, &zt).unwrap().to_scalar::<f32>().unwrap();
        let cos = |a: &[f32; 3], b: &[f32; 3]| {
            let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
            let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
            dot / (na * nb)
        };
        let want = ((2.0 - 2.0 * cos(&q[0], &z[0])) + (2.0 - 2.0 * cos(&q[1], &z[1]))) / 2.0;
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        // The second pair is identical: its term is 0, so the loss is half the first term.
        assert!((l - (1.0 - cos(&q[0], &z[0]))).abs() < 1e-6);
    }

    #[test]
    fn scale_invariant_and_target_detached() {
        let q = Var::new(&[[1.0f32, 2.0], [3.0, -1.0]], &Device::Cpu).unwrap();
        let z = Var::new(&[[0.5f32, 0.1], [1.0, 1.0]], &Device::Cpu).unwrap();
        let l1 = pooled_loss(q.as_tensor(), z.as_tensor()).unwrap();
        let l2 = pooled_loss(&q.as_tensor().affine(7.0, 0.0).unwrap(), z.as_tensor()).unwrap();
        let (a, b) = (
            l1.to_scalar::<f32>().unwrap(),
            l2.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-6 && a > 0.1);
        let g = l1.backward().unwrap();
        assert!(g.get(q.as_tensor()).is_some() && g.get(z.as_tensor()).is_none());
        assert!(pooled_loss(
            q.as_tensor(),
            &z.as_tensor().t().unwrap().narrow(0, 0, 1).unwrap()
        )
        .is_err());
    }
}
