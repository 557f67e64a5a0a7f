//! `poodle-train plot` end to end: two runs' metrics.jsonl in, one PNG out, read back as
//! pixels: each run is drawn in its colour, a falling loss falls, a term only one run logs
//! shows only that run.

mod common;

use poodle_train::plot::{PANELS, RUN_COLOURS};
use std::path::Path;
use std::process::Command;

const PANEL_W: u32 = 480;
const PANEL_H: u32 = 300;

fn write_run(dir: &Path, steps: u64, total: impl Fn(f64) -> f64, pooled: bool) {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = String::new();
    for step in 1..=steps {
        let t = total(step as f64);
        let mut line = serde_json::json!({
            "step": step, "pass": 0, "epoch": step as f64 / 10.0, "pairs_seen": step * 4,
            "lr": 1e-3 * step as f64 / steps as f64, "momentum": 0.99, "total": t,
            "dense": 0.7 * t, "dense_ab": 0.35 * t, "dense_ba": 0.35 * t,
            "dense_mask_fraction": 0.8, "proj_std": 0.05, "grad_norm": 1.0 + t,
            "pairs_per_s": 3.0, "data_wait_s": 0.01,
        });
        if pooled {
            let o = line.as_object_mut().unwrap();
            for (k, f) in [("pooled", 0.3), ("pooled_ab", 0.15), ("pooled_ba", 0.15)] {
                o.insert(k.into(), (f * t).into());
            }
        }
        text += &format!("{line}\n");
    }
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

/// (x, y) of the pixels of `colour` inside panel `index`.
fn pixels_in_panel(img: &image::RgbImage, index: usize, colour: (u8, u8, u8)) -> Vec<(u32, u32)> {
    let (px, py) = ((index % 3) as u32 * PANEL_W, (index / 3) as u32 * PANEL_H);
    let want = image::Rgb([colour.0, colour.1, colour.2]);
    let mut found = Vec::new();
    for y in py..py + PANEL_H {
        for x in px..px + PANEL_W {
            if *img.get_pixel(x, y) == want {
                found.push((x, y));
            }
        }
    }
    found
}

fn panel(key: &str) -> usize {
    PANELS.iter().position(|(k, _)| *k == key).unwrap()
}

#[test]
fn plot_overlays_runs_one_panel_per_term() {
    let tmp = common::tmpdir("plot");
    let (alpha, beta) = (tmp.join("alpha"), tmp.join("beta"));
    write_run(&alpha, 60, |s| 10.0 * (-s / 20.0).exp(), true);
    write_run(&beta, 40, |s| 4.0 + 0.01 * s, false);
    let out = tmp.join("curves/both.png");
    let st = Command::new(env!("CARGO_BIN_EXE_poodle-train"))
        .args([
            "plot",
            alpha.to_str().unwrap(),
            beta.to_str().unwrap(),
            "--out",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(
        img.dimensions(),
        (3 * PANEL_W, 4 * PANEL_H),
        "12 panels, 3 per row"
    );

    let (a, b) = (RUN_COLOURS[0], RUN_COLOURS[1]);
    let total_a = pixels_in_panel(&img, panel("total"), a);
    assert!(
        total_a.len() > 200,
        "alpha's total curve: {} px",
        total_a.len()
    );
    assert!(pixels_in_panel(&img, panel("total"), b).len() > 200);
    // alpha's loss falls: its curve is lower (larger y) in the panel's middle than at its
    // start (the legend sits at the upper right, away from both).
    let x_min = total_a.iter().map(|p| p.0).min().unwrap();
    let x_max = total_a.iter().map(|p| p.0).max().unwrap();
    let band = |lo: f64, hi: f64| {
        let ys: Vec<f64> = total_a
            .iter()
            .filter(|p| {
                let f = (p.0 - x_min) as f64 / (x_max - x_min) as f64;
                f >= lo && f < hi
            })
            .map(|p| p.1 as f64)
            .collect();
        ys.iter().sum::<f64>() / ys.len() as f64
    };
    assert!(
        band(0.0, 0.05) + 60.0 < band(0.45, 0.55),
        "start {} vs middle {}",
        band(0.0, 0.05),
        band(0.45, 0.55)
    );
    // beta logs no pooled terms: absent there (curve and legend), present in dense.
    assert!(pixels_in_panel(&img, panel("pooled"), a).len() > 200);
    assert!(pixels_in_panel(&img, panel("pooled"), b).is_empty());
    assert!(pixels_in_panel(&img, panel("dense"), b).len() > 200);
    // text was drawn: dark pixels in the caption strip of the first panel.
    let dark = (0..PANEL_W)
        .flat_map(|x| (0..24).map(move |y| (x, y)))
        .filter(|&(x, y)| img.get_pixel(x, y).0.iter().all(|&c| c < 100))
        .count();
    assert!(dark > 50, "caption pixels: {dark}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn plot_names_a_run_without_metrics() {
    let tmp = common::tmpdir("plot-missing");
    let out = Command::new(env!("CARGO_BIN_EXE_poodle-train"))
        .args(["plot", tmp.join("nope").to_str().unwrap(), "--out"])
        .arg(tmp.join("x.png"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope") && err.contains("cannot read"), "{err}");
    assert!(!tmp.join("x.png").exists());
    std::fs::remove_dir_all(&tmp).unwrap();
}
