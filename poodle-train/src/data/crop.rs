//! Global-crop geometry: where the training crop comes from, and cropping + resizing of
//! frames, flow (rescaled to output pixels) and occlusion masks, all bilinear with
//! `align_corners=False` (`F.interpolate` without antialias).
//!
//! Two ways to place the crop ([`GlobalCropMode`]), the same geometry in both frames:
//! * `scale_then_crop` (default; the authors' code, `bdd100k.py`): both frames resized to
//!   `(int(initial_size.0 s), int(initial_size.1 s))`, `s ~ U(initial_scale)`, then one
//!   `out_height x out_width` window at a uniform integer position (torchvision
//!   `RandomCrop`). At 512x1024 from (1080 s, 1920 s), s in [0.75, 1.25], the window covers
//!   0.162-0.449 of the frame with no anisotropic stretch. Computed as a window of the resize
//!   ([`resize_window`]), so the full resized frame is never built.
//! * `resized_crop` (the paper's wording, "random resized crop" by area): a
//!   RandomResizedCrop box (area fraction `U(area)`, log-uniform aspect in `ratio` relative
//!   to the output aspect), resized to the output.

use super::{Draws, Rng};
use poodle_common::flowmath::{
    resize_bilinear, resize_flow, resize_window, resize_window_flow, Map,
};
use serde::{Deserialize, Serialize};

/// How the global crop is placed (module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GlobalCropMode {
    /// Authors' code: resize by a random scale, then a fixed-size window.
    ScaleThenCrop,
    /// Paper's wording: RandomResizedCrop by area and aspect.
    ResizedCrop,
}

/// Where the global crop comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GlobalCropConfig {
    /// `scale_then_crop` (authors' code, default) or `resized_crop` (paper's wording).
    pub mode: GlobalCropMode,
    /// scale_then_crop: frame size before the random scale, (h, w) (authors: [1080, 1920]
    /// for BDD100K and Walking Tours alike, whatever the stored resolution).
    pub initial_size: [usize; 2],
    /// scale_then_crop: the scale range (authors: BDD100K [0.75, 1.25], Walking Tours
    /// [0.535, 0.625]).
    pub initial_scale: [f64; 2],
    /// resized_crop: area as a fraction of the stored frame (BDD [0.16, 0.45]).
    pub area: [f64; 2],
    /// resized_crop: aspect-ratio range (w/h) relative to the output aspect ([3/4, 4/3]).
    pub ratio: [f64; 2],
}

impl Default for GlobalCropConfig {
    fn default() -> Self {
        GlobalCropConfig {
            mode: GlobalCropMode::ScaleThenCrop,
            initial_size: [1080, 1920],
            initial_scale: [0.75, 1.25],
            area: [0.16, 0.45],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
        }
    }
}

impl GlobalCropConfig {
    /// The paper's wording: a RandomResizedCrop box of `area` of the frame.
    pub fn resized_crop(area: [f64; 2]) -> Self {
        GlobalCropConfig {
            mode: GlobalCropMode::ResizedCrop,
            area,
            ..Self::default()
        }
    }

    /// The scaled frame size for scale `s` (torch `int()` truncates).
    pub fn scaled_size(&self, s: f64) -> (usize, usize) {
        let [h, w] = self.initial_size;
        ((h as f64 * s) as usize, (w as f64 * s) as usize)
    }

    /// Checks the ranges, and for scale_then_crop that the smallest scaled frame holds an
    /// `out_h` x `out_w` window.
    pub fn validate(&self, out_h: usize, out_w: usize) -> Result<(), String> {
        let ok = |r: [f64; 2], lo: f64, hi: f64| r[0] <= r[1] && r[0] >= lo && r[1] <= hi;
        match self.mode {
            GlobalCropMode::ScaleThenCrop => {
                if !ok(self.initial_scale, 1e-6, 1e3) {
                    return Err(format!(
                        "global_crop.initial_scale must be an ordered positive range, got {:?}",
                        self.initial_scale
                    ));
                }
                let (h, w) = self.scaled_size(self.initial_scale[0]);
                if h < out_h || w < out_w {
                    return Err(format!(
                        "global_crop: initial_size {:?} at the smallest scale {} is {h}x{w}, \
                         smaller than the {out_h}x{out_w} crop",
                        self.initial_size, self.initial_scale[0]
                    ));
                }
            }
            GlobalCropMode::ResizedCrop => {
                if !ok(self.area, 1e-6, 1.0) {
                    return Err(format!(
                        "global_crop.area must be an ordered range within [1e-6, 1], got {:?}",
                        self.area
                    ));
                }
                if !ok(self.ratio, 1e-3, 1e3) {
                    return Err(format!(
                        "global_crop.ratio must be an ordered range within [1e-3, 1e3], got {:?}",
                        self.ratio
                    ));
                }
            }
        }
        Ok(())
    }
}

/// One drawn global crop, in the terms of its mode. Applies the same geometry to frames,
/// flow and masks of an `h` x `w` stored pair.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GlobalCrop {
    /// scale_then_crop: the stored frame resized to `scaled` (h, w), window at `origin`
    /// (y, x) of the output size.
    Window {
        scaled: (usize, usize),
        origin: (usize, usize),
    },
    /// resized_crop: a box of the stored frame resized to the output.
    Box(CropBox),
}

impl GlobalCrop {
    /// Draws a crop for an `h` x `w` stored frame and an `out` = (h, w) output.
    pub fn sample(
        cfg: &GlobalCropConfig,
        h: usize,
        w: usize,
        out: (usize, usize),
        rng: &mut Rng,
    ) -> GlobalCrop {
        match cfg.mode {
            GlobalCropMode::ScaleThenCrop => {
                let s = rng.uniform_in(cfg.initial_scale[0], cfg.initial_scale[1]);
                let (sh, sw) = cfg.scaled_size(s);
                assert!(
                    sh >= out.0 && sw >= out.1,
                    "global crop: scaled frame {sh}x{sw} smaller than {out:?} (validate the config)"
                );
                let y0 = rng.below(sh - out.0 + 1);
                let x0 = rng.below(sw - out.1 + 1);
                GlobalCrop::Window {
                    scaled: (sh, sw),
                    origin: (y0, x0),
                }
            }
            GlobalCropMode::ResizedCrop => {
                let aspect = out.1 as f64 / out.0 as f64;
                let ratio = [cfg.ratio[0] * aspect, cfg.ratio[1] * aspect];
                GlobalCrop::Box(sample_crop_box(h, w, cfg.area, ratio, rng))
            }
        }
    }

    /// Output pixels per stored pixel along (x, y) for an `h` x `w` stored frame.
    pub fn scale(&self, h: usize, w: usize, out: (usize, usize)) -> (f64, f64) {
        match self {
            GlobalCrop::Window { scaled, .. } => {
                (scaled.1 as f64 / w as f64, scaled.0 as f64 / h as f64)
            }
            GlobalCrop::Box(b) => (out.1 as f64 / b.w as f64, out.0 as f64 / b.h as f64),
        }
    }

    /// The stored-frame position sampled for output pixel `(x, y)` (pixel centres at
    /// integers; `align_corners=False`, clamped at the low edge as PyTorch does).
    pub fn source(&self, h: usize, w: usize, out: (usize, usize), x: f64, y: f64) -> (f64, f64) {
        let (sx, sy) = self.scale(h, w, out);
        match self {
            GlobalCrop::Window { origin, .. } => (
                ((origin.1 as f64 + x + 0.5) / sx - 0.5).max(0.0),
                ((origin.0 as f64 + y + 0.5) / sy - 0.5).max(0.0),
            ),
            GlobalCrop::Box(b) => (
                b.x0 as f64 + ((x + 0.5) / sx - 0.5).max(0.0),
                b.y0 as f64 + ((y + 0.5) / sy - 0.5).max(0.0),
            ),
        }
    }

    /// The crop of an image (any channels) at output size `out`.
    pub fn image(&self, m: &Map, out: (usize, usize)) -> Map {
        match self {
            GlobalCrop::Window { scaled, origin } => resize_window(m, *scaled, *origin, out),
            GlobalCrop::Box(b) => crop_resize(m, b, out.0, out.1),
        }
    }

    /// The crop of a flow field, its vectors in output pixels.
    pub fn flow(&self, f: &Map, out: (usize, usize)) -> Map {
        match self {
            GlobalCrop::Window { scaled, origin } => resize_window_flow(f, *scaled, *origin, out),
            GlobalCrop::Box(b) => crop_resize_flow(f, b, out.0, out.1),
        }
    }

    /// The crop of an `h` x `w` boolean mask: bilinear on 0/1, true iff `>= threshold`.
    pub fn mask(
        &self,
        mask: &[bool],
        h: usize,
        w: usize,
        out: (usize, usize),
        threshold: f32,
    ) -> Vec<bool> {
        let m = Map::from_vec(
            1,
            h,
            w,
            mask.iter().map(|&v| f32::from(u8::from(v))).collect(),
        );
        self.image(&m, out)
            .data
            .iter()
            .map(|&v| v >= threshold)
            .collect()
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
pub fn sample_crop_box<D: Draws + ?Sized>(
    h: usize,
    w: usize,
    area: [f64; 2],
    ratio: [f64; 2],
    rng: &mut D,
) -> CropBox {
    sample_crop_box_area(h, w, area, ratio, rng).0
}

/// [`sample_crop_box`] and the area fraction behind the box: the accepted try's draw, or the
/// centre crop's own fraction. Sizes round half to even, as Python's `round`.
pub fn sample_crop_box_area<D: Draws + ?Sized>(
    h: usize,
    w: usize,
    area: [f64; 2],
    ratio: [f64; 2],
    rng: &mut D,
) -> (CropBox, f64) {
    let total = (h * w) as f64;
    let (l0, l1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let frac = rng.uniform_in(area[0], area[1]);
        let target = total * frac;
        let ar = rng.uniform_in(l0, l1).exp();
        let cw = (target * ar).sqrt().round_ties_even() as usize;
        let ch = (target / ar).sqrt().round_ties_even() as usize;
        if cw > 0 && ch > 0 && cw <= w && ch <= h {
            let y0 = rng.below(h - ch + 1);
            let x0 = rng.below(w - cw + 1);
            let b = CropBox {
                x0,
                y0,
                w: cw,
                h: ch,
            };
            return (b, frac);
        }
    }
    let in_ratio = w as f64 / h as f64;
    let (cw, ch) = if in_ratio < ratio[0] {
        (
            w,
            ((w as f64 / ratio[0]).round_ties_even() as usize).clamp(1, h),
        )
    } else if in_ratio > ratio[1] {
        (
            ((h as f64 * ratio[1]).round_ties_even() as usize).clamp(1, w),
            h,
        )
    } else {
        (w, h)
    };
    let b = CropBox {
        x0: (w - cw) / 2,
        y0: (h - ch) / 2,
        w: cw,
        h: ch,
    };
    (b, (cw * ch) as f64 / total)
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

#[cfg(test)]
mod tests {
    use super::*;

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
    fn scale_then_crop_draws_the_authors_window() {
        // Paper configuration: 512x1024 windows of (int(1080 s), int(1920 s)), s ~ U(0.75, 1.25).
        let cfg = GlobalCropConfig::default();
        let mut rng = Rng::new(3);
        let (mut s_sum, mut n) = (0.0, 0);
        let (mut lo_area, mut hi_area) = (1.0f64, 0.0f64);
        let (mut max_y0_frac, mut max_x0_frac) = (0.0f64, 0.0f64);
        for _ in 0..4000 {
            let c = GlobalCrop::sample(&cfg, 720, 1280, (512, 1024), &mut rng);
            let GlobalCrop::Window { scaled, origin } = c else {
                panic!("default mode is scale_then_crop: {c:?}")
            };
            let s = scaled.0 as f64 / 1080.0;
            assert!((0.749..=1.25).contains(&s), "{scaled:?}");
            assert!(
                (scaled.1 as f64 / 1920.0 - s).abs() < 2e-3,
                "isotropic {scaled:?}"
            );
            assert!(origin.0 + 512 <= scaled.0 && origin.1 + 1024 <= scaled.1);
            let area = (512.0 * 1024.0) / (scaled.0 * scaled.1) as f64;
            lo_area = lo_area.min(area);
            hi_area = hi_area.max(area);
            max_y0_frac = max_y0_frac.max(origin.0 as f64 / (scaled.0 - 512) as f64);
            max_x0_frac = max_x0_frac.max(origin.1 as f64 / (scaled.1 - 1024) as f64);
            s_sum += s;
            n += 1;
            // Output pixels per stored pixel: the same along both axes (no stretch).
            let (sx, sy) = c.scale(720, 1280, (512, 1024));
            assert!((sx - sy).abs() < 3e-3, "{sx} {sy}");
        }
        assert!(
            (s_sum / n as f64 - 1.0).abs() < 0.01,
            "mean scale {}",
            s_sum / n as f64
        );
        assert!(lo_area > 0.161 && lo_area < 0.166, "{lo_area}");
        assert!(hi_area < 0.4495 && hi_area > 0.44, "{hi_area}");
        assert!(
            max_y0_frac > 0.99 && max_x0_frac > 0.99,
            "positions reach the far edge"
        );
        // Walking Tours' scale range fits a 512x1024 window; a smaller one is refused.
        let mut wt = cfg.clone();
        wt.initial_scale = [0.535, 0.625];
        assert!(wt.validate(512, 1024).is_ok());
        wt.initial_scale = [0.4, 0.625];
        assert!(wt.validate(512, 1024).unwrap_err().contains("432x768"));
    }

    #[test]
    fn window_samples_the_stored_frame_where_source_says() {
        // A map linear in x and y is reproduced exactly by bilinear resizing, so each output
        // pixel must equal the ramp at `source` (away from the clamped low edge).
        let (h, w) = (30, 50);
        let ramp = |x: f64, y: f64| 0.5 * x + 2.0 * y + 1.0;
        let m = Map::from_vec(
            1,
            h,
            w,
            (0..h * w)
                .map(|p| ramp((p % w) as f64, (p / w) as f64) as f32)
                .collect(),
        );
        let crops = [
            GlobalCrop::Window {
                scaled: (41, 77),
                origin: (5, 9),
            },
            GlobalCrop::Box(CropBox {
                x0: 7,
                y0: 3,
                w: 30,
                h: 20,
            }),
        ];
        for c in crops {
            let img = c.image(&m, (16, 32));
            for y in 1..15 {
                for x in 1..31 {
                    let (sx, sy) = c.source(h, w, (16, 32), x as f64, y as f64);
                    let want = ramp(sx, sy);
                    assert!((f64::from(img.get(0, y, x)) - want).abs() < 1e-3, "{c:?}");
                }
            }
        }
    }

    #[test]
    fn mask_threshold_ties_count_as_occluded() {
        // 1 x 2 -> 1 x 1 (align_corners=False) samples source x = 0.5: value exactly 0.5.
        let b = GlobalCrop::Box(CropBox {
            x0: 0,
            y0: 0,
            w: 2,
            h: 1,
        });
        assert_eq!(b.mask(&[true, false], 1, 2, (1, 1), 0.5), [true]);
        assert_eq!(b.mask(&[true, false], 1, 2, (1, 1), 0.51), [false]);
        // Upsampling 1 x 2 -> 1 x 4: the boundary falls between outputs 1 and 2.
        let m = b.mask(&[true, false], 1, 2, (1, 4), 0.5);
        assert_eq!(m, [true, true, false, false]);
    }
}
