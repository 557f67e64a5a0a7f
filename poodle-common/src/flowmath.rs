//! CPU optical-flow geometry shared by `poodle-prep` and `poodle-train`.
//!
//! Conventions:
//! - A [`Map`] is a planar (CHW), row-major `f32` buffer. Images are 3-channel RGB in `0..=255`.
//! - Flow is a 2-channel map: channel 0 is `u = dx`, channel 1 is `v = dy`, in pixels, from
//!   frame `t` to frame `t+dt`: pixel `(x, y)` of frame `t` moves to `(x+u, y+v)` in `t+dt`.
//! - Pixel centres sit at integer coordinates. Resizing maps centres like PyTorch
//!   `align_corners=False`: `src = (x_out + 0.5) * (w_in / w_out) - 0.5`, negative `src`
//!   clamped to 0 (identical to `F.interpolate(mode='bilinear', align_corners=False)`).
//! - Point sampling is in pixel units (PyTorch `grid_sample(align_corners=True,
//!   padding_mode='zeros')`); a point is *in bounds* iff it lies in `[0, w-1] x [0, h-1]`.
//!   Out-of-bounds points sample as 0 and are reported through a mask.
//!
//! Functions panic on shape mismatches (a programming error, not a data error).

use std::io;
use std::path::Path;

/// DDFlow forward-backward occlusion constant on `|f|^2 + |b'|^2`.
pub const OCC_ALPHA1: f32 = 0.1;
/// DDFlow forward-backward occlusion additive constant (px^2).
pub const OCC_ALPHA2: f32 = 0.5;
/// Default flow quantisation step: 1/32 px, so `i16` covers +-1024 px.
pub const FLOW_QUANT_SCALE: f32 = 1.0 / 32.0;
/// Names of [`FlowStats`] fields, in [`FlowStats::to_array`] order.
pub const FLOW_STAT_NAMES: [&str; 6] = [
    "median_mag",
    "mean_mag",
    "max_mag",
    "occluded_frac",
    "fb_error",
    "photometric_error",
];

/// Planar CHW `f32` map.
#[derive(Debug, Clone, PartialEq)]
pub struct Map {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub data: Vec<f32>,
}

impl Map {
    /// Zero-filled map (same as [`Map::zeros`]).
    pub fn new(c: usize, h: usize, w: usize) -> Map {
        Map::zeros(c, h, w)
    }
    pub fn zeros(c: usize, h: usize, w: usize) -> Map {
        Map::from_vec(c, h, w, vec![0.0; c * h * w])
    }
    /// `(c, h, w)`.
    pub fn shape(&self) -> (usize, usize, usize) {
        (self.c, self.h, self.w)
    }
    /// Wraps `data` (planar CHW); panics if its length is not `c*h*w`.
    pub fn from_vec(c: usize, h: usize, w: usize, data: Vec<f32>) -> Map {
        assert_eq!(data.len(), c * h * w, "Map::from_vec: length mismatch");
        Map { c, h, w, data }
    }
    #[inline]
    pub fn idx(&self, c: usize, y: usize, x: usize) -> usize {
        (c * self.h + y) * self.w + x
    }
    #[inline]
    pub fn get(&self, c: usize, y: usize, x: usize) -> f32 {
        self.data[self.idx(c, y, x)]
    }
    #[inline]
    pub fn set(&mut self, c: usize, y: usize, x: usize, v: f32) {
        let i = self.idx(c, y, x);
        self.data[i] = v;
    }
    /// One channel plane (`h*w` values).
    pub fn channel(&self, c: usize) -> &[f32] {
        &self.data[c * self.h * self.w..(c + 1) * self.h * self.w]
    }
    /// Interleaved RGB `u8` (`h*w*3`) to a planar 3-channel map with values in `0..=255`.
    pub fn from_hwc_u8(h: usize, w: usize, rgb: &[u8]) -> Map {
        assert_eq!(rgb.len(), h * w * 3, "Map::from_hwc_u8: length mismatch");
        let mut m = Map::zeros(3, h, w);
        let n = h * w;
        for (p, px) in rgb.chunks_exact(3).enumerate() {
            for (c, &v) in px.iter().enumerate() {
                m.data[c * n + p] = v as f32;
            }
        }
        m
    }
    /// Interleaved HWC `u8` (`h*w*c`), rounding and clamping each value to `0..=255`.
    pub fn to_hwc_u8(&self) -> Vec<u8> {
        let n = self.h * self.w;
        let mut out = vec![0u8; n * self.c];
        for c in 0..self.c {
            for (p, &v) in self.channel(c).iter().enumerate() {
                out[p * self.c + c] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
        out
    }
}

/// PyTorch's `align_corners=False` linear-resize rule for one axis, the one table every
/// resize and sampler in poodle builds on: for outputs `offset .. offset + n_out` of a resize
/// of `n_in` samples to `n_scaled`, `(i0, i1, w0, w1)` with `src = max((o + 0.5) * n_in /
/// n_scaled - 0.5, 0)`, `i0 = floor(src)`, `i1 = min(i0 + 1, n_in - 1)`, `w1 = src - i0`,
/// `w0 = 1 - w1` (at the last index `i1 = i0`, so the weights still sum to 1).
pub fn linear_axis(
    n_in: usize,
    n_scaled: usize,
    offset: usize,
    n_out: usize,
) -> Vec<(usize, usize, f64, f64)> {
    let scale = n_in as f64 / n_scaled as f64;
    (offset..offset + n_out)
        .map(|o| {
            let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src as usize).min(n_in - 1);
            let i1 = (i0 + 1).min(n_in - 1);
            let l1 = (src - i0 as f64).clamp(0.0, 1.0);
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

fn window_table(
    n_in: usize,
    n_scaled: usize,
    offset: usize,
    n_out: usize,
) -> Vec<(usize, usize, f32, f32)> {
    linear_axis(n_in, n_scaled, offset, n_out)
        .into_iter()
        .map(|(i0, i1, w0, w1)| (i0, i1, w0 as f32, w1 as f32))
        .collect()
}

/// Bilinear resize, identical to PyTorch `F.interpolate(mode='bilinear', align_corners=False,
/// antialias=False)` (no antialiasing when downscaling).
pub fn resize_bilinear(m: &Map, h: usize, w: usize) -> Map {
    resize_window(m, (h, w), (0, 0), (h, w))
}

/// The `out` = (h, w) window at `origin` = (y0, x0) of `m` resized to `scaled` = (H', W'):
/// exactly `F.interpolate(m, size=scaled, mode='bilinear', align_corners=False)` followed by
/// `[..., y0:y0+h, x0:x0+w]`, computing only the window. The window must lie inside `scaled`.
pub fn resize_window(
    m: &Map,
    scaled: (usize, usize),
    origin: (usize, usize),
    out: (usize, usize),
) -> Map {
    let (h, w) = out;
    assert!(
        origin.0 + h <= scaled.0 && origin.1 + w <= scaled.1,
        "resize_window: window {out:?} at {origin:?} outside {scaled:?}"
    );
    let mut out = Map::zeros(m.c, h, w);
    if h == 0 || w == 0 || m.c == 0 {
        return out;
    }
    assert!(m.h > 0 && m.w > 0, "resize_window: empty input");
    let ty = window_table(m.h, scaled.0, origin.0, h);
    let tx = window_table(m.w, scaled.1, origin.1, w);
    for c in 0..m.c {
        let src = m.channel(c);
        let dst = &mut out.data[c * h * w..(c + 1) * h * w];
        for (drow, &(y0, y1, wy0, wy1)) in dst.chunks_exact_mut(w).zip(ty.iter()) {
            let r0 = &src[y0 * m.w..(y0 + 1) * m.w];
            let r1 = &src[y1 * m.w..(y1 + 1) * m.w];
            for (d, &(x0, x1, wx0, wx1)) in drow.iter_mut().zip(tx.iter()) {
                let a = r0[x0] * wx0 + r0[x1] * wx1;
                let b = r1[x0] * wx0 + r1[x1] * wx1;
                *d = a * wy0 + b * wy1;
            }
        }
    }
    out
}

/// Resizes a flow field and rescales it: `u *= w / w_in`, `v *= h / h_in`.
pub fn resize_flow(flow: &Map, h: usize, w: usize) -> Map {
    resize_window_flow(flow, (h, w), (0, 0), (h, w))
}

/// [`resize_window`] for a flow field, its vectors rescaled to the resized image's pixels
/// (`u *= W' / w_in`, `v *= H' / h_in`; a crop does not change displacements).
pub fn resize_window_flow(
    flow: &Map,
    scaled: (usize, usize),
    origin: (usize, usize),
    out: (usize, usize),
) -> Map {
    assert_eq!(flow.c, 2, "resize_flow: flow must have 2 channels");
    let mut out = resize_window(flow, scaled, origin, out);
    let (h, w) = (out.h, out.w);
    let su = scaled.1 as f32 / flow.w as f32;
    let sv = scaled.0 as f32 / flow.h as f32;
    let n = h * w;
    out.data[..n].iter_mut().for_each(|u| *u *= su);
    out.data[n..].iter_mut().for_each(|v| *v *= sv);
    out
}

/// Corner indices (into one plane) and weights for an in-bounds point, else `None`.
/// Order nw, ne, sw, se as in `grid_sample`; a corner past the last row/column is clamped to it
/// but then always has weight exactly 0, which equals zero padding. The one bilinear-corner
/// rule of the CPU samplers ([`sample_bilinear`], [`warp_backward`], the affine views).
#[inline]
pub fn corners(h: usize, w: usize, x: f32, y: f32) -> Option<([usize; 4], [f32; 4])> {
    if !(x >= 0.0 && y >= 0.0 && x <= (w as f32 - 1.0) && y <= (h as f32 - 1.0)) {
        return None; // also rejects NaN and empty maps
    }
    let (x0, y0) = ((x as usize).min(w - 1), (y as usize).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let (gx, gy) = (1.0 - fx, 1.0 - fy);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    Some((
        [y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1],
        [gx * gy, fx * gy, gx * fy, fx * fy],
    ))
}

/// The value of one plane at [`corners`]' taps.
#[inline]
pub fn blend(plane: &[f32], (i, wt): &([usize; 4], [f32; 4])) -> f32 {
    plane[i[0]] * wt[0] + plane[i[1]] * wt[1] + plane[i[2]] * wt[2] + plane[i[3]] * wt[3]
}

/// Bilinear sample of channel `c` at pixel coordinates `(x, y)`.
///
/// Returns `None` iff the point is outside `[0, w-1] x [0, h-1]` (or NaN). Inside, the value
/// equals PyTorch `grid_sample(align_corners=True, padding_mode='zeros')` at the same point:
/// `sum over the 4 corners of weight * value`, where corners beyond the map (only possible with
/// weight 0, on the last row/column) contribute 0.
pub fn sample_bilinear(m: &Map, c: usize, x: f32, y: f32) -> Option<f32> {
    assert!(c < m.c, "sample_bilinear: channel out of range");
    corners(m.h, m.w, x, y).map(|cw| blend(m.channel(c), &cw))
}

/// Backward warp: `out(x, y) = m(x + u(x, y), y + v(x, y))`, bilinear, 0 where the sample point
/// is out of bounds. `m` lives on frame `t+dt`, `flow` is `t -> t+dt`, the result on frame `t`.
/// Returns the map and the in-bounds mask (row-major `h*w`).
pub fn warp_backward(m: &Map, flow: &Map) -> (Map, Vec<bool>) {
    assert_eq!(flow.c, 2, "warp_backward: flow must have 2 channels");
    assert_eq!((m.h, m.w), (flow.h, flow.w), "warp_backward: size mismatch");
    let (h, w, n) = (m.h, m.w, m.h * m.w);
    let mut out = Map::zeros(m.c, h, w);
    let mut mask = vec![false; n];
    let (fu, fv) = (flow.channel(0), flow.channel(1));
    for y in 0..h {
        for x in 0..w {
            let p = y * w + x;
            if let Some(cw) = corners(h, w, x as f32 + fu[p], y as f32 + fv[p]) {
                mask[p] = true;
                for c in 0..m.c {
                    out.data[c * n + p] = blend(m.channel(c), &cw);
                }
            }
        }
    }
    (out, mask)
}

/// DDFlow forward-backward occlusion mask (true = occluded).
///
/// `b' = warp_backward(bwd, fwd)`; a pixel is occluded where
/// `|f + b'|^2 > a1 * (|f|^2 + |b'|^2) + a2` (exact equality is *not* occluded). Pixels whose
/// forward target leaves the frame are also marked occluded: they have no correspondence in
/// `t+dt`, so no flow or photometric supervision is valid there.
pub fn occlusion_fb(fwd: &Map, bwd: &Map, a1: f32, a2: f32) -> Vec<bool> {
    assert_eq!(fwd.shape(), bwd.shape(), "occlusion_fb: shape mismatch");
    let (bw, inb) = warp_backward(bwd, fwd);
    let (fu, fv, bu, bv) = (fwd.channel(0), fwd.channel(1), bw.channel(0), bw.channel(1));
    (0..fwd.h * fwd.w)
        .map(|p| {
            let (su, sv) = (fu[p] + bu[p], fv[p] + bv[p]);
            let lhs = su * su + sv * sv;
            let rhs = a1 * (fu[p] * fu[p] + fv[p] * fv[p] + bu[p] * bu[p] + bv[p] * bv[p]) + a2;
            !inb[p] || lhs > rhs
        })
        .collect()
}

/// Summary statistics of one flow pair.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FlowStats {
    /// Median of `|f|` over all pixels (mean of the two middle values for an even count).
    pub median_mag: f32,
    pub mean_mag: f32,
    pub max_mag: f32,
    /// Fraction of pixels with `occ == true`.
    pub occluded_frac: f32,
    /// Mean `|f + b'|` over non-occluded, in-bounds pixels (0 if there are none).
    pub fb_error: f32,
    /// Mean absolute difference (0..255 scale, averaged over channels) between frame t and frame
    /// t+dt warped by `fwd`, over non-occluded, in-bounds pixels (0 if there are none).
    pub photometric_error: f32,
}

impl FlowStats {
    /// Field values in [`FLOW_STAT_NAMES`] order.
    pub fn to_array(&self) -> [f32; 6] {
        [
            self.median_mag,
            self.mean_mag,
            self.max_mag,
            self.occluded_frac,
            self.fb_error,
            self.photometric_error,
        ]
    }
}

/// Statistics of `fwd` (`t -> t+dt`) and `bwd` (`t+dt -> t`) between frames `f1` (t) and
/// `f2` (t+dt), given an occlusion mask `occ` (usually from [`occlusion_fb`]).
pub fn flow_stats(f1: &Map, f2: &Map, fwd: &Map, bwd: &Map, occ: &[bool]) -> FlowStats {
    let (h, w, n) = (fwd.h, fwd.w, fwd.h * fwd.w);
    assert!(fwd.c == 2 && bwd.shape() == fwd.shape());
    assert!(f1.shape() == f2.shape() && (f1.h, f1.w) == (h, w));
    assert_eq!(occ.len(), n, "flow_stats: occ length");
    if n == 0 {
        return FlowStats::default();
    }
    let (fu, fv) = (fwd.channel(0), fwd.channel(1));
    let mut mags: Vec<f32> = fu.iter().zip(fv).map(|(u, v)| u.hypot(*v)).collect();
    let mean_mag = (mags.iter().map(|&m| m as f64).sum::<f64>() / n as f64) as f32;
    let max_mag = mags.iter().copied().fold(0.0f32, f32::max);
    let mid = n / 2;
    let (lo, &mut m_hi, _) = mags.select_nth_unstable_by(mid, f32::total_cmp);
    let median_mag = if n % 2 == 1 {
        m_hi
    } else {
        let m_lo = lo.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        0.5 * (m_lo + m_hi)
    };
    let occluded_frac = occ.iter().filter(|&&o| o).count() as f32 / n as f32;

    let (bw, inb) = warp_backward(bwd, fwd); // same mask for every map warped by `fwd`
    let (f2w, _) = warp_backward(f2, fwd);
    let (bu, bv, nc) = (bw.channel(0), bw.channel(1), f1.c.max(1) as f64);
    let (mut fb_sum, mut ph_sum, mut cnt) = (0.0f64, 0.0f64, 0usize);
    for p in 0..n {
        if occ[p] || !inb[p] {
            continue;
        }
        cnt += 1;
        fb_sum += (fu[p] + bu[p]).hypot(fv[p] + bv[p]) as f64;
        for c in 0..f1.c {
            ph_sum += (f1.data[c * n + p] - f2w.data[c * n + p]).abs() as f64 / nc;
        }
    }
    let mean = |s: f64| (s / cnt.max(1) as f64) as f32; // 0 when no valid pixel
    FlowStats {
        median_mag,
        mean_mag,
        max_mag,
        occluded_frac,
        fb_error: mean(fb_sum),
        photometric_error: mean(ph_sum),
    }
}

/// The 55-entry Middlebury (Baker et al.) colour wheel, as in `flow_vis.make_colorwheel`.
fn color_wheel() -> [[u8; 3]; 55] {
    let mut wheel = [[0u8; 3]; 55];
    let ramp = |i: usize, n: usize| (255 * i / n) as u8; // floor(255*i/n)
    let mut k = 0;
    type Seg = (usize, fn(u8) -> [u8; 3]); // (length, colour from the ramp value)
    let segs: [Seg; 6] = [
        (15, |r| [255, r, 0]),       // RY
        (6, |r| [255 - r, 255, 0]),  // YG
        (4, |r| [0, 255, r]),        // GC
        (11, |r| [0, 255 - r, 255]), // CB
        (13, |r| [r, 0, 255]),       // BM
        (6, |r| [255, 0, 255 - r]),  // MR
    ];
    for (len, f) in segs {
        for i in 0..len {
            wheel[k] = f(ramp(i, len));
            k += 1;
        }
    }
    wheel
}

/// Middlebury colour coding of a flow field as interleaved RGB `u8` (`h*w*3`), matching
/// `flow_vis.flow_to_color`: `u, v` are divided by `max_mag + 1e-5` (`max_mag` defaults to the
/// field's largest magnitude); hue from `atan2(-v, -u)`, saturation from the magnitude, and
/// magnitudes above 1 are darkened by 0.75. `u > 0, v = 0` is red; zero flow is white.
pub fn flow_to_color(flow: &Map, max_mag: Option<f32>) -> Vec<u8> {
    assert_eq!(flow.c, 2, "flow_to_color: flow must have 2 channels");
    let (fu, fv) = (flow.channel(0), flow.channel(1));
    let field_max = || (0..fu.len()).fold(0.0f32, |m, p| m.max(fu[p].hypot(fv[p])));
    let norm = max_mag.unwrap_or_else(field_max) as f64 + 1e-5;
    let wheel = color_wheel();
    let mut out = vec![0u8; fu.len() * 3];
    for (p, px) in out.chunks_exact_mut(3).enumerate() {
        let (u, v) = (fu[p] as f64 / norm, fv[p] as f64 / norm);
        let rad = u.hypot(v);
        let a = (-v).atan2(-u) / std::f64::consts::PI;
        let fk = (a + 1.0) / 2.0 * 54.0;
        if !fk.is_finite() {
            continue; // NaN flow: black
        }
        let k0 = (fk.floor() as usize).min(54);
        let k1 = if k0 + 1 == 55 { 0 } else { k0 + 1 };
        let f = fk - k0 as f64;
        for i in 0..3 {
            let col = (1.0 - f) * wheel[k0][i] as f64 / 255.0 + f * wheel[k1][i] as f64 / 255.0;
            let col = if rad <= 1.0 {
                1.0 - rad * (1.0 - col)
            } else {
                col * 0.75
            };
            px[i] = (255.0 * col).floor().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Writes an 8-bit RGB PNG atomically (temp file in the same directory, then rename).
pub fn write_png_rgb(path: &Path, w: u32, h: u32, rgb: &[u8]) -> io::Result<()> {
    let invalid = |msg: &str| io::Error::new(io::ErrorKind::InvalidInput, msg.to_string());
    if rgb.len() as u64 != w as u64 * h as u64 * 3 {
        return Err(invalid("rgb length != w*h*3"));
    }
    let mut encoded = Vec::with_capacity(rgb.len() / 2 + 1024);
    {
        let mut enc = png::Encoder::new(&mut encoded, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(io::Error::other)?;
        writer.write_image_data(rgb).map_err(io::Error::other)?;
        writer.finish().map_err(io::Error::other)?;
    }
    crate::atomic::write_atomic(path, &encoded).map_err(io::Error::other)
}

/// Quantises flow (or any map): `round(value / scale)` saturated to the `i16` range (NaN -> 0).
pub fn quantize_flow(flow: &Map, scale: f32) -> Vec<i16> {
    flow.data
        .iter()
        .map(|&v| (v / scale).round().clamp(-32768.0, 32767.0) as i16)
        .collect()
}

/// Inverse of [`quantize_flow`]: `value = q * scale`.
pub fn dequantize_flow(q: &[i16], c: usize, h: usize, w: usize, scale: f32) -> Map {
    Map::from_vec(c, h, w, q.iter().map(|&v| v as f32 * scale).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow_const(h: usize, w: usize, u: f32, v: f32) -> Map {
        let mut f = Map::zeros(2, h, w);
        f.data[..h * w].fill(u);
        f.data[h * w..].fill(v);
        f
    }
    /// One-row flow from its `u` and `v` rows.
    fn row_flow(u: &[f32], v: &[f32]) -> Map {
        Map::from_vec(2, 1, u.len(), [u, v].concat())
    }
    fn occ_default(f: &Map, b: &Map) -> Vec<bool> {
        occlusion_fb(f, b, OCC_ALPHA1, OCC_ALPHA2)
    }

    #[test]
    fn resize_2x2_to_4x4_matches_pytorch() {
        let m = Map::from_vec(1, 2, 2, vec![0.0, 1.0, 2.0, 3.0]);
        let r = resize_bilinear(&m, 4, 4);
        #[rustfmt::skip]
        let want = [0.0, 0.25, 0.75, 1.0, 0.5, 0.75, 1.25, 1.5,
                    1.5, 1.75, 2.25, 2.5, 2.0, 2.25, 2.75, 3.0];
        assert_eq!(r.data, want);
        // Same size is the identity; 4 -> 2 downscale averages pairs (src = 0.5, 2.5).
        assert_eq!(resize_bilinear(&m, 2, 2), m);
        let row = Map::from_vec(1, 1, 4, vec![0.0, 10.0, 20.0, 40.0]);
        assert_eq!(resize_bilinear(&row, 1, 2).data, [5.0, 30.0]);
    }

    #[test]
    fn resize_window_is_the_window_of_the_full_resize() {
        let m = Map::from_vec(2, 5, 7, (0..70).map(|v| ((v * 37) % 11) as f32).collect());
        let full = resize_bilinear(&m, 9, 13);
        let win = resize_window(&m, (9, 13), (3, 4), (5, 6));
        for c in 0..2 {
            for y in 0..5 {
                for x in 0..6 {
                    assert_eq!(win.get(c, y, x), full.get(c, y + 3, x + 4));
                }
            }
        }
        let f = resize_window_flow(&m, (9, 13), (3, 4), (5, 6));
        let ff = resize_flow(&m, 9, 13);
        assert_eq!(f.get(0, 2, 3), ff.get(0, 5, 7));
        assert_eq!(f.get(1, 4, 5), ff.get(1, 7, 9));
        assert!((ff.get(0, 5, 7) - full.get(0, 5, 7) * 13.0 / 7.0).abs() < 1e-5);
    }

    #[test]
    fn resize_flow_rescales_vectors() {
        let r = resize_flow(&flow_const(10, 20, 2.0, 3.0), 5, 40);
        assert_eq!((r.c, r.h, r.w), (2, 5, 40));
        assert!(r.channel(0).iter().all(|&u| u == 4.0));
        assert!(r.channel(1).iter().all(|&v| v == 1.5));
    }

    #[test]
    fn sample_bilinear_bounds_and_values() {
        let m = Map::from_vec(1, 2, 3, vec![0.0, 1.0, 2.0, 10.0, 20.0, 30.0]);
        let at = |x, y| sample_bilinear(&m, 0, x, y);
        assert_eq!(at(0.5, 0.5), Some(0.25 * (0.0 + 1.0 + 10.0 + 20.0)));
        assert_eq!(at(2.0, 1.0), Some(30.0)); // exact far corner (right/bottom edge)
        assert_eq!(at(2.0, 0.25), Some(0.75 * 2.0 + 0.25 * 30.0));
        assert_eq!(at(0.0, 0.0), Some(0.0));
        let outside = [
            (-0.01, 0.0),
            (2.01, 0.0),
            (0.0, 1.01),
            (1.0, -1e-6),
            (f32::NAN, 0.0),
        ];
        for (x, y) in outside {
            assert_eq!(at(x, y), None, "({x}, {y})");
        }
    }

    #[test]
    fn warp_backward_ramp() {
        let (h, w) = (3, 8);
        let mut m = Map::zeros(1, h, w);
        for y in 0..h {
            for x in 0..w {
                m.set(0, y, x, x as f32);
            }
        }
        let (out, mask) = warp_backward(&m, &flow_const(h, w, 1.5, 0.0));
        for y in 0..h {
            for x in 0..w {
                let inside = x as f32 + 1.5 <= (w - 1) as f32;
                assert_eq!(mask[y * w + x], inside);
                let want = if inside { x as f32 + 1.5 } else { 0.0 };
                assert!((out.get(0, y, x) - want).abs() < 1e-6, "x={x}");
            }
        }
        assert_eq!(mask.iter().filter(|&&b| b).count(), 6 * h);
    }

    #[test]
    fn occlusion_consistent_translation_only_border() {
        let (h, w, s) = (5, 7, (1.5f32, -0.5f32));
        let occ = occ_default(&flow_const(h, w, s.0, s.1), &flow_const(h, w, -s.0, -s.1));
        for y in 0..h {
            for x in 0..w {
                let oob = x as f32 + s.0 > (w - 1) as f32 || (y as f32 + s.1) < 0.0;
                assert_eq!(occ[y * w + x], oob, "({x}, {y})");
            }
        }
        assert_eq!(occ.iter().filter(|&&o| o).count(), 2 * h + (w - 2));
    }

    #[test]
    fn occlusion_zero_backward_large_forward_all_occluded() {
        let (h, w) = (4, 6);
        let occ = occ_default(&flow_const(h, w, 1.0, 1.0), &Map::zeros(2, h, w));
        // |f+b'|^2 = 2 > 0.1 * 2 + 0.5 = 0.7 everywhere in bounds; the rest is out of bounds.
        assert!(occ.iter().all(|&o| o));
    }

    #[test]
    fn occlusion_threshold_exact_boundary() {
        // f = (2, 0), b' = 0: lhs = 4, rhs = a1 * 4 + a2. Equality is not occluded.
        let (h, w) = (1, 5);
        let (f, b) = (flow_const(h, w, 2.0, 0.0), Map::zeros(2, h, w));
        let want = [false, false, false, true, true]; // x + 2 > 4 is out of bounds
        assert_eq!(occlusion_fb(&f, &b, 0.25, 3.0), want);
        assert_eq!(occlusion_fb(&f, &b, 0.25, 2.99), [true; 5]);
        // Default constants: f = (1, 0), b' = (-0.5, 0): 0.25 <= 0.1 * 1.25 + 0.5.
        let f = flow_const(1, 3, 1.0, 0.0);
        let b = flow_const(1, 3, -0.5, 0.0);
        assert_eq!(occ_default(&f, &b), [false, false, true]);
    }

    #[test]
    fn flow_stats_magnitudes_median() {
        // Magnitudes 5, 1, 10, 0, 2 -> median 2, mean 3.6, max 10.
        let fwd = row_flow(&[3.0, 0.0, 6.0, 0.0, 0.0], &[4.0, 1.0, 8.0, 0.0, -2.0]);
        let fr = Map::zeros(3, 1, 5);
        let occ = [true, false, false, false, false];
        let s = flow_stats(&fr, &fr, &fwd, &Map::zeros(2, 1, 5), &occ);
        assert_eq!((s.median_mag, s.max_mag, s.occluded_frac), (2.0, 10.0, 0.2));
        assert!((s.mean_mag - 3.6).abs() < 1e-6);
        // Even count: magnitudes 5, 1, 10, 0 -> median (1 + 5) / 2.
        let fwd4 = row_flow(&[3.0, 0.0, 6.0, 0.0], &[4.0, 1.0, 8.0, 0.0]);
        let fr4 = Map::zeros(3, 1, 4);
        let s4 = flow_stats(&fr4, &fr4, &fwd4, &Map::zeros(2, 1, 4), &[false; 4]);
        assert_eq!(s4.median_mag, 3.0);
        assert_eq!(s4.to_array()[0], s4.median_mag);
        assert_eq!(FLOW_STAT_NAMES[5], "photometric_error");
    }

    #[test]
    fn flow_stats_fb_and_photometric() {
        // Content moves right by 1 px; f2 = f1 shifted plus per-channel offsets (3, 0, -6).
        let (h, w) = (1, 4);
        let fwd = flow_const(h, w, 1.0, 0.0);
        let mut bwd = flow_const(h, w, -1.0, 0.0);
        bwd.set(0, 0, 2, -0.5); // b'(1) = bwd(2) = -0.5 -> |f + b'| = 0.5
        let (mut f1, mut f2) = (Map::zeros(3, h, w), Map::zeros(3, h, w));
        for (c, off) in [3.0, 0.0, -6.0].into_iter().enumerate() {
            for x in 0..w {
                f1.set(c, 0, x, 10.0 * x as f32 + c as f32);
                if x > 0 {
                    f2.set(c, 0, x, 10.0 * (x - 1) as f32 + c as f32 + off);
                }
            }
        }
        let occ = occ_default(&fwd, &bwd);
        assert_eq!(occ, [false, false, false, true]);
        let s = flow_stats(&f1, &f2, &fwd, &bwd, &occ);
        assert!((s.fb_error - 0.5 / 3.0).abs() < 1e-6);
        assert!((s.photometric_error - 3.0).abs() < 1e-5);
        assert_eq!(s.occluded_frac, 0.25);
    }

    #[test]
    fn color_wheel_segments() {
        let wh = color_wheel();
        assert_eq!(wh[0], [255, 0, 0]);
        assert_eq!(wh[1], [255, 17, 0]); // floor(255 / 15)
        assert_eq!(wh[15], [255, 255, 0]); // YG start
        assert_eq!(wh[21], [0, 255, 0]); // GC start
        assert_eq!(wh[25], [0, 255, 255]); // CB start
        assert_eq!(wh[36], [0, 0, 255]); // BM start
        assert_eq!(wh[49], [255, 0, 255]); // MR start
        assert_eq!(wh[54], [255, 0, 255 - 212]); // floor(255 * 5 / 6) = 212
    }

    #[test]
    fn flow_to_color_directions() {
        // Pixels: right at full magnitude, zero, down at full magnitude, right at half.
        let f = row_flow(&[4.0, 0.0, 0.0, 2.0], &[0.0, 0.0, 4.0, 0.0]);
        let rgb = flow_to_color(&f, None);
        assert_eq!(&rgb[0..3], [255, 0, 0]); // atan2(-0, -u) = -pi -> wheel[0]
        assert_eq!(&rgb[3..6], [255, 255, 255]); // zero flow is white

        // Down: fk = 0.25 * 54 = 13.5 -> mix of wheel[13] = (255, 221, 0) and wheel[14] =
        // (255, 238, 0): G = 229.5 (raised slightly by rad < 1) -> floor 229.
        assert_eq!(&rgb[6..9], [255, 229, 0]);
        // Half magnitude red: G = B = 255 * (1 - 0.5 * (1 - eps')) -> floor(127.5+) = 127.
        assert_eq!(&rgb[9..12], [255, 127, 127]);
        // Explicit max_mag: magnitude 4 over max 2 is out of range -> 0.75 * red.
        assert_eq!(&flow_to_color(&f, Some(2.0))[0..3], [191, 0, 0]);
    }

    #[test]
    fn quantize_roundtrip_and_saturation() {
        let vals: Vec<f32> = (0..2000).map(|i| (i as f32 - 1000.0) * 1.0137).collect();
        let m = Map::from_vec(2, 25, 40, vals);
        let q = quantize_flow(&m, FLOW_QUANT_SCALE);
        let d = dequantize_flow(&q, 2, 25, 40, FLOW_QUANT_SCALE);
        for (a, b) in m.data.iter().zip(&d.data) {
            assert!((a - b).abs() <= FLOW_QUANT_SCALE / 2.0 + 1e-4, "{a} vs {b}");
        }
        let big = Map::from_vec(1, 1, 4, vec![5000.0, -5000.0, 1.0 / 64.0, -1.0 / 64.0]);
        let want = [i16::MAX, i16::MIN, 1, -1]; // saturation; 0.5 step rounds away from 0
        assert_eq!(quantize_flow(&big, FLOW_QUANT_SCALE), want);
    }

    #[test]
    fn hwc_u8_roundtrip() {
        let rgb: Vec<u8> = (0..2 * 3 * 3).map(|i| (i * 14) as u8).collect();
        let m = Map::from_hwc_u8(2, 3, &rgb);
        assert_eq!(m.get(1, 0, 1), rgb[4] as f32); // pixel 1, G
        assert_eq!(m.to_hwc_u8(), rgb);
        let odd = Map::from_vec(1, 1, 3, vec![-3.0, 254.6, 300.0]);
        assert_eq!(odd.to_hwc_u8(), [0, 255, 255]);
    }

    #[test]
    fn png_roundtrip() {
        let dir = std::env::temp_dir().join(format!("flowmath_png_{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.png");
        let (w, h) = (5u32, 3u32);
        let rgb: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 256) as u8).collect();
        write_png_rgb(&path, w, h, &rgb).unwrap();
        assert!(write_png_rgb(&path, w, h, &rgb[1..]).is_err());
        let file = std::fs::File::open(&path).unwrap();
        let mut reader = png::Decoder::new(file).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!((info.width, info.height), (w, h));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        assert_eq!(&buf[..info.buffer_size()], &rgb[..]);
        let mut entries = std::fs::read_dir(&dir).unwrap();
        assert_eq!(entries.next().unwrap().unwrap().file_name(), "x.png");
        assert!(entries.next().is_none(), "temp file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
