//! The prep job end to end on the real sample clips: resume after SIGKILL gives the same
//! store, bad videos are skipped and reported, parts split the manifest, a second writer is
//! refused, and missing tools or a mismatched model fail before any work.

use poodle_common::store::PoodleStore;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

mod common;
use common::{prep_bin, repo, run_json as run_ok};

fn sample_videos() -> Option<PathBuf> {
    common::shared_data("video", "dashcam-highway-720p.mp4")
}

fn tmpdir(tag: &str) -> PathBuf {
    common::tmpdir("job", tag)
}

fn write_config(
    dir: &Path,
    name: &str,
    pairs_per_video: usize,
    per_shard: usize,
    seed: u64,
) -> PathBuf {
    let cfg = serde_json::json!({
        "name": name,
        "layout": {"kind": "folder", "extensions": ["mp4"]},
        "sampling": {"kind": "per_video", "pairs_per_video": pairs_per_video, "dt_min": 15, "dt_max": 30},
        "height": 128, "width": 224, "pairs_per_shard": per_shard, "seed": seed
    });
    let p = dir.join(format!("{name}.json"));
    std::fs::write(&p, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    p
}

fn prep_cmd(cfg: &Path, root: &Path, out: &Path, extra: &[&str]) -> Command {
    let mut c = prep_bin();
    c.arg("prep")
        .arg("--config")
        .arg(cfg)
        .arg("--root")
        .arg(root)
        .arg("--out")
        .arg(out)
        .args(["--quiet", "--batch-size", "2", "--flow-threads", "2"])
        .args(extra);
    c
}

/// Every value of one pair: frames, flow, occlusion, stats, (video, t, dt), valid.
type PairValues = (Vec<u8>, Vec<f32>, Vec<bool>, Vec<f32>, i64, i64, i64, bool);

/// Every value of every pair, for comparing two stores.
fn store_contents(path: &Path) -> Vec<PairValues> {
    let s = PoodleStore::open(path).unwrap();
    let (group, _) = s.flow_group(None).unwrap().clone();
    (0..s.num_pairs())
        .map(|i| {
            let p = s.read_pair(i).unwrap();
            let f = s.read_flow(&group, i).unwrap();
            (
                p.frames,
                f.forward,
                f.occlusion,
                f.stats,
                p.video,
                p.t,
                p.dt,
                p.valid,
            )
        })
        .collect()
}

#[test]
fn sigkill_at_any_moment_then_rerun_gives_the_uninterrupted_store() {
    let Some(root) = sample_videos() else { return };
    let d = tmpdir("kill");
    let cfg = write_config(&d, "killtest", 3, 1, 5);
    let clean = d.join("clean");
    let s = run_ok(prep_cmd(&cfg, &root, &clean, &[]));
    assert_eq!(s["pairs_written"], 6);
    assert_eq!(s["shards_total"], 6);
    // Rerunning a finished job skips every shard.
    let again = run_ok(prep_cmd(&cfg, &root, &clean, &[]));
    assert_eq!(again["shards_resumed"], 6);
    assert_eq!(again["shards_written_now"], 0);

    let killed = d.join("killed");
    let store = killed.join("killtest-part-00000-of-00001.zarr");
    let mut kills = 0;
    for delay_ms in [700u64, 1500, 2500, 3500, 5000] {
        let mut child = prep_cmd(&cfg, &root, &killed, &[]).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            kills += 1;
        }
        child.wait().unwrap();
        if store.join("zarr.json").exists() {
            break;
        }
        // An unfinished store has no root metadata: it cannot be mistaken for a complete one.
        assert!(PoodleStore::open(&store).is_err());
    }
    assert!(kills >= 1, "the job was never interrupted");
    let s = run_ok(prep_cmd(&cfg, &root, &killed, &[]));
    assert_eq!(s["pairs_written"], 6);
    let a = store_contents(&clean.join("killtest-part-00000-of-00001.zarr"));
    let b = store_contents(&store);
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            x == y,
            "pair {i} differs between the uninterrupted and the killed+resumed store"
        );
    }
    let meta = |p: &Path| std::fs::read_to_string(p.join("zarr.json")).unwrap();
    assert_eq!(
        meta(&clean.join("killtest-part-00000-of-00001.zarr")).replace("clean", "X"),
        meta(&store).replace("killed", "X")
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn bad_videos_are_skipped_and_named_while_the_job_goes_on() {
    let Some(root) = sample_videos() else { return };
    let d = tmpdir("bad");
    let vids = d.join("videos");
    std::fs::create_dir_all(&vids).unwrap();
    std::fs::copy(root.join("dashcam-highway-720p.mp4"), vids.join("good.mp4")).unwrap();
    std::fs::write(vids.join("empty.mp4"), b"").unwrap();
    std::fs::write(vids.join("garbage.mp4"), vec![0x5au8; 100_000]).unwrap();
    let full = std::fs::read(root.join("dashcam-highway-540p.mp4")).unwrap();
    std::fs::write(vids.join("truncated.mp4"), &full[..full.len() / 3]).unwrap();
    // Ten frames: too short for dt >= 15.
    let ok = Command::new("ffmpeg")
        .args([
            "-v",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=320x240:rate=25",
        ])
        .args(["-frames:v", "10", "-pix_fmt", "yuv420p"])
        .arg(vids.join("short.mp4"))
        .status()
        .unwrap();
    assert!(ok.success());
    let cfg = write_config(&d, "badtest", 2, 2, 0);
    let s = run_ok(prep_cmd(&cfg, &vids, &d.join("out"), &[]));
    let skipped: Vec<(String, String)> = s["skipped_videos"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["path"].as_str().unwrap().to_string(),
                v["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let reason = |name: &str| {
        skipped
            .iter()
            .find(|(p, _)| p == name)
            .map(|(_, r)| r.clone())
            .unwrap_or_else(|| panic!("{name} not reported as skipped: {skipped:?}"))
    };
    assert!(reason("empty.mp4").contains("zero-length"));
    assert!(
        reason("garbage.mp4").contains("unreadable"),
        "{}",
        reason("garbage.mp4")
    );
    assert!(reason("short.mp4").contains("too short: 10 frames"));
    assert!(!skipped.iter().any(|(p, _)| p == "good.mp4"));
    // The good video's pairs were written; a truncated file is either skipped by name or
    // contributes only frames that exist.
    let store = PoodleStore::open(&d.join("out/badtest-part-00000-of-00001.zarr")).unwrap();
    assert!(store.attrs.videos.contains(&"good.mp4".to_string()));
    let written = s["pairs_written"].as_u64().unwrap() as usize;
    let valid = store
        .read_all_valid()
        .unwrap()
        .iter()
        .filter(|&&v| v)
        .count();
    assert_eq!(written, valid);
    assert!(written >= 2);
    assert_eq!(
        written + s["pairs_skipped"].as_u64().unwrap() as usize,
        store.num_pairs()
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn parts_split_the_manifest_and_default_from_slurm() {
    let Some(root) = sample_videos() else { return };
    let d = tmpdir("parts");
    let cfg = write_config(&d, "parttest", 2, 2, 1);
    let out = d.join("out");
    // Probe once before the array, as the README's sbatch script does.
    let mut disc = Command::new(env!("CARGO_BIN_EXE_poodle-prep"));
    disc.arg("discover")
        .arg("--config")
        .arg(&cfg)
        .arg("--root")
        .arg(&root)
        .arg("--out")
        .arg(&out);
    let counts = run_ok(disc);
    assert_eq!(
        (counts["videos"].as_u64(), counts["pairs"].as_u64()),
        (Some(2), Some(4))
    );
    let probed = out.join("manifest/parttest-videos.json");
    let before = std::fs::metadata(&probed).unwrap().modified().unwrap();
    let mut c0 = prep_cmd(&cfg, &root, &out, &[]);
    c0.env("SLURM_ARRAY_TASK_ID", "0")
        .env("SLURM_ARRAY_TASK_COUNT", "2");
    let s0 = run_ok(c0);
    let mut c1 = prep_cmd(&cfg, &root, &out, &[]);
    c1.env("SLURM_ARRAY_TASK_ID", "1")
        .env("SLURM_ARRAY_TASK_COUNT", "2");
    let s1 = run_ok(c1);
    assert_eq!(
        std::fs::metadata(&probed).unwrap().modified().unwrap(),
        before,
        "parts reuse the probed manifest"
    );
    assert_eq!(s0["part_index"], 0);
    assert_eq!(s1["part_index"], 1);
    assert_eq!(s1["num_parts"], 2);
    let p0 = PoodleStore::open(&out.join("parttest-part-00000-of-00002.zarr")).unwrap();
    let p1 = PoodleStore::open(&out.join("parttest-part-00001-of-00002.zarr")).unwrap();
    assert_eq!(p0.attrs.manifest_sha256, p1.attrs.manifest_sha256);
    assert_eq!(p0.attrs.first_pair, 0);
    assert_eq!(p1.attrs.first_pair, p0.num_pairs());
    // Together the parts hold the whole manifest (2 videos x 2 pairs), in order, once.
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("manifest/parttest-pairs.json")).unwrap())
            .unwrap();
    let all = manifest["pairs"].as_array().unwrap();
    assert_eq!(all.len(), 4);
    let mut k = 0;
    for s in [&p0, &p1] {
        for i in 0..s.num_pairs() {
            let r = s.read_pair(i).unwrap();
            let video = &s.attrs.videos[r.video as usize];
            let m = &all[k];
            let mvideo = if m["video"] == 0 {
                "dashcam-highway-540p.mp4"
            } else {
                "dashcam-highway-720p.mp4"
            };
            assert_eq!(
                (video.as_str(), r.t, r.dt),
                (mvideo, m["t"].as_i64().unwrap(), m["dt"].as_i64().unwrap())
            );
            k += 1;
        }
    }
    assert_eq!(k, 4);

    // inspect and show on the finished part.
    let p0_path = out.join("parttest-part-00000-of-00002.zarr");
    let mut insp = Command::new(env!("CARGO_BIN_EXE_poodle-prep"));
    insp.arg("inspect").arg(&p0_path).arg("--json");
    let o = insp.output().unwrap();
    assert!(o.status.success());
    let i: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(i["pairs"], 2);
    assert_eq!(i["valid_pairs"], 2);
    assert_eq!(i["flow_groups"][0]["name"], "raft_small_random");
    assert_eq!(i["flow_groups"][0]["stats"].as_array().unwrap().len(), 6);
    let png_path = d.join("pair1.png");
    let mut show = Command::new(env!("CARGO_BIN_EXE_poodle-prep"));
    show.arg("show")
        .arg(&p0_path)
        .args(["--pair", "1", "--out"])
        .arg(&png_path);
    assert!(show.status().unwrap().success());
    let dec = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(&png_path).unwrap(),
    ));
    let mut reader = dec.read_info().unwrap();
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (2 * 224, 2 * 128));
    // Top-left quadrant is frame t, top-right frame t+dt, as stored.
    let rec = p0.read_pair(1).unwrap();
    let n = 128 * 224;
    for &(y, x) in &[(0usize, 0usize), (50, 100), (127, 223)] {
        let o = (y * 2 * 224 + x) * 3;
        let q = y * 224 + x;
        assert_eq!(
            &buf[o..o + 3],
            &[rec.frames[q], rec.frames[n + q], rec.frames[2 * n + q]]
        );
        let o2 = (y * 2 * 224 + 224 + x) * 3;
        assert_eq!(buf[o2], rec.frames[3 * n + q]);
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn second_writer_and_changed_plan_are_refused() {
    let Some(root) = sample_videos() else { return };
    let d = tmpdir("lock");
    let cfg = write_config(&d, "locktest", 1, 1, 0);
    let out = d.join("out");
    let store = out.join("locktest-part-00000-of-00001.zarr");
    let held = poodle_prep::job::JobDir::open(&store).unwrap();
    let o = prep_cmd(&cfg, &root, &out, &[]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("another job is writing this part"), "{err}");
    drop(held);
    run_ok(prep_cmd(&cfg, &root, &out, &[]));
    // Same output, another seed: another manifest, refused rather than mixed.
    let cfg2 = write_config(&d, "locktest", 1, 1, 9);
    let o = prep_cmd(&cfg2, &root, &out, &[]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("was started with another dataset config"),
        "{err}"
    );
    // Same ONNX file, a card that reads it differently (another size multiple): refused too,
    // so shards computed two ways never mix. (The config again as the store was made.)
    let cfg = write_config(&d, "locktest", 1, 1, 0);
    let card_path = repo().join("models/raft_small_random.json"); // prep_bin's model
    let mut card: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&card_path).unwrap()).unwrap();
    card["size_multiple"] = serde_json::json!(16);
    let onnx = card["onnx"].as_str().unwrap().to_string();
    card["onnx"] = serde_json::json!(repo().join("models").join(onnx));
    let card2 = d.join("card16.json");
    std::fs::write(&card2, serde_json::to_vec(&card).unwrap()).unwrap();
    let o = prep_cmd(&cfg, &root, &out, &["--model", card2.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("was started with another flow model card"),
        "{err}"
    );
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn missing_runtime_or_mismatched_model_fails_before_any_work() {
    let Some(root) = sample_videos() else { return };
    let d = tmpdir("errors");
    let cfg = write_config(&d, "errtest", 1, 1, 0);
    let out = d.join("out");
    let o = prep_cmd(
        &cfg,
        &root,
        &out,
        &["--ort-lib", "/nonexistent/libonnxruntime.so"],
    )
    .output()
    .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("ONNX Runtime library"));
    assert!(
        !out.exists(),
        "nothing may be written before the checks pass"
    );

    let mut card: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo().join("models/raft_small_random.json")).unwrap(),
    )
    .unwrap();
    card["output"] = "flow_up".into();
    card["onnx"] = repo()
        .join("models/raft_small_random.onnx")
        .display()
        .to_string()
        .into();
    let bad_card = d.join("bad-card.json");
    std::fs::write(&bad_card, serde_json::to_vec(&card).unwrap()).unwrap();
    let o = prep_cmd(&cfg, &root, &out, &["--model", bad_card.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("card output \"flow_up\" is not a model output"),
        "{err}"
    );
    assert!(!out.exists());

    let o = prep_cmd(&cfg, &root, &out, &["--device", "cuda:0"])
        .output()
        .unwrap();
    assert!(
        !o.status.success(),
        "CUDA must not silently fall back to CPU"
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("CUDA"));
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn image_sequences_pair_consecutive_frames() {
    let Some(camvid) = common::shared_data("camvid/train", "0016E5_00390.png") else {
        return;
    };
    let d = tmpdir("frames");
    let seq = d.join("seq");
    std::fs::create_dir_all(&seq).unwrap();
    for f in ["0016E5_00390.png", "0016E5_00420.png", "0016E5_00450.png"] {
        std::os::unix::fs::symlink(camvid.join(f), seq.join(f)).unwrap();
    }
    let cfg = serde_json::json!({
        "name": "frametest", "layout": {"kind": "frames", "extensions": ["png"]},
        "sampling": {"kind": "consecutive"}, "height": 128, "width": 160, "pairs_per_shard": 4
    });
    let cfg_path = d.join("frametest.json");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let s = run_ok(prep_cmd(&cfg_path, &seq, &d.join("out"), &[]));
    assert_eq!(s["pairs_written"], 2);
    let store = PoodleStore::open(&d.join("out/frametest-part-00000-of-00001.zarr")).unwrap();
    let p = store.read_pair(1).unwrap();
    assert_eq!((p.t, p.dt), (420, 30));
    // Frame t of pair 1 is frame t+dt of pair 0 (the same file).
    let p0 = store.read_pair(0).unwrap();
    let n = 3 * 128 * 160;
    assert_eq!(p0.frames[n..], p.frames[..n]);
    std::fs::remove_dir_all(d).unwrap();
}
