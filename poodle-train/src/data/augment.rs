//! Pair augmentation (paper Section 3 and Appendix A; docs/method.md "Augmentation"), as the
//! authors apply it to frame pairs with flow:
//!
//! 1. **Global crop** ([`super::crop`]): the *same* geometry in both frames. Default (the
//!    authors' code): both frames resized to `(1080 s, 1920 s)`, `s ~ U(0.75, 1.25)`, then
//!    one `out_height x out_width` window at a uniform position; the paper-style
//!    RandomResizedCrop box is the `resized_crop` mode. Bilinear `align_corners=False`
//!    (PyTorch `F.interpolate`, no antialias). Flow in both directions is resized the same
//!    way and rescaled (`u *= sx`, `v *= sy`, output pixels per stored pixel), so it is in
//!    crop pixels: with the `align_corners=False` centre map `x_out = (x + 0.5) sx - 0.5 - x0`
//!    a displacement scales exactly by `sx`. Occlusion masks are resized bilinearly as 0/1
//!    and thresholded: occluded iff the interpolated value `>= occlusion_threshold`
//!    (default 0.5, ties count as occluded: conservative).
//! 2. **Colour** ([`super::colour`]; per frame, independent draws; all in `[0, 1]`,
//!    torchvision semantics). Default, the authors' code: `ColorJitter(0.8, 0.8, 0.8, 0.2)`
//!    with p = 0.8 (factors as `ColorJitter` draws them, ops in a random order), grayscale
//!    p = 0.2, Gaussian blur p = 0.5 on both frames with kernel `(round_up_odd(0.1 H),
//!    round_up_odd(0.1 W))` as torchvision's `(kx, ky)` ((53, 105) at 512x1024) and sigma
//!    `U(0.1, 2.0)` px, no solarize. `ColourConfig::byol()` is BYOL's recipe as the paper's
//!    Appendix A words it (blur 1.0 / 0.1 and solarize 0.0 / 0.2 for frame t / t+dt, 23 px
//!    kernel at 224 px scaled with the crop). The blur kernel is truncated at 4 sigma where
//!    that is narrower (within 1e-5 of torchvision's) and padded by reflection.
//! 3. **Normalisation**: ImageNet mean/std.
//! 4. **Subcrops** ([`super::subcrops`]): a fresh set of K pairs per direction of the
//!    symmetric loss (t online with the forward flow, t+dt online with the backward flow),
//!    cut from the normalised, colour-augmented global crops (before the affine).
//! 5. **Dense affine** (dense branch only): per frame *and role* (as the authors draw one
//!    affine for each image of the online batch and another for each image of the target
//!    batch, so frame t as online and frame t as target get different views), scale
//!    `U(affine_scale)`, rotation
//!    `U(-deg, deg)`, horizontal flip with `affine_flip_p`, as
//!    [`Affine::about_centre`]; `view(x) = crop(A x)`, bilinear, zero outside `[0, W-1] x
//!    [0, H-1]` (zero = mean colour after normalisation). `dense_affine = false` (ablation
//!    recipe) gives the identity. The affine is returned for the loss, which computes the
//!    validity masks.

use super::affine::{sample_affine, warp_affine, AffineConfig};
use super::colour::{apply_colour, normalize, sample_colour, ColourConfig, ColourParams};
use super::crop::{frame_map, GlobalCrop, GlobalCropConfig};
use super::subcrops::{self, SubcropConfig, SubcropSets};
use super::Rng;
use crate::geom::Affine;
use poodle_common::flowmath::Map;
use serde::{Deserialize, Serialize};

pub use super::colour::{IMAGENET_MEAN, IMAGENET_STD};

/// Every augmentation parameter, one sub-config per job. Defaults: the paper's BDD100K
/// recipe (docs/method.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AugmentConfig {
    /// Training crop size (paper: 512 x 1024; ablations 256 x 512).
    pub out_height: usize,
    pub out_width: usize,
    /// The global crop (same box in both frames).
    pub global_crop: GlobalCropConfig,
    /// Photometric augmentation per frame and normalisation.
    pub colour: ColourConfig,
    /// The dense branch's affine per view.
    pub affine: AffineConfig,
    /// Occlusion masks: resized bilinearly, occluded iff value >= this (0.5).
    pub occlusion_threshold: f32,
    /// Flow-informed subcrops.
    pub subcrops: SubcropConfig,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            out_height: 512,
            out_width: 1024,
            global_crop: GlobalCropConfig::default(),
            colour: ColourConfig::default(),
            affine: AffineConfig::default(),
            occlusion_threshold: 0.5,
            subcrops: SubcropConfig::default(),
        }
    }
}

impl AugmentConfig {
    /// The paper's BDD100K recipe (the default).
    pub fn bdd() -> Self {
        Self::default()
    }

    /// Walking Tours (authors' `poodle_wt.yaml`): scale range [0.535, 0.625] of 1080x1920.
    pub fn walking_tours() -> Self {
        AugmentConfig {
            global_crop: GlobalCropConfig {
                initial_scale: [0.535, 0.625],
                ..GlobalCropConfig::default()
            },
            ..Self::default()
        }
    }

    /// Ablation recipe (authors' `poodle_ablation.yaml`): 256 x 512 windows of the same
    /// scaled frames (0.040-0.112 of the frame), no dense affine.
    pub fn ablation() -> Self {
        AugmentConfig {
            out_height: 256,
            out_width: 512,
            affine: AffineConfig {
                enabled: false,
                ..AffineConfig::default()
            },
            ..Self::default()
        }
    }

    /// The same geometry without any photometric augmentation (still normalised): for tests
    /// and for checking geometry by eye.
    pub fn without_colour(self) -> Self {
        AugmentConfig {
            colour: ColourConfig {
                mean: self.colour.mean,
                std: self.colour.std,
                ..ColourConfig::none()
            },
            ..self
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.out_height == 0 || self.out_width == 0 {
            return Err("out_height and out_width must be positive".into());
        }
        self.global_crop.validate(self.out_height, self.out_width)?;
        self.colour.validate()?;
        self.affine.validate()?;
        self.subcrops.validate()
    }
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
    /// The global crop (same for both frames).
    pub crop: GlobalCrop,
    /// Normalised, colour-augmented global crops before the affine (3, H, W).
    pub crops: [Map; 2],
    /// Dense-branch online views `crops[i](affines[i] x)` (3, H, W): frame i as online.
    pub views: [Map; 2],
    pub affines: [Affine; 2],
    /// Dense-branch target views `crops[i](target_affines[i] x)`: frame i as target.
    pub target_views: [Map; 2],
    pub target_affines: [Affine; 2],
    /// [0] t -> t+dt, [1] t+dt -> t, crop pixels (2, H, W).
    pub flow: [Map; 2],
    /// [0] pixels of frame t occluded in t+dt, [1] pixels of t+dt occluded in t (H*W).
    pub occluded: [Vec<bool>; 2],
    /// Subcrop geometry per direction (boxes in crop pixels): [0] frame t online,
    /// [1] frame t+dt online.
    pub subcrop_pairs: SubcropSets,
    /// `subcrops[d][r]`: direction `d`, role `r` (0 online, 1 target), K maps (3, S, S);
    /// pair k at index k in both roles.
    pub subcrops: [[Vec<Map>; 2]; 2],
    pub colour: [ColourParams; 2],
}

/// RNG stream tags: each component draws from its own stream, so switching one augmentation
/// off does not change the draws of the others.
const TAG_CROP: u64 = 1;
const TAG_COLOUR: [u64; 2] = [2, 3];
const TAG_SUBCROPS: [u64; 2] = [4, 7];
const TAG_AFFINE: [u64; 2] = [5, 6];
const TAG_TARGET_AFFINE: [u64; 2] = [8, 9];

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
    let mut sub_rng = TAG_SUBCROPS.map(|t| rng.fork(t));
    let mut affine_rng = [rng.fork(TAG_AFFINE[0]), rng.fork(TAG_AFFINE[1])];

    let b = GlobalCrop::sample(&cfg.global_crop, h, w, (oh, ow), &mut crop_rng);

    let colour = [
        sample_colour(&cfg.colour, (oh, ow), 0, &mut colour_rng[0]),
        sample_colour(&cfg.colour, (oh, ow), 1, &mut colour_rng[1]),
    ];
    let crops: [Map; 2] = std::array::from_fn(|i| {
        let mut m = b.image(&frame_map(raw.frames, i, h, w), (oh, ow));
        apply_colour(&mut m, &colour[i], cfg.colour.solarize_threshold);
        normalize(&mut m, cfg.colour.mean, cfg.colour.std);
        m
    });
    let flow_map = |f: &[f32]| Map::from_vec(2, h, w, f.to_vec());
    let flow = [
        b.flow(&flow_map(raw.flow_fwd), (oh, ow)),
        b.flow(&flow_map(raw.flow_bwd), (oh, ow)),
    ];
    let occluded =
        [raw.occ_fwd, raw.occ_bwd].map(|o| b.mask(o, h, w, (oh, ow), cfg.occlusion_threshold));

    // Direction d: frame d online, the other frame target, flow[d] from online to target.
    let subcrop_pairs: SubcropSets = std::array::from_fn(|d| {
        subcrops::sample_subcrops(oh, ow, &flow[d], &cfg.subcrops, &mut sub_rng[d])
    });
    let subcrops = std::array::from_fn(|d| {
        let (online, target) = (&crops[d], &crops[1 - d]);
        subcrops::extract_subcrops(online, target, &subcrop_pairs[d], cfg.subcrops.size)
    });

    let affines: [Affine; 2] =
        std::array::from_fn(|i| sample_affine(ow, oh, &cfg.affine, &mut affine_rng[i]));
    let target_affines: [Affine; 2] = std::array::from_fn(|i| {
        let mut r = rng.fork(TAG_TARGET_AFFINE[i]);
        sample_affine(ow, oh, &cfg.affine, &mut r)
    });
    let views = std::array::from_fn(|i| warp_affine(&crops[i], &affines[i]));
    let target_views = std::array::from_fn(|i| warp_affine(&crops[i], &target_affines[i]));
    AugmentedPair {
        crop: b,
        crops,
        views,
        affines,
        target_views,
        target_affines,
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
    use crate::data::crop::GlobalCropMode;
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

    /// 48x96 crops; scale_then_crop from (72 s, 128 s), s in [0.75, 1.25].
    fn small_cfg() -> AugmentConfig {
        let mut cfg = AugmentConfig {
            out_height: 48,
            out_width: 96,
            ..AugmentConfig::default()
        };
        cfg.global_crop.initial_size = [72, 128];
        cfg.subcrops.size = 16;
        cfg
    }

    /// [`small_cfg`] in both global-crop modes.
    fn both_modes(cfg: AugmentConfig) -> [AugmentConfig; 2] {
        let mut boxed = cfg.clone();
        boxed.global_crop.mode = GlobalCropMode::ResizedCrop;
        [cfg, boxed]
    }

    #[test]
    fn translation_flow_stays_a_translation_scaled_by_the_resize() {
        let (dx, dy) = (6.0, -3.0);
        let s = synthetic(60, 96, dx, dy);
        for (cfg, seed) in both_modes(small_cfg().without_colour())
            .iter()
            .flat_map(|c| (0..20).map(move |seed| (c, seed)))
        {
            let a = augment_pair(&s.raw(), cfg, &mut Rng::new(seed));
            let (sx, sy) = a.crop.scale(60, 96, (48, 96));
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
        for (cfg, seed) in both_modes(small_cfg().without_colour())
            .iter()
            .flat_map(|c| (0..20).map(move |seed| (c, seed)))
        {
            let a = augment_pair(&s.raw(), cfg, &mut Rng::new(seed));
            for y in 0..48 {
                for x in 0..96 {
                    // Source position of the output pixel centre (align_corners=False).
                    let (src_x, src_y) = a.crop.source(90, 160, (48, 96), x as f64, y as f64);
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
        // The target role draws its own affines and views of the same crops.
        let a = augment_pair(&s.raw(), &cfg, &mut Rng::new(4));
        for i in 0..2 {
            assert_ne!(a.target_affines[i], a.affines[i]);
            let aff = a.target_affines[i];
            for (x, y) in [(5usize, 7usize), (47, 23), (60, 10)] {
                let (px, py) = aff.apply(x as f64, y as f64);
                let want = sample_bilinear(&a.crops[i], 0, px as f32, py as f32).unwrap_or(0.0);
                assert!((want - a.target_views[i].get(0, y, x)).abs() < 1e-5);
            }
        }
        // Ablation: identity and an exact copy.
        let mut cfg = small_cfg();
        cfg.affine.enabled = false;
        let a = augment_pair(&s.raw(), &cfg, &mut Rng::new(0));
        assert_eq!(a.affines, [Affine::IDENTITY; 2]);
        assert_eq!(a.target_affines, [Affine::IDENTITY; 2]);
        assert_eq!(a.views[0], a.crops[0]);
        assert_eq!(a.target_views[1], a.crops[1]);
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
        let mut bad = cfg;
        bad.global_crop.initial_scale = [0.2, 0.3];
        assert!(bad
            .validate()
            .unwrap_err()
            .contains("smaller than the 512x1024 crop"));
        bad.global_crop = GlobalCropConfig::resized_crop([0.5, 0.2]);
        assert!(bad.validate().unwrap_err().contains("global_crop.area"));
    }
}
