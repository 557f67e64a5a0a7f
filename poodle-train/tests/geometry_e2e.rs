//! Geometry end to end: synthetic stores whose frame t+dt is frame t moved by a known
//! translation or rotation (exact flow and occlusion), batches from the real [`Loader`] with
//! the real augmentations, fed to the real dense loss with the augmented views themselves as
//! the feature maps. When every convention (flow sign, affine direction, flip, crop geometry,
//! which affine belongs to which branch) agrees, the views line up and the loss is near zero;
//! negating the flow or swapping the affines must make it at least 10x larger. The same
//! stores check that paired subcrop centres show the same content.

mod common;

use candle_core::{Device, Tensor};
use common::synthetic::{write_store, Motion, StoreSpec};
use common::tmpdir;
use poodle_train::data::augment::{IMAGENET_MEAN, IMAGENET_STD};
use poodle_train::data::crop::GlobalCropMode;
use poodle_train::data::{AugmentConfig, Batch, Loader, LoaderConfig, PairSampling};
use poodle_train::loss::dense::{dense_loss, Correspondence, TargetOrder};
use std::path::Path;

const SH: usize = 60;
const SW: usize = 108;
const OH: usize = 32;
const OW: usize = 64;

/// Smooth texture: every neighbourhood differs, bilinear resampling is nearly exact.
fn texture(c: usize, x: f32, y: f32, off: f32) -> f32 {
    let c = c as f32;
    128.0
        + 50.0 * (0.35 * x + 1.3 * c + 0.01 * off).sin()
        + 40.0 * (0.45 * y + 0.7 * c).sin()
        + 20.0 * (0.21 * (x + y) + c).sin()
}

fn store(dir: &Path, motion: Motion) -> std::path::PathBuf {
    let p = dir.join("s.zarr");
    write_store(
        &p,
        &StoreSpec {
            h: SH,
            w: SW,
            pairs: 4,
            motion,
            pattern: texture,
            ..StoreSpec::default()
        },
    );
    p
}

fn augment(affine: bool) -> AugmentConfig {
    let mut a = AugmentConfig {
        out_height: OH,
        out_width: OW,
        ..AugmentConfig::default()
    }
    .without_colour();
    a.global_crop.mode = GlobalCropMode::ScaleThenCrop;
    a.global_crop.initial_size = [48, 96];
    a.affine.enabled = affine;
    a.subcrops.k = 3;
    a.subcrops.size = 8;
    a.subcrops.jitter = 0.0;
    a
}

fn batches(store: &Path, affine: bool) -> Vec<Batch> {
    let loader = Loader::open(
        LoaderConfig {
            stores: vec![store.to_path_buf()],
            batch_size: 4,
            workers: 1,
            prefetch: 1,
            seed: 5,
            drop_last: false,
            sampling: PairSampling::every_pair(),
            augment: augment(affine),
            ..LoaderConfig::default()
        },
        Device::Cpu,
    )
    .unwrap();
    (0..3)
        .flat_map(|e| loader.epoch(e).map(|b| b.unwrap()).collect::<Vec<_>>())
        .collect()
}

/// What the loss is asked to do wrong, if anything.
#[derive(Clone, Copy, PartialEq)]
enum Variant {
    True,
    NegatedFlow,
    SwappedAffines,
}

/// Mean over batches and both directions of the dense loss with views as features.
fn loss(bs: &[Batch], order: TargetOrder, v: Variant) -> (f32, f32) {
    let (mut sum, mut mask, mut n) = (0.0, 0.0, 0.0);
    for b in bs {
        for d in 0..2 {
            let flow = if v == Variant::NegatedFlow {
                b.flow[d].neg().unwrap()
            } else {
                b.flow[d].clone()
            };
            let (a_on, a_tg) = if v == Variant::SwappedAffines {
                (&b.target_affines[1 - d], &b.affines[d])
            } else {
                (&b.affines[d], &b.target_affines[1 - d])
            };
            let c = Correspondence {
                a_online: a_on,
                a_target: a_tg,
                flow: &flow,
                occluded: &b.occluded[d],
                crop: (OH, OW),
                order,
            };
            let (l, st) = dense_loss(&b.views[d], &b.target_views[1 - d], &c).unwrap();
            sum += l.to_scalar::<f32>().unwrap();
            mask += st.mask_fraction;
            n += 1.0;
        }
    }
    (sum / n, mask / n)
}

fn check_motion(motion: Motion, tag: &str) {
    let d = tmpdir(tag);
    let s = store(&d, motion);
    // Without the affine both orders are the same computation.
    let plain = batches(&s, false);
    for order in [TargetOrder::Authors, TargetOrder::Paper] {
        let (good, mask) = loss(&plain, order, Variant::True);
        let (bad, _) = loss(&plain, order, Variant::NegatedFlow);
        println!(
            "{tag} no affine {order:?}: loss {good:.5} (mask {mask:.2}), negated flow {bad:.5}"
        );
        assert!(mask > 0.5, "{tag}: mask fraction {mask}");
        assert!(
            good < 0.01,
            "{tag} {order:?}: aligned views give loss {good}"
        );
        assert!(
            bad > 10.0 * good,
            "{tag} {order:?}: negated flow {bad} vs {good}"
        );
    }
    // With the affine (rotation, scale, flip per view and role): the paper's order undoes
    // the affine exactly; the authors' order (warp in view coordinates) is near but not on.
    let aff = batches(&s, true);
    let (good, mask) = loss(&aff, TargetOrder::Paper, Variant::True);
    let (neg, _) = loss(&aff, TargetOrder::Paper, Variant::NegatedFlow);
    let (swap, _) = loss(&aff, TargetOrder::Paper, Variant::SwappedAffines);
    let (authors, _) = loss(&aff, TargetOrder::Authors, Variant::True);
    println!(
        "{tag} affine: paper {good:.5} (mask {mask:.2}), negated flow {neg:.5}, swapped \
         affines {swap:.5}; authors' order {authors:.5}"
    );
    assert!(mask > 0.3, "{tag}: mask fraction {mask}");
    assert!(good < 0.01, "{tag}: aligned views give loss {good}");
    assert!(neg > 10.0 * good, "{tag}: negated flow {neg} vs {good}");
    assert!(
        swap > 10.0 * good,
        "{tag}: swapped affines {swap} vs {good}"
    );
    assert!(
        authors < neg,
        "{tag}: the authors' order {authors} vs misaligned {neg}"
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn translated_frames_line_up_through_loader_and_loss() {
    check_motion(Motion::Translate(5.0, -3.0), "geom-translate");
}

#[test]
fn rotated_frames_line_up_through_loader_and_loss() {
    check_motion(Motion::Rotate(4.0), "geom-rotate");
}

fn value(t: &Tensor, n: usize, c: usize, x: usize, y: usize) -> f32 {
    t.get(n)
        .and_then(|s| s.get(c))
        .and_then(|s| s.get(y))
        .and_then(|s| s.get(x))
        .and_then(|s| s.to_scalar::<f32>())
        .unwrap()
}

#[test]
fn paired_subcrop_centres_show_the_same_content() {
    let d = tmpdir("geom-subcrops");
    let s = store(&d, Motion::Translate(5.0, -3.0));
    let (mut err, mut base, mut n) = (0.0f32, 0.0f32, 0usize);
    for b in batches(&s, false) {
        for (i, m) in b.meta.iter().enumerate() {
            for dir in 0..2 {
                for (k, p) in m.subcrops[dir].iter().enumerate().filter(|(_, p)| p.paired) {
                    let (o, t) = (p.online_centre, p.target_centre);
                    // Another pair's target centre: what an unrelated position differs by.
                    let other = m.subcrops[dir][(k + 1) % m.subcrops[dir].len()].target_centre;
                    for c in 0..3 {
                        let v = value(&b.views[dir], i, c, o.0, o.1);
                        err += (v - value(&b.views[1 - dir], i, c, t.0, t.1)).abs();
                        base += (v - value(&b.views[1 - dir], i, c, other.0, other.1)).abs();
                        n += 1;
                    }
                }
            }
        }
    }
    let (err, base) = (err / n as f32, base / n as f32);
    println!("paired centres: mean |diff| {err:.4}, unrelated positions {base:.4} ({n} values)");
    assert!(n > 50, "{n}");
    // Rounding the target centre to whole pixels costs up to half a pixel of the texture.
    assert!(err < 0.2, "paired centres differ by {err}");
    assert!(base > 4.0 * err, "{base} vs {err}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn the_picture_of_a_pair_shows_warped_target_and_online_view_lined_up() {
    let d = tmpdir("geom-picture");
    let s = store(&d, Motion::Translate(5.0, -3.0));
    let loader = Loader::open(
        LoaderConfig {
            stores: vec![s.clone()],
            batch_size: 4,
            workers: 0,
            seed: 5,
            drop_last: false,
            sampling: PairSampling::every_pair(),
            augment: augment(true),
            ..LoaderConfig::default()
        },
        Device::Cpu,
    )
    .unwrap();
    // `augmented` is the pair the batch holds at that position.
    let (a, meta) = loader.augmented(0, 0).unwrap();
    let b = loader.epoch(0).next().unwrap().unwrap();
    assert_eq!(meta, b.meta[0]);
    let first: Vec<f32> = b.views[0]
        .get(0)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(first, a.views[0].data);
    let (mean, std) = (IMAGENET_MEAN, IMAGENET_STD);
    let (w, h, rgb) =
        poodle_train::pictures::pair_picture(&a, TargetOrder::Paper, mean, std).unwrap();
    assert_eq!((w, h), (3 * OW + 8, 3 * OH + 8));
    // Panel (row 0, col 2) is the mask, (row 2, col 2) the masked difference of the aligned
    // views: mostly counted, and dark where counted (no colour augmentation here).
    let panel = |r: usize, c: usize| {
        let (ox, oy) = (c * (OW + 4), r * (OH + 4));
        (0..OH * OW)
            .map(|p| rgb[3 * ((oy + p / OW) * w + ox + p % OW)])
            .collect::<Vec<u8>>()
    };
    let (mask, diff) = (panel(0, 2), panel(2, 2));
    let counted: Vec<usize> = (0..mask.len()).filter(|&p| mask[p] == 255).collect();
    assert!(
        counted.len() * 2 > mask.len(),
        "{} of {} counted",
        counted.len(),
        mask.len()
    );
    let mean = counted.iter().map(|&p| f64::from(diff[p])).sum::<f64>() / counted.len() as f64;
    assert!(
        mean < 6.0,
        "aligned views differ by {mean} levels on average"
    );
    std::fs::remove_dir_all(d).unwrap();
}
