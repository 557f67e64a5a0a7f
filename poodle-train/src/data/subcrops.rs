//! Flow-informed subcrop pairs for the pooled objective (paper Section 3 "Pooled
//! objective", Appendix A "Local cropping details"), drawn as the authors' code draws them
//! (`src/models/poodle.py`; see docs/method.md "Subcrops").
//!
//! All coordinates are integer pixels of the global crop at training resolution (H x W).
//! A fresh set of K pairs is drawn for **each direction** of the symmetric loss: direction 0
//! has frame t online and frame t+dt as target (flow t -> t+dt), direction 1 the reverse
//! (flow t+dt -> t). For one direction, with `f` the online-to-target flow:
//!
//! 1. **Grid**: side `r = round(sqrt((smin + smax) / 2) * min(H, W))`, cells
//!    `(H / r + 1) x (W / r + 1)` (integer division; 214 px and 3 x 5 = 15 cells at
//!    512 x 1024). K cells drawn uniformly without replacement (with replacement when K
//!    exceeds the cells), as `torch.multinomial`.
//! 2. **Online size**: `s ~ U(smin, smax)`, then RandomResizedCrop's `get_params` with area
//!    fraction exactly `s` and a log-uniform aspect in `ratio` gives `(h, w)`.
//! 3. **Centre and pairing**, up to `tries` (5) times: the online centre `(i, j)` is uniform
//!    over the cell's rows `[gi r, min((gi+1) r, H))` and columns alike, raised to at least
//!    `(h/2, w/2)`; the jitter is `U(-jitter, jitter) * (H, W)`; the target centre is
//!    `round((i, j) + f(i, j) + jitter)` (half to even, as `torch.round`) with the flow read
//!    at the integer centre. The first try whose target centre lies inside the frame is
//!    kept. When none does, a new online centre is drawn the same way and the target crop is
//!    taken from the **online frame** at that same centre (`paired = false`).
//! 4. **Boxes**: online `[i - h/2, i - h/2 + h) x [j - w/2, j - w/2 + w)`; it may run past the
//!    bottom or right edge, and those pixels read as zero (torchvision's `crop` pads with
//!    zeros; zero is the mean colour after normalisation). Target: `get_params` with area
//!    fraction `U(s, smax)` gives `(h', w')`, the box `[c - h'/2, c - h'/2 + h')` around the
//!    target centre `c`, clipped to the frame (so it may be smaller).
//! 5. **Pixels**: each box is resized to `size x size` (bilinear, `align_corners=False`,
//!    no antialias) from its frame's normalised, colour-augmented global crop (before the
//!    dense affine).
//!
//! Randomness comes through [`Draws`] in the authors' order (the cells; each pair's online
//! half; then each pair's target box), so `tests/subcrop_reference.rs` can replay the draws
//! recorded by `tools/subcrop_reference.py`, which applies the authors' rules, and compare
//! boxes exactly.
//!
//! An edge case the authors' code does not meet at its sizes: when `r` divides H (or W), the
//! last row (column) of cells is empty and `torch.randint` would fail; here its centres come
//! from the last pixel row (column).

use super::crop::{sample_crop_box, sample_crop_box_area, CropBox};
use super::Draws;
use poodle_common::flowmath::{resize_bilinear, Map};
use serde::{Deserialize, Serialize};

/// Subcrop parameters (defaults: the authors' configs, which match the paper).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubcropConfig {
    /// Pairs per direction (6).
    pub k: usize,
    /// Output side (192).
    pub size: usize,
    /// Area fraction of the global crop [smin, smax] ([0.05, 0.3]).
    pub area: [f64; 2],
    /// Aspect-ratio range w/h ([0.75, 1.3333], the authors' config).
    pub ratio: [f64; 2],
    /// Jitter of the target centre as a fraction of the crop's height/width (0.1).
    pub jitter: f64,
    /// Tries to land the target centre inside the frame (5).
    pub tries: usize,
}

impl Default for SubcropConfig {
    fn default() -> Self {
        SubcropConfig {
            k: 6,
            size: 192,
            area: [0.05, 0.3],
            ratio: [0.75, 1.3333],
            jitter: 0.1,
            tries: 5,
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

/// The sampling grid over an `h` x `w` crop (module docs, step 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    /// Cell side in pixels.
    pub r: usize,
    pub rows: usize,
    pub cols: usize,
    pub h: usize,
    pub w: usize,
}

impl Grid {
    pub fn new(h: usize, w: usize, cfg: &SubcropConfig) -> Grid {
        let mean = (cfg.area[0] + cfg.area[1]) / 2.0;
        let r = ((mean.sqrt() * h.min(w) as f64).round_ties_even() as usize).max(1);
        Grid {
            r,
            rows: h / r + 1,
            cols: w / r + 1,
            h,
            w,
        }
    }

    pub fn cells(&self) -> usize {
        self.rows * self.cols
    }

    /// Half-open pixel range `[lo, hi)` of cell index `i` along an axis of `n` pixels (never
    /// empty: an empty last cell falls back to the last pixel).
    fn span(&self, i: usize, n: usize) -> (usize, usize) {
        let lo = (i * self.r).min(n - 1);
        let hi = ((i + 1) * self.r).min(n).max(lo + 1);
        (lo, hi)
    }

    /// Row range and column range of cell `(row, col)`.
    pub fn cell_ranges(&self, row: usize, col: usize) -> ((usize, usize), (usize, usize)) {
        (self.span(row, self.h), self.span(col, self.w))
    }
}

/// One subcrop pair of one direction, in crop pixels.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubcropPair {
    /// Grid cell `(row, col)` of the online centre.
    pub cell: (usize, usize),
    /// Online centre `(x, y)`.
    pub online_centre: (usize, usize),
    /// Target centre `(x, y)`: the online centre moved by the flow and the jitter, rounded;
    /// the online centre itself when `paired` is false.
    pub target_centre: (usize, usize),
    /// True: the target crop is cut from the target frame; false: no try landed inside,
    /// and the target crop is cut from the online frame.
    pub paired: bool,
    /// Area fractions drawn for [online, target] (the target box may be clipped smaller).
    pub area: [f64; 2],
    /// [online box, target box]. The online box may extend past the bottom/right edge
    /// (zero pixels there); the target box lies inside the frame.
    pub boxes: [CropBox; 2],
}

/// The subcrop geometry of one pair: `[direction 0 (t online), direction 1 (t+dt online)]`.
pub type SubcropSets = [Vec<SubcropPair>; 2];

/// A centre uniform over the cell's pixels, raised to at least `(bh / 2, bw / 2)`: (x, y).
fn draw_centre<D: Draws + ?Sized>(
    grid: &Grid,
    cell: (usize, usize),
    bh: usize,
    bw: usize,
    rng: &mut D,
) -> (usize, usize) {
    let ((y0, y1), (x0, x1)) = grid.cell_ranges(cell.0, cell.1);
    let i = (y0 + rng.below(y1 - y0)).max(bh / 2);
    let j = (x0 + rng.below(x1 - x0)).max(bw / 2);
    (j, i)
}

/// The online half of one pair (module docs, steps 2-3).
struct Online {
    cell: (usize, usize),
    s: f64,
    size: (usize, usize),
    centre: (usize, usize),
    target_centre: (usize, usize),
    paired: bool,
}

/// Steps 2-3 for one cell: online size, then up to `tries` centres moved by the flow at the
/// integer centre plus jitter, rounded half to even (`torch.round`); else the fallback.
fn draw_online<D: Draws + ?Sized>(
    grid: &Grid,
    cell: (usize, usize),
    flow: &Map,
    cfg: &SubcropConfig,
    rng: &mut D,
) -> Online {
    let (h, w) = (grid.h, grid.w);
    let s = rng.uniform_in(cfg.area[0], cfg.area[1]);
    let b = sample_crop_box(h, w, [s, s], cfg.ratio, rng);
    let (jy, jx) = (cfg.jitter * h as f64, cfg.jitter * w as f64);
    let mut found = None;
    for _ in 0..cfg.tries {
        let (x, y) = draw_centre(grid, cell, b.h, b.w, rng);
        let dy = rng.uniform_in(-jy, jy);
        let dx = rng.uniform_in(-jx, jx);
        let tx = (x as f64 + f64::from(flow.get(0, y, x)) + dx).round_ties_even();
        let ty = (y as f64 + f64::from(flow.get(1, y, x)) + dy).round_ties_even();
        if (0.0..w as f64).contains(&tx) && (0.0..h as f64).contains(&ty) {
            found = Some(((x, y), (tx as usize, ty as usize)));
            break;
        }
    }
    let paired = found.is_some();
    let (centre, target_centre) = found.unwrap_or_else(|| {
        let c = draw_centre(grid, cell, b.h, b.w, rng);
        (c, c)
    });
    Online {
        cell,
        s,
        size: (b.h, b.w),
        centre,
        target_centre,
        paired,
    }
}

/// Step 4 for one pair: the online box around its centre, and a target box of area
/// `U(s, smax)` (`get_params` with scale `(s, smax)`) around the target centre, clipped.
fn finish_pair<D: Draws + ?Sized>(
    o: Online,
    grid: &Grid,
    cfg: &SubcropConfig,
    rng: &mut D,
) -> SubcropPair {
    let (h, w) = (grid.h, grid.w);
    let (tb, s_target) = sample_crop_box_area(h, w, [o.s, cfg.area[1]], cfg.ratio, rng);
    let (bh, bw) = o.size;
    let online = CropBox {
        x0: o.centre.0 - bw / 2,
        y0: o.centre.1 - bh / 2,
        w: bw,
        h: bh,
    };
    let clip = |c: usize, b: usize, n: usize| {
        let lo = c.saturating_sub(b / 2);
        let hi = (c as isize - (b / 2) as isize + b as isize).clamp(0, n as isize) as usize;
        (lo.min(n), hi)
    };
    let (tx0, tx1) = clip(o.target_centre.0, tb.w, w);
    let (ty0, ty1) = clip(o.target_centre.1, tb.h, h);
    let target = CropBox {
        x0: tx0,
        y0: ty0,
        w: tx1 - tx0,
        h: ty1 - ty0,
    };
    SubcropPair {
        cell: o.cell,
        online_centre: o.centre,
        target_centre: o.target_centre,
        paired: o.paired,
        area: [o.s, s_target],
        boxes: [online, target],
    }
}

/// K subcrop pairs of one direction over an `h` x `w` global crop; `flow` is the
/// online-to-target flow in crop pixels (2, h, w). Draws in the authors' order: the cells,
/// every pair's online half, then every pair's target box.
pub fn sample_subcrops<D: Draws + ?Sized>(
    h: usize,
    w: usize,
    flow: &Map,
    cfg: &SubcropConfig,
    rng: &mut D,
) -> Vec<SubcropPair> {
    assert_eq!(
        (flow.c, flow.h, flow.w),
        (2, h, w),
        "sample_subcrops: flow shape"
    );
    let grid = Grid::new(h, w, cfg);
    let cells = rng.choose(grid.cells(), cfg.k, cfg.k > grid.cells());
    let online: Vec<Online> = cells
        .into_iter()
        .map(|c| draw_online(&grid, (c / grid.cols, c % grid.cols), flow, cfg, rng))
        .collect();
    online
        .into_iter()
        .map(|o| finish_pair(o, &grid, cfg, rng))
        .collect()
}

/// Copies box `b` out of `m`, zero where the box runs past the image (torchvision `crop`).
pub fn crop_zero_padded(m: &Map, b: &CropBox) -> Map {
    let mut out = Map::zeros(m.c, b.h, b.w);
    let rows = b.h.min(m.h.saturating_sub(b.y0));
    let cols = b.w.min(m.w.saturating_sub(b.x0));
    for c in 0..m.c {
        for y in 0..rows {
            let src = m.idx(c, b.y0 + y, b.x0);
            let dst = out.idx(c, y, 0);
            out.data[dst..dst + cols].copy_from_slice(&m.data[src..src + cols]);
        }
    }
    out
}

/// The subcrop pixels of one direction: `[online crops, target crops]`, K maps each of
/// (c, size, size). `online` and `target` are the two frames' global crops in that
/// direction's roles; an unpaired target crop is cut from `online`.
pub fn extract_subcrops(
    online: &Map,
    target: &Map,
    pairs: &[SubcropPair],
    size: usize,
) -> [Vec<Map>; 2] {
    let cut = |m: &Map, b: &CropBox| resize_bilinear(&crop_zero_padded(m, b), size, size);
    [
        pairs.iter().map(|p| cut(online, &p.boxes[0])).collect(),
        pairs
            .iter()
            .map(|p| cut(if p.paired { target } else { online }, &p.boxes[1]))
            .collect(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Rng;

    fn const_flow(h: usize, w: usize, u: f32, v: f32) -> Map {
        let mut m = Map::zeros(2, h, w);
        m.data[..h * w].fill(u);
        m.data[h * w..].fill(v);
        m
    }

    #[test]
    fn grid_matches_the_authors_numbers() {
        let cfg = SubcropConfig::default();
        let g = Grid::new(512, 1024, &cfg);
        // round(sqrt(0.175) * 512) = 214; (512 // 214 + 1) x (1024 // 214 + 1).
        assert_eq!((g.r, g.rows, g.cols, g.cells()), (214, 3, 5, 15));
        assert_eq!(g.cell_ranges(2, 4), ((428, 512), (856, 1024)));
        let g = Grid::new(256, 512, &cfg);
        assert_eq!((g.r, g.rows, g.cols), (107, 3, 5));
        // r divides H: the last row is empty in the authors' arithmetic; here it is the last
        // pixel row.
        let g = Grid::new(214, 428, &cfg);
        assert_eq!((g.r, g.rows, g.cols), (90, 3, 5));
        let g = Grid {
            r: 10,
            rows: 3,
            cols: 3,
            h: 20,
            w: 20,
        };
        assert_eq!(g.cell_ranges(2, 0), ((19, 20), (0, 10)));
    }

    #[test]
    fn target_centres_follow_the_online_to_target_flow_within_jitter() {
        let (h, w) = (64, 128);
        let cfg = SubcropConfig::default();
        let flow = const_flow(h, w, 7.4, -3.25);
        let grid = Grid::new(h, w, &cfg);
        let mut paired = 0;
        for seed in 0..200 {
            let pairs = sample_subcrops(h, w, &flow, &cfg, &mut Rng::new(seed));
            assert_eq!(pairs.len(), 6);
            let mut cells: Vec<_> = pairs.iter().map(|p| p.cell).collect();
            cells.sort();
            cells.dedup();
            assert_eq!(cells.len(), 6, "cells drawn without replacement");
            for p in &pairs {
                let ((y0, y1), (x0, x1)) = grid.cell_ranges(p.cell.0, p.cell.1);
                let [ob, tb] = p.boxes;
                let (ox, oy) = p.online_centre;
                // In the cell, or raised to half the box.
                assert!((ox >= x0 && ox < x1) || ox == ob.w / 2, "{p:?}");
                assert!((oy >= y0 && oy < y1) || oy == ob.h / 2, "{p:?}");
                assert_eq!((ob.x0, ob.y0), (ox - ob.w / 2, oy - ob.h / 2));
                let (tx, ty) = p.target_centre;
                assert!(tx < w && ty < h);
                if p.paired {
                    paired += 1;
                    assert!((tx as f64 - ox as f64 - 7.4).abs() <= 0.1 * w as f64 + 0.5);
                    assert!((ty as f64 - oy as f64 + 3.25).abs() <= 0.1 * h as f64 + 0.5);
                } else {
                    assert_eq!(p.online_centre, p.target_centre);
                }
                // Online area as drawn (up to rounding); target drawn in [online, smax] and
                // clipped into the frame.
                let frac = ob.area() as f64 / (h * w) as f64;
                assert!((frac - p.area[0]).abs() < 0.02, "{frac} vs {}", p.area[0]);
                assert!(p.area[0] >= 0.05 && p.area[0] <= p.area[1] && p.area[1] <= 0.3);
                assert!(tb.inside(w, h), "{tb:?}");
                assert!(tb.area() as f64 <= p.area[1] * (h * w) as f64 * 1.05 + 50.0);
            }
        }
        assert!(paired > 1000, "{paired} of 1200 paired");
    }

    #[test]
    fn jitter_zero_moves_the_centre_by_the_rounded_flow() {
        let (h, w) = (48, 96);
        let cfg = SubcropConfig {
            jitter: 0.0,
            ..SubcropConfig::default()
        };
        // Flow that differs per pixel: u = x / 10, v = -1.
        let mut flow = Map::zeros(2, h, w);
        for y in 0..h {
            for x in 0..w {
                flow.set(0, y, x, x as f32 / 10.0);
                flow.set(1, y, x, -1.0);
            }
        }
        for seed in 0..30 {
            for p in sample_subcrops(h, w, &flow, &cfg, &mut Rng::new(seed)) {
                let (ox, oy) = p.online_centre;
                if p.paired {
                    // Ties (x = 5, 15, ...) round half to even, as torch.round.
                    let want_x = (ox as f64 + f64::from(ox as f32 / 10.0)).round_ties_even();
                    let want_x = want_x as usize;
                    assert_eq!(p.target_centre, (want_x, oy - 1), "{p:?}");
                }
            }
        }
    }

    #[test]
    fn flow_out_of_the_frame_falls_back_to_the_online_frame() {
        let (h, w) = (40, 80);
        let cfg = SubcropConfig::default();
        // Everything moves far to the left: no jitter can bring it back.
        let flow = const_flow(h, w, -1000.0, 0.0);
        let mut online = Map::zeros(3, h, w);
        online
            .data
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32);
        let target = Map::from_vec(3, h, w, vec![-5.0; 3 * h * w]);
        for seed in 0..50 {
            let pairs = sample_subcrops(h, w, &flow, &cfg, &mut Rng::new(seed));
            let [_, t] = extract_subcrops(&online, &target, &pairs, 8);
            for (p, m) in pairs.iter().zip(&t) {
                assert!(!p.paired);
                assert_eq!(p.online_centre, p.target_centre);
                assert!(
                    m.data.iter().all(|&v| v >= 0.0),
                    "cut from the online frame"
                );
            }
        }
    }

    #[test]
    fn more_pairs_than_cells_draw_with_replacement() {
        let cfg = SubcropConfig {
            k: 40,
            ..SubcropConfig::default()
        };
        let (h, w) = (64, 128);
        assert_eq!(Grid::new(h, w, &cfg).cells(), 15);
        let pairs = sample_subcrops(h, w, &const_flow(h, w, 0.0, 0.0), &cfg, &mut Rng::new(1));
        let mut cells: Vec<_> = pairs.iter().map(|p| p.cell).collect();
        cells.sort();
        cells.dedup();
        assert!(cells.len() < 40 && cells.len() > 5, "{}", cells.len());
    }

    #[test]
    fn boxes_past_the_edge_read_zeros_and_pixels_are_the_box_resized() {
        let (h, w) = (4, 6);
        let m = Map::from_vec(1, h, w, (1..=24).map(|v| v as f32).collect());
        let b = CropBox {
            x0: 4,
            y0: 2,
            w: 3,
            h: 3,
        };
        let c = crop_zero_padded(&m, &b);
        assert_eq!(
            c.data,
            vec![17.0, 18.0, 0.0, 23.0, 24.0, 0.0, 0.0, 0.0, 0.0]
        );
        let (h, w) = (32, 64);
        let mut img = Map::zeros(3, h, w);
        img.data
            .iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = i as f32);
        let later = Map::from_vec(3, h, w, img.data.iter().map(|v| v + 1e5).collect());
        let cfg = SubcropConfig {
            size: 8,
            ..SubcropConfig::default()
        };
        let pairs = sample_subcrops(h, w, &const_flow(h, w, 2.0, 1.0), &cfg, &mut Rng::new(3));
        let sub = extract_subcrops(&img, &later, &pairs, 8);
        for (i, frame) in [&img, &later].into_iter().enumerate() {
            for (got, p) in sub[i].iter().zip(&pairs) {
                let src = if i == 1 && !p.paired { &img } else { frame };
                let want = resize_bilinear(&crop_zero_padded(src, &p.boxes[i]), 8, 8);
                assert_eq!(*got, want);
                assert_eq!((got.c, got.h, got.w), (3, 8, 8));
            }
        }
    }
}
