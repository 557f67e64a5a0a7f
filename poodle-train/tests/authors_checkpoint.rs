//! The authors' PooDLe checkpoints (`torch.save({'model': Poodle.state_dict(), ...})`, their
//! `src/utils/misc.py`) through the user-facing loaders: `export::load_init` (`--init`),
//! `export::load_init_with` (online or teacher) and `eval::linear::load_encoder`
//! (`eval linear --checkpoint`).
//!
//! Fixtures from `tools/authors_checkpoint_fixture.py` (needs PyTorch; rerun only when it
//! changes): a tiny module with the authors' attribute names and building blocks
//! (torchvision ResNet layout with Bottleneck [1, 1, 1, 1], stem 4, planes [2, 4, 8, 16];
//! torchvision Bottleneck decoder blocks; 1x1 conv heads; a stand-in `flow_model`), its
//! eval-mode outputs for a fixed input, and a copy with one tensor of a wrong shape; and a
//! tiny module with the attributes of their FlowE (`encoder`, `target_encoder`, ...).

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use poodle_train::eval::linear;
use poodle_train::export::{load_init, load_init_with, Which};
use poodle_train::model::{
    named_vars, Backbone, BlockKind, DecoderConfig, DecoderOrder, Encoder, ModelConfig, Online,
    ResNetConfig,
};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/model")
        .join(name)
}

fn reference() -> HashMap<String, Tensor> {
    let p = fixture("authors_poodle_tiny_ref.safetensors");
    candle_core::safetensors::load(&p, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn tiny() -> ModelConfig {
    ModelConfig {
        backbone: Backbone::Custom(ResNetConfig {
            block: BlockKind::Bottleneck,
            layers: [1, 1, 1, 1],
            stem_width: 4,
            widths: [2, 4, 8, 16],
            dilated: false,
        }),
        decoder: DecoderConfig::full(),
        dilated: false,
        proj_hidden: 16,
        proj_out: 8,
    }
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).unwrap()) / (max_abs(b) + 1e-6)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let e = rel_err(got, want);
    assert!(e <= TOL, "{what}: relative error {e:.2e}");
}

/// Eval-mode outputs of an encoder, named as in the reference file.
fn outputs(enc: &Encoder, x: &Tensor) -> BTreeMap<&'static str, Tensor> {
    let s = enc.stages(x, false).unwrap();
    BTreeMap::from([
        ("c3", s.c3),
        ("c4", s.c4),
        ("c5", s.c5),
        ("dense_features", enc.dense_features(x, false).unwrap()),
        ("p_dense", enc.dense(x, false).unwrap()),
        ("p_pooled", enc.pooled(x, false).unwrap()),
    ])
}

fn check(net: &str, got: &BTreeMap<&str, Tensor>, refs: &HashMap<String, Tensor>) -> usize {
    let mut n = 0;
    for (k, t) in got {
        if let Some(want) = refs.get(&format!("{net}.{k}")) {
            assert_close(&format!("{net}.{k}"), t, want);
            n += 1;
        }
    }
    n
}

fn online_map() -> (VarMap, Online) {
    let map = VarMap::new();
    let online = Online::new(
        &tiny(),
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
    );
    (map, online.unwrap())
}

fn snapshot(map: &VarMap) -> BTreeMap<String, Vec<f32>> {
    named_vars(map)
        .into_iter()
        .map(|(n, v)| (n, v.as_tensor().flatten_all().unwrap().to_vec1().unwrap()))
        .collect()
}

#[test]
fn init_loads_the_online_network_with_decoder_heads_and_predictors() {
    let refs = reference();
    let x = &refs["x"];
    let (map, online) = online_map();
    let rep = load_init(&map, &fixture("authors_poodle_tiny.pth")).unwrap();
    assert_eq!(rep.layout, "poodle");
    assert_eq!(rep.which, Which::Online);
    assert_eq!(rep.nested_key.as_deref(), Some("model"));
    // Every variable of the online map, predictors included.
    assert_eq!(rep.set, named_vars(&map).len());
    assert!(
        rep.ignored > 0,
        "teacher, flow_model and num_batches_tracked are ignored"
    );
    let n = check("online", &outputs(&online.encoder, x), &refs);
    assert_eq!(n, 6);
    let p_dense = online.encoder.dense(x, false).unwrap();
    let q_dense = online.predictors.dense(&p_dense, false).unwrap();
    assert_close("online.q_dense", &q_dense, &refs["online.q_dense"]);
    let p_pooled = online.encoder.pooled(x, false).unwrap();
    let q_pooled = online.predictors.pooled(&p_pooled, false).unwrap();
    assert_close("online.q_pooled", &q_pooled, &refs["online.q_pooled"]);

    // The same weights in the paper's decoder order are another function: the reference
    // pins the authors' order.
    let paper = ModelConfig {
        decoder: DecoderConfig::full().with_order(DecoderOrder::Paper),
        ..tiny()
    };
    let map = VarMap::new();
    let enc = Encoder::new(
        &paper,
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
    );
    let enc = enc.unwrap();
    load_init(&map, &fixture("authors_poodle_tiny.pth")).unwrap();
    let feats = enc.dense_features(x, false).unwrap();
    let apart = rel_err(&feats, &refs["online.dense_features"]);
    assert!(
        apart > 1e-2,
        "paper order within {apart:.2e} of the authors'"
    );
}

#[test]
fn teacher_selection_loads_the_teachers_weights() {
    let refs = reference();
    let x = &refs["x"];
    let (map, online) = online_map();
    let before = snapshot(&map);
    let rep = load_init_with(&map, &fixture("authors_poodle_tiny.pth"), Which::Target).unwrap();
    assert_eq!(rep.prefix, "teacher_");
    let n = check("teacher", &outputs(&online.encoder, x), &refs);
    assert_eq!(n, 4);
    // The teacher really is another network than the online one.
    let c5 = online.encoder.stages(x, false).unwrap().c5;
    assert!(rel_err(&c5, &refs["online.c5"]) > 1e-2);
    // It has no predictors: those keep their values, everything else was set.
    let after = snapshot(&map);
    let predictors: Vec<&String> = before
        .keys()
        .filter(|k| k.contains("_predictor."))
        .collect();
    assert!(!predictors.is_empty());
    for k in &predictors {
        assert_eq!(before[*k], after[*k], "{k}");
    }
    assert_eq!(rep.set, before.len() - predictors.len());
}

#[test]
fn eval_linear_reads_online_and_teacher_encoders_from_the_pth() {
    let refs = reference();
    let x = &refs["x"];
    let pth = fixture("authors_poodle_tiny.pth");
    for (use_target, net) in [(false, "online"), (true, "teacher")] {
        let (enc, _) = linear::load_encoder(&tiny(), Some(&pth), use_target, 5, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{net}: {e:#}"));
        let feats = enc.dense_features(x, false).unwrap();
        assert_close(net, &feats, &refs[&format!("{net}.dense_features")]);
    }
}

#[test]
fn a_wrong_shape_is_an_error_naming_the_key_and_leaves_the_map_alone() {
    let (map, _online) = online_map();
    let before = snapshot(&map);
    let e = load_init(&map, &fixture("authors_poodle_tiny_bad_shape.pth")).unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains(
            "decoder_laterals.1.weight: file [64, 8, 1, 1], \
             model decoder.blocks.1.lateral.weight [64, 16, 1, 1]"
        ),
        "{msg}"
    );
    assert_eq!(snapshot(&map), before);
}

#[test]
fn a_model_without_the_checkpoints_decoder_is_refused() {
    let cfg = ModelConfig {
        decoder: DecoderConfig::disabled(),
        dilated: true,
        ..tiny()
    };
    let map = VarMap::new();
    Online::new(
        &cfg,
        VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu),
    )
    .unwrap();
    let e = load_init(&map, &fixture("authors_poodle_tiny.pth")).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("decoder_blocks.0."), "{msg}");
    assert!(msg.contains("the model has no variable for it"), "{msg}");
}

/// The authors' FlowE checkpoint (`encoder.*`, `target_encoder.*`, `projector.*`, ...):
/// the backbone alone, online or target, for `--init` and for a readout of a model without
/// decoder; a model with a decoder is refused by the readout.
#[test]
fn flowe_checkpoints_give_their_backbone() {
    let refs = reference();
    let x = &refs["x"];
    let pth = fixture("authors_flowe_tiny.pth");
    let flowe = ModelConfig {
        decoder: DecoderConfig::disabled(),
        dilated: true,
        ..tiny()
    };
    for (which, prefix, net) in [
        (Which::Online, "encoder.", "online"),
        (Which::Target, "target_encoder.", "target"),
    ] {
        let map = VarMap::new();
        let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
        let online = Online::new(&flowe, vb).unwrap();
        let rep = load_init_with(&map, &pth, which).unwrap();
        assert_eq!((rep.layout, rep.prefix.as_str()), ("flowe", prefix));
        let backbone = named_vars(&map)
            .iter()
            .filter(|(n, _)| n.starts_with("backbone."))
            .count();
        assert_eq!(rep.set, backbone);
        let c5 = online.encoder.stages(x, false).unwrap().c5;
        assert_close(net, &c5, &refs[&format!("flowe.{net}.c5")]);

        let use_target = which == Which::Target;
        let (enc, _) = linear::load_encoder(&flowe, Some(&pth), use_target, 1, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{net}: {e:#}"));
        let feats = enc.dense_features(x, false).unwrap();
        assert_close(net, &feats, &refs[&format!("flowe.{net}.c5")]);
    }
    assert!(rel_err(&refs["flowe.online.c5"], &refs["flowe.target.c5"]) > 1e-2);
    match linear::load_encoder(&tiny(), Some(&pth), false, 1, &Device::Cpu) {
        Ok(_) => panic!("a FlowE checkpoint filled a model with a decoder"),
        Err(e) => assert!(format!("{e:#}").contains("holds a backbone only"), "{e:#}"),
    }
}

#[test]
fn a_run_starts_from_the_teacher_when_init_network_says_so() {
    // `init` + `init_network` in the training config reach the learner: its online and
    // target encoders both start as the checkpoint's teacher.
    let refs = reference();
    let x = &refs["x"];
    for (which, key) in [(Which::Online, "online.c5"), (Which::Target, "teacher.c5")] {
        let mut cfg = poodle_train::config::TrainConfig::tiny();
        cfg.model = tiny();
        cfg.init = Some(fixture("authors_poodle_tiny.pth"));
        cfg.init_network = which;
        let l = poodle_train::run::Learner::new(&cfg, &Device::Cpu).unwrap();
        for (name, c5) in [
            ("online", l.online.encoder.stages(x, false).unwrap().c5),
            ("target", l.target.stages(x, false).unwrap().c5),
        ] {
            let e = rel_err(&c5, &refs[key]);
            assert!(e < TOL, "{which:?}: the learner's {name} c5 vs {key}: {e}");
        }
    }
}
