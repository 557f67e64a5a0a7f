//! Photometric augmentation of one frame, with torchvision semantics on `[0, 1]` RGB planes:
//! colour jitter (brightness, contrast, saturation, hue in a random order, as
//! `transforms.ColorJitter`), grayscale, Gaussian blur (reflect padding), solarize, and the
//! ImageNet normalisation. [`ColourConfig`] holds every probability and strength; the recipe
//! that applies them per frame is [`super::augment`].

use super::Rng;
use poodle_common::flowmath::Map;
use serde::{Deserialize, Serialize};

/// ImageNet mean and std (RGB, 0..1 scale): pre-training and the readouts normalise alike.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Colour augmentation parameters (per frame, independent draws).
///
/// The default is the authors' code (`src/datasets/bdd100k.py`, colour distortion strength
/// 1.0): `RandomApply([ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8)`, `RandomGrayscale(0.2)`,
/// `RandomApply([GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5)` on both frames, no
/// solarize, ImageNet normalisation; kernel as [`BlurKernel::CropFraction`]. The paper only
/// says "following BYOL"; BYOL's own values are [`ColourConfig::byol`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ColourConfig {
    /// Probability of applying colour jitter (authors' code and BYOL: 0.8).
    pub jitter_p: f64,
    /// Jitter strengths as `ColorJitter`: brightness, contrast and saturation factors
    /// U[max(0, 1-b), 1+b], hue U[-h, h] in turns (`h <= 0.5`); 0 leaves the op out.
    /// Authors' code 0.8, 0.8, 0.8, 0.2 (BYOL 0.4, 0.4, 0.2, 0.1).
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    /// Probability of grayscale (0.2).
    pub grayscale_p: f64,
    /// Gaussian blur probability for [frame t, frame t+dt] (authors' code [0.5, 0.5];
    /// BYOL [1.0, 0.1]).
    pub blur_p: [f64; 2],
    /// Blur sigma range `U(lo, hi)`, one sigma for both axes as `GaussianBlur` draws it
    /// ([0.1, 2.0]): in crop pixels, or at the reference size for [`BlurKernel::Scaled`].
    pub blur_sigma: [f64; 2],
    /// How the kernel size follows from the crop (and whether sigma scales with it).
    pub blur_kernel: BlurKernel,
    /// Solarize probability for [frame t, frame t+dt] (authors' code [0, 0]; BYOL [0, 0.2]).
    pub solarize_p: [f64; 2],
    /// Solarize threshold on [0, 1] values (0.5).
    pub solarize_threshold: f32,
    /// Normalisation (ImageNet).
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// The Gaussian blur kernel for an `h x w` crop, as torchvision's `kernel_size = (kx, ky)`:
/// `kx` taps along the width (x), `ky` along the height (y).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum BlurKernel {
    /// Authors' code: `kernel_size = (round_up_odd(fraction h), round_up_odd(fraction w))`
    /// with `round_up_odd(x) = ceil(x / 2) 2 + 1`, handed to torchvision as given, so the
    /// size from the *height* is `kx` (along x) and the one from the width is `ky` (along y):
    /// 512x1024 and fraction 0.1 give 53 taps along x, 105 along y. Sigma is in crop pixels
    /// (not scaled).
    CropFraction { fraction: f64 },
    /// BYOL (paper Appendix A "following BYOL"): a square `size`-tap kernel on
    /// `ref_size`-pixel images; kernel and sigma scale with `s = min(h, w) / ref_size`, the
    /// kernel rounded and made odd (23 at 224 -> 53 at 512x1024, sigma up to 4.6 px);
    /// `ref_size = 0` takes `size` and sigma as given in pixels.
    Scaled { size: usize, ref_size: usize },
}

/// The authors' `round_up_odd`: `ceil(x / 2) * 2 + 1` (an odd number above `x`; 5.12 -> 7,
/// 51.2 -> 53, 102.4 -> 105).
pub fn round_up_odd(x: f64) -> usize {
    ((x / 2.0).ceil() * 2.0 + 1.0) as usize
}

impl BlurKernel {
    /// The authors' kernel (fraction 0.1 of the crop's height and width).
    pub const AUTHORS: BlurKernel = BlurKernel::CropFraction { fraction: 0.1 };
    /// BYOL's 23-tap kernel at 224 px, scaled with the crop.
    pub const BYOL: BlurKernel = BlurKernel::Scaled {
        size: 23,
        ref_size: 224,
    };

    /// Kernel sizes `(kx, ky)` (torchvision order: along x, along y) for an `out_h x out_w`
    /// crop; both odd.
    pub fn sizes(&self, out_h: usize, out_w: usize) -> (usize, usize) {
        match *self {
            BlurKernel::CropFraction { fraction } => (
                round_up_odd(fraction * out_h as f64),
                round_up_odd(fraction * out_w as f64),
            ),
            BlurKernel::Scaled { size, .. } => {
                let k = ((size as f64 * self.sigma_scale(out_h, out_w)).round() as usize).max(3);
                (k | 1, k | 1)
            }
        }
    }

    /// Factor from `blur_sigma` to crop pixels.
    pub fn sigma_scale(&self, out_h: usize, out_w: usize) -> f64 {
        match *self {
            BlurKernel::CropFraction { .. } | BlurKernel::Scaled { ref_size: 0, .. } => 1.0,
            BlurKernel::Scaled { ref_size, .. } => out_h.min(out_w) as f64 / ref_size as f64,
        }
    }

    fn validate(&self) -> Result<(), String> {
        match *self {
            BlurKernel::CropFraction { fraction } if !(fraction.is_finite() && fraction >= 0.0) => {
                Err(format!(
                    "colour.blur_kernel.crop_fraction.fraction must be finite and >= 0, got {fraction}"
                ))
            }
            BlurKernel::Scaled { size, .. } if size == 0 || size % 2 == 0 => Err(format!(
                "colour.blur_kernel.scaled.size must be odd and positive (torchvision), got {size}"
            )),
            _ => Ok(()),
        }
    }
}

impl Default for ColourConfig {
    /// The authors' code (see the type's doc).
    fn default() -> Self {
        ColourConfig {
            jitter_p: 0.8,
            brightness: 0.8,
            contrast: 0.8,
            saturation: 0.8,
            hue: 0.2,
            grayscale_p: 0.2,
            blur_p: [0.5, 0.5],
            blur_sigma: [0.1, 2.0],
            blur_kernel: BlurKernel::AUTHORS,
            solarize_p: [0.0, 0.0],
            solarize_threshold: 0.5,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
        }
    }
}

impl ColourConfig {
    /// BYOL's recipe, as the paper's Appendix A words it ("following BYOL"): jitter 0.4, 0.4,
    /// 0.2, 0.1 with p 0.8, grayscale 0.2, blur 1.0 / 0.1 and solarize 0 / 0.2 for frame t /
    /// t+dt, the 23 px kernel and sigma scaled from 224 px to the crop.
    pub fn byol() -> Self {
        ColourConfig {
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            blur_p: [1.0, 0.1],
            blur_kernel: BlurKernel::BYOL,
            solarize_p: [0.0, 0.2],
            ..Self::default()
        }
    }

    /// No photometric augmentation (still normalised).
    pub fn none() -> Self {
        ColourConfig {
            jitter_p: 0.0,
            grayscale_p: 0.0,
            blur_p: [0.0, 0.0],
            solarize_p: [0.0, 0.0],
            ..Self::default()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.blur_sigma[0] <= self.blur_sigma[1] && self.blur_sigma[0] >= 0.0) {
            return Err(format!(
                "colour.blur_sigma must be an ordered non-negative range, got {:?}",
                self.blur_sigma
            ));
        }
        for (n, p) in [
            ("jitter_p", self.jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p[0]", self.blur_p[0]),
            ("blur_p[1]", self.blur_p[1]),
            ("solarize_p[0]", self.solarize_p[0]),
            ("solarize_p[1]", self.solarize_p[1]),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("colour.{n} must be a probability, got {p}"));
            }
        }
        for (n, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(format!("colour.{n} must be finite and >= 0, got {v}"));
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return Err(format!("colour.hue must be in [0, 0.5], got {}", self.hue));
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            return Err(format!("colour.std must be positive, got {:?}", self.std));
        }
        self.blur_kernel.validate()
    }

    /// Blur kernel sizes `(kx, ky)` (torchvision order) and the factor from `blur_sigma` to
    /// pixels for an `out_h x out_w` crop.
    pub fn blur_scaling(&self, out_h: usize, out_w: usize) -> ((usize, usize), f64) {
        (
            self.blur_kernel.sizes(out_h, out_w),
            self.blur_kernel.sigma_scale(out_h, out_w),
        )
    }
}

/// The photometric draws for one frame (for logging and tests).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColourParams {
    /// Colour jitter: op order (0 brightness, 1 contrast, 2 saturation, 3 hue) and factors.
    pub jitter: Option<Jitter>,
    pub grayscale: bool,
    pub blur: Option<Blur>,
    pub solarize: bool,
}

/// One Gaussian blur: sigma in crop pixels (both axes) and torchvision's `(kx, ky)`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Blur {
    pub sigma: f64,
    /// Taps along x (the width).
    pub kx: usize,
    /// Taps along y (the height).
    pub ky: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Jitter {
    pub order: [usize; 4],
    pub brightness: Option<f32>,
    pub contrast: Option<f32>,
    pub saturation: Option<f32>,
    pub hue: Option<f32>,
}

/// Draws the photometric augmentation of frame `frame` (0 = t, 1 = t+dt).
/// `out_hw`: the crop size the blur kernel follows. Every draw is made whether or not its op
/// applies, so one config change does not shift the other draws.
pub fn sample_colour(
    cfg: &ColourConfig,
    out_hw: (usize, usize),
    frame: usize,
    rng: &mut Rng,
) -> ColourParams {
    let apply_jitter = rng.bernoulli(cfg.jitter_p);
    let mut order = [0usize, 1, 2, 3];
    rng.shuffle(&mut order);
    let mut factor = |b: f64| {
        let f = rng.uniform_in((1.0 - b).max(0.0), 1.0 + b) as f32;
        (b > 0.0).then_some(f)
    };
    let (brightness, contrast, saturation) = (
        factor(cfg.brightness),
        factor(cfg.contrast),
        factor(cfg.saturation),
    );
    let h = rng.uniform_in(-cfg.hue, cfg.hue) as f32;
    let hue = (cfg.hue > 0.0).then_some(h);
    let grayscale = rng.bernoulli(cfg.grayscale_p);
    let blur_on = rng.bernoulli(cfg.blur_p[frame]);
    let sigma = rng.uniform_in(cfg.blur_sigma[0], cfg.blur_sigma[1]);
    let solarize = rng.bernoulli(cfg.solarize_p[frame]);
    let ((kx, ky), s) = cfg.blur_scaling(out_hw.0, out_hw.1);
    ColourParams {
        jitter: apply_jitter.then_some(Jitter {
            order,
            brightness,
            contrast,
            saturation,
            hue,
        }),
        grayscale,
        blur: (blur_on && sigma > 0.0).then_some(Blur {
            sigma: sigma * s,
            kx,
            ky,
        }),
        solarize,
    }
}

/// Applies [`ColourParams`] in the order of torchvision's `Compose` in the authors' and
/// BYOL's recipes: jitter, grayscale, blur, solarize.
pub fn apply_colour(img: &mut Map, p: &ColourParams, solarize_threshold: f32) {
    if let Some(j) = &p.jitter {
        for op in j.order {
            match op {
                0 => {
                    if let Some(f) = j.brightness {
                        adjust_brightness(img, f)
                    }
                }
                1 => {
                    if let Some(f) = j.contrast {
                        adjust_contrast(img, f)
                    }
                }
                2 => {
                    if let Some(f) = j.saturation {
                        adjust_saturation(img, f)
                    }
                }
                _ => {
                    if let Some(f) = j.hue {
                        adjust_hue(img, f)
                    }
                }
            }
        }
    }
    if p.grayscale {
        to_grayscale(img);
    }
    if let Some(b) = p.blur {
        gaussian_blur(img, b.sigma, b.kx, b.ky);
    }
    if p.solarize {
        solarize(img, solarize_threshold);
    }
}

fn planes(img: &mut Map) -> (&mut [f32], &mut [f32], &mut [f32]) {
    assert_eq!(img.c, 3, "colour ops need 3 channels");
    let n = img.h * img.w;
    let (r, gb) = img.data.split_at_mut(n);
    let (g, b) = gb.split_at_mut(n);
    (r, g, b)
}

/// torchvision's tensor `rgb_to_grayscale` weights (TensorFlow's, 0.2989 rather than PIL's
/// 0.299: the authors convert to tensors before augmenting).
#[inline]
fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.2989 * r + 0.587 * g + 0.114 * b
}

/// torchvision `adjust_brightness`: `clamp(f x)`.
pub fn adjust_brightness(img: &mut Map, f: f32) {
    img.data
        .iter_mut()
        .for_each(|v| *v = (*v * f).clamp(0.0, 1.0));
}

/// torchvision `adjust_contrast`: blend with the mean of the grayscale image.
pub fn adjust_contrast(img: &mut Map, f: f32) {
    let (r, g, b) = planes(img);
    let n = r.len().max(1);
    let mean = (0..r.len())
        .map(|i| f64::from(gray(r[i], g[i], b[i])))
        .sum::<f64>()
        / n as f64;
    let m = (1.0 - f) * mean as f32;
    img.data
        .iter_mut()
        .for_each(|v| *v = (f * *v + m).clamp(0.0, 1.0));
}

/// torchvision `adjust_saturation`: blend with the per-pixel grayscale.
pub fn adjust_saturation(img: &mut Map, f: f32) {
    let (r, g, b) = planes(img);
    for i in 0..r.len() {
        let m = (1.0 - f) * gray(r[i], g[i], b[i]);
        r[i] = (f * r[i] + m).clamp(0.0, 1.0);
        g[i] = (f * g[i] + m).clamp(0.0, 1.0);
        b[i] = (f * b[i] + m).clamp(0.0, 1.0);
    }
}

/// torchvision `adjust_hue`: rotate the HSV hue by `f` (in turns, `|f| <= 0.5`).
pub fn adjust_hue(img: &mut Map, f: f32) {
    let (r, g, b) = planes(img);
    for i in 0..r.len() {
        let (h, s, v) = rgb_to_hsv(r[i], g[i], b[i]);
        let h = (h + f).rem_euclid(1.0);
        (r[i], g[i], b[i]) = hsv_to_rgb(h, s, v);
    }
}

/// torchvision `_rgb2hsv` for one pixel (h in [0, 1)).
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let crd = if eqc { 1.0 } else { cr };
    let (rc, gc, bc) = ((maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd);
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    ((h / 6.0 + 1.0).rem_euclid(1.0), s, maxc)
}

/// torchvision `_hsv2rgb` for one pixel.
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let i = (i as i64).rem_euclid(6);
    let p = (v * (1.0 - s)).clamp(0.0, 1.0);
    let q = (v * (1.0 - s * f)).clamp(0.0, 1.0);
    let t = (v * (1.0 - s * (1.0 - f))).clamp(0.0, 1.0);
    match i {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// torchvision `rgb_to_grayscale` replicated to 3 channels.
pub fn to_grayscale(img: &mut Map) {
    let (r, g, b) = planes(img);
    for i in 0..r.len() {
        let y = gray(r[i], g[i], b[i]);
        (r[i], g[i], b[i]) = (y, y, y);
    }
}

/// torchvision `solarize`: `1 - x` where `x >= threshold`.
pub fn solarize(img: &mut Map, threshold: f32) {
    img.data.iter_mut().for_each(|v| {
        if *v >= threshold {
            *v = 1.0 - *v
        }
    });
}

/// Normalised 1-D Gaussian of `k` taps (torchvision `_get_gaussian_kernel1d`), truncated to
/// radius `ceil(4 sigma)` when that is shorter, then renormalised. The truncation saves most
/// of the work for the long kernels of large crops (105 taps along y at 512x1024, 17 kept
/// at sigma 2); it drops at most 4e-5 of the mass per axis for sigma <= 5 px (the authors'
/// sigma is <= 2, BYOL's scaled one <= 4.6 at 512x1024), so a blurred [0, 1] image moves by
/// under 1e-4; `tests/augment_parity.rs` checks that against torchvision's full kernel.
pub fn gaussian_kernel(k: usize, sigma: f64) -> Vec<f32> {
    let half = (k.max(1) - 1) / 2;
    let r = half.min((4.0 * sigma).ceil().max(1.0) as usize);
    let w: Vec<f64> = (0..=2 * r)
        .map(|i| {
            let x = i as f64 - r as f64;
            (-0.5 * (x / sigma).powi(2)).exp()
        })
        .collect();
    let s: f64 = w.iter().sum();
    w.iter().map(|v| (v / s) as f32).collect()
}

/// Reflect-padding index (`numpy.pad(mode='reflect')`: the edge is not repeated). Unlike
/// torch's reflect padding it also folds pads wider than the image (torch refuses them).
#[inline]
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m >= n as isize { period - m } else { m }) as usize
}

/// torchvision `gaussian_blur(img, kernel_size=[kx, ky], sigma=[sigma, sigma])` on every
/// channel: `kx` taps along x (the width), `ky` along y (the height), reflect padding. The
/// 2-D kernel is the outer product of the two 1-D ones, so two 1-D passes give the same
/// result (each truncated as [`gaussian_kernel`]).
pub fn gaussian_blur(img: &mut Map, sigma: f64, kx: usize, ky: usize) {
    let kern_x = gaussian_kernel(kx, sigma);
    let kern_y = gaussian_kernel(ky, sigma);
    let (rx, ry) = (kern_x.len() / 2, kern_y.len() / 2);
    let (h, w) = (img.h, img.w);
    if h == 0 || w == 0 {
        return;
    }
    // Horizontal pass on a reflect-padded copy of each row; vertical pass as whole-row
    // multiply-adds (cache friendly, vectorisable).
    let mut padded = vec![0f32; w + 2 * rx];
    let mut tmp = vec![0f32; h * w];
    for c in 0..img.c {
        let plane = &mut img.data[c * h * w..(c + 1) * h * w];
        for y in 0..h {
            let src = &plane[y * w..(y + 1) * w];
            for (i, p) in padded.iter_mut().enumerate() {
                *p = src[reflect(i as isize - rx as isize, w)];
            }
            let out = &mut tmp[y * w..(y + 1) * w];
            out.fill(0.0);
            for (j, &kv) in kern_x.iter().enumerate() {
                for (o, &v) in out.iter_mut().zip(&padded[j..j + w]) {
                    *o += kv * v;
                }
            }
        }
        for y in 0..h {
            let out = &mut plane[y * w..(y + 1) * w];
            out.fill(0.0);
            for (j, &kv) in kern_y.iter().enumerate() {
                let sy = reflect(y as isize + j as isize - ry as isize, h);
                for (o, &v) in out.iter_mut().zip(&tmp[sy * w..(sy + 1) * w]) {
                    *o += kv * v;
                }
            }
        }
    }
}

/// `(x - mean) / std` per channel.
pub fn normalize(img: &mut Map, mean: [f32; 3], std: [f32; 3]) {
    let n = img.h * img.w;
    for c in 0..img.c.min(3) {
        let (m, s) = (mean[c], 1.0 / std[c]);
        img.data[c * n..(c + 1) * n]
            .iter_mut()
            .for_each(|v| *v = (*v - m) * s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hsv_round_trip_and_hue_rotation() {
        for &(r, g, b) in &[
            (0.2f32, 0.5, 0.9),
            (1.0, 0.0, 0.0),
            (0.3, 0.3, 0.3),
            (0.9, 0.8, 0.1),
        ] {
            let (h, s, v) = rgb_to_hsv(r, g, b);
            let (r2, g2, b2) = hsv_to_rgb(h, s, v);
            assert!((r - r2).abs() < 1e-5 && (g - g2).abs() < 1e-5 && (b - b2).abs() < 1e-5);
        }
        // Red rotated by a third of a turn is green.
        let mut m = Map::from_vec(3, 1, 1, vec![1.0, 0.0, 0.0]);
        adjust_hue(&mut m, 1.0 / 3.0);
        assert!((m.data[0]).abs() < 1e-5 && (m.data[1] - 1.0).abs() < 1e-5);
        // Saturation 0 and grayscale agree; contrast 0 gives the mean gray everywhere.
        let mut a = Map::from_vec(3, 1, 2, vec![0.2, 0.8, 0.4, 0.6, 0.9, 0.1]);
        let mut b = a.clone();
        adjust_saturation(&mut a, 0.0);
        to_grayscale(&mut b);
        for (x, y) in a.data.iter().zip(&b.data) {
            assert!((x - y).abs() < 1e-6);
        }
        let mut c = b.clone();
        adjust_contrast(&mut c, 0.0);
        // torchvision's weights sum to 0.9999, so the gray of a gray pixel is 0.9999 of it.
        let mean = 0.9999 * (b.data[0] + b.data[1]) / 2.0;
        assert!(c.data.iter().all(|v| (v - mean).abs() < 1e-6));
        let mut s = Map::from_vec(3, 1, 1, vec![0.2, 0.5, 0.9]);
        solarize(&mut s, 0.5);
        assert_eq!(&s.data[..2], &[0.2, 0.5]);
        assert!((s.data[2] - 0.1).abs() < 1e-6);
    }

    #[test]
    fn blur_keeps_constants_and_mass() {
        let k = gaussian_kernel(23, 2.0);
        assert_eq!(k.len(), 17); // truncated at 4 sigma = 8
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(gaussian_kernel(23, 10.0).len(), 23);
        let mut m = Map::from_vec(3, 5, 7, vec![0.25; 105]);
        gaussian_blur(&mut m, 1.5, 9, 5);
        assert!(m.data.iter().all(|v| (v - 0.25).abs() < 1e-6));
        // An impulse spreads symmetrically; a square kernel treats both axes alike.
        let mut m = Map::zeros(1, 9, 9);
        m.set(0, 4, 4, 1.0);
        gaussian_blur(&mut m, 1.0, 5, 5);
        assert!((m.get(0, 4, 3) - m.get(0, 4, 5)).abs() < 1e-7);
        assert!((m.get(0, 3, 4) - m.get(0, 4, 3)).abs() < 1e-7);
        assert!((m.data.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        // kx is along x: a 1-tap x kernel leaves each row's impulse in its column.
        let mut m = Map::zeros(1, 9, 9);
        m.set(0, 4, 4, 1.0);
        gaussian_blur(&mut m, 1.0, 1, 5);
        assert_eq!((m.get(0, 4, 3), m.get(0, 2, 5)), (0.0, 0.0));
        assert!(m.get(0, 3, 4) > 0.1 && m.get(0, 2, 4) > 0.01);
    }

    #[test]
    fn kernel_sizes_follow_the_authors_and_byol() {
        assert_eq!(
            [5.12, 51.2, 102.4, 4.8, 9.6, 6.0].map(round_up_odd),
            [7, 53, 105, 7, 11, 7]
        );
        // Authors' code: (round_up_odd(0.1 h), round_up_odd(0.1 w)) as (kx, ky), sigma as is.
        let a = ColourConfig::default();
        assert_eq!(a.blur_scaling(512, 1024), ((53, 105), 1.0));
        assert_eq!(a.blur_scaling(256, 512), ((27, 53), 1.0));
        // BYOL: 23 px at 224 scaled with min(h, w), square.
        let b = ColourConfig::byol();
        let ((kx, ky), s) = b.blur_scaling(512, 1024);
        assert_eq!((kx, ky), (53, 53));
        assert!((s - 512.0 / 224.0).abs() < 1e-12);
        assert_eq!(b.blur_scaling(256, 512).0, (27, 27));
        let fixed = BlurKernel::Scaled {
            size: 9,
            ref_size: 0,
        };
        assert_eq!(
            (fixed.sizes(64, 128), fixed.sigma_scale(64, 128)),
            ((9, 9), 1.0)
        );
        assert!(a.validate().is_ok() && b.validate().is_ok());
        let bad = |k| ColourConfig {
            blur_kernel: k,
            ..ColourConfig::default()
        };
        assert!(bad(BlurKernel::CropFraction { fraction: -0.1 })
            .validate()
            .is_err());
        assert!(bad(BlurKernel::CropFraction { fraction: f64::NAN })
            .validate()
            .is_err());
        assert!(bad(BlurKernel::Scaled {
            size: 22,
            ref_size: 224
        })
        .validate()
        .is_err());
        let hue = ColourConfig {
            hue: 0.6,
            ..ColourConfig::default()
        };
        assert!(hue.validate().unwrap_err().contains("hue"));
        // The recipe round-trips through JSON with the kernel kind named.
        let j = serde_json::to_string(&b).unwrap();
        assert!(
            j.contains(r#""blur_kernel":{"scaled":{"size":23,"ref_size":224}}"#),
            "{j}"
        );
        assert_eq!(serde_json::from_str::<ColourConfig>(&j).unwrap(), b);
        let j = serde_json::to_string(&a).unwrap();
        assert!(
            j.contains(r#""blur_kernel":{"crop_fraction":{"fraction":0.1}}"#),
            "{j}"
        );
    }

    #[test]
    fn blur_equals_the_direct_2d_convolution_with_reflect_padding() {
        let (h, w) = (7, 11);
        let data: Vec<f32> = (0..2 * h * w)
            .map(|i| ((i * 37) % 101) as f32 / 100.0)
            .collect();
        let src = Map::from_vec(2, h, w, data);
        let mut got = src.clone();
        // kx = 5 along x, ky = 9 along y: radius 4 reaches past the 7-row border.
        gaussian_blur(&mut got, 1.3, 5, 9);
        let (kx, ky) = (gaussian_kernel(5, 1.3), gaussian_kernel(9, 1.3));
        let (rx, ry) = ((kx.len() / 2) as isize, (ky.len() / 2) as isize);
        for c in 0..2 {
            for y in 0..h {
                for x in 0..w {
                    let mut want = 0.0f32;
                    for (i, ki) in ky.iter().enumerate() {
                        for (j, kj) in kx.iter().enumerate() {
                            let sy = reflect(y as isize + i as isize - ry, h);
                            let sx = reflect(x as isize + j as isize - rx, w);
                            want += ki * kj * src.get(c, sy, sx);
                        }
                    }
                    assert!((got.get(c, y, x) - want).abs() < 1e-5, "({c},{y},{x})");
                }
            }
        }
        // numpy 'reflect': -1 -> 1, n -> n-2.
        assert_eq!((reflect(-1, 5), reflect(5, 5), reflect(-6, 5)), (1, 3, 2));
    }

    #[test]
    fn byol_draws_follow_its_view_probabilities() {
        let cfg = ColourConfig::byol();
        let mut rng = Rng::new(5);
        let n = 4000;
        let mut counts = [[0usize; 4]; 2];
        for _ in 0..n {
            for (f, cnt) in counts.iter_mut().enumerate() {
                let p = sample_colour(&cfg, (512, 1024), f, &mut rng);
                cnt[0] += usize::from(p.jitter.is_some());
                cnt[1] += usize::from(p.grayscale);
                cnt[2] += usize::from(p.blur.is_some());
                cnt[3] += usize::from(p.solarize);
                if let Some(b) = p.blur {
                    assert_eq!((b.kx, b.ky), (53, 53));
                    let s = 512.0 / 224.0;
                    assert!((0.1 * s..=2.0 * s).contains(&b.sigma));
                }
            }
        }
        let frac = |c: usize| c as f64 / n as f64;
        for (f, want) in [[0.8, 0.2, 1.0, 0.0], [0.8, 0.2, 0.1, 0.2]]
            .iter()
            .enumerate()
        {
            for j in 0..4 {
                assert!(
                    (frac(counts[f][j]) - want[j]).abs() < 0.03,
                    "frame {f} op {j}"
                );
            }
        }
    }

    #[test]
    fn normalisation_is_imagenet() {
        let mut m = Map::from_vec(3, 1, 1, vec![0.485, 0.456 + 0.224, 0.0]);
        normalize(&mut m, IMAGENET_MEAN, IMAGENET_STD);
        assert!(m.data[0].abs() < 1e-6 && (m.data[1] - 1.0).abs() < 1e-6);
        assert!((m.data[2] + 0.406 / 0.225).abs() < 1e-5);
    }
}
