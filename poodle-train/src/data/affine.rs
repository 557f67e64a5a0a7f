//! The dense branch's reversible affine per view (scale, rotation, horizontal flip about the
//! crop centre; [`crate::geom::Affine`] has the convention) and the warp that applies it.

use super::Rng;
use crate::geom::Affine;
use poodle_common::flowmath::{blend, corners, Map};
use serde::{Deserialize, Serialize};

/// Dense-branch affine parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AffineConfig {
    /// false = identity (the ablation recipe).
    pub enabled: bool,
    /// Scale range ([0.9, 1.1]).
    pub scale: [f64; 2],
    /// Rotation: U(-deg, deg) degrees (10).
    pub rotation_deg: f64,
    /// Horizontal flip probability (0.5).
    pub flip_p: f64,
}

impl Default for AffineConfig {
    fn default() -> Self {
        AffineConfig {
            enabled: true,
            scale: [0.9, 1.1],
            rotation_deg: 10.0,
            flip_p: 0.5,
        }
    }
}

impl AffineConfig {
    pub fn validate(&self) -> Result<(), String> {
        let [a, b] = self.scale;
        if !(a <= b && a >= 1e-3 && b <= 1e3) {
            return Err(format!(
                "affine.scale must be an ordered range within [1e-3, 1e3], got {:?}",
                self.scale
            ));
        }
        if !(0.0..=1.0).contains(&self.flip_p) {
            return Err(format!(
                "affine.flip_p must be a probability, got {}",
                self.flip_p
            ));
        }
        Ok(())
    }
}

/// Draws the dense-branch affine of a `w` x `h` crop (identity when `enabled` is off).
pub fn sample_affine(w: usize, h: usize, cfg: &AffineConfig, rng: &mut Rng) -> Affine {
    let scale = rng.uniform_in(cfg.scale[0], cfg.scale[1]);
    let deg = rng.uniform_in(-cfg.rotation_deg, cfg.rotation_deg);
    let flip = rng.bernoulli(cfg.flip_p);
    if cfg.enabled {
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
    for y in 0..h {
        for x in 0..w {
            let (sx, sy) = a.apply(x as f64, y as f64);
            let Some(taps) = corners(h, w, sx as f32, sy as f32) else {
                continue;
            };
            for c in 0..img.c {
                out.data[c * n + y * w + x] = blend(&img.data[c * n..(c + 1) * n], &taps);
            }
        }
    }
    out
}
