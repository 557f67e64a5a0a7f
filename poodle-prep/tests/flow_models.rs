//! The shipped default flow model computes real optical flow: its accuracy on real pairs with
//! ground truth (`../shared/data/flow`) must stay within the bars of the flow-model issue.

use std::process::Command;

mod common;
use common::{ort_lib, repo};

#[test]
fn tvl1_default_model_meets_the_accuracy_bars() {
    let Some(_data) = common::shared_data("flow", "Middlebury_flow_gt.flo") else {
        return;
    };
    let lib = ort_lib();
    let o = Command::new(env!("CARGO_BIN_EXE_poodle-prep"))
        .current_dir(repo())
        .args(["eval-flow", "--json", "--model", "models/tvl1_flow.json"])
        .env("ORT_DYLIB_PATH", lib)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["model"], "tvl1_flow");
    let row = |name: &str| {
        v["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["name"] == name)
            .unwrap_or_else(|| panic!("no {name} row in {v}"))
            .clone()
    };
    let rw = row("middlebury-rubberwhale");
    let kitti = row("kitti");
    // Bars of issue 13 item 5: RubberWhale AEE <= 0.5 px (DIS medium 0.22, Farneback 0.36),
    // KITTI <= 15 px (the default: 14.9; DIS medium 24-38 by OpenCV version, Farneback 46).
    // Whoever chases the dashcam consistency target trades against exactly these.
    assert!(rw["aee"].as_f64().unwrap() <= 0.5, "{rw}");
    assert!(kitti["aee"].as_f64().unwrap() <= 15.0, "{kitti}");
    // The flow explains the motion: warping lowers the photometric error well below no motion.
    for r in [&rw, &kitti] {
        let (pred, zero) = (
            r["photometric_pred"].as_f64().unwrap(),
            r["photometric_zero"].as_f64().unwrap(),
        );
        assert!(pred < 0.6 * zero, "{r}");
    }
    assert!(kitti["fl_all"].as_f64().unwrap() < 100.0);
    check_dashcam_rows(&v);
}

/// The real-video consistency rows: both sample clips, the sample config's gaps and size,
/// figures that are fractions and errors, and a flow that explains the motion.
fn check_dashcam_rows(v: &serde_json::Value) {
    if common::shared_data("video", "dashcam-highway-720p.mp4").is_none() {
        return;
    }
    let clips = v["videos"].as_array().expect("videos rows");
    let names: Vec<&str> = clips.iter().map(|c| c["video"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["dashcam-highway-540p.mp4", "dashcam-highway-720p.mp4"],
        "{v}"
    );
    for c in clips {
        assert_eq!(c["size"], serde_json::json!([360, 640]), "{c}");
        let pairs = c["pairs"].as_array().unwrap();
        assert_eq!(pairs.len(), 4, "{c}");
        let mut occ = Vec::new();
        for p in pairs {
            assert!((15..=30).contains(&p["dt"].as_u64().unwrap()), "{p}");
            let f = |k: &str| p[k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&f("occluded_frac")), "{p}");
            assert!(f("photometric_error") < f("photometric_zero"), "{p}");
            occ.push(f("occluded_frac"));
        }
        // The row's median is the median of its pairs (even count: mean of the middle two).
        occ.sort_by(f64::total_cmp);
        let med = 0.5 * (occ[1] + occ[2]);
        assert!(
            (c["occluded_frac"]["median"].as_f64().unwrap() - med).abs() < 1e-9,
            "{c}"
        );
    }
}
