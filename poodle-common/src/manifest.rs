//! Video manifest (probed metadata of every video or image sequence) and pair manifest
//! (video, t, dt), drawn by the dataset's sampling rule with a seeded generator.
//!
//! Frame indices count decoded frames from 0 (never time seeks). Each video draws from its
//! own generator, seeded by the config seed and the video's path, so the pairs of one video
//! do not change when others are added or fail to probe.

use crate::config::{DatasetConfig, Sampling};
use crate::rng::SplitMix64;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// One probed video, or one image sequence (then `frames` lists its files in frame order).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VideoInfo {
    /// Path relative to the dataset root (stable across machines).
    pub path: String,
    /// Number of frames (counted packets for videos; files for sequences).
    pub num_frames: u64,
    /// Average frame rate (frames per second); 0 when unknown.
    pub fps: f64,
    /// Displayed size after rotation.
    pub width: u32,
    pub height: u32,
    /// Rotation metadata in degrees (display matrix), honoured by the decoder.
    pub rotation: i32,
    pub duration_s: f64,
    /// For image sequences: frame number of each file (from its name) and the file names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frame_numbers: Vec<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub frame_files: Vec<String>,
}

/// A video that could not be used, with the reason, for the job summary.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VideoManifest {
    pub videos: Vec<VideoInfo>,
    pub skipped: Vec<Skipped>,
}

/// One frame pair: frames `t` and `t + dt` of video `video` (an index into the manifest).
/// For image sequences `t` and `dt` are in the sequence's own frame numbers
/// (CamVid: dt = 30), and `t_index` is the position of the first file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pair {
    pub video: u32,
    pub t: u64,
    pub dt: u64,
}

/// Draw the pairs of every video by the config's rule; sorted by (video, t, dt).
/// A video too short for any pair yields none and is reported in the returned skips.
pub fn sample_pairs(cfg: &DatasetConfig, videos: &[VideoInfo]) -> (Vec<Pair>, Vec<Skipped>) {
    let mut pairs = Vec::new();
    let mut skipped = Vec::new();
    for (vi, v) in videos.iter().enumerate() {
        let before = pairs.len();
        let mut rng = SplitMix64::for_item(cfg.seed, &v.path);
        let n = v.num_frames;
        match &cfg.sampling {
            Sampling::PerVideo {
                pairs_per_video,
                dt_min,
                dt_max,
            } => {
                if n > *dt_min {
                    for _ in 0..*pairs_per_video {
                        // dt is capped so that a pair always fits in the video.
                        let dt = rng.range_inclusive(*dt_min, (*dt_max).min(n - 1));
                        let t = rng.range_inclusive(0, n - 1 - dt);
                        pairs.push(Pair {
                            video: vi as u32,
                            t,
                            dt,
                        });
                    }
                }
            }
            Sampling::Clips {
                clip_seconds,
                dt_seconds,
                pairs_per_clip,
            } => {
                let fps = if v.fps > 0.0 { v.fps } else { 30.0 };
                let clip = ((clip_seconds * fps).round() as u64).max(2);
                let dt = ((dt_seconds * fps).round() as u64).max(1);
                let mut start = 0;
                while start + dt < n {
                    let end = (start + clip).min(n); // exclusive
                    if end - start > dt {
                        for _ in 0..*pairs_per_clip {
                            let t = rng.range_inclusive(start, end - 1 - dt);
                            pairs.push(Pair {
                                video: vi as u32,
                                t,
                                dt,
                            });
                        }
                    }
                    start += clip;
                }
            }
            Sampling::Consecutive => {
                for w in v.frame_numbers.windows(2) {
                    pairs.push(Pair {
                        video: vi as u32,
                        t: w[0],
                        dt: w[1] - w[0],
                    });
                }
            }
        }
        if pairs.len() == before {
            skipped.push(Skipped {
                path: v.path.clone(),
                reason: format!("too short: {n} frames, no pair fits"),
            });
        }
        pairs[before..].sort_by_key(|p| (p.t, p.dt));
    }
    (pairs, skipped)
}

/// The contiguous range of the pair manifest that job part `index` of `count` writes.
/// Equal-sized contiguous ranges keep parts balanced for few long videos (Walking Tours)
/// and many short ones (BDD) alike.
pub fn part_range(num_pairs: usize, index: usize, count: usize) -> std::ops::Range<usize> {
    assert!(count > 0 && index < count, "part {index} of {count}");
    let lo = num_pairs * index / count;
    let hi = num_pairs * (index + 1) / count;
    lo..hi
}

/// SHA-256 of the canonical JSON of a value (hex), used to tie a store to its manifest.
pub fn json_sha256<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).expect("manifest serialises");
    hex(&Sha256::digest(&bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Layout;

    fn video(path: &str, n: u64, fps: f64) -> VideoInfo {
        VideoInfo {
            path: path.into(),
            num_frames: n,
            fps,
            width: 64,
            height: 32,
            rotation: 0,
            duration_s: n as f64 / fps,
            frame_numbers: vec![],
            frame_files: vec![],
        }
    }

    fn cfg(sampling: Sampling) -> DatasetConfig {
        DatasetConfig {
            name: "t".into(),
            layout: Layout::Folder {
                extensions: vec!["mp4".into()],
            },
            sampling,
            height: 32,
            width: 64,
            pairs_per_shard: 4,
            seed: 3,
            default_root: None,
        }
    }

    #[test]
    fn bdd_rule_draws_r_pairs_in_range_reproducibly() {
        let c = cfg(Sampling::PerVideo {
            pairs_per_video: 2,
            dt_min: 15,
            dt_max: 30,
        });
        let vids = vec![video("a.mov", 1200, 30.0), video("b.mov", 20, 30.0)];
        let (p, s) = sample_pairs(&c, &vids);
        assert_eq!(p.len(), 4);
        assert!(s.is_empty());
        for q in &p {
            assert!((15..=30).contains(&q.dt) || (q.video == 1 && q.dt <= 19));
            assert!(q.t + q.dt < vids[q.video as usize].num_frames);
        }
        assert_eq!(sample_pairs(&c, &vids).0, p, "same seed, same pairs");
        // Adding a video does not change the pairs of the others.
        let mut more = vids.clone();
        more.insert(0, video("0.mov", 900, 30.0));
        let (p2, _) = sample_pairs(&c, &more);
        let shifted: Vec<Pair> = p2
            .iter()
            .filter(|q| q.video > 0)
            .map(|q| Pair {
                video: q.video - 1,
                ..*q
            })
            .collect();
        assert_eq!(shifted, p);
        let mut c2 = c.clone();
        c2.seed = 4;
        assert_ne!(sample_pairs(&c2, &vids).0, p, "another seed, other pairs");
    }

    #[test]
    fn too_short_video_is_skipped_with_reason() {
        let c = cfg(Sampling::PerVideo {
            pairs_per_video: 2,
            dt_min: 15,
            dt_max: 30,
        });
        let (p, s) = sample_pairs(&c, &[video("short.mov", 15, 30.0)]);
        assert!(p.is_empty());
        assert_eq!(s[0].path, "short.mov");
        assert!(s[0].reason.contains("15 frames"));
    }

    #[test]
    fn walking_tours_rule_one_pair_per_10s_clip_with_half_second_gap() {
        let c = cfg(Sampling::Clips {
            clip_seconds: 10.0,
            dt_seconds: 0.5,
            pairs_per_clip: 1,
        });
        // 65 s at 30 fps: 6 full clips and a 5 s tail clip.
        let (p, _) = sample_pairs(&c, &[video("walk.mp4", 1950, 30.0)]);
        assert_eq!(p.len(), 7);
        for (k, q) in p.iter().enumerate() {
            assert_eq!(q.dt, 15);
            let start = 300 * k as u64;
            assert!(
                q.t >= start && q.t + q.dt < (start + 300).min(1950),
                "{q:?}"
            );
        }
    }

    #[test]
    fn consecutive_rule_pairs_neighbouring_frames() {
        let c = cfg(Sampling::Consecutive);
        let mut v = video("seq", 3, 0.0);
        v.frame_numbers = vec![7959, 7989, 8019];
        let (p, _) = sample_pairs(&c, &[v]);
        assert_eq!(
            p,
            vec![
                Pair {
                    video: 0,
                    t: 7959,
                    dt: 30
                },
                Pair {
                    video: 0,
                    t: 7989,
                    dt: 30
                }
            ]
        );
    }

    #[test]
    fn parts_cover_the_manifest_once() {
        for n in [0, 1, 7, 100] {
            for count in 1..6 {
                let mut covered = 0;
                let mut next = 0;
                for i in 0..count {
                    let r = part_range(n, i, count);
                    assert_eq!(r.start, next);
                    next = r.end;
                    covered += r.len();
                }
                assert_eq!(covered, n);
            }
        }
    }
}
