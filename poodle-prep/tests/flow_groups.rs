//! `flow STORE --model M`: a second flow group over a finished store, resumable after
//! SIGKILL, invisible until complete; and the prep filters for near-static and degenerate
//! pairs.

use poodle_common::store::PoodleStore;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::{prep_bin, run_json as ok};

fn bin(args: &[&str]) -> Command {
    let mut c = prep_bin();
    c.args(args);
    c
}

fn tmpdir(tag: &str) -> PathBuf {
    common::tmpdir("flowgroups", tag)
}

fn config(dir: &Path, per_shard: usize, r: usize) -> PathBuf {
    let p = dir.join("fg.json");
    let cfg = serde_json::json!({
        "name": "fg", "layout": {"kind": "folder", "extensions": ["mp4"]},
        "sampling": {"kind": "per_video", "pairs_per_video": r, "dt_min": 15, "dt_max": 30},
        "height": 128, "width": 224, "pairs_per_shard": per_shard, "seed": 2
    });
    std::fs::write(&p, serde_json::to_vec(&cfg).unwrap()).unwrap();
    p
}

#[test]
fn second_flow_group_is_resumable_and_matches_prep_flow() {
    let Some(videos) = common::shared_data("video", "dashcam-highway-720p.mp4") else {
        return;
    };
    let d = tmpdir("reflow");
    let cfg = config(&d, 1, 4);
    let out = d.join("out");
    ok(bin(&[
        "prep",
        "--config",
        cfg.to_str().unwrap(),
        "--root",
        videos.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--quiet",
    ]));
    let store = out.join("fg-part-00000-of-00001.zarr");
    let s = store.to_str().unwrap();
    let done_dir = store.join(".poodle/flow-again/done");
    let done = || std::fs::read_dir(&done_dir).map_or(0, |rd| rd.count());
    let mut kills = 0;
    for delay in [700u64, 1400, 2100, 2800, 3500, 4200] {
        let mut child = bin(&["flow", s, "--flow-group", "again", "--quiet"])
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        let partial =
            PoodleStore::open(&store).expect("the store stays valid while a flow group is written");
        if partial.flow_groups.len() == 2 {
            break;
        }
        assert_eq!(
            partial.flow_groups.len(),
            1,
            "an unfinished group must be invisible"
        );
        if done() >= 1 {
            break;
        }
    }
    assert!(kills >= 1, "the flow job was never interrupted");
    let summary = ok(bin(&["flow", s, "--flow-group", "again", "--quiet"]));
    if summary["pairs_flowed"] != 0 {
        assert!(
            summary["shards_resumed"].as_u64().unwrap() >= 1,
            "{summary}"
        );
    }
    let st = PoodleStore::open(&store).unwrap();
    let names: Vec<&str> = st.flow_groups.iter().map(|(g, _)| g.as_str()).collect();
    assert_eq!(names, vec!["again", "raft_small_random"]);
    // Same model over the stored frames: exactly the flow prep computed from the video.
    for i in 0..st.num_pairs() {
        let a = st.read_flow("raft_small_random", i).unwrap();
        let b = st.read_flow("again", i).unwrap();
        assert_eq!(a.forward, b.forward, "pair {i}");
        assert_eq!(a.occlusion, b.occlusion, "pair {i}");
    }
    // Rerunning a complete group is a no-op.
    let again = ok(bin(&["flow", s, "--flow-group", "again", "--quiet"]));
    assert_eq!(again["pairs_flowed"], 0);
    // Another model may not write into that group, but gets its own beside it.
    let tvl1 = ["--model", "models/tvl1_flow.json", "--quiet"];
    let o = bin(&[&["flow", s, "--flow-group", "again"][..], &tvl1[..]].concat())
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds flow of another model"));
    let third = ok(bin(&[&["flow", s][..], &tvl1[..]].concat()));
    assert_eq!(third["flow_group"], "tvl1_flow");
    let st = PoodleStore::open(&store).unwrap();
    assert_eq!(st.flow_groups.len(), 3);
    let (_, fa) = st.flow_group(Some("tvl1_flow")).unwrap();
    assert_eq!(fa.model_name, "tvl1_flow");
    assert!(fa.backward);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn near_static_and_degenerate_pairs_are_dropped_and_counted() {
    let d = tmpdir("filters");
    let vids = d.join("videos");
    std::fs::create_dir_all(&vids).unwrap();
    for (name, src) in [
        ("black.mp4", "color=black:size=320x240:rate=25"),
        ("still.mp4", "testsrc=size=320x240:rate=25"),
    ] {
        let mut c = Command::new("ffmpeg");
        c.args(["-v", "error", "-y", "-f", "lavfi", "-i", src]);
        if name == "still.mp4" {
            // One test pattern frame, repeated: frozen.
            c.args([
                "-vf",
                "select=eq(n\\,0),loop=loop=60:size=1:start=0,setpts=N/25/TB",
            ]);
        }
        let st = c
            .args(["-frames:v", "60", "-pix_fmt", "yuv420p"])
            .arg(vids.join(name))
            .status()
            .unwrap();
        assert!(st.success(), "ffmpeg failed for {name}");
    }
    let cfg = config(&d, 2, 2);
    let base = [
        "prep",
        "--config",
        cfg.to_str().unwrap(),
        "--root",
        vids.to_str().unwrap(),
        "--quiet",
    ];
    let mut args: Vec<&str> = base.to_vec();
    let out1 = d.join("out1");
    args.extend(["--out", out1.to_str().unwrap(), "--drop-degenerate"]);
    let s = ok(bin(&args));
    assert_eq!(s["pairs_written"], 0, "{s}");
    assert_eq!(s["skipped_by_kind"]["black"], 2, "{s}");
    assert_eq!(s["skipped_by_kind"]["frozen"], 2, "{s}");
    // Without the filter the same pairs are written; with an absurd motion threshold every
    // pair is near-static.
    let mut args: Vec<&str> = base.to_vec();
    let out2 = d.join("out2");
    args.extend(["--out", out2.to_str().unwrap()]);
    assert_eq!(ok(bin(&args))["pairs_written"], 4);
    let mut args: Vec<&str> = base.to_vec();
    let out3 = d.join("out3");
    args.extend(["--out", out3.to_str().unwrap(), "--min-median-flow", "1000"]);
    let s = ok(bin(&args));
    assert_eq!(s["skipped_by_kind"]["near_static"], 4, "{s}");
    assert!(s["skipped_pairs"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("median flow"));
    std::fs::remove_dir_all(d).unwrap();
}
