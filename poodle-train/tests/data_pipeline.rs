//! The data pipeline end to end: synthetic stores written through the store schema (exact
//! content, invalid pairs, corrupt chunks, broken stores) and one real store made by the
//! `poodle-prep` binary.
//!
//! Synthetic pairs: frame t is a linear colour ramp, frame t+dt the same ramp moved by
//! (DX, DY) (content moves by it), forward flow (DX, DY), backward flow (-DX, -DY). Bilinear
//! resizing reproduces a linear ramp exactly away from the borders, so geometry can be checked
//! in closed form.

use candle_core::{Device, Tensor};
use poodle_common::flowmath::{resize_bilinear, sample_bilinear, Map};
use poodle_common::store::{PoodleStore, SCHEMA_VERSION};
use poodle_train::data::subcrops::crop_zero_padded;
use poodle_train::data::{AugmentConfig, Batch, Loader, LoaderConfig, PairSampling};
use poodle_train::geom::Affine;
use std::path::{Path, PathBuf};
use std::process::Command;

const H: usize = 40;
const W: usize = 72;
const OH: usize = 24;
const OW: usize = 48;
const K: usize = 3;
const S: usize = 8;
const DX: f32 = 4.0;
const DY: f32 = -2.0;

mod common;
use common::synthetic::{write_store, StoreSpec};
use common::{ort_library, prep_binary, repo, shared_data, tmpdir};

fn small_augment() -> AugmentConfig {
    let mut a = AugmentConfig {
        out_height: OH,
        out_width: OW,
        ..AugmentConfig::default()
    };
    // Windows of (36 s, 64 s), s in [0.75, 1.25], from the 40x72 stored frames.
    a.global_crop.initial_size = [36, 64];
    a.subcrops.k = K;
    a.subcrops.size = S;
    a
}

fn no_affine(mut a: AugmentConfig) -> AugmentConfig {
    a.affine.enabled = false;
    a
}

fn loader_cfg(stores: Vec<PathBuf>, augment: AugmentConfig) -> LoaderConfig {
    LoaderConfig {
        stores,
        batch_size: 2,
        workers: 2,
        prefetch: 2,
        seed: 11,
        // Every pair once per pass: the generic loader tests below count pairs per pass.
        // `passes_draw_r_pairs_per_video_visit_from_its_pool` tests the default sampling.
        sampling: PairSampling::every_pair(),
        augment,
        ..LoaderConfig::default()
    }
}

fn open(cfg: LoaderConfig) -> Loader {
    Loader::open(cfg, Device::Cpu).unwrap()
}

fn all_batches(loader: &Loader, epoch: u64) -> Vec<Batch> {
    loader.epoch(epoch).map(|b| b.unwrap()).collect()
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Sample `n` of a (N, C, H, W) tensor as a Map.
fn map_of(t: &Tensor, n: usize) -> Map {
    let (_, c, h, w) = t.dims4().unwrap();
    Map::from_vec(c, h, w, vals(&t.get(n).unwrap()))
}

fn assert_same_batches(a: &[Batch], b: &[Batch]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.meta, y.meta);
        assert_eq!(x.affines, y.affines);
        for i in 0..2 {
            assert_eq!(vals(&x.views[i]), vals(&y.views[i]));
            assert_eq!(vals(&x.flow[i]), vals(&y.flow[i]));
            assert_eq!(vals(&x.occluded[i]), vals(&y.occluded[i]));
            for r in 0..2 {
                assert_eq!(vals(&x.subcrops[i][r]), vals(&y.subcrops[i][r]));
            }
        }
    }
}

#[test]
fn flow_and_frames_stay_consistent_through_the_loader() {
    let d = tmpdir("consistent");
    write_store(&d.join("a.zarr"), &StoreSpec::default());
    let aug = no_affine(small_augment().without_colour());
    let loader = open(loader_cfg(vec![d.join("a.zarr")], aug));
    let mut checked = 0;
    for epoch in 0..3 {
        for b in all_batches(&loader, epoch) {
            assert_eq!(b.views[0].dims4().unwrap(), (2, 3, OH, OW));
            assert_eq!(b.flow[1].dims4().unwrap(), (2, 2, OH, OW));
            assert_eq!(b.occluded[0].dims4().unwrap(), (2, 1, OH, OW));
            assert_eq!(b.subcrops[1][0].dims4().unwrap(), (2 * K, 3, S, S));
            for (n, m) in b.meta.iter().enumerate() {
                let (sx, sy) = m.crop.scale(H, W, (OH, OW));
                let (sx, sy) = (sx as f32, sy as f32);
                let (f0, f1) = (map_of(&b.flow[0], n), map_of(&b.flow[1], n));
                let np = OH * OW;
                // Translation flow stays a translation, scaled by the resize factors.
                for p in 0..np {
                    assert!((f0.data[p] - DX * sx).abs() < 1e-3, "{}", f0.data[p]);
                    assert!((f0.data[np + p] - DY * sy).abs() < 1e-3);
                    assert!((f1.data[p] + DX * sx).abs() < 1e-3);
                    assert!((f1.data[np + p] + DY * sy).abs() < 1e-3);
                }
                // The same crop box in both frames: view_{t+dt}(x + flow_fwd(x)) = view_t(x).
                let (v0, v1) = (map_of(&b.views[0], n), map_of(&b.views[1], n));
                for y in 2..OH - 2 {
                    for x in 2..OW - 2 {
                        let (tx, ty) = (x as f32 + f0.get(0, y, x), y as f32 + f0.get(1, y, x));
                        if !(1.5..OW as f32 - 2.5).contains(&tx)
                            || !(1.5..OH as f32 - 2.5).contains(&ty)
                        {
                            continue;
                        }
                        for c in 0..3 {
                            let a = v0.get(c, y, x);
                            let z = sample_bilinear(&v1, c, tx, ty).unwrap();
                            assert!((a - z).abs() < 0.03, "({x},{y}) c{c}: {a} vs {z}");
                        }
                        checked += 1;
                    }
                }
                // Occlusion: the right DX stored columns of frame t are occluded; they map to
                // the crop pixels whose source lies right of W - DX - 0.5.
                let occ0 = map_of(&b.occluded[0], n);
                for x in 0..OW {
                    let src = m.crop.source(H, W, (OH, OW), x as f64, 0.0).0 as f32;
                    let edge = W as f32 - DX - 0.5;
                    if (src - edge).abs() > 1.0 {
                        let want = if src > edge { 1.0 } else { 0.0 };
                        assert_eq!(occ0.get(0, OH / 2, x), want, "x={x} src={src}");
                    }
                }
            }
        }
    }
    assert!(checked > 1000, "{checked}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn affine_views_sample_the_crop_at_a_x() {
    let d = tmpdir("affine");
    write_store(&d.join("a.zarr"), &StoreSpec::default());
    // Every augmentation component has its own RNG stream: switching the affine off leaves
    // crops and colours unchanged, so the affine-free run shows the crops behind the views.
    let with = open(loader_cfg(vec![d.join("a.zarr")], small_augment()));
    let without = open(loader_cfg(
        vec![d.join("a.zarr")],
        no_affine(small_augment()),
    ));
    let (bw, bo) = (all_batches(&with, 0), all_batches(&without, 0));
    let mut flips = 0;
    for (a, b) in bw.iter().zip(&bo) {
        assert_eq!(a.meta, b.meta);
        assert!(b.affines.iter().flatten().all(|m| *m == Affine::IDENTITY));
        for i in 0..2 {
            // Subcrops come from the crops before the affine: identical in both runs.
            for r in 0..2 {
                assert_eq!(vals(&a.subcrops[i][r]), vals(&b.subcrops[i][r]));
            }
            for n in 0..a.len() {
                let aff = a.affines[i][n];
                assert_ne!(aff, Affine::IDENTITY);
                flips += usize::from(aff.0[0] < 0.0);
                let (view, crop) = (map_of(&a.views[i], n), map_of(&b.views[i], n));
                for (x, y) in [(0, 0), (3, 5), (23, 11), (47, 23), (40, 2), (10, 20)] {
                    let (px, py) = aff.apply(x as f64, y as f64);
                    for c in 0..3 {
                        let want = sample_bilinear(&crop, c, px as f32, py as f32).unwrap_or(0.0);
                        let got = view.get(c, y, x);
                        assert!((want - got).abs() < 1e-4, "({x},{y}) c{c}: {want} vs {got}");
                    }
                }
            }
        }
    }
    assert!(flips > 0 && flips < 12, "{flips} of 12 views flipped");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn subcrops_of_each_direction_follow_its_flow_and_match_their_boxes() {
    let d = tmpdir("subcrops");
    write_store(&d.join("a.zarr"), &StoreSpec::default());
    let aug = no_affine(small_augment().without_colour());
    let loader = open(loader_cfg(vec![d.join("a.zarr")], aug));
    let (mut paired, mut total) = (0, 0);
    for epoch in 0..4 {
        for b in all_batches(&loader, epoch) {
            for (n, m) in b.meta.iter().enumerate() {
                let (sx, sy) = m.crop.scale(H, W, (OH, OW));
                // Direction 0: frame t online, flow t -> t+dt; direction 1 the reverse.
                for (dir, sign) in [(0usize, 1.0), (1, -1.0)] {
                    let pairs = &m.subcrops[dir];
                    assert_eq!(pairs.len(), K);
                    let mut cells: Vec<_> = pairs.iter().map(|p| p.cell).collect();
                    cells.sort();
                    cells.dedup();
                    assert_eq!(cells.len(), K, "grid cells are distinct");
                    let flow = (sign * DX as f64 * sx, sign * DY as f64 * sy);
                    let online_view = map_of(&b.views[dir], n);
                    let target_view = map_of(&b.views[1 - dir], n);
                    for (k, p) in pairs.iter().enumerate() {
                        total += 1;
                        let (o, t) = (p.online_centre, p.target_centre);
                        if p.paired {
                            paired += 1;
                            let ex = t.0 as f64 - o.0 as f64 - flow.0;
                            let ey = t.1 as f64 - o.1 as f64 - flow.1;
                            assert!(ex.abs() <= 0.1 * OW as f64 + 0.5, "{p:?} {flow:?}");
                            assert!(ey.abs() <= 0.1 * OH as f64 + 0.5, "{p:?} {flow:?}");
                        } else {
                            assert_eq!(o, t);
                        }
                        // Each subcrop is its box of the (affine-free) view, resized; an
                        // unpaired target is cut from the online view.
                        let target_src = if p.paired { &target_view } else { &online_view };
                        for (role, src) in [(0, &online_view), (1, target_src)] {
                            let bx = p.boxes[role];
                            let want = resize_bilinear(&crop_zero_padded(src, &bx), S, S);
                            let got = map_of(&b.subcrops[dir][role], n * K + k);
                            for (u, v) in want.data.iter().zip(&got.data) {
                                assert!((u - v).abs() < 1e-5);
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(paired * 10 > total * 7, "{paired} of {total} paired");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn same_seed_gives_identical_batches_for_any_worker_count() {
    let d = tmpdir("determinism");
    write_store(
        &d.join("a.zarr"),
        &StoreSpec {
            pairs: 9,
            ..StoreSpec::default()
        },
    );
    let cfg = |workers, prefetch| LoaderConfig {
        workers,
        prefetch,
        drop_last: false,
        ..loader_cfg(vec![d.join("a.zarr")], small_augment())
    };
    let base = open(cfg(0, 1));
    for epoch in [0, 1] {
        let reference = all_batches(&base, epoch);
        assert_eq!(reference.len(), 5);
        assert_eq!(reference[4].len(), 1, "the short last batch is kept");
        for (workers, prefetch) in [(1, 1), (3, 2), (4, 8)] {
            let other = open(cfg(workers, prefetch));
            assert_same_batches(&reference, &all_batches(&other, epoch));
        }
    }
    // Another seed gives other batches.
    let other_seed = open(LoaderConfig {
        seed: 12,
        ..cfg(2, 2)
    });
    let a = all_batches(&base, 0);
    let b = all_batches(&other_seed, 0);
    assert_ne!(vals(&a[0].views[0]), vals(&b[0].views[0]));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn epochs_reshuffle_and_cover_every_valid_pair_once() {
    let d = tmpdir("epochs");
    write_store(
        &d.join("a.zarr"),
        &StoreSpec {
            pairs: 12,
            per_shard: 4,
            ..StoreSpec::default()
        },
    );
    let loader = open(LoaderConfig {
        drop_last: false,
        ..loader_cfg(vec![d.join("a.zarr")], small_augment())
    });
    let order = |e| -> Vec<usize> {
        all_batches(&loader, e)
            .iter()
            .flat_map(|b| b.meta.iter().map(|m| m.pair).collect::<Vec<_>>())
            .collect()
    };
    let (o0, o1) = (order(0), order(1));
    assert_ne!(o0, o1, "epoch 1 reshuffles");
    assert_eq!(o0, order(0), "an epoch replays identically");
    for o in [&o0, &o1] {
        let mut s = o.clone();
        s.sort();
        assert_eq!(s, (0..12).collect::<Vec<_>>());
    }
    let expected: Vec<usize> = loader.epoch_order(1).iter().map(|(_, i)| *i).collect();
    assert_eq!(o1, expected);
    // Pairs of different shards mix within the first batches.
    let shards: std::collections::BTreeSet<usize> = o0[..4].iter().map(|i| i / 4).collect();
    assert!(shards.len() > 1 || o1[..4].iter().any(|i| i / 4 != o1[0] / 4));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn passes_draw_r_pairs_per_video_visit_from_its_pool() {
    // Two parts of one job: pairs alternate between videos a.mp4 and b.mp4 (same root), so
    // each video's pool spans both stores: 2 x 6 = 12 pairs per video; pair 4 of the first
    // part (video a) is invalid.
    let d = tmpdir("pools");
    let valid: Vec<bool> = (0..12).map(|i| i != 4).collect();
    for (name, offset, valid) in [("p0.zarr", 20.0, &valid[..]), ("p1.zarr", 30.0, &[][..])] {
        let spec = StoreSpec {
            pairs: 12,
            per_shard: 4,
            valid,
            offset,
            ..StoreSpec::default()
        };
        write_store(&d.join(name), &spec);
    }
    let cfg = LoaderConfig {
        sampling: PairSampling::default(),
        ..loader_cfg(vec![d.clone()], no_affine(small_augment().without_colour()))
    };
    let loader = open(cfg);
    let s = loader.summary();
    assert_eq!((s.units, s.pool_min, s.pool_max), (2, 11, 12), "{s}");
    assert_eq!(
        (s.pairs_per_visit, s.pairs_per_pass, s.epochs_per_pass),
        (2, 4, 2)
    );
    assert_eq!(s.batches_per_epoch, 2);
    let video_of = |m: &poodle_train::data::SampleMeta| m.video.clone();
    let mut seen: std::collections::HashMap<String, Vec<(PathBuf, usize)>> = Default::default();
    for pass in 0..6 {
        let batches = all_batches(&loader, pass);
        assert_eq!(batches.len(), 2);
        for b in &batches {
            // A batch of 2 is one visit: both pairs from the same video, different pairs.
            assert_eq!(video_of(&b.meta[0]), video_of(&b.meta[1]), "pass {pass}");
            assert_ne!(
                (&b.meta[0].store, b.meta[0].pair),
                (&b.meta[1].store, b.meta[1].pair)
            );
            for m in &b.meta {
                assert!(
                    !(m.store.ends_with("p0.zarr") && m.pair == 4),
                    "invalid pair used"
                );
                seen.entry(video_of(m))
                    .or_default()
                    .push((m.store.clone(), m.pair));
            }
        }
    }
    // 6 passes x 2 draws = 12 draws per video: the first 11 (a's pool) or 12 (b's) are
    // distinct, so no pair was reused before its pool was used up; both stores contribute.
    for (video, draws) in &seen {
        assert_eq!(draws.len(), 12, "{video}");
        let pool = if video == "a.mp4" { 11 } else { 12 };
        let distinct: std::collections::HashSet<_> = draws[..pool].iter().collect();
        assert_eq!(distinct.len(), pool, "{video}: {draws:?}");
        assert!(draws.iter().any(|(st, _)| st.ends_with("p0.zarr")));
        assert!(draws.iter().any(|(st, _)| st.ends_with("p1.zarr")));
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn invalid_pairs_are_skipped_and_counted() {
    let d = tmpdir("invalid");
    let valid = [true, false, true, true, false, true, true, true];
    write_store(
        &d.join("a.zarr"),
        &StoreSpec {
            pairs: 8,
            valid: &valid,
            ..StoreSpec::default()
        },
    );
    let loader = open(LoaderConfig {
        drop_last: false,
        ..loader_cfg(vec![d.join("a.zarr")], small_augment())
    });
    let s = loader.summary();
    assert_eq!((s.valid_pairs, s.invalid_skipped), (6, 2));
    assert_eq!(s.stores[0].invalid, 2);
    assert!(s.to_string().contains("2 invalid pairs skipped"), "{s}");
    for e in 0..3 {
        let seen: Vec<usize> = all_batches(&loader, e)
            .iter()
            .flat_map(|b| b.meta.iter().map(|m| m.pair).collect::<Vec<_>>())
            .collect();
        assert_eq!(seen.len(), 6);
        assert!(!seen.contains(&1) && !seen.contains(&4), "{seen:?}");
    }
    assert_eq!(loader.stats().corrupt_reads, 0);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn two_stores_are_both_read_from_a_folder_or_a_list() {
    let d = tmpdir("two");
    let job = d.join("job");
    write_store(
        &job.join("x-part-00000-of-00002.zarr"),
        &StoreSpec::default(),
    );
    write_store(
        &job.join("x-part-00001-of-00002.zarr"),
        &StoreSpec {
            pairs: 4,
            offset: 3.0,
            ..StoreSpec::default()
        },
    );
    std::fs::create_dir_all(job.join("manifest")).unwrap(); // not a store: ignored
    let from_folder = open(loader_cfg(vec![job.clone()], small_augment()));
    let s = from_folder.summary();
    assert_eq!(s.stores.len(), 2);
    assert_eq!(s.valid_pairs, 10);
    assert_eq!(s.flow_group, "synthetic");
    let stores: std::collections::BTreeSet<PathBuf> = all_batches(&from_folder, 0)
        .iter()
        .flat_map(|b| b.meta.iter().map(|m| m.store.clone()).collect::<Vec<_>>())
        .collect();
    assert_eq!(stores.len(), 2, "{stores:?}");
    let from_list = open(loader_cfg(
        vec![
            job.join("x-part-00000-of-00002.zarr"),
            job.join("x-part-00001-of-00002.zarr"),
        ],
        small_augment(),
    ));
    assert_same_batches(&all_batches(&from_folder, 0), &all_batches(&from_list, 0));
    // Videos and times come from the right store.
    let b = all_batches(&from_folder, 0);
    for m in b.iter().flat_map(|b| b.meta.iter()) {
        assert_eq!(m.video, ["a.mp4", "b.mp4"][m.pair % 2]);
        assert_eq!((m.t, m.dt), (10 * m.pair as i64, 15));
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn prefetch_bounds_the_batches_in_flight() {
    let d = tmpdir("bound");
    write_store(
        &d.join("a.zarr"),
        &StoreSpec {
            pairs: 24,
            per_shard: 4,
            ..StoreSpec::default()
        },
    );
    for (workers, prefetch) in [(3, 2), (1, 3), (4, 4)] {
        let loader = open(LoaderConfig {
            workers,
            prefetch,
            ..loader_cfg(vec![d.join("a.zarr")], small_augment())
        });
        let mut it = loader.epoch(0);
        let mut n = 0;
        // Let the workers fill the pipeline before consuming anything: they stop at the
        // prefetch budget even though more work is left.
        let t0 = std::time::Instant::now();
        while it.buffered() < prefetch && t0.elapsed().as_secs() < 30 {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert_eq!(
            it.buffered(),
            prefetch,
            "workers fill exactly the prefetch budget"
        );
        while let Some(b) = it.next() {
            b.unwrap();
            n += 1;
            assert!(it.buffered() <= prefetch, "{} > {prefetch}", it.buffered());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        assert_eq!(n, 12);
        assert!(it.max_buffered() <= prefetch, "{}", it.max_buffered());
        assert!(it.max_buffered() <= prefetch + workers);
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn dropping_an_epoch_midway_stops_its_workers() {
    let d = tmpdir("drop");
    write_store(
        &d.join("a.zarr"),
        &StoreSpec {
            pairs: 20,
            ..StoreSpec::default()
        },
    );
    let loader = open(loader_cfg(vec![d.join("a.zarr")], small_augment()));
    let t0 = std::time::Instant::now();
    {
        let mut it = loader.epoch(0);
        it.next().unwrap().unwrap();
    }
    assert!(t0.elapsed() < std::time::Duration::from_secs(20));
    // The loader is still usable.
    assert_eq!(all_batches(&loader, 0).len(), 10);
    std::fs::remove_dir_all(d).unwrap();
}

/// Overwrites every shard file of `array` whose name ends in `shard` with garbage.
fn corrupt_shard(store: &Path, array: &str, shard: &str) -> usize {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, out)
            } else {
                out.push(p)
            }
        }
    }
    let mut files = Vec::new();
    walk(&store.join(array).join("c"), &mut files);
    let mut n = 0;
    for f in files {
        let rel = f
            .strip_prefix(store.join(array))
            .unwrap()
            .to_string_lossy()
            .into_owned();
        if rel == format!("c/{shard}/0/0/0/0") || rel == format!("c/{shard}/0/0/0") {
            let len = std::fs::metadata(&f).unwrap().len() as usize;
            std::fs::write(&f, vec![0xa5u8; len]).unwrap();
            n += 1;
        }
    }
    n
}

#[test]
fn a_corrupt_chunk_is_skipped_counted_and_reported() {
    let d = tmpdir("corrupt");
    let store = d.join("a.zarr");
    write_store(
        &store,
        &StoreSpec {
            pairs: 8,
            ..StoreSpec::default()
        },
    );
    // Shard 1 of the frames holds pairs 2 and 3; shard 3 of the backward flow pairs 6, 7.
    assert_eq!(corrupt_shard(&store, "frames", "1"), 1);
    assert_eq!(corrupt_shard(&store, "flow/synthetic/backward", "3"), 1);
    let cfg = |workers| LoaderConfig {
        workers,
        ..loader_cfg(vec![store.clone()], small_augment())
    };
    let loader = open(cfg(2));
    let batches = all_batches(&loader, 0);
    assert_eq!(batches.len(), 4);
    for b in &batches {
        assert_eq!(b.len(), 2, "unreadable pairs are replaced by readable ones");
        for m in &b.meta {
            assert!(
                ![2, 3, 6, 7].contains(&m.pair),
                "pair {} is corrupt",
                m.pair
            );
        }
    }
    let st = loader.stats();
    assert_eq!(st.bad_pairs_count, 4, "{st:?}");
    assert!(st.corrupt_reads >= 4);
    assert_eq!(st.replaced, 4);
    assert_eq!(st.dropped, 0);
    for (p, i, msg) in &st.bad_pairs {
        assert_eq!(p, &store);
        assert!([2, 3, 6, 7].contains(i));
        assert!(msg.contains("a.zarr"), "the message names the store: {msg}");
    }
    // Still deterministic for another worker count.
    assert_same_batches(&batches, &all_batches(&open(cfg(0)), 0));
    std::fs::remove_dir_all(d).unwrap();
}

fn open_err(cfg: LoaderConfig) -> String {
    match Loader::open(cfg, Device::Cpu) {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn broken_stores_are_errors_that_name_the_store() {
    let d = tmpdir("broken");
    let good = d.join("good.zarr");
    write_store(&good, &StoreSpec::default());
    let cfg = |p: &Path| loader_cfg(vec![p.to_path_buf()], small_augment());

    // Unknown flow group, by name; a named group is used.
    let e = open_err(LoaderConfig {
        flow_group: Some("raft_large".into()),
        ..cfg(&good)
    });
    assert!(e.contains("good.zarr") && e.contains("raft_large"), "{e}");
    let ok = open(LoaderConfig {
        flow_group: Some("synthetic".into()),
        ..cfg(&good)
    });
    assert_eq!(ok.summary().flow_group, "synthetic");

    // No backward flow.
    let nb = d.join("nobackward.zarr");
    write_store(
        &nb,
        &StoreSpec {
            backward: false,
            ..StoreSpec::default()
        },
    );
    let e = open_err(cfg(&nb));
    assert!(
        e.contains("nobackward.zarr") && e.contains("backward"),
        "{e}"
    );

    // A missing array.
    let missing = d.join("missing.zarr");
    write_store(&missing, &StoreSpec::default());
    std::fs::remove_file(missing.join("frames/zarr.json")).unwrap();
    let e = open_err(cfg(&missing));
    assert!(e.contains("missing.zarr") && e.contains("frames"), "{e}");
    let missing_flow = d.join("missingflow.zarr");
    write_store(&missing_flow, &StoreSpec::default());
    std::fs::remove_file(missing_flow.join("flow/synthetic/occlusion_backward/zarr.json")).unwrap();
    let e = open_err(cfg(&missing_flow));
    assert!(
        e.contains("missingflow.zarr") && e.contains("occlusion_backward"),
        "{e}"
    );

    // An unknown schema version.
    let future = d.join("future.zarr");
    write_store(&future, &StoreSpec::default());
    let meta = future.join("zarr.json");
    let text = std::fs::read_to_string(&meta).unwrap();
    let text = text.replace(
        &format!("\"schema_version\": {SCHEMA_VERSION}"),
        "\"schema_version\": 99",
    );
    assert!(text.contains("99"));
    std::fs::write(&meta, text).unwrap();
    let e = open_err(cfg(&future));
    assert!(e.contains("future.zarr") && e.contains("schema"), "{e}");

    // In a folder of parts, the bad part is named.
    let job = d.join("job");
    write_store(&job.join("p0.zarr"), &StoreSpec::default());
    write_store(
        &job.join("p1.zarr"),
        &StoreSpec {
            group: "other",
            ..StoreSpec::default()
        },
    );
    let e = open_err(cfg(&job));
    assert!(e.contains("p1.zarr") && e.contains("synthetic"), "{e}");

    // Not a store at all, and a folder without stores.
    let e = open_err(cfg(&d.join("nothing")));
    assert!(e.contains("nothing"), "{e}");
    std::fs::create_dir_all(d.join("empty")).unwrap();
    let e = open_err(cfg(&d.join("empty")));
    assert!(e.contains("empty") && e.contains("*.zarr"), "{e}");

    // Too few pairs for one batch.
    let e = open_err(LoaderConfig {
        batch_size: 100,
        ..cfg(&good)
    });
    assert!(e.contains("not one batch"), "{e}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn a_real_prep_job_streams_through_the_loader() {
    let Some(videos) = shared_data("video") else {
        return;
    };
    let Some(ort) = ort_library() else { return };
    let Some(bin) = prep_binary() else { return };
    let d = tmpdir("prep");
    let cfg = d.join("tiny.json");
    let json = serde_json::json!({
        "name": "tiny", "layout": {"kind": "folder", "extensions": ["mp4"]},
        "sampling": {"kind": "per_video", "pairs_per_video": 3, "dt_min": 15, "dt_max": 30},
        "height": 128, "width": 224, "pairs_per_shard": 2, "seed": 4
    });
    std::fs::write(&cfg, serde_json::to_vec(&json).unwrap()).unwrap();
    let out = d.join("out");
    for part in ["0", "1"] {
        let o = Command::new(&bin)
            .current_dir(repo())
            .arg("prep")
            .arg("--config")
            .arg(&cfg)
            .arg("--root")
            .arg(&videos)
            .arg("--out")
            .arg(&out)
            .args(["--quiet", "--batch-size", "2", "--flow-threads", "2"])
            .args(["--part-index", part, "--num-parts", "2"])
            .env("ORT_DYLIB_PATH", &ort)
            .env_remove("SLURM_ARRAY_TASK_ID")
            .env_remove("SLURM_ARRAY_TASK_COUNT")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let mut aug = AugmentConfig {
        out_height: 64,
        out_width: 128,
        ..AugmentConfig::default()
    };
    aug.global_crop.initial_size = [135, 240];
    aug.subcrops.k = 2;
    aug.subcrops.size = 32;
    let loader = open(LoaderConfig {
        stores: vec![out.clone()],
        batch_size: 2,
        workers: 2,
        prefetch: 2,
        seed: 3,
        drop_last: false,
        augment: aug,
        ..LoaderConfig::default()
    });
    let s = loader.summary();
    assert_eq!(s.stores.len(), 2, "{s}");
    assert_eq!(s.valid_pairs + s.invalid_skipped, 6);
    let mut seen = std::collections::BTreeSet::new();
    for b in all_batches(&loader, 0) {
        assert!(b.wait.as_secs() < 60);
        assert_eq!(b.subcrops[0][0].dims4().unwrap(), (2 * b.len(), 3, 32, 32));
        for t in b
            .views
            .iter()
            .chain(&b.flow)
            .chain(b.subcrops.iter().flatten())
        {
            assert!(vals(t).iter().all(|v| v.is_finite()));
        }
        for (n, m) in b.meta.iter().enumerate() {
            seen.insert(m.store.clone());
            // The batch's flow is the stored flow cropped at the recorded box and rescaled.
            let store = PoodleStore::open(&m.store).unwrap();
            let (g, _) = store.flow_group(None).unwrap();
            let rec = store.read_flow(g, m.pair).unwrap();
            let geo = store.attrs.geometry;
            for (i, f) in [rec.forward, rec.backward.unwrap()].into_iter().enumerate() {
                let want = m
                    .crop
                    .flow(&Map::from_vec(2, geo.height, geo.width, f), (64, 128));
                let got = map_of(&b.flow[i], n);
                for (u, v) in want.data.iter().zip(&got.data) {
                    assert!((u - v).abs() < 1e-4);
                }
            }
            let pair = store.read_pair(m.pair).unwrap();
            assert_eq!((pair.t, pair.dt), (m.t, m.dt));
            assert_eq!(store.attrs.videos[pair.video as usize], m.video);
        }
    }
    assert_eq!(seen.len(), 2, "both parts are read: {seen:?}");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn no_subcrops_gives_empty_subcrop_tensors() {
    let d = tmpdir("k0");
    write_store(&d.join("a.zarr"), &StoreSpec::default());
    let mut aug = small_augment();
    aug.subcrops.k = 0; // the paper's K = 0 ablation
    let loader = open(loader_cfg(vec![d.join("a.zarr")], aug));
    for b in all_batches(&loader, 0) {
        assert_eq!(b.subcrops[0][1].dims4().unwrap(), (0, 3, S, S));
        assert!(b
            .meta
            .iter()
            .all(|m| m.subcrops.iter().all(|s| s.is_empty())));
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn ranks_share_each_global_batch_as_distributed_sampler() {
    use poodle_train::data::loader::Shard;
    let d = tmpdir("shards");
    write_store(
        &d.join("a.zarr"),
        &StoreSpec {
            pairs: 13,
            per_shard: 4,
            ..StoreSpec::default()
        },
    );
    let cfg = |batch_size, shard| LoaderConfig {
        batch_size,
        shard,
        ..loader_cfg(vec![d.join("a.zarr")], small_augment())
    };
    let whole = open(cfg(4, Shard::default()));
    let ranks: Vec<Loader> = (0..2)
        .map(|rank| open(cfg(2, Shard { rank, world: 2 })))
        .collect();
    // 13 pairs: 3 global batches of 4 (drop_last), the same count on every rank.
    assert_eq!(whole.batches_per_epoch(), 3);
    assert!(ranks.iter().all(|r| r.batches_per_epoch() == 3));
    for epoch in [0, 1] {
        let w = all_batches(&whole, epoch);
        let parts: Vec<Vec<Batch>> = ranks.iter().map(|r| all_batches(r, epoch)).collect();
        for (b, wb) in w.iter().enumerate() {
            for (rank, part) in parts.iter().enumerate() {
                let pb = &part[b];
                // Rank r takes positions r, r + 2 of the global batch: strided as
                // DistributedSampler, and each pair exactly as the one-process batch holds it.
                let pos: Vec<usize> = pb.meta.iter().map(|m| m.position).collect();
                assert_eq!(pos, vec![4 * b + rank, 4 * b + rank + 2]);
                for (i, m) in pb.meta.iter().enumerate() {
                    let j = m.position - 4 * b;
                    assert_eq!(wb.meta[j].pair, m.pair);
                    let one = |t: &Tensor, k: usize| vals(&t.get(k).unwrap());
                    assert_eq!(one(&pb.views[0], i), one(&wb.views[0], j));
                    assert_eq!(one(&pb.flow[0], i), one(&wb.flow[0], j));
                }
            }
        }
    }
    let e = Loader::open(cfg(2, Shard { rank: 2, world: 2 }), Device::Cpu)
        .err()
        .unwrap();
    assert!(e.to_string().contains("rank 2 of world size 2"), "{e}");
    std::fs::remove_dir_all(d).unwrap();
}
