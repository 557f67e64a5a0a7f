//! Linear readout evaluation: metrics on hand-worked confusion matrices, checkpoint loading,
//! the command-line flags, and an end-to-end readout on a CamVid subset whose numbers are
//! checked against statistics this file computes on its own from the label PNGs.

use clap::Parser;
use poodle_train::checkpoint::{self, Progress};
use poodle_train::config::TrainConfig;
use poodle_train::eval::linear::{self, LinearArgs, LinearEvalConfig, LinearReport};
use poodle_train::eval::metrics::{group_miou, ClassGroups, ClassStats, Confusion};
use poodle_train::eval::DatasetKind;
use poodle_train::model::{named_vars, ModelConfig};
use poodle_train::run::Learner;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

mod common;
use common::{shared_data, tmpdir};

fn camvid() -> Option<PathBuf> {
    shared_data("camvid/trainannot").map(|p| p.parent().unwrap().to_path_buf())
}

/// This file's own label decoder: (width, height, values) of an 8-bit greyscale PNG.
fn label_png(p: &Path) -> (usize, usize, Vec<u8>) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
    let mut r = dec.read_info().unwrap();
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).unwrap();
    assert_eq!(info.color_type, png::ColorType::Grayscale);
    buf.truncate(info.buffer_size());
    (info.width as usize, info.height as usize, buf)
}

fn png_size(p: &Path) -> (u32, u32) {
    let dec = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(p).unwrap()));
    let r = dec.read_info().unwrap();
    (r.info().width, r.info().height)
}

fn sorted_pngs(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    v.sort();
    v
}

/// Per-class pixel counts (ids < 11) over label files.
fn class_counts(files: &[PathBuf]) -> [u64; 11] {
    let mut c = [0u64; 11];
    for f in files {
        for v in label_png(f).2 {
            if v < 11 {
                c[v as usize] += 1;
            }
        }
    }
    c
}

#[test]
fn metrics_on_hand_worked_confusion_matrices() {
    // gt:   0 0 0 1 1 2 2 2 | 11 (ignored)
    // pred: 0 0 1 1 2 2 2 0 |  0
    let mut c = Confusion::new(3);
    c.add(&[0, 0, 0, 1, 1, 2, 2, 2, 11], &[0, 0, 1, 1, 2, 2, 2, 0, 0]);
    // Class 0: TP 2, FP 1 (a 2 read as 0), FN 1 -> 2/4. Class 1: TP 1, FP 1, FN 1 -> 1/3.
    // Class 2: TP 2, FP 1, FN 1 -> 2/4. Accuracy 5/8.
    let iou = c.iou();
    assert!((iou[0].unwrap() - 0.5).abs() < 1e-12);
    assert!((iou[1].unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert!((iou[2].unwrap() - 0.5).abs() < 1e-12);
    assert!((c.miou() - (0.5 + 1.0 / 3.0 + 0.5) / 3.0).abs() < 1e-12);
    assert!((c.pixel_acc() - 5.0 / 8.0).abs() < 1e-12);
    assert_eq!(c.total(), 8);
    assert_eq!(c.gt_counts(), vec![3, 2, 3]);
    // Groups {0, 2} and {1}.
    assert_eq!(group_miou(&iou, &[0, 2]), Some(0.5));
    assert!((group_miou(&iou, &[1]).unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(group_miou(&iou, &[]), None);

    // Class statistics: 3 images of 4 pixels; class 0 in all, 1 in one, 2 in one.
    let imgs: [&[u8]; 3] = [&[0, 0, 0, 0], &[0, 0, 0, 1], &[0, 2, 2, 2]];
    let s = ClassStats::from_labels(3, imgs);
    let avg = [(1.0 + 0.75 + 0.25) / 3.0, 0.25 / 3.0, 0.75 / 3.0];
    for (got, want) in s.avg_pixel_share.iter().zip(avg) {
        assert!((got - want).abs() < 1e-12);
    }
    assert_eq!(s.image_share, vec![1.0, 1.0 / 3.0, 1.0 / 3.0]);
    assert_eq!(
        s.total_pixel_share,
        vec![8.0 / 12.0, 1.0 / 12.0, 3.0 / 12.0]
    );
    let g = ClassGroups::with_thresholds(&s, 0.1, 0.5);
    assert_eq!((g.small, g.large), (vec![1], vec![0, 2]));
    assert_eq!((g.rare, g.common), (vec![1, 2], vec![0]));
}

/// A tiny run folder: config.json and one checkpoint whose online and target weights differ.
fn tiny_run(dir: &Path) -> Learner {
    let cfg = TrainConfig::tiny();
    let l = Learner::new(&cfg, &candle_core::Device::Cpu).unwrap();
    // Make the online network differ from the target.
    for (name, var) in named_vars(&l.online_map) {
        if name == "backbone.conv1.weight" || name == "decoder.blocks.1.lateral.bias" {
            var.set(&var.as_tensor().affine(1.5, 0.1).unwrap()).unwrap();
        }
    }
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec(&serde_json::json!({"git_sha": "test", "config": cfg})).unwrap(),
    )
    .unwrap();
    let p = Progress {
        step: 7,
        epoch: 0,
        batch: 7,
        file: String::new(),
        config_json: String::new(),
        world_size: 1,
    };
    checkpoint::save(dir, &l.online_map, &l.target_map, HashMap::new(), p).unwrap();
    l
}

#[test]
fn checkpoint_weights_load_into_the_frozen_encoder() {
    let d = tmpdir("ckpt");
    let l = tiny_run(&d);
    let (file, step) = linear::resolve_checkpoint(&d).unwrap();
    assert_eq!(step, Some(7));
    assert_eq!(linear::resolve_checkpoint(&file).unwrap().1, Some(7));
    let model = linear::model_config_of(&d).unwrap();
    assert_eq!(model, ModelConfig::tiny());
    assert_eq!(linear::model_config_of(&file).unwrap(), model);
    let dev = candle_core::Device::Cpu;
    let x = candle_core::Tensor::randn(0f32, 1., (1, 3, 64, 96), &dev).unwrap();
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let want_online = l.online.encoder.dense_features(&x, false).unwrap();
    let want_target = l.target.dense_features(&x, false).unwrap();
    assert!(diff(&want_online, &want_target) > 1e-3, "online == target");
    let (enc, _) = linear::load_encoder(&model, Some(&file), false, 99, &dev).unwrap();
    assert_eq!(
        diff(&enc.dense_features(&x, false).unwrap(), &want_online),
        0.0
    );
    let (enc, _) = linear::load_encoder(&model, Some(&file), true, 99, &dev).unwrap();
    assert_eq!(
        diff(&enc.dense_features(&x, false).unwrap(), &want_target),
        0.0
    );
    // Scratch encoders are a function of the seed.
    let f = |seed| {
        let (e, _) = linear::load_encoder(&model, None, false, seed, &dev).unwrap();
        e.dense_features(&x, false).unwrap()
    };
    assert_eq!(diff(&f(3), &f(3)), 0.0);
    assert!(diff(&f(3), &f(4)) > 1e-3);
    // Scratch with the run's seed is the pre-training's starting point (the untouched
    // target copy here): scratch vs pre-trained is a paired comparison.
    assert_eq!(TrainConfig::tiny().seed, 0);
    assert_eq!(diff(&f(0), &want_target), 0.0);
    // Another architecture does not load silently.
    let e = linear::load_encoder(&ModelConfig::paper(), Some(&file), false, 0, &dev)
        .err()
        .expect("a ResNet-50 must not load a ResNet-18 checkpoint");
    assert!(format!("{e:#}").contains("checkpoint"), "{e:#}");
    let _ = std::fs::remove_dir_all(&d);
}

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    a: LinearArgs,
}

fn args(v: &[&str]) -> LinearArgs {
    Cli::try_parse_from(std::iter::once("eval-linear").chain(v.iter().copied()))
        .unwrap()
        .a
}

#[test]
fn command_line_flags_become_a_config() {
    let d = tmpdir("cli");
    tiny_run(&d);
    let ds = d.display().to_string();
    // A checkpoint: the architecture comes from its config.json at run time.
    let c = args(&[
        "--checkpoint",
        &ds,
        "--root",
        "/data/cv",
        "--size",
        "96x128",
    ])
    .to_config()
    .unwrap();
    assert_eq!(c.checkpoint.as_deref(), Some(d.as_path()));
    assert_eq!(c.model, None);
    assert_eq!((c.size, c.dataset), (Some((96, 128)), DatasetKind::Camvid));
    assert_eq!((c.epochs, c.batch_size, c.lr), (20, 8, 0.05));
    assert!(c.cache_features && !c.use_target);
    // --scratch with a checkpoint: that run's architecture, random weights.
    let c = args(&[
        "--scratch",
        "--checkpoint",
        &ds,
        "--root",
        "r",
        "--seed",
        "5",
    ])
    .to_config()
    .unwrap();
    assert_eq!(
        (c.checkpoint, c.model, c.seed),
        (None, Some(ModelConfig::tiny()), 5)
    );
    let c = args(&[
        "--scratch",
        "--model",
        "paper",
        "--root",
        "r",
        "--dataset",
        "cityscapes",
        "--no-cache",
        "--rare-share",
        "0.5",
    ])
    .to_config()
    .unwrap();
    assert_eq!(c.model, Some(ModelConfig::paper()));
    assert_eq!(c.dataset, DatasetKind::Cityscapes);
    assert!(!c.cache_features);
    assert_eq!((c.small_share, c.rare_share), (0.01, 0.5));
    assert!(args(&["--scratch", "--root", "r"]).to_config().is_err());
    assert!(args(&["--root", "r"]).to_config().is_err());
    let e = args(&["--scratch", "--checkpoint", "runs/none", "--root", "r"])
        .to_config()
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("runs/none: no such run folder"),
        "{e:#}"
    );
    assert!(Cli::try_parse_from(["x", "--root", "r", "--size", "96"]).is_err());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn camvid_subset_readout_learns_and_writes_its_report() {
    let Some(root) = camvid() else { return };
    let out = tmpdir("camvid");
    let mut cfg = LinearEvalConfig::new(DatasetKind::Camvid, &root);
    cfg.model = Some(ModelConfig::tiny());
    cfg.seed = 1;
    cfg.max_train = Some(24);
    cfg.max_val = Some(12);
    cfg.size = Some((96, 128));
    cfg.epochs = 15;
    cfg.num_vis = 2;
    cfg.out = Some(out.clone());
    cfg.quiet = true;
    let r: LinearReport = linear::run(&cfg).unwrap();
    eprintln!("{}", r.to_table());

    // The same evenly spaced subsets, chosen and counted here.
    let train_all = sorted_pngs(&root.join("trainannot"));
    let val_all = sorted_pngs(&root.join("valannot"));
    let pick = |v: &[PathBuf], m: usize| -> Vec<PathBuf> {
        (0..m).map(|i| v[i * v.len() / m].clone()).collect()
    };
    let (train, val) = (pick(&train_all, 24), pick(&val_all, 12));
    assert_eq!((r.train_images, r.val_images), (24, 12));
    assert_eq!((r.input_size, r.feature_size), ([96, 128], [12, 16, 512]));

    // Validation is scored at the labels' native 480x360: every labelled pixel, per class.
    let vc = class_counts(&val);
    assert_eq!(r.confusion.total(), vc.iter().sum::<u64>());
    for (c, cls) in r.classes.iter().enumerate() {
        assert_eq!(cls.val_pixels, vc[c], "{}", cls.name);
    }
    // Learning: the loss falls from ln(11) (zero-initialised head), and accuracy beats the
    // majority class on train and on val.
    let first = r.epoch_loss[0];
    let last = *r.epoch_loss.last().unwrap();
    assert!(
        first < 11f64.ln() && last < 0.75 * first,
        "{:?}",
        r.epoch_loss
    );
    let tc = class_counts(&train);
    let train_major = *tc.iter().max().unwrap() as f64 / tc.iter().sum::<u64>() as f64;
    let val_major = *vc.iter().max().unwrap() as f64 / vc.iter().sum::<u64>() as f64;
    assert!(
        r.train_pixel_acc > train_major + 0.2,
        "train acc {} vs majority {train_major}",
        r.train_pixel_acc
    );
    assert!(
        r.pixel_acc > val_major + 0.15,
        "val acc {} vs majority {val_major}",
        r.pixel_acc
    );
    assert!(r.miou > 0.1 && r.miou < 1.0, "{}", r.miou);
    for name in ["Sky", "Road"] {
        let c = r.classes.iter().find(|c| c.name == name).unwrap();
        assert!(c.iou.unwrap() > 0.4, "{name} IoU {:?}", c.iou);
    }

    // Class groups from the full training split, recomputed here.
    assert_eq!(r.groups.stats_images, train_all.len() as u64);
    let (mut share, mut present) = ([0f64; 11], [0u64; 11]);
    for f in &train_all {
        let (_, _, v) = label_png(f);
        let mut cnt = [0u64; 11];
        v.iter()
            .filter(|&&x| x < 11)
            .for_each(|&x| cnt[x as usize] += 1);
        let n: u64 = cnt.iter().sum();
        for ((s, p), &k) in share.iter_mut().zip(present.iter_mut()).zip(&cnt) {
            *s += k as f64 / n as f64;
            *p += u64::from(k > 0);
        }
    }
    let n = train_all.len() as f64;
    let names = |ids: Vec<usize>| -> Vec<String> {
        ids.into_iter().map(|c| r.classes[c].name.clone()).collect()
    };
    let small: Vec<usize> = (0..11).filter(|&c| share[c] / n < 0.01).collect();
    let rare: Vec<usize> = (0..11).filter(|&c| (present[c] as f64) / n < 0.2).collect();
    assert_eq!(r.groups.small.classes, names(small));
    assert_eq!(r.groups.rare.classes, names(rare));
    for (c, cls) in r.classes.iter().enumerate() {
        assert!(
            (cls.avg_pixel_share - share[c] / n).abs() < 1e-9,
            "{}",
            cls.name
        );
        assert!((cls.image_share - present[c] as f64 / n).abs() < 1e-9);
    }
    // What that gives on CamVid (checked against the data, not assumed): Road and Sky
    // large and common; Pedestrian and Bicyclist small; Pole (1.02%) and SignSymbol (1.23%)
    // just above the paper's 1% line; no class is in fewer than 20% of the frames.
    assert_eq!(r.groups.small.classes, vec!["Pedestrian", "Bicyclist"]);
    for name in ["Road", "Sky", "Pole", "SignSymbol"] {
        assert!(r.groups.large.classes.iter().any(|c| c == name), "{name}");
    }
    assert!(r.groups.rare.classes.is_empty() && r.groups.rare.miou.is_none());
    assert_eq!(r.groups.common.classes.len(), 11);
    let want_small = group_miou(
        &r.classes.iter().map(|c| c.iou).collect::<Vec<_>>(),
        &[9, 10],
    );
    assert_eq!(r.groups.small.miou, want_small);

    // Outputs: the JSON round-trips, the table and readout exist, the pictures are
    // image | truth | prediction at 480x360.
    let back: LinearReport =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(back.miou, r.miou);
    assert_eq!(back.classes, r.classes);
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(md.contains("| mIoU |") && md.contains("Bicyclist"));
    let ro =
        candle_core::safetensors::load(out.join("readout.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(ro["readout.weight"].dims(), &[11, 512, 1, 1]);
    assert_eq!(r.visualisations.len(), 2);
    for v in &r.visualisations {
        assert_eq!(png_size(Path::new(v)), (3 * 480, 360), "{v}");
    }
    // The confusion matrix picture: (11 + 1) cells of 16 px, the report's matrix drawn.
    let conf = out.join("confusion.png");
    assert_eq!(png_size(&conf), (12 * 16, 12 * 16));
    let (w, h, want) = r
        .confusion
        .picture(16, &poodle_train::eval::datasets::CAMVID_PALETTE);
    let img = poodle_train::eval::datasets::read_rgb(&conf).unwrap();
    assert_eq!((img.width, img.height), (w, h));
    assert!(img.data == want, "confusion.png is not the report's matrix");
    let _ = std::fs::remove_dir_all(&out);
}

/// Writes an 8-bit greyscale PNG of class ids.
fn write_label_png(p: &Path, w: u32, h: u32, ids: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    let f = std::io::BufWriter::new(std::fs::File::create(p).unwrap());
    let mut e = png::Encoder::new(f, w, h);
    e.set_color(png::ColorType::Grayscale);
    e.set_depth(png::BitDepth::Eight);
    e.write_header().unwrap().write_image_data(ids).unwrap();
}

/// BDD100K (JPEG images through ffmpeg) and Cityscapes (city folders, trainId PNGs) trees built
/// from one CamVid frame: each image is paired with its label file, unlabelled images are
/// counted and skipped, and 255 is ignored by the metrics.
#[test]
fn bdd100k_and_cityscapes_layouts_pair_images_with_labels() {
    use poodle_train::eval::datasets::{read_label, read_rgb};
    let Some(root) = camvid() else { return };
    let src = sorted_pngs(&root.join("train"))[0].clone();
    let want = read_rgb(&src).unwrap();
    let (w, h) = (want.width as u32, want.height as u32);
    // Left half road (0), right half ignored (255).
    let ids: Vec<u8> = (0..h * w)
        .map(|i| if i % w < w / 2 { 0 } else { 255 })
        .collect();
    let d = tmpdir("layouts");

    // BDD100K: a.jpg and b.jpg, only a has a mask.
    let img_dir = d.join("bdd/images/10k/val");
    std::fs::create_dir_all(&img_dir).unwrap();
    for stem in ["a", "b"] {
        let ok = std::process::Command::new("ffmpeg")
            .args(["-v", "error", "-y", "-i"])
            .arg(&src)
            .args(["-q:v", "2"])
            .arg(img_dir.join(format!("{stem}.jpg")))
            .status()
            .expect("ffmpeg")
            .success();
        assert!(ok);
    }
    write_label_png(&d.join("bdd/labels/sem_seg/masks/val/a.png"), w, h, &ids);
    let (s, skipped) = DatasetKind::Bdd100k.list(&d.join("bdd"), "val").unwrap();
    assert_eq!(skipped, 1);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].image, img_dir.join("a.jpg"));
    let jpg = read_rgb(&s[0].image).unwrap();
    assert_eq!((jpg.width, jpg.height), (want.width, want.height));
    // JPEG at q 2 is within a few grey levels of the PNG on average.
    let mad = jpg
        .data
        .iter()
        .zip(&want.data)
        .map(|(&a, &b)| (a as f64 - b as f64).abs())
        .sum::<f64>()
        / want.data.len() as f64;
    assert!(mad < 4.0, "JPEG decode differs from the PNG by {mad}");
    let l = read_label(&s[0].label).unwrap();
    assert_eq!(l.data, ids);
    let mut c = Confusion::new(19);
    c.add(&l.data, &vec![0u8; l.data.len()]);
    assert_eq!(c.total(), u64::from(h * (w / 2)));
    assert_eq!(c.iou()[0], Some(1.0));
    let e = DatasetKind::Bdd100k
        .list(&d.join("bdd"), "train")
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("images/10k/train: cannot list the split's images"),
        "{e:#}"
    );

    // Cityscapes: two cities, one frame without trainIds, a colour mask that is no image.
    let cs = d.join("cityscapes");
    for (city, frame, labelled) in [
        ("aachen", "aachen_000000_000019", true),
        ("bremen", "bremen_000001_000019", true),
        ("bremen", "bremen_000002_000019", false),
    ] {
        let img = cs.join(format!("leftImg8bit/train/{city}/{frame}_leftImg8bit.png"));
        std::fs::create_dir_all(img.parent().unwrap()).unwrap();
        std::fs::copy(&src, &img).unwrap();
        let gt = cs.join(format!("gtFine/train/{city}/{frame}_gtFine_color.png"));
        std::fs::create_dir_all(gt.parent().unwrap()).unwrap();
        std::fs::copy(&src, &gt).unwrap();
        if labelled {
            write_label_png(
                &cs.join(format!(
                    "gtFine/train/{city}/{frame}_gtFine_labelTrainIds.png"
                )),
                w,
                h,
                &ids,
            );
        }
    }
    let (s, skipped) = DatasetKind::Cityscapes.list(&cs, "train").unwrap();
    assert_eq!(skipped, 1);
    let names: Vec<String> = s
        .iter()
        .map(|x| x.label.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "aachen_000000_000019_gtFine_labelTrainIds.png",
            "bremen_000001_000019_gtFine_labelTrainIds.png"
        ]
    );
    assert!(s[1]
        .image
        .ends_with("leftImg8bit/train/bremen/bremen_000001_000019_leftImg8bit.png"));
    assert_eq!(read_rgb(&s[0].image).unwrap(), want);
    let _ = std::fs::remove_dir_all(&d);
}
