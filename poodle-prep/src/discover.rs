//! Dataset layouts -> videos (or image sequences) -> probed video manifest.
//!
//! Every video is probed with ffprobe: frame count (counted packets, which needs no
//! decoding and does not trust the container's header), frame rate, displayed size and
//! rotation, duration. A video that cannot be probed is skipped with the reason.

use crate::{PrepError, Result};
use poodle_common::config::{DatasetConfig, Layout};
use poodle_common::manifest::{Skipped, VideoInfo, VideoManifest};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Lists the dataset's videos (paths relative to `root`), sorted, and the folders that could
/// not be read (unreadable, or a symlink loop), each with the reason.
pub fn list_videos(cfg: &DatasetConfig, root: &Path) -> Result<(Vec<String>, Vec<Skipped>)> {
    if !root.is_dir() {
        return Err(PrepError::Usage(format!(
            "dataset root {} is not a directory",
            root.display()
        )));
    }
    let (mut out, mut problems) = (Vec::new(), Vec::new());
    match &cfg.layout {
        Layout::Bdd { splits } => {
            for split in splits {
                let dir = root.join("videos").join(split);
                if !dir.is_dir() {
                    return Err(PrepError::Usage(format!(
                        "BDD100K layout: {} is missing (expected videos/{{train,val}}/*.mov under the root)",
                        dir.display()
                    )));
                }
                walk(&dir, &["mov".to_string()], &mut out, &mut problems);
            }
        }
        Layout::Folder { extensions } | Layout::Frames { extensions } => {
            walk(root, extensions, &mut out, &mut problems)
        }
    }
    let mut rel: Vec<String> = out
        .iter()
        .map(|p| {
            p.strip_prefix(root)
                .unwrap_or(p)
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    rel.sort();
    Ok((rel, problems))
}

/// Every file under `dir` with one of `exts` (case-insensitive), following symlinks; a
/// folder that cannot be read or a symlink loop is recorded in `problems`, not fatal.
fn walk(dir: &Path, exts: &[String], out: &mut Vec<PathBuf>, problems: &mut Vec<Skipped>) {
    let wanted = |p: &Path| {
        p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| exts.iter().any(|x| x.eq_ignore_ascii_case(e)))
    };
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
    {
        match entry {
            Ok(e) if e.file_type().is_file() && wanted(e.path()) => out.push(e.into_path()),
            Ok(_) => {}
            Err(e) => problems.push(Skipped {
                path: e
                    .path()
                    .map_or_else(|| dir.display().to_string(), |p| p.display().to_string()),
                reason: match e.loop_ancestor() {
                    Some(a) => format!("symlink loop back to {}", a.display()),
                    None => format!("cannot read: {e}"),
                },
            }),
        }
    }
}

/// Probes every video in parallel; failures become skips.
pub fn probe_all(
    cfg: &DatasetConfig,
    root: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<VideoManifest> {
    let (files, problems) = list_videos(cfg, root)?;
    if let Layout::Frames { .. } = cfg.layout {
        let mut m = group_sequences(&files);
        m.skipped.extend(problems);
        return Ok(m);
    }
    progress.set_length(files.len() as u64);
    let results: Vec<std::result::Result<VideoInfo, Skipped>> = files
        .par_iter()
        .map(|rel| {
            let r = probe_video(&root.join(rel), rel).map_err(|e| Skipped {
                path: rel.clone(),
                reason: match e {
                    PrepError::Video { reason, .. } => reason,
                    other => other.to_string(),
                },
            });
            progress.inc(1);
            r
        })
        .collect();
    let mut m = VideoManifest {
        skipped: problems,
        ..VideoManifest::default()
    };
    for r in results {
        match r {
            Ok(v) => m.videos.push(v),
            Err(s) => m.skipped.push(s),
        }
    }
    Ok(m)
}

fn parse_rate(s: &str) -> f64 {
    match s.split_once('/') {
        Some((a, b)) => {
            let (a, b) = (
                a.parse::<f64>().unwrap_or(0.0),
                b.parse::<f64>().unwrap_or(0.0),
            );
            if b > 0.0 {
                a / b
            } else {
                0.0
            }
        }
        None => s.parse().unwrap_or(0.0),
    }
}

/// Probes one video with ffprobe.
pub fn probe_video(path: &Path, rel: &str) -> Result<VideoInfo> {
    let err = |reason: String| PrepError::Video {
        path: rel.to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(format!("cannot read: {e}")))?;
    if meta.len() == 0 {
        return Err(err("zero-length file".into()));
    }
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0", "-count_packets"])
        .args([
            "-show_entries",
            "stream=width,height,nb_read_packets,avg_frame_rate,r_frame_rate,duration:stream_side_data=rotation:stream_tags=rotate:format=duration",
            "-of",
            "json",
        ])
        .arg(path)
        .output()
        .map_err(|e| err(format!("cannot run ffprobe: {e}")))?;
    if !out.status.success() {
        let msg = String::from_utf8_lossy(&out.stderr);
        let first = msg.lines().last().unwrap_or("ffprobe failed").trim();
        return Err(err(format!("unreadable: {first}")));
    }
    let j: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| err(format!("ffprobe output not JSON: {e}")))?;
    let s = j["streams"]
        .get(0)
        .ok_or_else(|| err("no video stream".into()))?;
    let num = |v: &serde_json::Value| -> Option<f64> {
        v.as_f64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
    };
    let frames = num(&s["nb_read_packets"]).unwrap_or(0.0) as u64;
    if frames == 0 {
        return Err(err("no decodable video frames".into()));
    }
    let mut fps = parse_rate(s["avg_frame_rate"].as_str().unwrap_or("0/0"));
    if fps <= 0.0 {
        fps = parse_rate(s["r_frame_rate"].as_str().unwrap_or("0/0"));
    }
    let rotation = s["side_data_list"]
        .as_array()
        .and_then(|l| l.iter().find_map(|d| num(&d["rotation"])))
        .or_else(|| num(&s["tags"]["rotate"]))
        .unwrap_or(0.0)
        .round() as i32;
    let (mut w, mut h) = (
        s["width"].as_u64().unwrap_or(0) as u32,
        s["height"].as_u64().unwrap_or(0) as u32,
    );
    if w == 0 || h == 0 {
        return Err(err("video stream has no size".into()));
    }
    if rotation.rem_euclid(180) == 90 {
        std::mem::swap(&mut w, &mut h);
    }
    let duration = num(&s["duration"])
        .or_else(|| num(&j["format"]["duration"]))
        .unwrap_or(if fps > 0.0 { frames as f64 / fps } else { 0.0 });
    Ok(VideoInfo {
        path: rel.to_string(),
        num_frames: frames,
        fps,
        width: w,
        height: h,
        rotation,
        duration_s: duration,
        frame_numbers: vec![],
        frame_files: vec![],
    })
}

/// Splits a file name into (prefix, frame number, suffix) at its last run of digits that
/// is not embedded in a word (the `8` of `leftImg8bit` is not a frame number):
/// `0016E5_07959.png` -> ("0016E5_", 7959, ".png"),
/// `aachen_000000_000019_leftImg8bit.png` -> ("aachen_000000_", 19, "_leftImg8bit.png").
pub fn split_frame_number(name: &str) -> Option<(String, u64, String)> {
    let b = name.as_bytes();
    let stem_end = name.rfind('.').unwrap_or(name.len());
    let mut end = stem_end;
    while end > 0 {
        // Find the next run of digits ending at or before `end`.
        let last = (0..end).rev().find(|&i| b[i].is_ascii_digit())?;
        let run_end = last + 1;
        let start = (0..run_end)
            .rev()
            .find(|&i| !b[i].is_ascii_digit())
            .map_or(0, |i| i + 1);
        let letter_before = start > 0 && b[start - 1].is_ascii_alphabetic();
        let letter_after = run_end < stem_end && b[run_end].is_ascii_alphabetic();
        if !(letter_before && letter_after) {
            let n = name[start..run_end].parse().ok()?;
            return Some((name[..start].to_string(), n, name[run_end..].to_string()));
        }
        end = start;
    }
    None
}

/// Groups image files into sequences: same folder, same text around the frame number.
pub fn group_sequences(files: &[String]) -> VideoManifest {
    let mut seqs: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
    let mut m = VideoManifest::default();
    for f in files {
        let p = Path::new(f);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or(f);
        let dir = p
            .parent()
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default();
        match split_frame_number(name) {
            Some((pre, n, suf)) => {
                let key = if dir.is_empty() {
                    format!("{pre}#{suf}")
                } else {
                    format!("{dir}/{pre}#{suf}")
                };
                seqs.entry(key).or_default().push((n, f.clone()));
            }
            None => m.skipped.push(Skipped {
                path: f.clone(),
                reason: "no frame number in the file name".into(),
            }),
        }
    }
    for (key, mut frames) in seqs {
        frames.sort();
        frames.dedup_by_key(|f| f.0);
        m.videos.push(VideoInfo {
            path: key,
            num_frames: frames.len() as u64,
            fps: 0.0,
            width: 0,
            height: 0,
            rotation: 0,
            duration_s: 0.0,
            frame_numbers: frames.iter().map(|f| f.0).collect(),
            frame_files: frames.into_iter().map(|f| f.1).collect(),
        });
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symlink_loop_is_reported_and_the_walk_goes_on() {
        let d = std::env::temp_dir().join(format!("poodle-walk-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("a/b")).unwrap();
        std::fs::write(d.join("a/x.MP4"), b"").unwrap();
        std::fs::write(d.join("a/b/y.mp4"), b"").unwrap();
        std::fs::write(d.join("a/b/notes.txt"), b"").unwrap();
        std::os::unix::fs::symlink(d.join("a"), d.join("a/b/back")).unwrap();
        let cfg: DatasetConfig = serde_json::from_value(serde_json::json!({
            "name": "walk", "layout": {"kind": "folder", "extensions": ["mp4"]},
            "sampling": {"kind": "consecutive"}, "height": 8, "width": 8
        }))
        .unwrap();
        let (files, problems) = list_videos(&cfg, &d).unwrap();
        assert_eq!(files, ["a/b/y.mp4", "a/x.MP4"]);
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].path.ends_with("a/b/back"), "{problems:?}");
        assert!(problems[0].reason.contains("symlink loop"), "{problems:?}");
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn frame_numbers_from_common_naming_schemes() {
        assert_eq!(
            split_frame_number("0016E5_07959.png"),
            Some(("0016E5_".into(), 7959, ".png".into()))
        );
        assert_eq!(
            split_frame_number("aachen_000000_000019_leftImg8bit.png"),
            Some(("aachen_000000_".into(), 19, "_leftImg8bit.png".into()))
        );
        assert_eq!(
            split_frame_number("0000000123.png"),
            Some(("".into(), 123, ".png".into()))
        );
        assert_eq!(
            split_frame_number("img10.jpg"),
            Some(("img".into(), 10, ".jpg".into()))
        );
        assert_eq!(split_frame_number("cover.png"), None);
    }

    #[test]
    fn sequences_group_by_folder_and_pattern() {
        let files: Vec<String> = [
            "a/0001TP_006690.png",
            "a/0001TP_006720.png",
            "a/0016E5_07959.png",
            "a/0016E5_07989.png",
            "a/0016E5_08019.png",
            "b/0016E5_07959.png",
            "a/readme.png",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let m = group_sequences(&files);
        assert_eq!(m.videos.len(), 3);
        let e5 = m
            .videos
            .iter()
            .find(|v| v.path == "a/0016E5_#.png")
            .unwrap();
        assert_eq!(e5.frame_numbers, vec![7959, 7989, 8019]);
        assert_eq!(m.skipped.len(), 1);
    }
}
