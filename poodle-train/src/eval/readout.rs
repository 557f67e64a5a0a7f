//! The linear readout head with a hand-written forward and backward pass (plain Rust on
//! CPU, one image per rayon task): logits `z = W f + b` at stride 8, bilinear upsampling
//! (PyTorch `align_corners=False`, separable, two taps per axis), softmax cross-entropy over
//! labelled pixels, and the gradients of `W` and `b`. The head is tiny and linear, so this is
//! far cheaper than building an autograd graph over the upsampled logits; the tests check it
//! against candle's autograd.
//!
//! Features are `C x P` row-major per image (`P = h * w`), labels `H x W` class ids with
//! values `>= K` ignored.

use crate::optim::{AdamWConfig, Grads};
use candle_core::{Device, Result, Tensor, Var};
use rayon::prelude::*;

/// One axis of PyTorch's `align_corners=False` bilinear interpolation: for each output
/// index the two input indices and their weights.
pub fn interp_table(n_in: usize, n_out: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = n_in as f64 / n_out as f64;
    (0..n_out)
        .map(|o| {
            let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            let l1 = (src - i0 as f64).clamp(0.0, 1.0) as f32;
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// Bilinear upsampling of `K x h x w` maps to `K x H x W`.
pub fn upsample(z: &[f32], k: usize, (h, w): (usize, usize), (hh, ww): (usize, usize)) -> Vec<f32> {
    let ty = interp_table(h, hh);
    let tx = interp_table(w, ww);
    let mut out = vec![0f32; k * hh * ww];
    for c in 0..k {
        let zc = &z[c * h * w..(c + 1) * h * w];
        // Rows first: (hh x w), then columns.
        let mut rows = vec![0f32; hh * w];
        for (y, &(y0, y1, a0, a1)) in ty.iter().enumerate() {
            for x in 0..w {
                rows[y * w + x] = a0 * zc[y0 * w + x] + a1 * zc[y1 * w + x];
            }
        }
        let oc = &mut out[c * hh * ww..(c + 1) * hh * ww];
        for y in 0..hh {
            let r = &rows[y * w..(y + 1) * w];
            for (x, &(x0, x1, b0, b1)) in tx.iter().enumerate() {
                oc[y * ww + x] = b0 * r[x0] + b1 * r[x1];
            }
        }
    }
    out
}

/// The transpose of [`upsample`]: gradients `K x H x W` back to `K x h x w`.
pub fn upsample_backward(
    g: &[f32],
    k: usize,
    (h, w): (usize, usize),
    (hh, ww): (usize, usize),
) -> Vec<f32> {
    let ty = interp_table(h, hh);
    let tx = interp_table(w, ww);
    let mut out = vec![0f32; k * h * w];
    let mut rows = vec![0f32; hh * w];
    for c in 0..k {
        rows.iter_mut().for_each(|v| *v = 0.0);
        let gc = &g[c * hh * ww..(c + 1) * hh * ww];
        for y in 0..hh {
            let r = &mut rows[y * w..(y + 1) * w];
            for (x, &(x0, x1, b0, b1)) in tx.iter().enumerate() {
                let v = gc[y * ww + x];
                r[x0] += b0 * v;
                r[x1] += b1 * v;
            }
        }
        let oc = &mut out[c * h * w..(c + 1) * h * w];
        for (y, &(y0, y1, a0, a1)) in ty.iter().enumerate() {
            for x in 0..w {
                let v = rows[y * w + x];
                oc[y0 * w + x] += a0 * v;
                oc[y1 * w + x] += a1 * v;
            }
        }
    }
    out
}

/// A 1x1 convolution `C -> K` with bias.
#[derive(Clone, Debug, PartialEq)]
pub struct LinearHead {
    pub k: usize,
    pub c: usize,
    /// `K x C`, row-major.
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// Summed loss, labelled-pixel count and gradients of one or more images.
#[derive(Clone, Debug, PartialEq)]
pub struct LossGrad {
    /// Sum over labelled pixels of `-log p(label)`.
    pub loss_sum: f64,
    pub count: u64,
    pub gw: Vec<f32>,
    pub gb: Vec<f32>,
}

impl LossGrad {
    fn zeros(k: usize, c: usize) -> Self {
        LossGrad {
            loss_sum: 0.0,
            count: 0,
            gw: vec![0.0; k * c],
            gb: vec![0.0; k],
        }
    }

    fn add(mut self, o: LossGrad) -> Self {
        self.loss_sum += o.loss_sum;
        self.count += o.count;
        self.gw.iter_mut().zip(&o.gw).for_each(|(a, b)| *a += b);
        self.gb.iter_mut().zip(&o.gb).for_each(|(a, b)| *a += b);
        self
    }
}

impl LinearHead {
    /// Zero weights and bias (the readout problem is convex).
    pub fn zeros(c: usize, k: usize) -> Self {
        LinearHead {
            k,
            c,
            w: vec![0.0; k * c],
            b: vec![0.0; k],
        }
    }

    /// Logits `K x P` of features `C x P`.
    pub fn logits(&self, f: &[f32]) -> Vec<f32> {
        let p = f.len() / self.c;
        assert_eq!(f.len(), self.c * p, "features are not C x P");
        let mut z = vec![0f32; self.k * p];
        for kk in 0..self.k {
            let zk = &mut z[kk * p..(kk + 1) * p];
            zk.iter_mut().for_each(|v| *v = self.b[kk]);
            for cc in 0..self.c {
                let wv = self.w[kk * self.c + cc];
                if wv == 0.0 {
                    continue;
                }
                let fc = &f[cc * p..(cc + 1) * p];
                for (a, &b) in zk.iter_mut().zip(fc) {
                    *a += wv * b;
                }
            }
        }
        z
    }

    /// Loss and gradients of one image: features `C x (h*w)`, labels `H x W`.
    pub fn loss_grad(
        &self,
        f: &[f32],
        fsize: (usize, usize),
        labels: &[u8],
        lsize: (usize, usize),
    ) -> LossGrad {
        let (k, c) = (self.k, self.c);
        let p = fsize.0 * fsize.1;
        let q = lsize.0 * lsize.1;
        assert_eq!(labels.len(), q, "labels are not H x W");
        let up = upsample(&self.logits(f), k, fsize, lsize);
        let mut g = vec![0f32; k * q];
        let mut out = LossGrad::zeros(k, c);
        let mut probs = vec![0f32; k];
        for (i, &l) in labels.iter().enumerate() {
            let l = l as usize;
            if l >= k {
                continue;
            }
            let m = (0..k)
                .map(|j| up[j * q + i])
                .fold(f32::NEG_INFINITY, f32::max);
            let mut s = 0f32;
            for j in 0..k {
                probs[j] = (up[j * q + i] - m).exp();
                s += probs[j];
            }
            out.loss_sum += f64::from(s.ln() + m - up[l * q + i]);
            out.count += 1;
            for j in 0..k {
                g[j * q + i] = probs[j] / s - if j == l { 1.0 } else { 0.0 };
            }
        }
        let gz = upsample_backward(&g, k, fsize, lsize);
        for kk in 0..k {
            let gk = &gz[kk * p..(kk + 1) * p];
            out.gb[kk] = gk.iter().sum();
            for cc in 0..c {
                let fc = &f[cc * p..(cc + 1) * p];
                out.gw[kk * c + cc] = gk.iter().zip(fc).map(|(a, b)| a * b).sum();
            }
        }
        out
    }

    /// Summed loss and gradients of a batch of `(features, labels)` (parallel over images),
    /// all with features `C x fsize` and labels `lsize`.
    pub fn batch_loss_grad(
        &self,
        items: &[(&[f32], &[u8])],
        fsize: (usize, usize),
        lsize: (usize, usize),
    ) -> LossGrad {
        items
            .par_iter()
            .map(|(f, l)| self.loss_grad(f, fsize, l, lsize))
            .reduce(|| LossGrad::zeros(self.k, self.c), LossGrad::add)
    }

    /// Arg-max classes at `H x W` of features `C x (h*w)`.
    pub fn predict(&self, f: &[f32], fsize: (usize, usize), out: (usize, usize)) -> Vec<u8> {
        let q = out.0 * out.1;
        let up = upsample(&self.logits(f), self.k, fsize, out);
        (0..q)
            .map(|i| {
                let mut best = 0;
                for j in 1..self.k {
                    if up[j * q + i] > up[best * q + i] {
                        best = j;
                    }
                }
                best as u8
            })
            .collect()
    }
}

/// The project's AdamW ([`crate::optim::AdamW`], PyTorch semantics) over the head's two
/// tensors, `readout.weight` (decayed) and `readout.bias` (not, by the optimiser's name rule),
/// with PyTorch's default eps 1e-8.
pub struct AdamW {
    opt: crate::optim::AdamW,
    w: Var,
    b: Var,
}

impl AdamW {
    pub fn new(head: &LinearHead, weight_decay: f64) -> Result<Self> {
        let (k, c) = (head.b.len(), head.w.len() / head.b.len().max(1));
        let w = Var::from_vec(head.w.clone(), (k, c), &Device::Cpu)?;
        let b = Var::from_vec(head.b.clone(), k, &Device::Cpu)?;
        let cfg = AdamWConfig {
            eps: 1e-8,
            weight_decay,
            ..AdamWConfig::default()
        };
        let params = vec![
            ("readout.weight".to_string(), w.clone()),
            ("readout.bias".to_string(), b.clone()),
        ];
        Ok(AdamW {
            opt: crate::optim::AdamW::new(params, cfg)?,
            w,
            b,
        })
    }

    /// One step with gradients `gw`, `gb` (already averaged); the head gets the new values.
    pub fn step(&mut self, head: &mut LinearHead, gw: &[f32], gb: &[f32], lr: f64) -> Result<()> {
        let mut grads = Grads::default();
        grads.insert(
            "readout.weight",
            Tensor::from_slice(gw, self.w.dims(), &Device::Cpu)?,
        );
        grads.insert(
            "readout.bias",
            Tensor::from_slice(gb, self.b.dims(), &Device::Cpu)?,
        );
        self.opt.step(&grads, lr)?;
        head.w = self.w.as_tensor().flatten_all()?.to_vec1()?;
        head.b = self.b.to_vec1()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor, Var};

    fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        let mut r = poodle_common::rng::SplitMix64::new(seed);
        (0..n)
            .map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0)
            .collect()
    }

    #[test]
    fn upsample_matches_the_model_layer_and_backward_is_its_transpose() {
        let (k, h, w, hh, ww) = (3, 4, 5, 13, 18);
        let z = rand_vec(k * h * w, 1);
        let ours = upsample(&z, k, (h, w), (hh, ww));
        let t = Tensor::from_vec(z.clone(), (1, k, h, w), &Device::Cpu).unwrap();
        let theirs = crate::model::upsample_bilinear(&t, hh, ww)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in ours.iter().zip(&theirs) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // <U z, g> == <z, U^T g>.
        let g = rand_vec(k * hh * ww, 2);
        let lhs: f64 = ours.iter().zip(&g).map(|(a, b)| f64::from(a * b)).sum();
        let bt = upsample_backward(&g, k, (h, w), (hh, ww));
        let rhs: f64 = z.iter().zip(&bt).map(|(a, b)| f64::from(a * b)).sum();
        assert!((lhs - rhs).abs() < 1e-3, "{lhs} vs {rhs}");
    }

    #[test]
    fn loss_and_gradients_match_candle_autograd() {
        let dev = Device::Cpu;
        let (k, c, h, w, hh, ww) = (4, 6, 3, 4, 10, 13);
        let f = rand_vec(c * h * w, 3);
        let mut head = LinearHead::zeros(c, k);
        head.w = rand_vec(k * c, 4);
        head.b = rand_vec(k, 5);
        let labels: Vec<u8> = (0..hh * ww).map(|i| ((i * 7) % 6) as u8).collect(); // 4, 5 ignored
        let ours = head.loss_grad(&f, (h, w), &labels, (hh, ww));
        // Reference: candle autograd of the same computation.
        let wv = Var::from_vec(head.w.clone(), (k, c), &dev).unwrap();
        let bv = Var::from_vec(head.b.clone(), (k, 1), &dev).unwrap();
        let ft = Tensor::from_vec(f.clone(), (c, h * w), &dev).unwrap();
        let z = wv
            .as_tensor()
            .matmul(&ft)
            .unwrap()
            .broadcast_add(bv.as_tensor())
            .unwrap();
        let up = crate::model::upsample_bilinear(&z.reshape((1, k, h, w)).unwrap(), hh, ww)
            .unwrap()
            .reshape((k, hh * ww))
            .unwrap();
        let lp = candle_nn::ops::log_softmax(&up, 0).unwrap();
        let idx: Vec<u32> = labels
            .iter()
            .map(|&l| if l < 4 { l as u32 } else { 0 })
            .collect();
        let mask: Vec<f32> = labels
            .iter()
            .map(|&l| if l < 4 { 1.0 } else { 0.0 })
            .collect();
        let n = mask.iter().sum::<f32>();
        let idx = Tensor::from_vec(idx, (1, hh * ww), &dev).unwrap();
        let mask = Tensor::from_vec(mask, hh * ww, &dev).unwrap();
        let picked = lp.gather(&idx, 0).unwrap().squeeze(0).unwrap();
        let loss = picked.mul(&mask).unwrap().sum_all().unwrap().neg().unwrap();
        let grads = loss.backward().unwrap();
        assert_eq!(ours.count as f32, n);
        let l_ref = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((ours.loss_sum - l_ref).abs() < 1e-3 * l_ref.abs().max(1.0));
        let gw = grads
            .get(wv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gb = grads
            .get(bv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in ours.gw.iter().zip(&gw).chain(ours.gb.iter().zip(&gb)) {
            assert!((a - b).abs() < 1e-3 * b.abs().max(1.0), "{a} vs {b}");
        }
        // The prediction is the arg-max of the upsampled logits.
        let pred = head.predict(&f, (h, w), (hh, ww));
        let am = up.argmax(0).unwrap().to_vec1::<u32>().unwrap();
        assert_eq!(pred, am.iter().map(|&v| v as u8).collect::<Vec<_>>());
    }

    #[test]
    fn loss_matches_a_hand_computation() {
        // Two classes, one feature position, zero weights and bias (0, ln 3): p = (1/4, 3/4)
        // at every upsampled pixel; one pixel labelled 1, one ignored.
        let mut head = LinearHead::zeros(1, 2);
        head.b = vec![0.0, 3f32.ln()];
        let g = head.loss_grad(&[5.0], (1, 1), &[1, 7], (1, 2));
        assert_eq!(g.count, 1);
        assert!((g.loss_sum - (-(0.75f64).ln())).abs() < 1e-6);
        // d/db = p - onehot = (1/4, -1/4); d/dW = that times the feature 5.
        assert!((g.gb[0] - 0.25).abs() < 1e-6 && (g.gb[1] + 0.25).abs() < 1e-6);
        assert!((g.gw[0] - 1.25).abs() < 1e-5 && (g.gw[1] + 1.25).abs() < 1e-5);
        assert_eq!(head.predict(&[5.0], (1, 1), (2, 3)), vec![1u8; 6]);
    }

    #[test]
    fn adamw_first_step_moves_each_weight_by_lr() {
        let mut head = LinearHead::zeros(2, 1);
        head.w = vec![1.0, -1.0];
        let mut opt = AdamW::new(&head, 0.0).unwrap();
        opt.step(&mut head, &[0.5, -2.0], &[1.0], 0.1).unwrap();
        // Bias-corrected m / sqrt(v) = sign(g) on the first step.
        assert!((head.w[0] - 0.9).abs() < 1e-6 && (head.w[1] + 0.9).abs() < 1e-6);
        assert!((head.b[0] + 0.1).abs() < 1e-6);
        let mut opt = AdamW::new(&head, 0.5).unwrap();
        let before = head.w[0];
        opt.step(&mut head, &[0.0, 0.0], &[0.0], 0.1).unwrap();
        assert!((head.w[0] - before * 0.95).abs() < 1e-6);
    }
}
