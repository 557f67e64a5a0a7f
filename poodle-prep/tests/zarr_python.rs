//! Interop: a store written by `poodle-prep` (zarrs) must read the same in zarr-python 3.
//!
//! Runs prep on the real sample videos (an odd number of pairs, a partial last shard, backward
//! flow stored), reads a few pairs back with `poodle_common::store::PoodleStore`, writes what
//! it saw to an expected JSON, then runs `tests/zarr_interop.py STORE EXPECTED.json` with the
//! project's venv python (`make setup`), which re-reads the store with zarr-python and checks
//! the schema, the codecs and the values.

mod common;

use poodle_common::store::PoodleStore;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Pairs kept (odd) and pairs per shard (does not divide it): shards of 2, 2 and 1.
const NUM_PAIRS: usize = 5;
const PAIRS_PER_SHARD: usize = 2;
const HEIGHT: usize = 128;
const WIDTH: usize = 224;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// sum(v[k] * (k % 251 + 1)) over the flat index: catches layouts that a plain sum misses
/// (same definition as `weighted_sum` in tests/zarr_interop.py).
fn weighted_sum(values: impl Iterator<Item = i64>) -> i64 {
    values
        .enumerate()
        .map(|(k, v)| v * (k as i64 % 251 + 1))
        .sum()
}

fn run_logged(cmd: &mut Command, what: &str) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: could not start {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{what} failed ({}): {cmd:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// What the Rust reader sees: the expected values for the Python side.
fn expected(store: &PoodleStore, indices: &[usize]) -> Value {
    let a = &store.attrs;
    let g = a.geometry;
    let mut groups = serde_json::Map::new();
    for (name, fa) in &store.flow_groups {
        groups.insert(
            name.clone(),
            json!({
                "flow_scale": f64::from(fa.flow_scale),
                "backward": fa.backward,
                "stat_names": fa.stat_names,
            }),
        );
    }
    let valid = store.read_all_valid().expect("read valid");
    let mut pairs = Vec::new();
    for &i in indices {
        let p = store.read_pair(i).expect("read_pair");
        assert_eq!(
            p.frames.len(),
            2 * 3 * g.height * g.width,
            "pair {i} frames"
        );
        let mut flow = serde_json::Map::new();
        for (name, fa) in &store.flow_groups {
            let f = store.read_flow(name, i).expect("read_flow");
            // Stored values are int16 at flow_scale (a power of two): v / scale is exact.
            let raw = |v: &[f32]| -> Vec<i64> {
                v.iter()
                    .map(|x| (x / fa.flow_scale).round() as i64)
                    .collect()
            };
            let fwd = raw(&f.forward);
            let mut e = json!({
                "forward_sum": fwd.iter().sum::<i64>(),
                "forward_wsum": weighted_sum(fwd.iter().copied()),
                "occluded": f.occlusion.iter().filter(|&&o| o).count(),
                "occluded_wsum": weighted_sum(f.occlusion.iter().map(|&o| i64::from(o))),
                "stats": f.stats.iter().map(|&s| f64::from(s)).collect::<Vec<f64>>(),
            });
            if let Some(b) = &f.backward {
                let bwd = raw(b);
                e["backward_sum"] = json!(bwd.iter().sum::<i64>());
                e["backward_wsum"] = json!(weighted_sum(bwd.iter().copied()));
                let ob = f.occlusion_backward.as_ref().expect("backward occlusion");
                e["occluded_backward"] = json!(weighted_sum(ob.iter().map(|&o| i64::from(o))));
            }
            flow.insert(name.clone(), e);
        }
        pairs.push(json!({
            "index": i,
            "video": p.video,
            "t": p.t,
            "dt": p.dt,
            "valid": p.valid,
            "frames_sum": p.frames.iter().map(|&b| u64::from(b)).sum::<u64>(),
            "frames_wsum": weighted_sum(p.frames.iter().map(|&b| i64::from(b))),
            "flow": flow,
        }));
    }
    json!({
        "schema_version": a.schema_version,
        "num_pairs": g.num_pairs,
        "height": g.height,
        "width": g.width,
        "pairs_per_shard": g.pairs_per_shard,
        "videos": a.videos,
        "valid_count": valid.iter().filter(|&&v| v).count(),
        "flow_groups": groups,
        "pairs": pairs,
    })
}

#[test]
fn zarr_python_reads_prep_store() {
    let repo = repo();
    let Some(root) = common::shared_data("video", "dashcam-highway-720p.mp4") else {
        return;
    };
    let venv = repo.join(".venv");
    let python = venv.join("bin/python");
    assert!(
        python.exists(),
        "{} is missing: run `make setup` (it creates .venv with onnxruntime and zarr-python)",
        python.display()
    );
    let ort = common::ort_lib();

    let tmp = std::env::temp_dir().join(format!("poodle-zarr-python-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let config = tmp.join("interop.json");
    let cfg = json!({
        "name": "interop",
        "layout": {"kind": "folder", "extensions": ["mp4"]},
        "sampling": {"kind": "per_video", "pairs_per_video": 3, "dt_min": 15, "dt_max": 30},
        "height": HEIGHT,
        "width": WIDTH,
        "pairs_per_shard": PAIRS_PER_SHARD,
        "seed": 0,
    });
    std::fs::write(&config, serde_json::to_vec_pretty(&cfg).unwrap()).expect("write config");
    let out = tmp.join("out");
    run_logged(
        Command::new(env!("CARGO_BIN_EXE_poodle-prep"))
            .current_dir(&repo)
            .arg("prep")
            .arg("--config")
            .arg(&config)
            .arg("--root")
            .arg(&root)
            .arg("--out")
            .arg(&out)
            .arg("--model")
            .arg(repo.join("models/raft_small_random.json"))
            .arg("--ort-lib")
            .arg(&ort)
            .arg("--max-pairs")
            .arg(NUM_PAIRS.to_string())
            .arg("--quiet"),
        "poodle-prep prep",
    );
    let store_path = out.join("interop-part-00000-of-00001.zarr");

    let store = PoodleStore::open(&store_path).expect("open store");
    let g = store.attrs.geometry;
    assert_eq!(g.num_pairs, NUM_PAIRS, "the sample videos give fewer pairs");
    assert!(
        !g.num_pairs.is_multiple_of(2) && !g.num_pairs.is_multiple_of(g.pairs_per_shard),
        "odd pairs and a partial last shard"
    );
    assert_eq!(store.flow_groups.len(), 1);
    assert!(store.flow_groups[0].1.backward, "backward flow stored");
    // First pair, a shard boundary, and both pairs around the partial last shard.
    let n = g.num_pairs;
    let mut indices = vec![0, 1, n - 2, n - 1];
    indices.dedup();
    let exp = expected(&store, &indices);
    let exp_path = tmp.join("expected.json");
    std::fs::write(&exp_path, serde_json::to_vec_pretty(&exp).unwrap()).expect("write expected");

    let script = repo.join("tests/zarr_interop.py");
    let res = run_logged(
        Command::new(&python)
            .current_dir(&repo)
            .arg(&script)
            .arg(&store_path)
            .arg(&exp_path),
        "tests/zarr_interop.py (zarr-python)",
    );
    print!("{}", String::from_utf8_lossy(&res.stdout));
    let _ = std::fs::remove_dir_all(&tmp);
}
