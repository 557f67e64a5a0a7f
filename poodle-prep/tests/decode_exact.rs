//! Frame exactness: videos generated with their frame number burned into each frame (as
//! 8 black/white bars, most significant bit left) must decode to exactly the asked frames,
//! also with variable frame rate and rotation metadata.

use poodle_prep::decode::{decode_frames, Frame};
use poodle_prep::discover::probe_video;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const W: usize = 256;
const H: usize = 128;

mod common;

fn tmpdir(tag: &str) -> PathBuf {
    common::tmpdir("decode", tag)
}

/// Encodes `n` frames whose number is drawn as 8 vertical bars with H.264 (B-frames on).
fn make_video(path: &Path, n: usize, extra: &[&str]) {
    let mut child = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"])
        .args(["-s", &format!("{W}x{H}"), "-r", "25", "-i", "-"])
        .args(extra)
        .args([
            "-c:v", "libx264", "-crf", "12", "-g", "10", "-bf", "2", "-pix_fmt", "yuv420p",
        ])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn()
        .expect("ffmpeg must be installed (apt-get install ffmpeg)");
    let mut stdin = child.stdin.take().unwrap();
    for k in 0..n {
        let mut frame = vec![0u8; W * H * 3];
        for y in 0..H {
            for x in 0..W {
                let bit = 7 - x / (W / 8);
                let v = if (k >> bit) & 1 == 1 { 255 } else { 0 };
                frame[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&[v, v, v]);
            }
        }
        stdin.write_all(&frame).unwrap();
    }
    drop(stdin);
    assert!(
        child.wait().unwrap().success(),
        "ffmpeg failed to make {path:?}"
    );
}

/// Reads the burned-in number along x (or along y for a rotated frame).
fn read_number(f: &Frame, along_y: bool) -> usize {
    let len = if along_y { f.height } else { f.width };
    (0..8).fold(0, |acc, b| {
        let pos = (2 * b + 1) * len / 16;
        let (x, y) = if along_y {
            (f.width / 2, pos)
        } else {
            (pos, f.height / 2)
        };
        let v = f.rgb[(y * f.width + x) * 3];
        (acc << 1) | usize::from(v > 127)
    })
}

#[test]
fn pairs_hold_exactly_the_requested_frames() {
    let d = tmpdir("cfr");
    let v = d.join("numbers.mp4");
    make_video(&v, 60, &[]);
    let info = probe_video(&v, "numbers.mp4").unwrap();
    assert_eq!(info.num_frames, 60);
    assert_eq!((info.width, info.height), (W as u32, H as u32));
    // Pairs (t, t+dt) as the sampler draws them, at another resolution than the source.
    let wanted = [0u64, 15, 17, 41, 42, 59];
    let frames = decode_frames(&v, &wanted, 64, 128).unwrap();
    assert_eq!(frames.len(), wanted.len());
    for (&k, f) in &frames {
        assert_eq!((f.height, f.width), (64, 128));
        assert_eq!(read_number(f, false), k as usize, "asked for frame {k}");
    }
    // Past the end: missing, not an error, not a wrong frame.
    let tail = decode_frames(&v, &[58, 60, 75], 64, 128).unwrap();
    assert_eq!(tail.keys().copied().collect::<Vec<_>>(), vec![58]);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn variable_frame_rate_counts_frames_not_time() {
    let d = tmpdir("vfr");
    let v = d.join("vfr.mp4");
    // Frames 20.. jump 1.2 s forward in time: a time seek would land 30 frames off.
    make_video(
        &v,
        50,
        &[
            "-vf",
            "setpts='if(lt(N,20),N,N+30)/(25*TB)'",
            "-fps_mode",
            "vfr",
        ],
    );
    let info = probe_video(&v, "vfr.mp4").unwrap();
    assert_eq!(info.num_frames, 50);
    assert!(
        info.duration_s > 2.5,
        "the gap is in the timestamps: {}",
        info.duration_s
    );
    let wanted = [5u64, 19, 20, 21, 35, 49];
    let frames = decode_frames(&v, &wanted, 64, 128).unwrap();
    let got: Vec<usize> = frames.values().map(|f| read_number(f, false)).collect();
    assert_eq!(got, vec![5, 19, 20, 21, 35, 49]);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn rotation_metadata_is_honoured() {
    let d = tmpdir("rot");
    let plain = d.join("plain.mp4");
    make_video(&plain, 12, &[]);
    // Rotation metadata is set by remuxing (an encode would apply it to the pixels).
    let v = d.join("rot.mp4");
    let ok = Command::new("ffmpeg")
        .args(["-v", "error", "-y", "-i"])
        .arg(&plain)
        .args(["-c", "copy", "-metadata:s:v:0", "rotate=90"])
        .arg(&v)
        .status()
        .unwrap();
    assert!(ok.success());
    let info = probe_video(&v, "rot.mp4").unwrap();
    assert_eq!(
        info.rotation.rem_euclid(180),
        90,
        "rotation {}",
        info.rotation
    );
    assert_eq!(
        (info.width, info.height),
        (H as u32, W as u32),
        "displayed size is portrait"
    );
    let frames = decode_frames(&v, &[3, 10], 128, 64).unwrap();
    for (&k, f) in &frames {
        // Rotated by 90 degrees: the bars run along y, in one of the two directions.
        let down = read_number(f, true);
        let mut up = Frame {
            rgb: vec![],
            ..f.clone()
        };
        up.rgb = (0..f.height)
            .rev()
            .flat_map(|y| f.rgb[y * f.width * 3..(y + 1) * f.width * 3].to_vec())
            .collect();
        let up = read_number(&up, true);
        assert!(
            down == k as usize || up == k as usize,
            "frame {k}: read {down} / {up}"
        );
    }
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn stored_pairs_hold_frames_t_and_t_plus_dt_across_shards() {
    // A Walking-Tours-style job (clips of 2 s, dt = 0.5 s) over one numbered video: one
    // streaming decode feeds several shards, and every stored pair must show frames t, t+dt.
    let d = tmpdir("store");
    let vids = d.join("videos");
    std::fs::create_dir_all(&vids).unwrap();
    make_video(&vids.join("walk.mp4"), 250, &[]);
    let cfg = serde_json::json!({
        "name": "walk", "layout": {"kind": "folder", "extensions": ["mp4"]},
        "sampling": {"kind": "clips", "clip_seconds": 2.0, "dt_seconds": 0.5, "pairs_per_clip": 2},
        "height": H, "width": W, "pairs_per_shard": 3, "seed": 4
    });
    let cfg_path = d.join("walk.json");
    std::fs::write(&cfg_path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let out = common::prep_bin()
        .args([
            "prep",
            "--quiet",
            "--num-parts",
            "1",
            "--part-index",
            "0",
            "--config",
        ])
        .arg(&cfg_path)
        .arg("--root")
        .arg(&vids)
        .arg("--out")
        .arg(d.join("out"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let store =
        poodle_common::store::PoodleStore::open(&d.join("out/walk-part-00000-of-00001.zarr"))
            .unwrap();
    // 250 frames at 25 fps: 5 clips of 50 frames, 2 pairs each, dt = 13 (0.5 s rounded).
    assert_eq!(store.num_pairs(), 10);
    let n = H * W;
    for i in 0..store.num_pairs() {
        let p = store.read_pair(i).unwrap();
        assert!(p.valid);
        assert_eq!(p.dt, 13);
        for (j, want) in [(0usize, p.t), (1, p.t + p.dt)] {
            let planar = &p.frames[j * 3 * n..(j + 1) * 3 * n];
            let rgb: Vec<u8> = (0..n)
                .flat_map(|q| [planar[q], planar[n + q], planar[2 * n + q]])
                .collect();
            let f = Frame {
                height: H,
                width: W,
                rgb,
            };
            assert_eq!(read_number(&f, false) as i64, want, "pair {i} frame {j}");
        }
    }
    std::fs::remove_dir_all(d).unwrap();
}
