//! Parity of the photometric augmentation (`poodle_train::data::colour`) and of the global
//! crop's resize-then-window (`poodle_common::flowmath::resize_window{,_flow}`) with
//! torchvision / PyTorch, from committed fixtures written by
//! `tools/torch_reference_augment.py` (its docstring lists the keys). Colour ops must agree
//! within 1e-5, the blur and whole compositions within 1e-4 (max abs, on [0, 1] images or
//! their normalised values): the blur's 4-sigma truncation is measured here against
//! torchvision's full kernel. Plus one statistical check of the default (authors') draws.

use candle_core::{DType, Device, Tensor};
use poodle_common::flowmath::{resize_window, resize_window_flow, Map};
use poodle_common::testenv;
use poodle_train::data::colour::{
    adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation, apply_colour, gaussian_blur,
    gaussian_kernel, normalize, sample_colour, to_grayscale, Blur, ColourConfig, ColourParams,
    Jitter, IMAGENET_MEAN, IMAGENET_STD,
};
use poodle_train::data::Rng;
use std::collections::HashMap;
use std::path::PathBuf;

const COLOUR_TOL: f32 = 1e-5;
const BLUR_TOL: f32 = 1e-4;

/// The fixture `name`, or `None` (after [`testenv::missing`]: a failure under CI=true) when
/// the file is absent.
fn fixture(name: &str) -> Option<HashMap<String, Tensor>> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/augment")
        .join(format!("{name}.safetensors"));
    testenv::require(&path, "write it with tools/torch_reference_augment.py")?;
    Some(
        candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {}: {e}", path.display())),
    )
}

fn get<'a>(f: &'a HashMap<String, Tensor>, k: &str) -> &'a Tensor {
    f.get(k)
        .unwrap_or_else(|| panic!("fixture key {k} missing"))
}

fn map(f: &HashMap<String, Tensor>, k: &str) -> Map {
    let t = get(f, k);
    let (c, h, w) = t.dims3().unwrap();
    let data = t
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    Map::from_vec(c, h, w, data)
}

fn vec64(f: &HashMap<String, Tensor>, k: &str) -> Vec<f64> {
    get(f, k)
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Max abs difference, after checking the shapes agree.
fn max_err(what: &str, got: &Map, want: &Map) -> f32 {
    assert_eq!(
        (got.c, got.h, got.w),
        (want.c, want.h, want.w),
        "{what}: shape"
    );
    got.data
        .iter()
        .zip(&want.data)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

fn assert_close(what: &str, got: &Map, want: &Map, tol: f32) -> f32 {
    let e = max_err(what, got, want);
    assert!(e <= tol, "{what}: max abs error {e:.3e} > {tol:.0e}");
    e
}

#[test]
fn colour_ops_match_torchvision() {
    let Some(f) = fixture("colour") else { return };
    type Op = fn(&mut Map, f32);
    let ops: [(&str, Op); 4] = [
        ("brightness", adjust_brightness),
        ("contrast", adjust_contrast),
        ("saturation", adjust_saturation),
        ("hue", adjust_hue),
    ];
    let mut worst = 0f32;
    let mut cases = 0;
    for img in ["smooth", "noisy"] {
        let src = map(&f, &format!("in.{img}"));
        for (op, apply) in ops {
            for (i, &factor) in vec64(&f, &format!("{op}.factors")).iter().enumerate() {
                let mut got = src.clone();
                apply(&mut got, factor as f32);
                let want = map(&f, &format!("{op}.{img}.{i}"));
                let what = format!("{op}({factor}) on {img}");
                // The op must change the image (else the comparison proves little).
                assert!(max_err(&what, &src, &want) > 1e-2, "{what}: no-op case");
                worst = worst.max(assert_close(&what, &got, &want, COLOUR_TOL));
                cases += 1;
            }
        }
        let mut got = src.clone();
        to_grayscale(&mut got);
        let e = assert_close(
            &format!("grayscale on {img}"),
            &got,
            &map(&f, &format!("grayscale.{img}")),
            COLOUR_TOL,
        );
        let mut got = src.clone();
        let (mean, std) = (vec64(&f, "normalize.mean"), vec64(&f, "normalize.std"));
        let as3 = |v: &[f64]| [v[0] as f32, v[1] as f32, v[2] as f32];
        assert_eq!((as3(&mean), as3(&std)), (IMAGENET_MEAN, IMAGENET_STD));
        normalize(&mut got, IMAGENET_MEAN, IMAGENET_STD);
        let e2 = assert_close(
            &format!("normalize on {img}"),
            &got,
            &map(&f, &format!("normalize.{img}")),
            COLOUR_TOL,
        );
        worst = worst.max(e).max(e2);
        cases += 2;
    }
    assert_eq!(cases, 26);
    eprintln!("colour ops: {cases} cases, max abs error {worst:.2e}");
}

#[test]
fn blur_matches_torchvision_with_its_kx_ky_order_and_the_4_sigma_truncation() {
    let Some(f) = fixture("blur") else { return };
    let imgs = [map(&f, "in.smooth"), map(&f, "in.noisy")];
    let mut n = 0;
    let mut truncated = 0;
    while f.contains_key(&format!("case.{n}.out")) {
        let p = vec64(&f, &format!("case.{n}.params"));
        let (img, sigma, kx, ky) = (p[0] as usize, p[1], p[2] as usize, p[3] as usize);
        let mut got = imgs[img].clone();
        gaussian_blur(&mut got, sigma, kx, ky);
        let want = map(&f, &format!("case.{n}.out"));
        let cut = gaussian_kernel(kx, sigma).len() < kx || gaussian_kernel(ky, sigma).len() < ky;
        truncated += usize::from(cut);
        let e = assert_close(
            &format!("blur case {n}: image {img}, sigma {sigma}, (kx, ky) = ({kx}, {ky})"),
            &got,
            &want,
            BLUR_TOL,
        );
        // Where the two axes' (truncated) kernels differ, swapping them gives a different
        // image: the fixture pins torchvision's (kx, ky) order.
        if gaussian_kernel(kx, sigma).len() != gaussian_kernel(ky, sigma).len() {
            let mut swapped = imgs[img].clone();
            gaussian_blur(&mut swapped, sigma, ky, kx);
            let es = max_err("swapped", &swapped, &want);
            eprintln!("blur case {n}: swapped axes max abs error {es:.2e}");
            assert!(
                es > BLUR_TOL && es > 100.0 * e,
                "case {n}: (ky, kx) matches as well as (kx, ky)"
            );
        }
        eprintln!(
            "blur case {n}: sigma {sigma} ({kx}, {ky}) max abs error {e:.2e}{}",
            if cut { " (truncated at 4 sigma)" } else { "" }
        );
        n += 1;
    }
    assert_eq!(n, 8, "blur cases");
    // The long-kernel cases are where the truncation drops the most mass.
    assert!(
        truncated >= 3,
        "only {truncated} cases exercise the truncation"
    );
}

#[test]
fn compositions_match_torchvision() {
    let Some(f) = fixture("compose") else { return };
    let src = map(&f, "in");
    for i in 0..2 {
        let order: Vec<i64> = get(&f, &format!("comp.{i}.order"))
            .to_vec1::<i64>()
            .unwrap();
        let fac = vec64(&f, &format!("comp.{i}.factors"));
        let rest = vec64(&f, &format!("comp.{i}.rest"));
        let params = ColourParams {
            jitter: Some(Jitter {
                order: [0, 1, 2, 3].map(|j| order[j] as usize),
                brightness: Some(fac[0] as f32),
                contrast: Some(fac[1] as f32),
                saturation: Some(fac[2] as f32),
                hue: Some(fac[3] as f32),
            }),
            grayscale: rest[0] != 0.0,
            blur: (rest[1] > 0.0).then_some(Blur {
                sigma: rest[1],
                kx: rest[2] as usize,
                ky: rest[3] as usize,
            }),
            solarize: rest[4] >= 0.0,
        };
        let mut got = src.clone();
        apply_colour(&mut got, &params, rest[4] as f32);
        normalize(&mut got, IMAGENET_MEAN, IMAGENET_STD);
        let e = assert_close(
            &format!("composition {i}"),
            &got,
            &map(&f, &format!("comp.{i}.out")),
            BLUR_TOL,
        );
        eprintln!("composition {i}: {params:?}: max abs error {e:.2e}");
    }
}

#[test]
fn resize_then_window_matches_interpolate_then_slice() {
    let Some(f) = fixture("crop") else { return };
    let p: Vec<i64> = get(&f, "params").to_vec1::<i64>().unwrap();
    let p: Vec<usize> = p.iter().map(|&v| v as usize).collect();
    assert_eq!(p, [59, 105, 7, 20, 32, 64]);
    let (scaled, origin, out) = ((p[0], p[1]), (p[2], p[3]), (p[4], p[5]));
    let img = resize_window(&map(&f, "in.img"), scaled, origin, out);
    let e1 = assert_close("image window", &img, &map(&f, "out.img"), COLOUR_TOL);
    let want = map(&f, "out.flow");
    let scale = want.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    let flow = resize_window_flow(&map(&f, "in.flow"), scaled, origin, out);
    // Flow values reach ~10 px: 1e-5 relative to the largest.
    let e2 = assert_close("flow window", &flow, &want, 1e-5 * scale.max(1.0));
    eprintln!("resize window: image {e1:.2e}, flow {e2:.2e} (max |flow| {scale:.1})");
}

/// 4000 draws per frame of the default config: the authors' probabilities and ranges.
#[test]
fn default_draws_follow_the_authors_recipe() {
    let cfg = ColourConfig::default();
    cfg.validate().unwrap();
    let n = 4000;
    let mut rng = Rng::new(17);
    for frame in 0..2 {
        let (mut jit, mut gray, mut blur) = (0usize, 0usize, 0usize);
        let mut orders = std::collections::HashSet::new();
        let (mut lo, mut hi) = ([f32::MAX; 4], [f32::MIN; 4]);
        let (mut slo, mut shi) = (f64::MAX, f64::MIN);
        for _ in 0..n {
            let p = sample_colour(&cfg, (512, 1024), frame, &mut rng);
            assert!(!p.solarize, "the authors' recipe has no solarize");
            gray += usize::from(p.grayscale);
            if let Some(j) = &p.jitter {
                jit += 1;
                let mut o = j.order;
                orders.insert(o);
                o.sort();
                assert_eq!(o, [0, 1, 2, 3]);
                let fs = [j.brightness, j.contrast, j.saturation, j.hue].map(Option::unwrap);
                for k in 0..4 {
                    lo[k] = lo[k].min(fs[k]);
                    hi[k] = hi[k].max(fs[k]);
                }
            }
            if let Some(b) = p.blur {
                blur += 1;
                assert_eq!((b.kx, b.ky), (53, 105), "(kx, ky) as the authors pass them");
                slo = slo.min(b.sigma);
                shi = shi.max(b.sigma);
            }
        }
        let rate = |c: usize| c as f64 / n as f64;
        for (what, got, want) in [
            ("jitter", rate(jit), 0.8),
            ("grayscale", rate(gray), 0.2),
            ("blur", rate(blur), 0.5),
        ] {
            assert!(
                (got - want).abs() < 0.03,
                "frame {frame}: {what} rate {got:.3}, want {want} +- 0.03"
            );
        }
        // Factors fill U[0.2, 1.8] (brightness, contrast, saturation) and U[-0.2, 0.2] (hue).
        for k in 0..3 {
            assert!(lo[k] >= 0.2 && lo[k] < 0.21, "factor {k} min {}", lo[k]);
            assert!(hi[k] < 1.8 && hi[k] > 1.79, "factor {k} max {}", hi[k]);
        }
        assert!(lo[3] >= -0.2 && lo[3] < -0.195 && hi[3] < 0.2 && hi[3] > 0.195);
        assert!(
            (0.1..0.11).contains(&slo) && shi < 2.0 && shi > 1.99,
            "{slo} {shi}"
        );
        assert_eq!(orders.len(), 24, "every jitter order occurs");
    }
}
