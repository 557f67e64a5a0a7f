//! Pair augmentation (paper Section 3 and Appendix A; REFERENCE.md "Augmentation"), the BYOL
//! recipe adapted to frame pairs with flow:
//!
//! 1. **Global crop**: one RandomResizedCrop box (torchvision `get_params`: 10 tries of area
//!    fraction `U(crop_area)` and log-uniform aspect ratio, else a centre crop; integer box)
//!    at the *same* image coordinates in both frames, resized to `out_height x out_width`
//!    with bilinear `align_corners=False` (PyTorch `F.interpolate`, no antialias). The aspect
//!    range is relative to the output aspect: `ratio * out_width / out_height`.
//!    Flow in both directions is cropped and resized the same way and rescaled (`u *= sx`,
//!    `v *= sy`, with `sx = out_width / box_w`, `sy = out_height / box_h`), so it is in crop
//!    pixels: with the `align_corners=False` centre map `x_out = (x - x0 + 0.5) sx - 0.5`
//!    a displacement scales exactly by `sx`. Occlusion masks are resized bilinearly as 0/1
//!    and thresholded: occluded iff the interpolated value `>= occlusion_threshold`
//!    (default 0.5, ties count as occluded: conservative).
//! 2. **Colour** (per frame, independent draws; all in `[0, 1]`, torchvision semantics):
//!    colour jitter with probability `jitter_p` (brightness, contrast, saturation, hue factors
//!    drawn as in `ColorJitter`, applied in a random order), grayscale with `grayscale_p`,
//!    Gaussian blur with `blur_p[frame]`, solarize with `solarize_p[frame]`. BYOL's "view 1"
//!    and "view 2" probabilities (blur 1.0 / 0.1, solarize 0.0 / 0.2) go to frame t and frame
//!    t+dt; the loss is symmetrised, so each frame plays both roles.
//!    Blur: BYOL uses a 23 px kernel and sigma `U(0.1, 2.0)` px on 224 px images. Both scale
//!    with the crop: `s = min(out_h, out_w) / blur_ref_size` (512x1024: s = 2.29, kernel 53,
//!    sigma up to 4.6 px), kernel made odd; `blur_ref_size = 0` disables the scaling. The
//!    kernel is truncated at 4 sigma when that is narrower (the dropped mass is < 1e-4) and
//!    padded by reflection as torchvision does.
//! 3. **Normalisation**: ImageNet mean/std.
//! 4. **Subcrops** ([`super::subcrops`]) are cut from the normalised, colour-augmented global
//!    crops (before the affine), using the resized backward flow.
//! 5. **Dense affine** (dense branch only): per frame, scale `U(affine_scale)`, rotation
//!    `U(-deg, deg)`, horizontal flip with `affine_flip_p`, as
//!    [`Affine::about_centre`]; `view(x) = crop(A x)`, bilinear, zero outside `[0, W-1] x
//!    [0, H-1]` (zero = mean colour after normalisation). `dense_affine = false` (ablation
//!    recipe) gives the identity. The affine is returned for the loss, which computes the
//!    validity masks.

use super::subcrops::{self, SubcropConfig, SubcropPair};
use super::Rng;
use crate::geom::Affine;
use poodle_common::flowmath::{resize_bilinear, resize_flow, Map};
use serde::{Deserialize, Serialize};

/// ImageNet mean and std (RGB, 0..1 scale): pre-training and the readouts normalise alike.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Every augmentation parameter. Defaults: the paper's BDD100K recipe (REFERENCE.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Training crop size (paper: 512 x 1024; ablations 256 x 512).
    pub out_height: usize,
    pub out_width: usize,
    /// Global crop area as a fraction of the stored frame (BDD [0.16, 0.45], WT [0.65, 1.0]).
    pub crop_area: [f64; 2],
    /// Global crop aspect-ratio range (w/h) relative to the output aspect (default [3/4, 4/3]).
    pub crop_ratio: [f64; 2],
    /// Occlusion masks: resized bilinearly, occluded iff value >= this (0.5).
    pub occlusion_threshold: f32,
    /// Probability of applying colour jitter (BYOL 0.8).
    pub jitter_p: f64,
    /// Jitter strengths: factors U[max(0, 1-b), 1+b] etc. (0.4, 0.4, 0.2); hue U[-h, h] (0.1).
    pub brightness: f64,
    pub contrast: f64,
    pub saturation: f64,
    pub hue: f64,
    /// Probability of grayscale (0.2).
    pub grayscale_p: f64,
    /// Gaussian blur probability for [frame t, frame t+dt] (BYOL [1.0, 0.1]).
    pub blur_p: [f64; 2],
    /// Blur sigma range in pixels at `blur_ref_size` ([0.1, 2.0]).
    pub blur_sigma: [f64; 2],
    /// Blur kernel size at `blur_ref_size` (23).
    pub blur_kernel: usize,
    /// Image side the blur parameters refer to (224); 0 = use them as given in pixels.
    pub blur_ref_size: usize,
    /// Solarize probability for [frame t, frame t+dt] (BYOL [0.0, 0.2]).
    pub solarize_p: [f64; 2],
    /// Solarize threshold on [0, 1] values (0.5).
    pub solarize_threshold: f32,
    /// Normalisation (ImageNet).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Dense-branch affine per frame (false = identity, the ablation recipe).
    pub dense_affine: bool,
    /// Affine scale range ([0.9, 1.1]).
    pub affine_scale: [f64; 2],
    /// Affine rotation: U(-deg, deg) degrees (10).
    pub affine_rotation_deg: f64,
    /// Affine horizontal flip probability (0.5).
    pub affine_flip_p: f64,
    /// Flow-informed subcrops.
    pub subcrops: SubcropConfig,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            out_height: 512,
            out_width: 1024,
            crop_area: [0.16, 0.45],
            crop_ratio: [3.0 / 4.0, 4.0 / 3.0],
            occlusion_threshold: 0.5,
            jitter_p: 0.8,
            brightness: 0.4,
            contrast: 0.4,
            saturation: 0.2,
            hue: 0.1,
            grayscale_p: 0.2,
            blur_p: [1.0, 0.1],
            blur_sigma: [0.1, 2.0],
            blur_kernel: 23,
            blur_ref_size: 224,
            solarize_p: [0.0, 0.2],
            solarize_threshold: 0.5,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            dense_affine: true,
            affine_scale: [0.9, 1.1],
            affine_rotation_deg: 10.0,
            affine_flip_p: 0.5,
            subcrops: SubcropConfig::default(),
        }
    }
}

impl AugmentConfig {
    /// The paper's BDD100K recipe (the default).
    pub fn bdd() -> Self {
        Self::default()
    }

    /// Walking Tours: global crop area [0.65, 1.0].
    pub fn walking_tours() -> Self {
        AugmentConfig {
            crop_area: [0.65, 1.0],
            ..Self::default()
        }
    }

    /// Ablation recipe (REFERENCE.md): 256 x 512 crops, no dense affine.
    pub fn ablation() -> Self {
        AugmentConfig {
            out_height: 256,
            out_width: 512,
            dense_affine: false,
            ..Self::default()
        }
    }

    /// The same geometry without any photometric augmentation (still normalised): for tests
    /// and for checking geometry by eye.
    pub fn without_colour(self) -> Self {
        AugmentConfig {
            jitter_p: 0.0,
            grayscale_p: 0.0,
            blur_p: [0.0, 0.0],
            solarize_p: [0.0, 0.0],
            ..self
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let range = |name: &str, r: [f64; 2], lo: f64, hi: f64| {
            if r[0] <= r[1] && r[0] >= lo && r[1] <= hi {
                Ok(())
            } else {
                Err(format!(
                    "{name} must be an ordered range within [{lo}, {hi}], got {r:?}"
                ))
            }
        };
        if self.out_height == 0 || self.out_width == 0 {
            return Err("out_height and out_width must be positive".into());
        }
        range("crop_area", self.crop_area, 1e-6, 1.0)?;
        range("crop_ratio", self.crop_ratio, 1e-3, 1e3)?;
        range("blur_sigma", self.blur_sigma, 0.0, 1e3)?;
        range("affine_scale", self.affine_scale, 1e-3, 1e3)?;
        for (n, p) in [
            ("jitter_p", self.jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p[0]", self.blur_p[0]),
            ("blur_p[1]", self.blur_p[1]),
            ("solarize_p[0]", self.solarize_p[0]),
            ("solarize_p[1]", self.solarize_p[1]),
            ("affine_flip_p", self.affine_flip_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{n} must be a probability, got {p}"));
            }
        }
        if self.std.iter().any(|&s| s <= 0.0) {
            return Err(format!("std must be positive, got {:?}", self.std));
        }
        if self.blur_kernel == 0 {
            return Err("blur_kernel must be positive".into());
        }
        self.subcrops.validate()
    }

    /// Blur kernel size and sigma scale at the output size (see the module docs).
    pub fn blur_scaling(&self) -> (usize, f64) {
        let s = if self.blur_ref_size == 0 {
            1.0
        } else {
            self.out_height.min(self.out_width) as f64 / self.blur_ref_size as f64
        };
        let k = ((self.blur_kernel as f64 * s).round() as usize).max(3);
        (k | 1, s)
    }
}

/// An integer box `[x0, x0 + w) x [y0, y0 + h)` in pixels of the image it was cut from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CropBox {
    pub x0: usize,
    pub y0: usize,
    pub w: usize,
    pub h: usize,
}

impl CropBox {
    /// Centre in pixel coordinates (pixel centres at integers).
    pub fn centre(&self) -> (f64, f64) {
        (
            self.x0 as f64 + (self.w as f64 - 1.0) / 2.0,
            self.y0 as f64 + (self.h as f64 - 1.0) / 2.0,
        )
    }
    pub fn area(&self) -> usize {
        self.w * self.h
    }
    /// True when the box lies inside a `w` x `h` image and is not empty.
    pub fn inside(&self, w: usize, h: usize) -> bool {
        self.w > 0 && self.h > 0 && self.x0 + self.w <= w && self.y0 + self.h <= h
    }
}

/// torchvision `RandomResizedCrop.get_params` on an `h` x `w` image: area fraction
/// `U(area)`, aspect ratio (w/h) log-uniform in `ratio`, 10 tries, else a centre crop with
/// the ratio clamped into range.
pub fn sample_crop_box(
    h: usize,
    w: usize,
    area: [f64; 2],
    ratio: [f64; 2],
    rng: &mut Rng,
) -> CropBox {
    let total = (h * w) as f64;
    let (l0, l1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target = total * rng.uniform_in(area[0], area[1]);
        let ar = rng.uniform_in(l0, l1).exp();
        let cw = (target * ar).sqrt().round() as usize;
        let ch = (target / ar).sqrt().round() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let y0 = rng.below(h - ch + 1);
            let x0 = rng.below(w - cw + 1);
            return CropBox {
                x0,
                y0,
                w: cw,
                h: ch,
            };
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio[0] {
        (w, ((w as f64 / ratio[0]).round() as usize).clamp(1, h))
    } else if in_ratio > ratio[1] {
        (((h as f64 * ratio[1]).round() as usize).clamp(1, w), h)
    } else {
        (w, h)
    };
    CropBox {
        x0: (w - cw) / 2,
        y0: (h - ch) / 2,
        w: cw,
        h: ch,
    }
}

/// Copies box `b` out of `m` (all channels).
pub fn crop(m: &Map, b: &CropBox) -> Map {
    assert!(b.inside(m.w, m.h), "crop box {b:?} outside {}x{}", m.w, m.h);
    let mut out = Map::zeros(m.c, b.h, b.w);
    for c in 0..m.c {
        for y in 0..b.h {
            let src = m.idx(c, b.y0 + y, b.x0);
            let dst = out.idx(c, y, 0);
            out.data[dst..dst + b.w].copy_from_slice(&m.data[src..src + b.w]);
        }
    }
    out
}

/// Crop then bilinear resize (`align_corners=False`): torchvision `resized_crop` without
/// antialiasing.
pub fn crop_resize(m: &Map, b: &CropBox, out_h: usize, out_w: usize) -> Map {
    resize_bilinear(&crop(m, b), out_h, out_w)
}

/// Crop and resize a flow field, rescaling it to output pixels (`u *= out_w / b.w`,
/// `v *= out_h / b.h`).
pub fn crop_resize_flow(flow: &Map, b: &CropBox, out_h: usize, out_w: usize) -> Map {
    resize_flow(&crop(flow, b), out_h, out_w)
}

/// Crop and resize a boolean mask: bilinear on 0/1, true iff the value `>= threshold`.
pub fn crop_resize_mask(
    mask: &[bool],
    h: usize,
    w: usize,
    b: &CropBox,
    out_h: usize,
    out_w: usize,
    threshold: f32,
) -> Vec<bool> {
    let m = Map::from_vec(
        1,
        h,
        w,
        mask.iter().map(|&v| f32::from(u8::from(v))).collect(),
    );
    crop_resize(&m, b, out_h, out_w)
        .data
        .iter()
        .map(|&v| v >= threshold)
        .collect()
}

/// Frame `i` of a `(2, 3, h, w)` u8 pair as a 3-channel map in `[0, 1]`.
pub fn frame_map(frames: &[u8], i: usize, h: usize, w: usize) -> Map {
    let n = 3 * h * w;
    Map::from_vec(
        3,
        h,
        w,
        frames[i * n..(i + 1) * n]
            .iter()
            .map(|&v| f32::from(v) / 255.0)
            .collect(),
    )
}

/// The photometric draws for one frame (for logging and tests).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ColourParams {
    /// Colour jitter: op order (0 brightness, 1 contrast, 2 saturation, 3 hue) and factors.
    pub jitter: Option<Jitter>,
    pub grayscale: bool,
    /// Blur sigma in output pixels (already scaled) and kernel size.
    pub blur: Option<(f64, usize)>,
    pub solarize: bool,
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
pub fn sample_colour(cfg: &AugmentConfig, frame: usize, rng: &mut Rng) -> ColourParams {
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
    let (k, s) = cfg.blur_scaling();
    ColourParams {
        jitter: apply_jitter.then_some(Jitter {
            order,
            brightness,
            contrast,
            saturation,
            hue,
        }),
        grayscale,
        blur: (blur_on && sigma > 0.0).then_some((sigma * s, k)),
        solarize,
    }
}

/// Applies [`ColourParams`] in BYOL order: jitter, grayscale, blur, solarize.
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
    if let Some((sigma, k)) = p.blur {
        gaussian_blur(img, sigma, k);
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

#[inline]
fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
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
/// radius `ceil(4 sigma)` when that is shorter, then renormalised.
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

/// Reflect-padding index (`numpy.pad(mode='reflect')`: the edge is not repeated).
#[inline]
fn reflect(i: isize, n: usize) -> usize {
    if n == 1 {
        return 0;
    }
    let period = 2 * (n as isize - 1);
    let m = i.rem_euclid(period);
    (if m >= n as isize { period - m } else { m }) as usize
}

/// Separable Gaussian blur of every channel, reflect padding.
pub fn gaussian_blur(img: &mut Map, sigma: f64, k: usize) {
    let kern = gaussian_kernel(k, sigma);
    let r = kern.len() / 2;
    let (h, w) = (img.h, img.w);
    if h == 0 || w == 0 {
        return;
    }
    // Horizontal pass on a reflect-padded copy of each row; vertical pass as whole-row
    // multiply-adds (cache friendly, vectorisable).
    let mut padded = vec![0f32; w + 2 * r];
    let mut tmp = vec![0f32; h * w];
    for c in 0..img.c {
        let plane = &mut img.data[c * h * w..(c + 1) * h * w];
        for y in 0..h {
            let src = &plane[y * w..(y + 1) * w];
            for (i, p) in padded.iter_mut().enumerate() {
                *p = src[reflect(i as isize - r as isize, w)];
            }
            let out = &mut tmp[y * w..(y + 1) * w];
            out.fill(0.0);
            for (j, &kv) in kern.iter().enumerate() {
                for (o, &v) in out.iter_mut().zip(&padded[j..j + w]) {
                    *o += kv * v;
                }
            }
        }
        for y in 0..h {
            let out = &mut plane[y * w..(y + 1) * w];
            out.fill(0.0);
            for (j, &kv) in kern.iter().enumerate() {
                let sy = reflect(y as isize + j as isize - r as isize, h);
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

/// Draws the dense-branch affine of a `w` x `h` crop (identity when `dense_affine` is off).
pub fn sample_affine(w: usize, h: usize, cfg: &AugmentConfig, rng: &mut Rng) -> Affine {
    let scale = rng.uniform_in(cfg.affine_scale[0], cfg.affine_scale[1]);
    let deg = rng.uniform_in(-cfg.affine_rotation_deg, cfg.affine_rotation_deg);
    let flip = rng.bernoulli(cfg.affine_flip_p);
    if cfg.dense_affine {
        Affine::about_centre(w, h, deg, scale, flip)
    } else {
        Affine::IDENTITY
    }
}

/// `out(x) = img(A x)`: bilinear in pixel coordinates, zero where `A x` falls outside
/// `[0, w-1] x [0, h-1]` (the same rule as `flowmath::sample_bilinear`). Output size =
/// input size.
pub fn warp_affine(img: &Map, a: &Affine) -> Map {
    if *a == Affine::IDENTITY {
        return img.clone();
    }
    let (h, w, n) = (img.h, img.w, img.h * img.w);
    let mut out = Map::zeros(img.c, h, w);
    let (xmax, ymax) = (w as f32 - 1.0, h as f32 - 1.0);
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = a.apply(x as f64, y as f64);
            let (sx, sy) = (sx as f32, sy as f32);
            if !(sx >= 0.0 && sy >= 0.0 && sx <= xmax && sy <= ymax) {
                continue;
            }
            let (x0, y0) = ((sx as usize).min(w - 1), (sy as usize).min(h - 1));
            let (fx, fy) = (sx - x0 as f32, sy - y0 as f32);
            let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
            let wts = [
                (1.0 - fx) * (1.0 - fy),
                fx * (1.0 - fy),
                (1.0 - fx) * fy,
                fx * fy,
            ];
            let idx = [y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1];
            for c in 0..img.c {
                let p = &img.data[c * n..(c + 1) * n];
                out.data[c * n + y * w + x] = p[idx[0]] * wts[0]
                    + p[idx[1]] * wts[1]
                    + p[idx[2]] * wts[2]
                    + p[idx[3]] * wts[3];
            }
        }
    }
    out
}

/// One pair as read from a store (borrowed), at stored resolution `h` x `w`.
#[derive(Clone, Copy, Debug)]
pub struct RawPair<'a> {
    pub h: usize,
    pub w: usize,
    /// (2, 3, h, w) u8, RGB planar.
    pub frames: &'a [u8],
    /// (2, h, w) pixels, t -> t+dt.
    pub flow_fwd: &'a [f32],
    /// (2, h, w) pixels, t+dt -> t.
    pub flow_bwd: &'a [f32],
    /// (h, w): pixels of frame t occluded in t+dt.
    pub occ_fwd: &'a [bool],
    /// (h, w): pixels of frame t+dt occluded in t.
    pub occ_bwd: &'a [bool],
}

impl RawPair<'_> {
    /// Checks every buffer length against `h` x `w`.
    pub fn check(&self) -> Result<(), String> {
        let n = self.h * self.w;
        let want = [
            ("frames", self.frames.len(), 6 * n),
            ("forward flow", self.flow_fwd.len(), 2 * n),
            ("backward flow", self.flow_bwd.len(), 2 * n),
            ("occlusion", self.occ_fwd.len(), n),
            ("occlusion_backward", self.occ_bwd.len(), n),
        ];
        for (name, got, exp) in want {
            if got != exp {
                return Err(format!(
                    "{name}: {got} values, expected {exp} for {}x{}",
                    self.h, self.w
                ));
            }
        }
        if n == 0 {
            return Err("empty frames".into());
        }
        Ok(())
    }
}

/// One augmented pair at training resolution. Index 0 = frame t, 1 = frame t+dt.
#[derive(Clone, Debug)]
pub struct AugmentedPair {
    /// The global crop box in stored-frame pixels (same for both frames).
    pub crop: CropBox,
    /// Normalised, colour-augmented global crops before the affine (3, H, W).
    pub crops: [Map; 2],
    /// Dense-branch views `crops[i](affines[i] x)` (3, H, W).
    pub views: [Map; 2],
    pub affines: [Affine; 2],
    /// [0] t -> t+dt, [1] t+dt -> t, crop pixels (2, H, W).
    pub flow: [Map; 2],
    /// [0] pixels of frame t occluded in t+dt, [1] pixels of t+dt occluded in t (H*W).
    pub occluded: [Vec<bool>; 2],
    /// Subcrop geometry (boxes in crop pixels).
    pub subcrop_pairs: Vec<SubcropPair>,
    /// K subcrops per frame (3, S, S), pair k at index k in both.
    pub subcrops: [Vec<Map>; 2],
    pub colour: [ColourParams; 2],
}

/// RNG stream tags: each component draws from its own stream, so switching one augmentation
/// off does not change the draws of the others.
const TAG_CROP: u64 = 1;
const TAG_COLOUR: [u64; 2] = [2, 3];
const TAG_SUBCROPS: u64 = 4;
const TAG_AFFINE: [u64; 2] = [5, 6];

/// The whole recipe for one pair (module docs). Panics on inconsistent buffer sizes: call
/// [`RawPair::check`] on data read from disk first.
pub fn augment_pair(raw: &RawPair, cfg: &AugmentConfig, rng: &mut Rng) -> AugmentedPair {
    if let Err(e) = raw.check() {
        panic!("augment_pair: {e}");
    }
    let (h, w) = (raw.h, raw.w);
    let (oh, ow) = (cfg.out_height, cfg.out_width);
    let mut crop_rng = rng.fork(TAG_CROP);
    let mut colour_rng = [rng.fork(TAG_COLOUR[0]), rng.fork(TAG_COLOUR[1])];
    let mut sub_rng = rng.fork(TAG_SUBCROPS);
    let mut affine_rng = [rng.fork(TAG_AFFINE[0]), rng.fork(TAG_AFFINE[1])];

    let aspect = ow as f64 / oh as f64;
    let ratio = [cfg.crop_ratio[0] * aspect, cfg.crop_ratio[1] * aspect];
    let b = sample_crop_box(h, w, cfg.crop_area, ratio, &mut crop_rng);

    let colour = [
        sample_colour(cfg, 0, &mut colour_rng[0]),
        sample_colour(cfg, 1, &mut colour_rng[1]),
    ];
    let crops: [Map; 2] = std::array::from_fn(|i| {
        let mut m = crop_resize(&frame_map(raw.frames, i, h, w), &b, oh, ow);
        apply_colour(&mut m, &colour[i], cfg.solarize_threshold);
        normalize(&mut m, cfg.mean, cfg.std);
        m
    });
    let flow_map = |f: &[f32]| Map::from_vec(2, h, w, f.to_vec());
    let flow = [
        crop_resize_flow(&flow_map(raw.flow_fwd), &b, oh, ow),
        crop_resize_flow(&flow_map(raw.flow_bwd), &b, oh, ow),
    ];
    let occluded = [raw.occ_fwd, raw.occ_bwd]
        .map(|o| crop_resize_mask(o, h, w, &b, oh, ow, cfg.occlusion_threshold));

    let subcrop_pairs = subcrops::sample_subcrops(oh, ow, &flow[1], &cfg.subcrops, &mut sub_rng);
    let subcrops = subcrops::extract_subcrops(&crops, &subcrop_pairs, cfg.subcrops.size);

    let affines = [
        sample_affine(ow, oh, cfg, &mut affine_rng[0]),
        sample_affine(ow, oh, cfg, &mut affine_rng[1]),
    ];
    let views = [
        warp_affine(&crops[0], &affines[0]),
        warp_affine(&crops[1], &affines[1]),
    ];
    AugmentedPair {
        crop: b,
        crops,
        views,
        affines,
        flow,
        occluded,
        subcrop_pairs,
        subcrops,
        colour,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use poodle_common::flowmath::sample_bilinear;

    /// A pair whose frame t+dt is frame t translated by (dx, dy) (content moves by it), with
    /// the matching constant flows. The pattern is linear in x and y, so bilinear resizing
    /// reproduces it exactly away from the borders.
    struct Synthetic {
        h: usize,
        w: usize,
        frames: Vec<u8>,
        fwd: Vec<f32>,
        bwd: Vec<f32>,
        occ: Vec<bool>,
        occ_b: Vec<bool>,
    }

    fn pattern(c: usize, x: f64, y: f64) -> f64 {
        // Steep enough that a one-pixel misregistration exceeds the tolerances below.
        [
            2.3 * x + 0.2 * y + 15.0,
            0.2 * x + 3.5 * y,
            0.5 * x + 0.5 * y + 20.0,
        ][c]
    }

    fn synthetic(h: usize, w: usize, dx: f64, dy: f64) -> Synthetic {
        let n = h * w;
        let mut frames = vec![0u8; 6 * n];
        for f in 0..2 {
            for c in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        let (sx, sy) = if f == 0 {
                            (x as f64, y as f64)
                        } else {
                            (x as f64 - dx, y as f64 - dy)
                        };
                        let v = pattern(c, sx, sy).clamp(0.0, 255.0);
                        frames[f * 3 * n + c * n + y * w + x] = v.round() as u8;
                    }
                }
            }
        }
        let mut fwd = vec![dx as f32; 2 * n];
        fwd[n..].fill(dy as f32);
        let mut bwd = vec![-dx as f32; 2 * n];
        bwd[n..].fill(-dy as f32);
        // Occlusion: frame t's right 10 columns (they leave the frame when dx = 10), and a
        // block in frame t+dt.
        let occ = (0..n).map(|p| p % w >= w - 10).collect();
        let occ_b = (0..n).map(|p| (p / w) < h / 2 && (p % w) < w / 3).collect();
        Synthetic {
            h,
            w,
            frames,
            fwd,
            bwd,
            occ,
            occ_b,
        }
    }

    impl Synthetic {
        fn raw(&self) -> RawPair<'_> {
            RawPair {
                h: self.h,
                w: self.w,
                frames: &self.frames,
                flow_fwd: &self.fwd,
                flow_bwd: &self.bwd,
                occ_fwd: &self.occ,
                occ_bwd: &self.occ_b,
            }
        }
    }

    fn small_cfg() -> AugmentConfig {
        let mut cfg = AugmentConfig {
            out_height: 48,
            out_width: 96,
            ..AugmentConfig::default()
        };
        cfg.subcrops.size = 16;
        cfg
    }

    #[test]
    fn crop_box_follows_area_and_ratio() {
        let mut rng = Rng::new(1);
        for _ in 0..500 {
            let b = sample_crop_box(360, 640, [0.16, 0.45], [1.5, 8.0 / 3.0], &mut rng);
            assert!(b.inside(640, 360), "{b:?}");
            let frac = b.area() as f64 / (360.0 * 640.0);
            let ar = b.w as f64 / b.h as f64;
            assert!((0.15..=0.46).contains(&frac), "{frac}");
            assert!((1.47..=2.7).contains(&ar), "{ar}");
        }
        // An impossible request falls back to a centre crop with the ratio clamped.
        let b = sample_crop_box(100, 100, [2.0, 3.0], [2.0, 3.0], &mut rng);
        assert_eq!(
            b,
            CropBox {
                x0: 0,
                y0: 25,
                w: 100,
                h: 50
            }
        );
    }

    #[test]
    fn translation_flow_stays_a_translation_scaled_by_the_resize() {
        let (dx, dy) = (6.0, -3.0);
        let s = synthetic(60, 96, dx, dy);
        let cfg = small_cfg().without_colour();
        for seed in 0..20 {
            let a = augment_pair(&s.raw(), &cfg, &mut Rng::new(seed));
            let b = a.crop;
            let (sx, sy) = (96.0 / b.w as f64, 48.0 / b.h as f64);
            let n = 48 * 96;
            for (i, sign) in [(0usize, 1.0), (1, -1.0)] {
                let f = &a.flow[i];
                for p in 0..n {
                    assert!((f.data[p] as f64 - sign * dx * sx).abs() < 1e-4);
                    assert!((f.data[n + p] as f64 - sign * dy * sy).abs() < 1e-4);
                }
            }
            // Same crop box in both frames: crop_{t+dt}(x + flow_fwd(x)) = crop_t(x) away
            // from the borders (the pattern is linear, so bilinear is exact there).
            let mut checked = 0;
            for y in 4..44 {
                for x in 4..92 {
                    let (tx, ty) = (
                        x as f32 + a.flow[0].get(0, y, x),
                        y as f32 + a.flow[0].get(1, y, x),
                    );
                    if !(2.0..93.0).contains(&tx) || !(2.0..45.0).contains(&ty) {
                        continue;
                    }
                    for c in 0..3 {
                        let v0 = a.crops[0].get(c, y, x);
                        let v1 = sample_bilinear(&a.crops[1], c, tx, ty).unwrap();
                        // u8 rounding of the frames: 0.5/255 per value, divided by std.
                        assert!(
                            (v0 - v1).abs() < 0.02,
                            "seed {seed} ({x},{y}) c{c}: {v0} {v1}"
                        );
                    }
                    checked += 1;
                }
            }
            assert!(checked > 500, "{checked}");
        }
    }

    #[test]
    fn occlusion_is_cropped_and_resized_with_the_frames() {
        let s = synthetic(90, 160, 10.0, 0.0);
        let cfg = small_cfg().without_colour();
        for seed in 0..20 {
            let a = augment_pair(&s.raw(), &cfg, &mut Rng::new(seed));
            let b = a.crop;
            let (sx, sy) = (b.w as f64 / 96.0, b.h as f64 / 48.0);
            for y in 0..48 {
                for x in 0..96 {
                    // Source position of the output pixel centre (align_corners=False).
                    let src_x = b.x0 as f64 + ((x as f64 + 0.5) * sx - 0.5).max(0.0);
                    let src_y = b.y0 as f64 + ((y as f64 + 0.5) * sy - 0.5).max(0.0);
                    let o0 = a.occluded[0][y * 96 + x];
                    let o1 = a.occluded[1][y * 96 + x];
                    // Away from the mask edges the value is the source mask's.
                    let edge = 150.0;
                    if (src_x - (edge - 0.5)).abs() > 1.0 {
                        assert_eq!(o0, src_x > edge - 0.5, "seed {seed} fwd ({x},{y})");
                    }
                    // Frame t+dt's block: rows < 45, columns < 53 (160 / 3 in integers).
                    let (ex, ey) = (52.5, 44.5);
                    let near = (src_x - ex).abs() <= 1.0 || (src_y - ey).abs() <= 1.0;
                    if !near {
                        let want = src_x < ex && src_y < ey;
                        assert_eq!(o1, want, "seed {seed} bwd ({x},{y}) src ({src_x},{src_y})");
                    }
                }
            }
        }
    }

    #[test]
    fn mask_threshold_ties_count_as_occluded() {
        // 1 x 2 -> 1 x 1 (align_corners=False) samples source x = 0.5: value exactly 0.5.
        let b = CropBox {
            x0: 0,
            y0: 0,
            w: 2,
            h: 1,
        };
        assert_eq!(
            crop_resize_mask(&[true, false], 1, 2, &b, 1, 1, 0.5),
            [true]
        );
        assert_eq!(
            crop_resize_mask(&[true, false], 1, 2, &b, 1, 1, 0.51),
            [false]
        );
        // Upsampling 1 x 2 -> 1 x 4: the boundary falls between outputs 1 and 2.
        let m = crop_resize_mask(&[true, false], 1, 2, &b, 1, 4, 0.5);
        assert_eq!(m, [true, true, false, false]);
    }

    #[test]
    fn affine_view_samples_the_crop_at_a_x() {
        let s = synthetic(90, 160, 3.0, 2.0);
        let cfg = small_cfg();
        let mut flipped = 0;
        for seed in 0..10 {
            let a = augment_pair(&s.raw(), &cfg, &mut Rng::new(seed));
            for i in 0..2 {
                let aff = a.affines[i];
                assert_ne!(aff, Affine::IDENTITY);
                let [a0, ..] = aff.0;
                if a0 < 0.0 {
                    flipped += 1;
                }
                // The sampling map shrinks by 1 / scale: |det| = 1 / scale^2.
                let inv_scale = (aff.0[0] * aff.0[4] - aff.0[1] * aff.0[3]).abs().sqrt();
                assert!((1.0 / 1.1 - 1e-9..=1.0 / 0.9 + 1e-9).contains(&inv_scale));
                for (x, y) in [
                    (0usize, 0usize),
                    (5, 7),
                    (47, 23),
                    (95, 47),
                    (60, 10),
                    (30, 40),
                ] {
                    let (px, py) = aff.apply(x as f64, y as f64);
                    for c in 0..3 {
                        let want =
                            sample_bilinear(&a.crops[i], c, px as f32, py as f32).unwrap_or(0.0);
                        let got = a.views[i].get(c, y, x);
                        assert!((want - got).abs() < 1e-5, "({x},{y}) c{c}: {want} {got}");
                    }
                }
                // The centre is a fixed point of the affine.
                let (cx, cy) = aff.apply(47.5, 23.5);
                assert!((cx - 47.5).abs() < 1e-9 && (cy - 23.5).abs() < 1e-9);
            }
        }
        assert!((1..20).contains(&flipped), "flip p=0.5: {flipped}/20");
        // Ablation: identity and an exact copy.
        let cfg = AugmentConfig {
            dense_affine: false,
            ..small_cfg()
        };
        let a = augment_pair(&s.raw(), &cfg, &mut Rng::new(0));
        assert_eq!(a.affines, [Affine::IDENTITY; 2]);
        assert_eq!(a.views[0], a.crops[0]);
    }

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
        let mean = (b.data[0] + b.data[1]) / 2.0;
        assert!(c.data.iter().all(|v| (v - mean).abs() < 1e-6));
        let mut s = Map::from_vec(3, 1, 1, vec![0.2, 0.5, 0.9]);
        solarize(&mut s, 0.5);
        assert_eq!(&s.data[..2], &[0.2, 0.5]);
        assert!((s.data[2] - 0.1).abs() < 1e-6);
    }

    #[test]
    fn blur_keeps_constants_and_mass_and_scales_with_size() {
        let k = gaussian_kernel(23, 2.0);
        assert_eq!(k.len(), 17); // truncated at 4 sigma = 8
        assert!((k.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(gaussian_kernel(23, 10.0).len(), 23);
        let mut m = Map::from_vec(3, 5, 7, vec![0.25; 105]);
        gaussian_blur(&mut m, 1.5, 9);
        assert!(m.data.iter().all(|v| (v - 0.25).abs() < 1e-6));
        // An impulse spreads symmetrically.
        let mut m = Map::zeros(1, 9, 9);
        m.set(0, 4, 4, 1.0);
        gaussian_blur(&mut m, 1.0, 5);
        assert!((m.get(0, 4, 3) - m.get(0, 4, 5)).abs() < 1e-7);
        assert!((m.get(0, 3, 4) - m.get(0, 4, 3)).abs() < 1e-7);
        assert!((m.data.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(AugmentConfig::default().blur_scaling().0, 53);
        let ab = AugmentConfig::ablation().blur_scaling();
        assert_eq!(ab.0, 27);
        assert!((ab.1 - 256.0 / 224.0).abs() < 1e-12);
    }

    #[test]
    fn blur_equals_the_direct_2d_convolution_with_reflect_padding() {
        let (h, w) = (7, 11);
        let data: Vec<f32> = (0..2 * h * w)
            .map(|i| ((i * 37) % 101) as f32 / 100.0)
            .collect();
        let src = Map::from_vec(2, h, w, data);
        let mut got = src.clone();
        gaussian_blur(&mut got, 1.3, 9); // radius 4: reaches past the 7-row border
        let k = gaussian_kernel(9, 1.3);
        let r = (k.len() / 2) as isize;
        for c in 0..2 {
            for y in 0..h {
                for x in 0..w {
                    let mut want = 0.0f32;
                    for (i, ki) in k.iter().enumerate() {
                        for (j, kj) in k.iter().enumerate() {
                            let sy = reflect(y as isize + i as isize - r, h);
                            let sx = reflect(x as isize + j as isize - r, w);
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
    fn colour_draws_follow_probabilities_per_frame() {
        let cfg = AugmentConfig::default();
        let mut rng = Rng::new(5);
        let n = 4000;
        let mut counts = [[0usize; 4]; 2];
        for _ in 0..n {
            for (f, cnt) in counts.iter_mut().enumerate() {
                let p = sample_colour(&cfg, f, &mut rng);
                cnt[0] += usize::from(p.jitter.is_some());
                cnt[1] += usize::from(p.grayscale);
                cnt[2] += usize::from(p.blur.is_some());
                cnt[3] += usize::from(p.solarize);
                if let Some((s, k)) = p.blur {
                    assert_eq!(k, 53);
                    assert!((0.1 * 512.0 / 224.0..=2.0 * 512.0 / 224.0).contains(&s));
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

    #[test]
    fn config_round_trips_through_json_and_validates() {
        let cfg = AugmentConfig::walking_tours();
        let j = serde_json::to_string(&cfg).unwrap();
        assert_eq!(serde_json::from_str::<AugmentConfig>(&j).unwrap(), cfg);
        let partial: AugmentConfig = serde_json::from_str(r#"{"out_height": 64}"#).unwrap();
        assert_eq!(partial.out_width, 1024);
        assert!(serde_json::from_str::<AugmentConfig>(r#"{"out_hieght": 64}"#).is_err());
        assert!(cfg.validate().is_ok());
        let bad = AugmentConfig {
            crop_area: [0.5, 0.2],
            ..cfg
        };
        assert!(bad.validate().unwrap_err().contains("crop_area"));
    }
}
