//! Global-crop geometry: the crop box, and cropping + resizing of frames, flow (rescaled to
//! output pixels) and occlusion masks, all bilinear with `align_corners=False`
//! (`F.interpolate` without antialias).

use super::Rng;
use poodle_common::flowmath::{resize_bilinear, resize_flow, Map};
use serde::{Deserialize, Serialize};

/// Where the global crop comes from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GlobalCropConfig {
    /// Area as a fraction of the stored frame (BDD [0.16, 0.45], WT [0.65, 1.0]).
    pub area: [f64; 2],
    /// Aspect-ratio range (w/h) relative to the output aspect (default [3/4, 4/3]).
    pub ratio: [f64; 2],
}

impl Default for GlobalCropConfig {
    fn default() -> Self {
        GlobalCropConfig {
            area: [0.16, 0.45],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
        }
    }
}

impl GlobalCropConfig {
    pub fn validate(&self) -> Result<(), String> {
        let ok = |r: [f64; 2], lo: f64, hi: f64| r[0] <= r[1] && r[0] >= lo && r[1] <= hi;
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
        Ok(())
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
}
