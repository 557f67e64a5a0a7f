//! Synthetic stores with exact content, written through `poodle_common::store` (the schema
//! poodle-prep writes): frame t+dt is frame t moved by a known [`Motion`], with the exact
//! forward and backward flow and the occlusion that motion implies (a pixel whose motion
//! leaves the frame is occluded).

use poodle_common::config::{DatasetConfig, Layout, Sampling};
use poodle_common::flowmath::{FLOW_QUANT_SCALE, FLOW_STAT_NAMES};
use poodle_common::store::{Codecs, FlowAttrs, Geometry, StoreArrays, StoreAttrs, SCHEMA_VERSION};
use std::path::Path;

/// How frame t's content moves to frame t+dt.
#[derive(Clone, Copy, Debug)]
pub enum Motion {
    /// By `(dx, dy)` pixels.
    Translate(f32, f32),
    /// By `deg` degrees about the frame centre ((w-1)/2, (h-1)/2).
    Rotate(f64),
}

impl Motion {
    /// Where frame t's pixel `(x, y)` is in frame t+dt.
    pub fn forward(&self, x: f32, y: f32, h: usize, w: usize) -> (f32, f32) {
        self.apply(x, y, h, w, 1.0)
    }
    /// Where frame t+dt's pixel `(x, y)` was in frame t.
    pub fn backward(&self, x: f32, y: f32, h: usize, w: usize) -> (f32, f32) {
        self.apply(x, y, h, w, -1.0)
    }
    fn apply(&self, x: f32, y: f32, h: usize, w: usize, sign: f32) -> (f32, f32) {
        match *self {
            Motion::Translate(dx, dy) => (x + sign * dx, y + sign * dy),
            Motion::Rotate(deg) => {
                let (cx, cy) = ((w as f64 - 1.0) / 2.0, (h as f64 - 1.0) / 2.0);
                let (s, c) = (f64::from(sign) * deg).to_radians().sin_cos();
                let (u, v) = (f64::from(x) - cx, f64::from(y) - cy);
                ((cx + c * u - s * v) as f32, (cy + s * u + c * v) as f32)
            }
        }
    }
}

/// Frame content: `pattern(channel, x, y, offset)` in 0..255 at frame-t coordinates.
pub type Pattern = fn(usize, f32, f32, f32) -> f32;

/// A linear colour ramp, steep in x (channel 0) and y (channel 1): bilinear resizing
/// reproduces it exactly away from the borders, and a one-pixel misregistration shows.
pub fn ramp(c: usize, x: f32, y: f32, offset: f32) -> f32 {
    [
        3.0 * x + 0.3 * y + 15.0,
        0.4 * x + 5.5 * y,
        0.5 * x + 0.5 * y + offset,
    ][c]
}

pub struct StoreSpec<'a> {
    pub h: usize,
    pub w: usize,
    pub pairs: usize,
    pub per_shard: usize,
    pub valid: &'a [bool],
    pub backward: bool,
    pub group: &'a str,
    /// Added to the pattern, so pairs and stores differ.
    pub offset: f32,
    pub motion: Motion,
    pub pattern: Pattern,
}

impl Default for StoreSpec<'_> {
    fn default() -> Self {
        StoreSpec {
            h: 40,
            w: 72,
            pairs: 6,
            per_shard: 2,
            valid: &[],
            backward: true,
            group: "synthetic",
            offset: 0.0,
            motion: Motion::Translate(4.0, -2.0),
            pattern: ramp,
        }
    }
}

/// Writes a finished store.
pub fn write_store(path: &Path, spec: &StoreSpec) {
    let (h, w) = (spec.h, spec.w);
    let g = Geometry {
        num_pairs: spec.pairs,
        height: h,
        width: w,
        pairs_per_shard: spec.per_shard,
    };
    let arrays = StoreArrays::new(path, g, Codecs::default()).unwrap();
    let fa = arrays
        .flow_arrays(spec.group, spec.backward, Codecs::default())
        .unwrap();
    let n = h * w;
    let q = |v: f32| (v / FLOW_QUANT_SCALE).round() as i16;
    let inside =
        |(x, y): (f32, f32)| x >= 0.0 && y >= 0.0 && x <= (w - 1) as f32 && y <= (h - 1) as f32;
    let pixels = || (0..n).map(|p| ((p % w) as f32, (p / w) as f32));
    // One flow field for every pair: (u plane, v plane) from a motion direction.
    let field = |dir: &dyn Fn(f32, f32) -> (f32, f32)| {
        let moved: Vec<(f32, f32)> = pixels().map(|(x, y)| dir(x, y)).collect();
        let u = pixels().zip(&moved).map(|((x, _), m)| q(m.0 - x));
        let v = pixels().zip(&moved).map(|((_, y), m)| q(m.1 - y));
        let occ: Vec<bool> = moved.iter().map(|&m| !inside(m)).collect();
        (u.chain(v).collect::<Vec<i16>>(), occ)
    };
    let (fwd1, occ1) = field(&|x, y| spec.motion.forward(x, y, h, w));
    let (bwd1, occ_b1) = field(&|x, y| spec.motion.backward(x, y, h, w));
    for k in 0..g.num_shards() {
        let range = g.shard_pairs(k);
        let (mut frames, mut pairs, mut valid) = (Vec::new(), Vec::new(), Vec::new());
        let (mut fwd, mut bwd, mut occ, mut occ_b, mut stats) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in range {
            let off = spec.offset + (10 * i % 150) as f32;
            for f in 0..2 {
                for c in 0..3 {
                    for (x, y) in pixels() {
                        let (sx, sy) = if f == 0 {
                            (x, y)
                        } else {
                            spec.motion.backward(x, y, h, w)
                        };
                        frames.push((spec.pattern)(c, sx, sy, off).round().clamp(0.0, 255.0) as u8);
                    }
                }
            }
            pairs.extend([(i % 2) as i64, 10 * i as i64, 15]);
            valid.push(spec.valid.get(i).copied().unwrap_or(true));
            fwd.extend_from_slice(&fwd1);
            bwd.extend_from_slice(&bwd1);
            occ.extend_from_slice(&occ1);
            occ_b.extend_from_slice(&occ_b1);
            stats.extend([0f32; 6]);
        }
        arrays.write_shard(k, &frames, &pairs, &valid).unwrap();
        let b = spec.backward.then_some((&bwd[..], &occ_b[..]));
        arrays
            .write_flow_shard(&fa, k, &fwd, b, &occ, &stats)
            .unwrap();
    }
    arrays
        .finalize_flow(
            &fa,
            &FlowAttrs {
                model_name: spec.group.into(),
                model_sha256: "0".repeat(64),
                card: serde_json::json!({}),
                flow_scale: FLOW_QUANT_SCALE,
                backward: spec.backward,
                occlusion: "synthetic".into(),
                stat_names: FLOW_STAT_NAMES.iter().map(|s| s.to_string()).collect(),
            },
        )
        .unwrap();
    arrays
        .finalize(&StoreAttrs {
            schema_version: SCHEMA_VERSION,
            tool_version: "test".into(),
            dataset: DatasetConfig {
                name: "synthetic".into(),
                layout: Layout::Folder {
                    extensions: vec!["mp4".into()],
                },
                sampling: Sampling::PerVideo {
                    pairs_per_video: 3,
                    dt_min: 15,
                    dt_max: 15,
                },
                height: h,
                width: w,
                pairs_per_shard: spec.per_shard,
                seed: 0,
                default_root: None,
            },
            manifest_sha256: "0".repeat(64),
            part_index: 0,
            num_parts: 1,
            first_pair: 0,
            geometry: g,
            videos: vec!["a.mp4".into(), "b.mp4".into()],
            root: "/nowhere".into(),
            video_fps: vec![30.0, 30.0],
        })
        .unwrap();
}
