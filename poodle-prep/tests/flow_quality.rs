//! Flow quality is visible: the prep summary and `inspect` report the occluded fraction, the
//! forward-backward error and the photometric error per store and per video, and prep warns,
//! naming the model and the videos, when the store's median occluded fraction is too high.
//!
//! The reported figures are checked against values this test recomputes from the stored
//! frames, flows and occlusion masks with its own bilinear warp (not poodle's `flowmath`).

use poodle_common::store::PoodleStore;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::prep_bin;

const H: usize = 128;
const W: usize = 224;

fn write_config(dir: &Path) -> PathBuf {
    let cfg = serde_json::json!({
        "name": "quality",
        "layout": {"kind": "folder", "extensions": ["mp4"]},
        "sampling": {"kind": "per_video", "pairs_per_video": 3, "dt_min": 15, "dt_max": 30},
        "height": H, "width": W, "pairs_per_shard": 2, "seed": 3
    });
    let p = dir.join("quality.json");
    std::fs::write(&p, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    p
}

/// Runs prep with the default TV-L1 model and a warning threshold; returns (summary, stderr).
fn prep(cfg: &Path, root: &Path, out: &Path, max_occ: &str) -> (Value, String) {
    let mut c = prep_bin();
    c.args([
        "prep",
        "--quiet",
        "--batch-size",
        "2",
        "--flow-threads",
        "2",
    ])
    .args([
        "--model",
        "models/tvl1_flow.json",
        "--max-occluded-median",
        max_occ,
    ])
    .arg("--config")
    .arg(cfg)
    .arg("--root")
    .arg(root)
    .arg("--out")
    .arg(out);
    let o = ok(c);
    (
        serde_json::from_slice(&o.stdout).expect("JSON summary on stdout"),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn ok(mut c: Command) -> Output {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o
}

/// Bilinear sample of plane `p` (h x w) at (x, y); None outside [0, w-1] x [0, h-1].
fn sample(p: &[f32], h: usize, w: usize, x: f32, y: f32) -> Option<f32> {
    if !(x >= 0.0 && y >= 0.0 && x <= (w - 1) as f32 && y <= (h - 1) as f32) {
        return None;
    }
    let (x0, y0) = (x.floor() as usize, y.floor() as usize);
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let at = |xx: usize, yy: usize| {
        if xx < w && yy < h {
            p[yy * w + xx]
        } else {
            0.0
        }
    };
    Some(
        at(x0, y0) * (1.0 - fx) * (1.0 - fy)
            + at(x0 + 1, y0) * fx * (1.0 - fy)
            + at(x0, y0 + 1) * (1.0 - fx) * fy
            + at(x0 + 1, y0 + 1) * fx * fy,
    )
}

/// (occluded fraction, fb error, photometric error) of one stored pair, recomputed.
fn recompute(frames: &[u8], fwd: &[f32], bwd: &[f32], occ: &[bool]) -> [f64; 3] {
    let n = H * W;
    let plane = |k: usize| -> Vec<f32> {
        frames[k * n..(k + 1) * n]
            .iter()
            .map(|&v| f32::from(v))
            .collect()
    };
    let f1: Vec<Vec<f32>> = (0..3).map(plane).collect();
    let f2: Vec<Vec<f32>> = (3..6).map(plane).collect();
    let (mut fb, mut ph, mut cnt) = (0.0f64, 0.0f64, 0usize);
    for p in 0..n {
        let (x, y) = ((p % W) as f32 + fwd[p], (p / W) as f32 + fwd[n + p]);
        let Some(bu) = sample(&bwd[..n], H, W, x, y) else {
            continue;
        };
        if occ[p] {
            continue;
        }
        let bv = sample(&bwd[n..], H, W, x, y).unwrap();
        cnt += 1;
        fb += f64::from((fwd[p] + bu).hypot(fwd[n + p] + bv));
        for c in 0..3 {
            let w2 = sample(&f2[c], H, W, x, y).unwrap();
            ph += f64::from((f1[c][p] - w2).abs()) / 3.0;
        }
    }
    let occ_frac = occ.iter().filter(|&&o| o).count() as f64 / n as f64;
    [occ_frac, fb / cnt.max(1) as f64, ph / cnt.max(1) as f64]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

/// Checks one reported quality object against the recomputed per-pair rows.
fn check(q: &Value, rows: &[[f64; 3]], what: &str) {
    assert_eq!(q["pairs"].as_u64().unwrap() as usize, rows.len(), "{what}");
    // Stored flow is rounded to 1/32 px: the recomputed errors may move a little
    // (absolute + relative tolerance); the occlusion mask is stored exactly.
    for (j, (name, abs, rel)) in [
        ("occluded_frac", 1e-6, 0.0),
        ("fb_error", 0.02, 0.02),
        ("photometric_error", 0.05, 0.02),
    ]
    .iter()
    .enumerate()
    {
        let col: Vec<f64> = rows.iter().map(|r| r[j]).collect();
        let mean = col.iter().sum::<f64>() / col.len() as f64;
        for (stat, want) in [("median", median(&col)), ("mean", mean)] {
            let got = q[name][stat].as_f64().unwrap();
            assert!(
                (got - want).abs() <= abs + rel * want.abs(),
                "{what} {name} {stat}: reported {got}, recomputed {want}"
            );
        }
    }
}

#[test]
fn summary_and_inspect_report_quality_that_the_stored_pairs_reproduce() {
    let Some(root) = common::shared_data("video", "dashcam-highway-720p.mp4") else {
        return;
    };
    let d = common::tmpdir("quality", "summary");
    let cfg = write_config(&d);
    let out = d.join("out");
    // Threshold 0: any occlusion at all warns.
    let (s, err) = prep(&cfg, &root, &out, "0");
    let store_path = out.join("quality-part-00000-of-00001.zarr");
    let store = PoodleStore::open(&store_path).unwrap();
    let (group, _) = store.flow_group(None).unwrap().clone();
    let mut by_video: Vec<Vec<[f64; 3]>> = vec![vec![]; store.attrs.videos.len()];
    for i in 0..store.num_pairs() {
        let p = store.read_pair(i).unwrap();
        assert!(p.valid, "pair {i} skipped");
        let f = store.read_flow(&group, i).unwrap();
        let row = recompute(
            &p.frames,
            &f.forward,
            f.backward.as_ref().unwrap(),
            &f.occlusion,
        );
        by_video[p.video as usize].push(row);
    }
    let q = &s["flow_quality"];
    assert_eq!(q["model_name"], "tvl1_flow");
    let all: Vec<[f64; 3]> = by_video.concat();
    check(&q["store"], &all, "store");
    assert!(q["store"]["occluded_frac"]["median"].as_f64().unwrap() > 0.0);
    for (vi, rows) in by_video.iter().enumerate() {
        let name = &store.attrs.videos[vi];
        let v = q["videos"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["video"] == name.as_str())
            .unwrap_or_else(|| panic!("no row for {name} in {q}"));
        check(v, rows, name);
    }
    // The warning names the model and the videos, in the summary and on stderr.
    let w = q["warning"].as_str().expect("warning at threshold 0");
    for want in [
        "tvl1_flow",
        "dashcam-highway-540p.mp4",
        "dashcam-highway-720p.mp4",
    ] {
        assert!(w.contains(want), "{w}");
    }
    assert!(err.contains(&format!("warning: {w}")), "{err}");
    assert!(err.contains("flow quality of group tvl1_flow"), "{err}");

    // A resumed run reports the same figures (read back from the store); threshold 1 is quiet.
    let (again, err) = prep(&cfg, &root, &out, "1");
    assert_eq!(again["shards_written_now"], 0);
    assert_eq!(again["flow_quality"]["store"], q["store"]);
    assert!(again["flow_quality"]["warning"].is_null());
    assert!(!err.contains("warning:"), "{err}");

    // inspect reports the same quality.
    let mut c = prep_bin();
    c.args(["inspect", "--json", "--max-occluded-median", "0"])
        .arg(&store_path);
    let i: Value = serde_json::from_slice(&ok(c).stdout).unwrap();
    let iq = &i["flow_groups"][0]["quality"];
    assert_eq!(iq["store"], q["store"]);
    assert_eq!(iq["videos"], q["videos"]);
    assert_eq!(iq["warning"], q["warning"]);
    std::fs::remove_dir_all(d).unwrap();
}
