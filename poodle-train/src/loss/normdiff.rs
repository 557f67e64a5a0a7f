//! `sum_c |normalize(a) - normalize(b)|^2` per position, fused.
//!
//! For `a`, `b` of shape `(N, C, H, W)` the result is `(N, 1, H, W)`:
//! `d = sum_c (a_c / na - b_c / nb)^2`, `na = max(|a|, eps)` (`F.normalize`, eps 1e-12).
//! On the CPU (f32/f64) and, with the `cuda` feature, on CUDA (f32, src/cuda/kernels.cu) this
//! is one custom op with a hand-written backward, which avoids the half-dozen full-size
//! temporaries (and their backward passes) of the composed form; sums over channels are
//! accumulated in f64. Elsewhere it falls back to the composed candle ops.
//!
//! Backward, with `u = a / na`, `v = b / nb`, `r = u - v` and upstream gradient `g`:
//! `dd/da = 2 g (r - u (u . r)) / na` where `|a| > eps`, `2 g r / eps` where `|a| <= eps`
//! (PyTorch's `clamp_min` passes no gradient to the norm there); `dd/db` likewise with `-r`
//! and `v`.

use super::{l2_normalize, NORM_EPS};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// Positions per parallel work item.
const CHUNK: usize = 512;

/// `sum_c |normalize(a) - normalize(b)|^2` over dim 1, keepdim: `(N, C, ...) -> (N, 1, ...)`.
/// Differentiable w.r.t. both inputs (detach one to stop its gradient).
pub fn normalized_sq_diff(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if a.dims() != b.dims() || a.rank() < 2 {
        candle_core::bail!(
            "normalized_sq_diff: shapes {:?} and {:?}",
            a.dims(),
            b.dims()
        );
    }
    let cpu_float = a.device().is_cpu() && matches!(a.dtype(), DType::F32 | DType::F64);
    let cuda_f32 = cfg!(feature = "cuda") && a.device().is_cuda() && a.dtype() == DType::F32;
    if (cpu_float || cuda_f32) && a.dtype() == b.dtype() {
        a.contiguous()?.apply_op2(&b.contiguous()?, NormDiff)
    } else {
        normalized_sq_diff_composed(a, b)
    }
}

/// The same quantity from candle ops (reference form and non-CPU fallback).
pub fn normalized_sq_diff_composed(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (l2_normalize(a, 1)? - l2_normalize(b, 1)?)?
        .sqr()?
        .sum_keepdim(1)
}

pub(super) trait Elem: Copy + Send + Sync + Default {
    fn f(self) -> f64;
    fn from_f(v: f64) -> Self;
}

impl Elem for f32 {
    fn f(self) -> f64 {
        self as f64
    }
    fn from_f(v: f64) -> Self {
        v as f32
    }
}

impl Elem for f64 {
    fn f(self) -> f64 {
        self
    }
    fn from_f(v: f64) -> Self {
        v
    }
}

/// `(n, c, positions per sample)` of an `(N, C, ...)` layout.
fn geometry(layout: &Layout) -> (usize, usize, usize) {
    let dims = layout.shape().dims();
    (dims[0], dims[1], dims[2..].iter().product())
}

fn slice<'a, T>(v: &'a [T], l: &Layout) -> Result<&'a [T]> {
    crate::custom_op::contiguous_slice(v, l, "normalized_sq_diff")
}

/// Inverse clamped norms `1 / max(|x|, eps)` and whether `|x| > eps`, for positions
/// `[p0, p0 + len)` of sample `s`.
fn inv_norms<T: Elem>(
    x: &[T],
    (c, hw): (usize, usize),
    s: usize,
    p0: usize,
    len: usize,
) -> Vec<(f64, bool)> {
    let mut acc = vec![0f64; len];
    for ch in 0..c {
        let row = &x[(s * c + ch) * hw + p0..][..len];
        for (a, &v) in acc.iter_mut().zip(row) {
            *a += v.f() * v.f();
        }
    }
    acc.into_iter()
        .map(|s2| {
            let n = s2.sqrt();
            (1.0 / n.max(NORM_EPS), n > NORM_EPS)
        })
        .collect()
}

/// Forward: `d[s, p] = sum_c (a / na - b / nb)^2`.
fn forward<T: Elem>(a: &[T], b: &[T], (n, c, hw): (usize, usize, usize)) -> Vec<T> {
    let mut out = vec![T::default(); n * hw];
    out.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(s, os)| {
            os.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
                let (p0, len) = (k * CHUNK, o.len());
                let ia = inv_norms(a, (c, hw), s, p0, len);
                let ib = inv_norms(b, (c, hw), s, p0, len);
                let mut d = vec![0f64; len];
                for ch in 0..c {
                    let off = (s * c + ch) * hw + p0;
                    let (ra, rb) = (&a[off..off + len], &b[off..off + len]);
                    for i in 0..len {
                        let r = ra[i].f() * ia[i].0 - rb[i].f() * ib[i].0;
                        d[i] += r * r;
                    }
                }
                for (o, v) in o.iter_mut().zip(d) {
                    *o = T::from_f(v);
                }
            });
        });
    out
}

/// Per-position backward scalars: `(1/na, 1/nb, u.r or 0, v.r or 0)` (the projections are
/// dropped where the norm is clamped).
fn backward_scalars<T: Elem>(a: &[T], b: &[T], (n, c, hw): (usize, usize, usize)) -> Vec<[f64; 4]> {
    let mut out = vec![[0f64; 4]; n * hw];
    out.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(s, os)| {
            os.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
                let (p0, len) = (k * CHUNK, o.len());
                let ia = inv_norms(a, (c, hw), s, p0, len);
                let ib = inv_norms(b, (c, hw), s, p0, len);
                let (mut su, mut sv) = (vec![0f64; len], vec![0f64; len]);
                for ch in 0..c {
                    let off = (s * c + ch) * hw + p0;
                    let (ra, rb) = (&a[off..off + len], &b[off..off + len]);
                    for i in 0..len {
                        let (u, v) = (ra[i].f() * ia[i].0, rb[i].f() * ib[i].0);
                        su[i] += u * (u - v);
                        sv[i] += v * (u - v);
                    }
                }
                for i in 0..len {
                    let su = if ia[i].1 { su[i] } else { 0.0 };
                    let sv = if ib[i].1 { sv[i] } else { 0.0 };
                    o[i] = [ia[i].0, ib[i].0, su, sv];
                }
            });
        });
    out
}

/// Backward: `[dd/da; dd/db]` as one `(2, N, C, ...)` buffer.
fn backward<T: Elem>(a: &[T], b: &[T], g: &[T], (n, c, hw): (usize, usize, usize)) -> Vec<T> {
    let sc = backward_scalars(a, b, (n, c, hw));
    let mut out = vec![T::default(); 2 * n * c * hw];
    out.par_chunks_mut(hw.max(1))
        .enumerate()
        .for_each(|(k, o)| {
            let (which, plane) = (k / (n * c), k % (n * c));
            let s = plane / c;
            let (ra, rb) = (&a[plane * hw..][..hw], &b[plane * hw..][..hw]);
            let (gs, ss) = (&g[s * hw..][..hw], &sc[s * hw..][..hw]);
            for p in 0..hw {
                let [ia, ib, su, sv] = ss[p];
                let (u, v) = (ra[p].f() * ia, rb[p].f() * ib);
                let r = u - v;
                let gp = 2.0 * gs[p].f();
                o[p] = T::from_f(if which == 0 {
                    gp * (r - u * su) * ia
                } else {
                    -gp * (r - v * sv) * ib
                });
            }
        });
    out
}

struct NormDiff;
struct NormDiffGrad;

impl CustomOp2 for NormDiff {
    fn name(&self) -> &'static str {
        "normalized-sq-diff"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geo = geometry(l1);
        let mut dims = l1.shape().dims().to_vec();
        dims[1] = 1;
        let out = match (s1, s2) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                CpuStorage::F32(forward(slice(a, l1)?, slice(b, l2)?, geo))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                CpuStorage::F64(forward(slice(a, l1)?, slice(b, l2)?, geo))
            }
            _ => candle_core::bail!("normalized-sq-diff: f32 or f64 inputs of one dtype"),
        };
        Ok((out, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let mut dims = l1.shape().dims().to_vec();
        dims[1] = 1;
        let out = crate::cuda::kernels::normdiff_fwd(s1, l1, s2, l2, geometry(l1), NORM_EPS)?;
        Ok((out, Shape::from(dims)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let both = a
            .detach()
            .apply_op3_no_bwd(&b.detach(), &grad.contiguous()?, &NormDiffGrad)?;
        Ok((Some(both.get(0)?), Some(both.get(1)?)))
    }
}

impl CustomOp3 for NormDiffGrad {
    fn name(&self) -> &'static str {
        "normalized-sq-diff-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let geo = geometry(l1);
        let mut dims = vec![2];
        dims.extend_from_slice(l1.shape().dims());
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(g)) => {
                CpuStorage::F32(backward(slice(a, l1)?, slice(b, l2)?, slice(g, l3)?, geo))
            }
            (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(g)) => {
                CpuStorage::F64(backward(slice(a, l1)?, slice(b, l2)?, slice(g, l3)?, geo))
            }
            _ => candle_core::bail!("normalized-sq-diff-grad: f32 or f64 inputs of one dtype"),
        };
        Ok((out, Shape::from(dims)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let mut dims = vec![2];
        dims.extend_from_slice(l1.shape().dims());
        let out = crate::cuda::kernels::normdiff_bwd(
            (s1, l1),
            (s2, l2),
            (s3, l3),
            geometry(l1),
            NORM_EPS,
        )?;
        Ok((out, Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn data(n: usize, seed: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 + 1.0) * (0.713 + seed)).sin() * 2.0)
            .collect()
    }

    #[test]
    fn fused_equals_composed_forward_and_backward() {
        let (n, c, h, w) = (2, 5, 3, 7);
        let m = n * c * h * w;
        let mut av = data(m, 0.0);
        let bv = data(m, 0.3);
        // Position (0, 1, 2) of sample 0 is an all-zero vector; (1, 0, 0) a tiny one.
        for ch in 0..c {
            av[ch * h * w + w + 2] = 0.0;
            av[(c + ch) * h * w] = 1e-14;
        }
        let a = Var::from_vec(av, (n, c, h, w), &Device::Cpu).unwrap();
        let b = Var::from_vec(bv, (n, c, h, w), &Device::Cpu).unwrap();
        let g = Tensor::from_vec(data(n * h * w, 0.9), (n, 1, h, w), &Device::Cpu).unwrap();
        let run = |fused: bool| {
            let d = if fused {
                normalized_sq_diff(a.as_tensor(), b.as_tensor()).unwrap()
            } else {
                normalized_sq_diff_composed(a.as_tensor(), b.as_tensor()).unwrap()
            };
            assert_eq!(d.dims(), &[n, 1, h, w]);
            let gr = d.mul(&g).unwrap().sum_all().unwrap().backward().unwrap();
            let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (
                v(&d),
                v(gr.get(a.as_tensor()).unwrap()),
                v(gr.get(b.as_tensor()).unwrap()),
            )
        };
        let (f, c_) = (run(true), run(false));
        for (x, y) in f.0.iter().zip(&c_.0) {
            assert!((x - y).abs() < 1e-5, "value {x} vs {y}");
        }
        for (x, y) in f.1.iter().zip(&c_.1).chain(f.2.iter().zip(&c_.2)) {
            assert!((x - y).abs() <= 1e-4 * y.abs().max(1.0), "grad {x} vs {y}");
        }
        // The tiny vector is divided by eps (gradient ~ 1e12 scale), the zero vector has a
        // finite gradient.
        assert!(f.1.iter().all(|v| v.is_finite()));
        assert!(f.1[(c) * h * w].abs() > 1e6);
    }

    #[test]
    fn identical_directions_give_zero() {
        let a = Tensor::from_vec(data(2 * 4 * 5, 0.1), (2, 4, 5), &Device::Cpu).unwrap();
        let b = (&a * 3.5).unwrap();
        let d: Vec<f32> = normalized_sq_diff(&a, &b)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(d.len(), 10);
        assert!(d.iter().all(|v| v.abs() < 1e-6));
        let e: Vec<f32> = normalized_sq_diff(&a, &a.neg().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(e.iter().all(|v| (v - 4.0).abs() < 1e-5), "opposite: 4");
        assert!(normalized_sq_diff(&a, &a.narrow(2, 0, 4).unwrap()).is_err());
    }
}
