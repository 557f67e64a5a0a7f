//! `export::export_torchvision` and `export::load_init`: the exported key set is exactly
//! torchvision's ResNet-50 `state_dict` (without `fc`), an export round-trips into a fresh
//! learner through `TrainConfig::init`, and real torchvision `.pth` files parse, map and fail
//! with clear errors.
//!
//! The `.pth` fixtures (`tests/fixtures/model/resnet18_stem*.pth`, 47 KB each) hold the stem
//! of a seeded torchvision ResNet-18 (`conv1.weight`, `bn1.*` with set values and
//! `num_batches_tracked` 7, `fc.bias`), saved by `torch.save` as `state_dict()` returns it (an
//! OrderedDict), and nested as `{"state_dict": {"module." + k: v}, "epoch": 3, ...}`;
//! `resnet18_stem_pth.json` has each tensor's shape, sum and first values. Regenerate with
//! torch and torchvision (the full ResNet-18 is 45 MB, too big to commit):
//!
//! ```python
//! import collections, json, pathlib, torch, torchvision
//! out = pathlib.Path("poodle-train/tests/fixtures/model")
//! torch.manual_seed(0)
//! sd = torchvision.models.resnet18().state_dict()
//! keep = {"conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
//!         "bn1.num_batches_tracked", "fc.bias"}
//! for k in list(sd):
//!     if k not in keep:
//!         del sd[k]
//! i = torch.arange(64, dtype=torch.float32)
//! sd["bn1.weight"].copy_(1 + i / 64); sd["bn1.bias"].copy_(i / 128 - 0.25)
//! sd["bn1.running_mean"].copy_(i / 100 - 0.3); sd["bn1.running_var"].copy_(1 + i / 50)
//! sd["bn1.num_batches_tracked"].fill_(7)
//! torch.save(sd, out / "resnet18_stem.pth")
//! nested = collections.OrderedDict(("module." + k, v) for k, v in sd.items())
//! torch.save({"state_dict": nested, "epoch": 3, "arch": "resnet18"},
//!            out / "resnet18_stem_nested.pth")
//! ref = {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
//!            "sum": float(v.double().sum()),
//!            "first": [float(x) for x in v.flatten()[:4].double()]} for k, v in sd.items()}
//! (out / "resnet18_stem_pth.json").write_text(json.dumps(ref, indent=1, sort_keys=True) + "\n")
//! ```
//!
//! With full torchvision files at hand, `POODLE_TORCHVISION_PARITY=DIR` runs one more test:
//! `DIR/resnet50.pth` (any torchvision ResNet-50 `state_dict`) and `DIR/parity.safetensors`
//! (`x`: an NCHW input, `c5`: `resnet50` up to `layer4` on it in eval mode) — loaded with
//! `load_init`, the backbone must reproduce `c5`.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Init, VarBuilder, VarMap};
use poodle_train::checkpoint::{self, Progress};
use poodle_train::config::TrainConfig;
use poodle_train::export::{export_torchvision, load_init, Which};
use poodle_train::model::{named_vars, Encoder, ModelConfig};
use poodle_train::run::Learner;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model")
}

mod common;
use common::tmpdir;

/// torchvision's key -> shape list, as `tools/torch_reference_model.py` wrote it.
fn torchvision_keys(file: &str) -> BTreeMap<String, Vec<usize>> {
    let text = std::fs::read_to_string(fixtures().join(file)).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn save_checkpoint(l: &Learner, dir: &Path, step: u64) -> PathBuf {
    let p = Progress {
        step,
        epoch: 0,
        batch: 0,
        file: String::new(),
        config_json: serde_json::to_string(&l.cfg).unwrap(),
        world_size: 1,
    };
    let state = l.opt.state_tensors().unwrap();
    checkpoint::save(dir, &l.online_map, &l.target_map, state, p).unwrap()
}

/// The values of a map's variables under `prefix`, by the name below it.
fn values(map: &VarMap, prefix: &str) -> BTreeMap<String, Vec<f32>> {
    named_vars(map)
        .into_iter()
        .filter_map(|(n, v)| {
            let rest = n.strip_prefix(prefix)?.to_string();
            Some((
                rest,
                v.as_tensor().flatten_all().unwrap().to_vec1().unwrap(),
            ))
        })
        .collect()
}

/// Gives every backbone BatchNorm tensor (weight 1, bias 0, mean 0, var 1 at initialisation,
/// the same for every seed) distinct values, so that a round trip has something to carry.
fn perturb_bn(map: &VarMap, seed: f32) {
    for (name, var) in named_vars(map) {
        if name.starts_with("backbone.") && var.rank() == 1 {
            let n = var.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|i| 0.5 + ((i as f32 * 0.37 + seed).sin()).abs())
                .collect();
            var.set(&Tensor::from_vec(v, n, &Device::Cpu).unwrap())
                .unwrap();
        }
    }
}

#[test]
fn resnet50_export_has_exactly_torchvisions_keys_shapes_and_dtypes() {
    let mut cfg = TrainConfig::paper();
    // The heads are never exported; smaller ones keep the test light.
    cfg.model.proj_hidden = 64;
    cfg.model.proj_out = 16;
    let learner = Learner::new(&cfg, &Device::Cpu).unwrap();
    let d = tmpdir("r50");
    let run = d.join("run");
    save_checkpoint(&learner, &run, 7);
    let out = d.join("out/backbone.safetensors");
    let r = export_torchvision(&run, Which::Online, &out).unwrap();
    assert_eq!(r.backbone, "resnet50");
    assert_eq!(r.step, Some(7));
    assert_eq!(r.dilated, Some(false));
    assert_eq!(
        r.torchvision.as_deref(),
        Some("torchvision.models.resnet50()")
    );
    assert_eq!(r.num_batches_tracked, 53);
    assert_eq!(r.tensors, 318);
    let want = torchvision_keys("resnet50_torchvision_keys.json");
    let elements: usize = want.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(r.elements, elements - 53); // less the num_batches_tracked scalars

    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let got_keys: BTreeMap<String, Vec<usize>> = got
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    assert_eq!(
        got_keys, want,
        "key set and shapes differ from torchvision's"
    );
    let online = values(&learner.online_map, "backbone.");
    for (k, t) in &got {
        if k.ends_with("num_batches_tracked") {
            assert_eq!(t.dtype(), DType::I64, "{k}");
            assert_eq!(t.to_scalar::<i64>().unwrap(), 0, "{k}");
        } else {
            assert_eq!(t.dtype(), DType::F32, "{k}");
            let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(&v, &online[k], "{k}");
        }
    }
    // Nothing of the decoder or the heads, and no temporary file left behind.
    assert!(!got
        .keys()
        .any(|k| k.contains("decoder") || k.contains("projector")));
    let left: Vec<_> = std::fs::read_dir(d.join("out")).unwrap().collect();
    assert_eq!(left.len(), 1);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn export_then_init_round_trips_into_a_fresh_learner() {
    let mut cfg_a = TrainConfig::tiny();
    cfg_a.seed = 1;
    let a = Learner::new(&cfg_a, &Device::Cpu).unwrap();
    perturb_bn(&a.online_map, 0.0);
    perturb_bn(&a.target_map, 1.0); // the target now differs from the online network
    let d = tmpdir("roundtrip");
    let run = d.join("run");
    let ckpt = save_checkpoint(&a, &run, 3);

    let out = d.join("online.safetensors");
    let r = export_torchvision(&ckpt, Which::default(), &out).unwrap();
    assert_eq!(
        (r.backbone.as_str(), r.step, r.which),
        ("resnet18", Some(3), Which::Online)
    );
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let keys: BTreeMap<String, Vec<usize>> = got
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    assert_eq!(keys, torchvision_keys("resnet18_torchvision_keys.json"));

    // Learner B: another seed, initialised from A's export through the config.
    let mut cfg_b = TrainConfig::tiny();
    cfg_b.seed = 2;
    let plain_b = Learner::new(&cfg_b, &Device::Cpu).unwrap();
    cfg_b.init = Some(out.clone());
    let b = Learner::new(&cfg_b, &Device::Cpu).unwrap();
    let a_backbone = values(&a.online_map, "backbone.");
    assert_eq!(values(&b.online_map, "backbone."), a_backbone);
    // The target is copied from the initialised online network.
    assert_eq!(values(&b.target_map, "backbone."), a_backbone);
    // The heads and the decoder keep B's own seeded initialisation.
    for prefix in ["decoder.", "dense_projector.", "pooled_predictor."] {
        let (hb, ha) = (values(&b.online_map, prefix), values(&a.online_map, prefix));
        assert!(!hb.is_empty());
        assert_ne!(hb, ha, "{prefix}");
        assert_eq!(hb, values(&plain_b.online_map, prefix), "{prefix}");
    }

    // The target export and a checkpoint file (prefix online.backbone.) load as well.
    let target_out = d.join("target.safetensors");
    export_torchvision(&run, Which::Target, &target_out).unwrap();
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    Encoder::new(&ModelConfig::tiny(), vb).unwrap();
    let rep = load_init(&map, &target_out).unwrap();
    assert_eq!(
        (rep.format, rep.prefix.as_str(), rep.set),
        ("safetensors", "", 100)
    );
    assert_eq!(rep.ignored, 20); // num_batches_tracked
    assert_eq!(
        values(&map, "backbone."),
        values(&a.target_map, "backbone.")
    );
    let rep = load_init(&map, &ckpt).unwrap();
    assert_eq!(rep.prefix, "online.backbone.");
    assert_eq!(values(&map, "backbone."), a_backbone);
    let _ = std::fs::remove_dir_all(&d);
}

/// A map with only the stem of a ResNet with `width` stem channels, zero-filled.
fn stem_map(width: usize) -> VarMap {
    let map = VarMap::new();
    let z = Init::Const(0.0);
    map.get(
        (width, 3, 7, 7),
        "backbone.conv1.weight",
        z,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for p in ["weight", "bias", "running_mean", "running_var"] {
        map.get(
            width,
            &format!("backbone.bn1.{p}"),
            z,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    }
    map
}

#[derive(serde::Deserialize)]
struct Ref {
    shape: Vec<usize>,
    sum: f64,
    first: Vec<f64>,
}

fn check_stem_values(map: &VarMap) {
    let text = std::fs::read_to_string(fixtures().join("resnet18_stem_pth.json")).unwrap();
    let refs: BTreeMap<String, Ref> = serde_json::from_str(&text).unwrap();
    let got = values(map, "backbone.");
    assert_eq!(got.len(), 5);
    for (name, v) in &got {
        let r = &refs[name];
        assert_eq!(r.shape.iter().product::<usize>(), v.len(), "{name}");
        for (a, b) in v.iter().zip(&r.first) {
            assert_eq!(f64::from(*a), *b, "{name}");
        }
        let sum: f64 = v.iter().map(|x| f64::from(*x)).sum();
        assert!((sum - r.sum).abs() < 1e-4 * (1.0 + r.sum.abs()), "{name}");
    }
}

#[test]
fn torchvision_pth_parses_maps_to_backbone_names_and_sets_values() {
    let map = stem_map(64);
    let r = load_init(&map, &fixtures().join("resnet18_stem.pth")).unwrap();
    assert_eq!(
        (r.format, r.prefix.as_str(), r.nested_key.as_deref()),
        ("pth", "", None)
    );
    assert_eq!(r.set, 5);
    assert_eq!(r.ignored, 2); // fc.bias, bn1.num_batches_tracked
    check_stem_values(&map);

    // Nested under "state_dict", with DataParallel's "module." prefix.
    let map = stem_map(64);
    let r = load_init(&map, &fixtures().join("resnet18_stem_nested.pth")).unwrap();
    assert_eq!(r.nested_key.as_deref(), Some("state_dict"));
    assert_eq!(r.prefix, "module.");
    check_stem_values(&map);
}

#[test]
fn shape_mismatch_names_the_key_and_both_shapes_and_leaves_the_map_alone() {
    let map = stem_map(32);
    let e = load_init(&map, &fixtures().join("resnet18_stem.pth")).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("conv1.weight: file [64, 3, 7, 7], model backbone.conv1.weight [32, 3, 7, 7]"),
        "{msg}"
    );
    assert!(msg.contains("bn1.running_var: file [64]"), "{msg}");
    assert!(values(&map, "").values().flatten().all(|v| *v == 0.0));
}

#[test]
fn missing_backbone_tensors_are_an_error_naming_them() {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    Encoder::new(&ModelConfig::tiny(), vb).unwrap();
    let before = values(&map, "backbone.");
    let e = load_init(&map, &fixtures().join("resnet18_stem.pth")).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains("95 of the model's 100 backbone tensors missing"),
        "{msg}"
    );
    assert!(msg.contains("layer1.0.bn1.bias"), "{msg}");
    assert_eq!(
        values(&map, "backbone."),
        before,
        "the map changed on error"
    );
}

#[test]
fn unmatched_extra_and_legacy_files_are_clear_errors() {
    let d = tmpdir("errors");
    let cpu = Device::Cpu;
    let conv = Tensor::ones((64, 3, 7, 7), DType::F32, &cpu).unwrap();
    let vec64 = Tensor::ones(64, DType::F32, &cpu).unwrap();
    let mut ts: HashMap<String, Tensor> = HashMap::new();
    ts.insert("conv1.weight".into(), conv);
    for p in ["weight", "bias", "running_mean", "running_var"] {
        ts.insert(format!("bn1.{p}"), vec64.clone());
    }
    // A key under the prefix that the model does not have (a deeper network).
    ts.insert("layer1.2.conv1.weight".into(), vec64.clone());
    let extra = d.join("extra.safetensors");
    candle_core::safetensors::save(&ts, &extra).unwrap();
    let e = load_init(&stem_map(64), &extra).unwrap_err();
    assert!(format!("{e:#}").contains("layer1.2.conv1.weight"), "{e:#}");

    // Nothing that looks like the backbone.
    let other: HashMap<String, Tensor> = [("head.weight".to_string(), vec64.clone())].into();
    let unrelated = d.join("unrelated.safetensors");
    candle_core::safetensors::save(&other, &unrelated).unwrap();
    let e = load_init(&stem_map(64), &unrelated).unwrap_err();
    assert!(
        format!("{e:#}").contains("no ResNet backbone key matched"),
        "{e:#}"
    );

    // A legacy (non-zip) torch pickle, and a file that is neither format.
    let legacy = d.join("legacy.pth");
    std::fs::write(&legacy, [0x80u8, 0x02, 0x8a, 0x0a, 0x6c]).unwrap();
    let e = load_init(&stem_map(64), &legacy).unwrap_err();
    assert!(format!("{e:#}").contains("legacy"), "{e:#}");
    let by_magic = d.join("legacy.weights"); // recognised by its first bytes
    std::fs::copy(&legacy, &by_magic).unwrap();
    let e = load_init(&stem_map(64), &by_magic).unwrap_err();
    assert!(format!("{e:#}").contains("legacy"), "{e:#}");
    let junk = d.join("junk.safetensors");
    std::fs::write(&junk, b"not a tensor file").unwrap();
    assert!(load_init(&stem_map(64), &junk).is_err());

    // The config key (`--set init=PATH` works on presets) and a missing file.
    let mut cfg =
        TrainConfig::load("tiny", &[format!("init={}", d.join("nope.pth").display())]).unwrap();
    assert_eq!(cfg.init, Some(d.join("nope.pth")));
    let e = Learner::new(&cfg, &Device::Cpu).err().unwrap();
    assert!(format!("{e:#}").starts_with("init "), "{e:#}");
    cfg.init = Some(legacy);
    let e = Learner::new(&cfg, &Device::Cpu).err().unwrap();
    assert!(format!("{e:#}").contains("legacy"), "{e:#}");

    // Export errors: no run folder, no checkpoint in it.
    let e = export_torchvision(&d, Which::Online, &d.join("x.safetensors")).unwrap_err();
    assert!(format!("{e:#}").contains("no latest.json"), "{e:#}");
    let e = export_torchvision(&extra, Which::Online, &d.join("x.safetensors")).unwrap_err();
    assert!(format!("{e:#}").contains("no online.backbone.*"), "{e:#}");
    let _ = std::fs::remove_dir_all(&d);
}

/// Needs torchvision's 100 MB ResNet-50 weights, which CI does not download: opt in with
/// `POODLE_TORCHVISION_PARITY=DIR cargo test --test export_init -- --ignored`.
#[test]
#[ignore = "needs POODLE_TORCHVISION_PARITY=DIR (torchvision ResNet-50 weights); run with --ignored"]
fn torchvision_resnet50_weights_reproduce_torchvision_features() {
    let dir = std::env::var_os("POODLE_TORCHVISION_PARITY")
        .map(PathBuf::from)
        .expect("set POODLE_TORCHVISION_PARITY=DIR (see the file's documentation)");
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    let enc = Encoder::new(&ModelConfig::paper(), vb).unwrap();
    let r = load_init(&map, &dir.join("resnet50.pth")).unwrap();
    assert_eq!(r.set, 265);
    // num_batches_tracked (53), and fc.weight and fc.bias unless the file is an export
    assert!(r.ignored == 53 || r.ignored == 55, "{r:?}");
    let io = candle_core::safetensors::load(dir.join("parity.safetensors"), &Device::Cpu).unwrap();
    let c5 = enc.stages(&io["x"], false).unwrap().c5;
    let want = &io["c5"];
    let err = (c5 - want).unwrap().abs().unwrap().max_all().unwrap();
    let scale = want.abs().unwrap().max_all().unwrap();
    let (err, scale) = (
        err.to_scalar::<f32>().unwrap(),
        scale.to_scalar::<f32>().unwrap(),
    );
    eprintln!("c5 max abs error {err:e} (max |c5| {scale})");
    assert!(err <= 1e-4 * scale.max(1.0), "{err} vs {scale}");
}
