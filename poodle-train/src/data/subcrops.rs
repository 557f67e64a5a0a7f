//! Flow-informed subcrop pairs (paper Section 3 "Pooled objective", Appendix A "Local
//! cropping details"; REFERENCE.md "Subcrops").
//!
//! All coordinates are pixels of the global crop at training resolution (H x W).
//!
//! 1. **Grid**: cell side `d = min(H, W) * sqrt((smin + smax) / 2)`, `ceil(H/d) x ceil(W/d)`
//!    cells (the last row/column clipped to the crop: 214 px and 3 x 5 = 15 cells at
//!    512 x 1024). The K pairs take K distinct cells, drawn without replacement (when
//!    K exceeds the number of cells, a fresh permutation of all cells follows).
//! 2. **Target centre** `p` uniform in its cell, in the *target* frame `x_{t+dt}` (paper).
//! 3. **Paired centre** in frame `x_t`: `p' = p + b(p) + jitter`, where `b` is the
//!    *backward* flow `t+dt -> t` (bilinear at `p`). Why backward: flow `t+dt -> t` says
//!    where pixel `p` of frame t+dt came from in frame t, which is exactly the point wanted.
//!    (With only the forward flow `f` one would need to solve `q + f(q) = p` for `q`, an
//!    inversion that fails at occlusions; the store keeps the backward flow for this.)
//!    The jitter is uniform in `[-j W, j W] x [-j H, j H]` with `j = 0.1` ("10% of the input
//!    image size", Appendix A: the input to subcropping is the global crop). Up to `tries`
//!    (5) jitter draws; the first that lands in `[0, W-1] x [0, H-1]` is kept, else the pair
//!    uses the same position `p' = p` in both frames (`warped = false`).
//! 4. **Boxes**: the online crop (frame t) has area `U(smin, smax) * H * W`, the target crop
//!    (frame t+dt) an area fraction drawn between the online crop's and `smax`
//!    (`target_area_from_online`); each crop draws its own log-uniform aspect ratio in
//!    `ratio`. A box is centred on its centre (rounded to integer pixels) and shifted, if
//!    needed, to lie inside the crop, so boxes are always inside; sizes are clamped to the
//!    crop.
//! 5. **Pixels**: each box is resized to `size x size` (bilinear, `align_corners=False`) from
//!    its frame's normalised, colour-augmented global crop (before the dense affine).
//!
//! **Symmetric loss**: the pairs are symmetric: `subcrops[0][k]` (frame t) and
//! `subcrops[1][k]` (frame t+dt) correspond, and the loss uses `(crop_t_k, crop_tdt_k)` in
//! both orders (online t -> target t+dt, then online t+dt -> target t). The only asymmetry
//! is the area rule (the frame-t crop is the smaller one on average), which the swapped
//! direction inherits; one subcrop set per pair keeps the cost at K crops per frame.

use super::crop::{crop_resize, CropBox};
use super::Rng;
use poodle_common::flowmath::{sample_bilinear, Map};
use serde::{Deserialize, Serialize};

/// Subcrop parameters (defaults from the paper).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubcropConfig {
    /// Pairs per frame pair (6).
    pub k: usize,
    /// Output side (192).
    pub size: usize,
    /// Area fraction of the global crop [smin, smax] ([0.05, 0.3]).
    pub area: [f64; 2],
    /// Aspect-ratio range w/h ([3/4, 4/3]).
    pub ratio: [f64; 2],
    /// Jitter of the paired centre as a fraction of the global crop's width/height (0.1).
    pub jitter: f64,
    /// Jitter draws to land in bounds before falling back to the same position (5).
    pub tries: usize,
    /// Target (frame t+dt) crop area drawn between the online crop's and smax (true);
    /// false: drawn independently from [smin, smax].
    pub target_area_from_online: bool,
}

impl Default for SubcropConfig {
    fn default() -> Self {
        SubcropConfig {
            k: 6,
            size: 192,
            area: [0.05, 0.3],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
            jitter: 0.1,
            tries: 5,
            target_area_from_online: true,
        }
    }
}

impl SubcropConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.size == 0 {
            return Err("subcrops.size must be positive".into());
        }
        let [a0, a1] = self.area;
        if !(a0 > 0.0 && a0 <= a1 && a1 <= 1.0) {
            return Err(format!(
                "subcrops.area must be an ordered range in (0, 1], got {:?}",
                self.area
            ));
        }
        let [r0, r1] = self.ratio;
        if !(r0 > 0.0 && r0 <= r1) {
            return Err(format!(
                "subcrops.ratio must be an ordered positive range, got {:?}",
                self.ratio
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(format!(
                "subcrops.jitter must be in [0, 1], got {}",
                self.jitter
            ));
        }
        Ok(())
    }
}

/// The sampling grid over an `h` x `w` crop.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Grid {
    pub d: f64,
    pub rows: usize,
    pub cols: usize,
    pub h: usize,
    pub w: usize,
}

impl Grid {
    pub fn new(h: usize, w: usize, cfg: &SubcropConfig) -> Grid {
        let d = h.min(w) as f64 * ((cfg.area[0] + cfg.area[1]) / 2.0).sqrt();
        let d = d.max(1.0);
        let count = |n: usize| ((n as f64 / d).ceil() as usize).max(1);
        Grid {
            d,
            rows: count(h),
            cols: count(w),
            h,
            w,
        }
    }

    pub fn cells(&self) -> usize {
        self.rows * self.cols
    }

    /// Closed range of centres in cell `(row, col)`: `(x_lo, x_hi, y_lo, y_hi)`, clipped to
    /// `[0, w-1] x [0, h-1]`.
    pub fn cell_bounds(&self, row: usize, col: usize) -> (f64, f64, f64, f64) {
        let span = |i: usize, n: usize| {
            let max = n as f64 - 1.0;
            let lo = (i as f64 * self.d).min(max);
            let hi = ((i + 1) as f64 * self.d).min(max);
            (lo, hi)
        };
        let (x0, x1) = span(col, self.w);
        let (y0, y1) = span(row, self.h);
        (x0, x1, y0, y1)
    }
}

/// One subcrop pair. Index 0 = frame t (online in the forward direction), 1 = frame t+dt.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubcropPair {
    /// Grid cell `(row, col)` of the target centre.
    pub cell: (usize, usize),
    /// `[frame t centre, frame t+dt centre]`: the frame-t+dt centre is uniform in the cell;
    /// the frame-t centre is `flow_point + jitter`, or the frame-t+dt centre when not warped.
    pub centres: [(f64, f64); 2],
    /// The frame-t+dt centre moved by the backward flow (no jitter).
    pub flow_point: (f64, f64),
    /// False when no jitter draw landed in bounds (same position used).
    pub warped: bool,
    /// Area fractions drawn for [frame t, frame t+dt].
    pub area: [f64; 2],
    /// Boxes in crop pixels, inside the crop.
    pub boxes: [CropBox; 2],
}

/// An integer box of `area_px` pixels and aspect `ratio` centred (as nearly as integers allow)
/// on `(cx, cy)`, shifted to lie inside a `w` x `h` image.
pub fn box_around(cx: f64, cy: f64, area_px: f64, ratio: f64, h: usize, w: usize) -> CropBox {
    let bw = ((area_px * ratio).sqrt().round() as usize).clamp(1, w);
    let bh = ((area_px / ratio).sqrt().round() as usize).clamp(1, h);
    let place = |c: f64, b: usize, n: usize| {
        let x0 = (c - (b as f64 - 1.0) / 2.0).round();
        x0.clamp(0.0, (n - b) as f64) as usize
    };
    CropBox {
        x0: place(cx, bw, w),
        y0: place(cy, bh, h),
        w: bw,
        h: bh,
    }
}

/// K subcrop pairs over an `h` x `w` global crop; `flow_bwd` is the crop's `t+dt -> t` flow
/// in crop pixels (2, h, w).
pub fn sample_subcrops(
    h: usize,
    w: usize,
    flow_bwd: &Map,
    cfg: &SubcropConfig,
    rng: &mut Rng,
) -> Vec<SubcropPair> {
    assert_eq!(
        (flow_bwd.c, flow_bwd.h, flow_bwd.w),
        (2, h, w),
        "sample_subcrops: flow shape"
    );
    let grid = Grid::new(h, w, cfg);
    let mut cells: Vec<usize> = Vec::with_capacity(cfg.k);
    while cells.len() < cfg.k {
        let mut perm: Vec<usize> = (0..grid.cells()).collect();
        rng.shuffle(&mut perm);
        cells.extend(perm.into_iter().take(cfg.k - cells.len()));
    }
    let (lr0, lr1) = (cfg.ratio[0].ln(), cfg.ratio[1].ln());
    let total = (h * w) as f64;
    let (xmax, ymax) = (w as f64 - 1.0, h as f64 - 1.0);
    cells
        .into_iter()
        .map(|cell| {
            let (row, col) = (cell / grid.cols, cell % grid.cols);
            let (x0, x1, y0, y1) = grid.cell_bounds(row, col);
            let target = (rng.uniform_in(x0, x1), rng.uniform_in(y0, y1));
            let a_online = rng.uniform_in(cfg.area[0], cfg.area[1]);
            let a_target = if cfg.target_area_from_online {
                rng.uniform_in(a_online, cfg.area[1])
            } else {
                rng.uniform_in(cfg.area[0], cfg.area[1])
            };
            let ratios = [
                rng.uniform_in(lr0, lr1).exp(),
                rng.uniform_in(lr0, lr1).exp(),
            ];
            let (tx, ty) = (target.0 as f32, target.1 as f32);
            let bu = sample_bilinear(flow_bwd, 0, tx, ty).unwrap_or(0.0) as f64;
            let bv = sample_bilinear(flow_bwd, 1, tx, ty).unwrap_or(0.0) as f64;
            let flow_point = (target.0 + bu, target.1 + bv);
            let (jx, jy) = (cfg.jitter * w as f64, cfg.jitter * h as f64);
            let mut online = None;
            for _ in 0..cfg.tries {
                let c = (
                    flow_point.0 + rng.uniform_in(-jx, jx),
                    flow_point.1 + rng.uniform_in(-jy, jy),
                );
                if (0.0..=xmax).contains(&c.0) && (0.0..=ymax).contains(&c.1) {
                    online = Some(c);
                    break;
                }
            }
            let warped = online.is_some();
            let online = online.unwrap_or(target);
            let area = [a_online, a_target];
            let boxes = [
                box_around(online.0, online.1, a_online * total, ratios[0], h, w),
                box_around(target.0, target.1, a_target * total, ratios[1], h, w),
            ];
            SubcropPair {
                cell: (row, col),
                centres: [online, target],
                flow_point,
                warped,
                area,
                boxes,
            }
        })
        .collect()
}

/// The subcrop pixels: `[frame t crops, frame t+dt crops]`, each K maps of (c, size, size).
pub fn extract_subcrops(crops: &[Map; 2], pairs: &[SubcropPair], size: usize) -> [Vec<Map>; 2] {
    std::array::from_fn(|i| {
        pairs
            .iter()
            .map(|p| crop_resize(&crops[i], &p.boxes[i], size, size))
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn const_flow(h: usize, w: usize, u: f32, v: f32) -> Map {
        let mut m = Map::zeros(2, h, w);
        m.data[..h * w].fill(u);
        m.data[h * w..].fill(v);
        m
    }

    #[test]
    fn grid_matches_the_reference_numbers() {
        let g = Grid::new(512, 1024, &SubcropConfig::default());
        assert!((g.d - 214.2).abs() < 0.1, "{}", g.d);
        assert_eq!((g.rows, g.cols, g.cells()), (3, 5, 15));
        assert_eq!(g.cell_bounds(2, 4).1, 1023.0);
        assert_eq!(g.cell_bounds(2, 4).3, 511.0);
    }

    #[test]
    fn box_around_stays_inside_and_keeps_size() {
        let b = box_around(2.0, 3.0, 400.0, 1.0, 50, 60);
        assert_eq!(
            b,
            CropBox {
                x0: 0,
                y0: 0,
                w: 20,
                h: 20
            }
        );
        let b = box_around(59.0, 49.0, 400.0, 1.0, 50, 60);
        assert_eq!(
            b,
            CropBox {
                x0: 40,
                y0: 30,
                w: 20,
                h: 20
            }
        );
        let b = box_around(30.0, 25.0, 400.0, 1.0, 50, 60);
        // x0 = round(30 - 9.5) = 21 (half away from zero): centred within half a pixel.
        assert_eq!(b.centre(), (30.5, 25.5));
        let huge = box_around(30.0, 25.0, 1e6, 1.0, 50, 60);
        assert!(huge.inside(60, 50));
    }

    #[test]
    fn paired_centres_follow_the_backward_flow_within_jitter() {
        let (h, w) = (64, 128);
        let cfg = SubcropConfig::default();
        let flow = const_flow(h, w, 7.5, -3.25);
        let grid = Grid::new(h, w, &cfg);
        let mut warped = 0;
        for seed in 0..200 {
            let pairs = sample_subcrops(h, w, &flow, &cfg, &mut Rng::new(seed));
            assert_eq!(pairs.len(), 6);
            let mut cells: Vec<_> = pairs.iter().map(|p| p.cell).collect();
            cells.sort();
            cells.dedup();
            assert_eq!(cells.len(), 6, "cells drawn without replacement");
            for p in &pairs {
                let (x0, x1, y0, y1) = grid.cell_bounds(p.cell.0, p.cell.1);
                let t = p.centres[1];
                assert!(t.0 >= x0 && t.0 <= x1 && t.1 >= y0 && t.1 <= y1);
                assert!((p.flow_point.0 - (t.0 + 7.5)).abs() < 1e-5);
                assert!((p.flow_point.1 - (t.1 - 3.25)).abs() < 1e-5);
                let o = p.centres[0];
                if p.warped {
                    warped += 1;
                    assert!((o.0 - p.flow_point.0).abs() <= 0.1 * w as f64);
                    assert!((o.1 - p.flow_point.1).abs() <= 0.1 * h as f64);
                    assert!(o.0 >= 0.0 && o.0 <= (w - 1) as f64);
                    assert!(o.1 >= 0.0 && o.1 <= (h - 1) as f64);
                } else {
                    assert_eq!(o, t);
                }
                for (i, b) in p.boxes.iter().enumerate() {
                    assert!(b.inside(w, h), "{b:?}");
                    let frac = b.area() as f64 / (h * w) as f64;
                    assert!((frac - p.area[i]).abs() < 0.02, "{frac} vs {}", p.area[i]);
                }
                assert!(p.area[0] >= 0.05 && p.area[0] <= p.area[1] && p.area[1] <= 0.3);
            }
        }
        assert!(warped > 1000, "{warped} of 1200 warped");
    }

    #[test]
    fn out_of_bounds_flow_falls_back_to_the_same_position() {
        let (h, w) = (40, 80);
        let cfg = SubcropConfig::default();
        // Everything in frame t+dt came from far to the left: no jitter can bring it back.
        let flow = const_flow(h, w, -1000.0, 0.0);
        for seed in 0..50 {
            for p in sample_subcrops(h, w, &flow, &cfg, &mut Rng::new(seed)) {
                assert!(!p.warped);
                assert_eq!(p.centres[0], p.centres[1]);
                assert!(p.boxes[0].inside(w, h) && p.boxes[1].inside(w, h));
            }
        }
    }

    #[test]
    fn more_pairs_than_cells_reuse_cells_after_a_full_round() {
        let cfg = SubcropConfig {
            k: 20,
            ..SubcropConfig::default()
        };
        let (h, w) = (64, 128);
        let g = Grid::new(h, w, &cfg);
        assert_eq!(g.cells(), 15);
        let pairs = sample_subcrops(h, w, &const_flow(h, w, 0.0, 0.0), &cfg, &mut Rng::new(1));
        let mut first: Vec<_> = pairs[..15].iter().map(|p| p.cell).collect();
        first.sort();
        first.dedup();
        assert_eq!(first.len(), 15);
    }

    #[test]
    fn extracted_pixels_are_the_box_resized() {
        let (h, w) = (32, 64);
        let mut img = Map::zeros(3, h, w);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    img.set(c, y, x, (c * 1000 + y * w + x) as f32);
                }
            }
        }
        let cfg = SubcropConfig {
            size: 8,
            ..SubcropConfig::default()
        };
        let pairs = sample_subcrops(h, w, &const_flow(h, w, 2.0, 1.0), &cfg, &mut Rng::new(3));
        let mut later = img.clone();
        later.data.iter_mut().for_each(|v| *v += 5000.0);
        let crops = [img, later];
        let sub = extract_subcrops(&crops, &pairs, 8);
        for (i, frame_subcrops) in sub.iter().enumerate() {
            assert_eq!(frame_subcrops.len(), 6);
            for (m, p) in frame_subcrops.iter().zip(&pairs) {
                let b = p.boxes[i];
                assert_eq!((m.c, m.h, m.w), (3, 8, 8));
                // Each frame's subcrop is its own box of its own crop, resized.
                assert_eq!(*m, crop_resize(&crops[i], &b, 8, 8));
                let lo = (b.y0 * w + b.x0) as f32 + 5000.0 * i as f32;
                let hi = ((b.y0 + b.h - 1) * w + b.x0 + b.w - 1) as f32 + 5000.0 * i as f32;
                assert!(m.get(0, 0, 0) >= lo - 1e-3 && m.get(0, 7, 7) <= hi + 1e-3);
            }
        }
    }
}
