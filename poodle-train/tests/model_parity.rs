//! Parity of poodle-train's model code with PyTorch/torchvision, from committed fixtures
//! written by `tools/torch_reference_model.py` (float64 reference stored as f32; see its
//! docstring for the key layout). Each case loads the PyTorch weights into a `VarMap` (so the
//! names must match exactly), runs the training-mode forward, backpropagates
//! `sum(out * R)` and compares outputs, input and parameter gradients, the updated BN running
//! statistics and, where stored, evaluation-mode outputs, within 1e-4 relative error
//! (`max|a - b| / (max|b| + 1e-6)`).

use candle_core::{DType, Device, ModuleT, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use poodle_train::model::{
    self, max_pool_3x3_s2, resnet::Bottleneck, upsample_bilinear, Backbone, BlockKind,
    DecoderConfig, DecoderOrder, ModelConfig, Online, ResNet, ResNetConfig, Stages,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::time::Instant;

const TOL: f32 = 1e-4;

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/model")
}

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = fixture_dir().join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading {}: {e}", path.display()))
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
    max_abs(&(a - b).unwrap()) / (max_abs(b) + 1e-6)
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let e = rel_err(got, want);
    assert!(e <= TOL, "{what}: relative error {e:.3e} > {TOL:.0e}");
    e
}

fn with_prefix<'a>(
    fx: &'a HashMap<String, Tensor>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a str, &'a Tensor)> + 'a {
    fx.iter()
        .filter_map(move |(k, v)| k.strip_prefix(prefix).map(|n| (n, v)))
}

/// Sets every `param.*` tensor of the fixture into the map and checks that the map holds
/// exactly these names (torchvision's, less `num_batches_tracked`).
fn load_params(map: &mut VarMap, fx: &HashMap<String, Tensor>) {
    let fixture_names: BTreeSet<String> = with_prefix(fx, "param.")
        .map(|(n, _)| n.to_string())
        .collect();
    let map_names: BTreeSet<String> = model::named_vars(map).into_iter().map(|n| n.0).collect();
    assert_eq!(
        map_names, fixture_names,
        "parameter names differ from PyTorch's"
    );
    map.set(with_prefix(fx, "param.")).unwrap();
}

/// Runs one fixture case. `forward(inputs, train)` returns the named outputs.
fn check_case<F>(name: &str, fx: &HashMap<String, Tensor>, map: &VarMap, forward: F)
where
    F: Fn(&HashMap<String, Tensor>, bool) -> Result<Vec<(String, Tensor)>>,
{
    let vars: HashMap<String, Var> = with_prefix(fx, "in.")
        .map(|(n, t)| (n.to_string(), Var::from_tensor(t).unwrap()))
        .collect();
    let inputs: HashMap<String, Tensor> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let outputs = forward(&inputs, true).unwrap();
    let mut loss = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    let mut checked = 0;
    let mut worst = 0f32;
    for (k, y) in &outputs {
        worst = worst.max(assert_close(
            &format!("{name}: out.{k}"),
            y,
            &fx[&format!("out.{k}")],
        ));
        let r = &fx[&format!("r.{k}")];
        loss = (loss + (y * r).unwrap().sum_all().unwrap()).unwrap();
        checked += 1;
    }
    assert_eq!(checked, with_prefix(fx, "out.").count(), "{name}: outputs");
    let grads = loss.backward().unwrap();
    for (k, want) in with_prefix(fx, "grad.in.") {
        let got = grads.get(vars[k].as_tensor()).expect("input gradient");
        worst = worst.max(assert_close(&format!("{name}: grad.in.{k}"), got, want));
    }
    let params: HashMap<String, Var> = model::named_vars(map).into_iter().collect();
    let param_grads: Vec<(&str, &Tensor)> = with_prefix(fx, "grad.")
        .filter(|(k, _)| !k.starts_with("in."))
        .collect();
    // A bias whose channel constant is absorbed by a later training-mode BN (the projector's
    // first layer, the last lateral conv before it) has an analytically zero gradient: the
    // reference holds ~1e-15 and a relative error is meaningless. Those must come out as
    // f32 rounding noise relative to the case's largest gradient instead.
    let scale = param_grads
        .iter()
        .map(|(_, g)| max_abs(g))
        .fold(0f32, f32::max);
    let mut n_grads = 0;
    for (k, want) in param_grads {
        let var = params
            .get(k)
            .unwrap_or_else(|| panic!("{name}: no parameter {k}"));
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient for {k}"));
        if max_abs(want) < 1e-9 * scale {
            let noise = max_abs(got) / scale;
            eprintln!("{name}: grad.{k} is zero in the reference; ours {noise:.1e} of the largest");
            assert!(
                noise < 1e-6,
                "{name}: grad.{k} should be zero, is {noise:.1e} x {scale}"
            );
        } else {
            worst = worst.max(assert_close(&format!("{name}: grad.{k}"), got, want));
        }
        n_grads += 1;
    }
    assert_eq!(
        n_grads,
        model::trainable_vars(map).len(),
        "{name}: every trainable parameter has a reference gradient"
    );
    for (k, want) in with_prefix(fx, "after.") {
        let e = assert_close(&format!("{name}: after.{k}"), params[k].as_tensor(), want);
        worst = worst.max(e);
    }
    if with_prefix(fx, "eval.").count() > 0 {
        for (k, y) in forward(&inputs, false).unwrap() {
            if let Some(want) = fx.get(&format!("eval.{k}")) {
                worst = worst.max(assert_close(&format!("{name}: eval.{k}"), &y, want));
            }
        }
    }
    eprintln!("{name}: worst relative error {worst:.2e}");
}

fn new_map() -> (VarMap, VarBuilder<'static>) {
    let map = VarMap::new();
    let vb = VarBuilder::from_varmap(&map, DType::F32, &Device::Cpu);
    (map, vb)
}

#[test]
fn torchvision_bottleneck_train_step() {
    let fx = fixture("bottleneck");
    let (mut map, vb) = new_map();
    // torchvision Bottleneck(16, planes=8, stride=2, downsample=conv1x1 16->32 + BN).
    let block = Bottleneck::new(16, 8, 32, 2, 1, vb).unwrap();
    load_params(&mut map, &fx);
    check_case("bottleneck", &fx, &map, |i, train| {
        Ok(vec![("y".into(), block.forward_t(&i["x"], train)?)])
    });
}

/// The paper's order (Eq. 3: upsample, bottleneck, + lateral) on sizes that are not exact
/// 2x steps (the upsampling goes to the lateral's size).
#[test]
fn decoder_paper_order_train_step() {
    let fx = fixture("decoder");
    let (mut map, vb) = new_map();
    let cfg = DecoderConfig::full().with_order(DecoderOrder::Paper);
    let dec = model::Decoder::new(&cfg, [4, 8, 16], vb.pp("decoder")).unwrap();
    load_params(&mut map, &fx);
    check_case("decoder", &fx, &map, |i, train| {
        let stages = Stages {
            c3: i["c3"].clone(),
            c4: i["c4"].clone(),
            c5: i["c5"].clone(),
        };
        Ok(vec![("y".into(), dec.forward_t(&stages, train)?)])
    });
}

/// poodle's name for an authors' decoder name (`decoder_blocks.{i}.X` is block i's
/// bottleneck, `decoder_laterals.{i}.X` its lateral conv), written out here independently of
/// the library's own mapping.
fn authors_to_poodle(name: &str) -> String {
    for (theirs, ours) in [
        ("decoder_blocks.", "bottleneck"),
        ("decoder_laterals.", "lateral"),
    ] {
        if let Some(rest) = name.strip_prefix(theirs) {
            let (i, tail) = rest.split_once('.').unwrap();
            return format!("decoder.blocks.{i}.{ours}.{tail}");
        }
    }
    panic!("not an authors' decoder name: {name}")
}

/// The fixture with every `param.` / `grad.` / `after.` key renamed to poodle's names.
fn rename_authors_fixture(fx: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    fx.into_iter()
        .map(|(k, v)| {
            for p in ["param.", "grad.", "after."] {
                if let Some(n) = k.strip_prefix(p) {
                    if !n.starts_with("in.") {
                        return (format!("{p}{}", authors_to_poodle(n)), v);
                    }
                }
            }
            (k, v)
        })
        .collect()
}

/// The decoder as the authors build and run it (torchvision `Bottleneck(32, 8,
/// base_width=32)`, nn.Conv2d laterals, bottleneck -> upsample x2 -> + lateral), loaded by
/// name into poodle's default decoder; and the paper's order from the same weights, which
/// poodle's `order: paper` must reproduce and which is visibly another function.
#[test]
fn decoder_as_the_authors_train_step_and_paper_order_switch() {
    let fx = rename_authors_fixture(fixture("decoder_authors"));
    let stages = |i: &HashMap<String, Tensor>| Stages {
        c3: i["c3"].clone(),
        c4: i["c4"].clone(),
        c5: i["c5"].clone(),
    };
    let (mut map, vb) = new_map();
    let cfg = DecoderConfig::full();
    assert_eq!(cfg.order, DecoderOrder::Authors, "the default order");
    let dec = model::Decoder::new(&cfg, [8, 16, 32], vb.pp("decoder")).unwrap();
    load_params(&mut map, &fx);
    check_case("decoder_authors", &fx, &map, |i, train| {
        Ok(vec![("y".into(), dec.forward_t(&stages(i), train)?)])
    });

    let (mut map_p, vb_p) = new_map();
    let cfg_p = cfg.with_order(DecoderOrder::Paper);
    let dec_p = model::Decoder::new(&cfg_p, [8, 16, 32], vb_p.pp("decoder")).unwrap();
    load_params(&mut map_p, &fx);
    let inputs: HashMap<String, Tensor> = with_prefix(&fx, "in.")
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    let y_paper = dec_p.forward_t(&stages(&inputs), true).unwrap();
    let e = assert_close("decoder_authors: paper.y", &y_paper, &fx["paper.y"]);
    let apart = rel_err(&fx["out.y"], &fx["paper.y"]);
    eprintln!("decoder_authors: paper order within {e:.2e}; orders differ by {apart:.3} relative");
    assert!(apart > 1e-2, "the two orders differ by only {apart:.2e}");
}

#[test]
fn stem_max_pool_forward_and_gradient() {
    let fx = fixture("maxpool");
    let map = VarMap::new();
    check_case("maxpool", &fx, &map, |i, _| {
        Ok(vec![
            ("a".into(), max_pool_3x3_s2(&i["a"])?),
            ("b".into(), max_pool_3x3_s2(&i["b"])?),
        ])
    });
}

#[test]
fn bilinear_resize_forward_and_gradient() {
    let fx = fixture("upsample");
    let map = VarMap::new();
    let sizes = [
        ("up", 12, 16),
        ("down", 3, 4),
        ("x2", 10, 14),
        ("mixed", 4, 20),
    ];
    check_case("upsample", &fx, &map, |i, _| {
        sizes
            .iter()
            .map(|(k, h, w)| Ok((k.to_string(), upsample_bilinear(&i["x"], *h, *w)?)))
            .collect()
    });
}

fn tiny_resnet(block: BlockKind, layers: [usize; 4], dilated: bool) -> ResNetConfig {
    ResNetConfig {
        block,
        layers,
        stem_width: 4,
        widths: [2, 4, 8, 16],
        dilated,
    }
}

fn check_resnet(name: &str, cfg: ResNetConfig) {
    let fx = fixture(name);
    let (mut map, vb) = new_map();
    let net = ResNet::new(&cfg, vb).unwrap();
    load_params(&mut map, &fx);
    check_case(name, &fx, &map, |i, train| {
        let s = net.forward_stages(&i["x"], train)?;
        Ok(vec![
            ("c3".into(), s.c3),
            ("c4".into(), s.c4),
            ("c5".into(), s.c5),
        ])
    });
}

#[test]
fn tiny_dilated_resnet_train_step() {
    let cfg = tiny_resnet(BlockKind::Bottleneck, [1, 1, 2, 2], true);
    check_resnet("resnet_tiny_dilated", cfg);
}

#[test]
fn tiny_basic_block_resnet_train_step() {
    let cfg = tiny_resnet(BlockKind::Basic, [2, 1, 1, 1], false);
    check_resnet("resnet_tiny_basic", cfg);
}

#[test]
fn tiny_encoder_and_predictors_train_step() {
    let fx = fixture("encoder_tiny");
    let cfg = ModelConfig {
        backbone: Backbone::Custom(tiny_resnet(BlockKind::Bottleneck, [1, 1, 1, 1], false)),
        decoder: DecoderConfig::full(),
        dilated: false,
        proj_hidden: 16,
        proj_out: 8,
    };
    let (mut map, vb) = new_map();
    let online = Online::new(&cfg, vb).unwrap();
    load_params(&mut map, &fx);
    // Same call order as the reference: the backbone's BN statistics are updated twice.
    check_case("encoder_tiny", &fx, &map, |i, train| {
        let (enc, pred) = (&online.encoder, &online.predictors);
        let p_dense = enc.dense(&i["x"], train)?;
        let p_pooled = enc.pooled(&i["xs"], train)?;
        if !train {
            return Ok(vec![
                ("p_dense".into(), p_dense),
                ("p_pooled".into(), p_pooled),
            ]);
        }
        let q_dense = pred.dense(&p_dense, train)?;
        let q_pooled = pred.pooled(&p_pooled, train)?;
        Ok(vec![
            ("p_dense".into(), p_dense),
            ("q_dense".into(), q_dense),
            ("p_pooled".into(), p_pooled),
            ("q_pooled".into(), q_pooled),
        ])
    });
}

fn torchvision_keys(arch: &str) -> BTreeMap<String, Vec<usize>> {
    let path = fixture_dir().join(format!("{arch}_torchvision_keys.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn check_torchvision_names(arch: &str, cfg: &ResNetConfig) {
    let want = torchvision_keys(arch);
    let start = Instant::now();
    let (map, vb) = new_map();
    ResNet::new(cfg, vb).unwrap();
    let built = start.elapsed();
    assert!(
        built.as_secs_f64() < 10.0,
        "{arch}: building took {built:?}"
    );
    let got: BTreeMap<String, Vec<usize>> = model::named_vars(&map)
        .into_iter()
        .map(|(n, v)| (n, v.dims().to_vec()))
        .collect();
    // torchvision keeps an integer `num_batches_tracked` per BN; we do not (it only matters
    // with momentum=None).
    let (tracked, want): (BTreeMap<_, _>, BTreeMap<_, _>) = want
        .into_iter()
        .partition(|(k, _)| k.ends_with(".num_batches_tracked"));
    let bns = want.keys().filter(|k| k.ends_with(".running_mean")).count();
    assert_eq!(tracked.len(), bns, "{arch}: one num_batches_tracked per BN");
    assert!(!want.keys().any(|k| k.starts_with("fc.")));
    for (k, shape) in &want {
        assert_eq!(got.get(k), Some(shape), "{arch}: {k}");
    }
    assert_eq!(got.len(), want.len(), "{arch}: extra names");
}

#[test]
fn resnet50_names_and_shapes_equal_torchvision() {
    check_torchvision_names("resnet50", &ResNetConfig::resnet50());
    // Dilation changes no parameter.
    check_torchvision_names("resnet50", &ResNetConfig::resnet50().with_dilation(true));
}

#[test]
fn resnet18_names_and_shapes_equal_torchvision() {
    check_torchvision_names("resnet18", &ResNetConfig::resnet18());
}
