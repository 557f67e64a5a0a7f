//! What a prep job will write, before any flow is computed: pairs per video (the pool the
//! trainer draws from) and the disk the stores will take, from a measured bytes-per-pair.

use poodle_common::config::DatasetConfig;
use poodle_common::store::{dir_size, PoodleStore};
use serde::Serialize;
use std::path::Path;

/// Bytes per stored pair per frame pixel, measured on the real 720p dashcam clips with the
/// default flow model (2026-12-03, `bench/loader.sh`'s store, 8 pairs, zstd 3: frames, both
/// flows, both occlusion masks; 5.60 MB per 1280x720 pair, 27.6% of raw). Flow compresses
/// worse on busier scenes: treat it as a guide, and prefer the figure measured from a store
/// of the same job (`measured_from`).
pub const REFERENCE_BYTES_PER_PIXEL: f64 = 5.60e6 / (1280.0 * 720.0);

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DiskPlan {
    pub videos: usize,
    pub pairs: usize,
    /// Pairs per video: the pool that training draws R pairs from at every visit.
    pub pairs_per_video_min: usize,
    pub pairs_per_video_max: usize,
    pub bytes_per_pair: f64,
    /// The store the bytes-per-pair figure was measured on, or `null` for the reference
    /// figure ([`REFERENCE_BYTES_PER_PIXEL`]).
    pub measured_from: Option<String>,
    pub total_bytes: f64,
}

/// Bytes per pair at the config's resolution: from the largest complete store under `out`
/// (scaled by pixel count if its resolution differs), else the reference figure.
pub fn bytes_per_pair(cfg: &DatasetConfig, out: &Path) -> (f64, Option<String>) {
    let pixels = (cfg.height * cfg.width) as f64;
    let mut best: Option<(usize, f64, String)> = None;
    if let Ok(rd) = std::fs::read_dir(out) {
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            let Ok(s) = PoodleStore::open(&p) else {
                continue;
            };
            let g = s.attrs.geometry;
            if g.num_pairs == 0 || best.as_ref().is_some_and(|b| b.0 >= g.num_pairs) {
                continue;
            }
            let per_pixel = dir_size(&p) as f64 / g.num_pairs as f64 / (g.height * g.width) as f64;
            best = Some((g.num_pairs, per_pixel, p.display().to_string()));
        }
    }
    match best {
        Some((_, per_pixel, path)) => (per_pixel * pixels, Some(path)),
        None => (REFERENCE_BYTES_PER_PIXEL * pixels, None),
    }
}

/// The plan for `pairs` (one `video` index per pair) over `videos` videos.
pub fn plan(cfg: &DatasetConfig, videos: usize, pair_videos: &[u32], out: &Path) -> DiskPlan {
    let mut per_video = vec![0usize; videos];
    for &v in pair_videos {
        if let Some(c) = per_video.get_mut(v as usize) {
            *c += 1;
        }
    }
    let used = per_video.iter().copied().filter(|&c| c > 0);
    let (bytes_per_pair, measured_from) = bytes_per_pair(cfg, out);
    DiskPlan {
        videos,
        pairs: pair_videos.len(),
        pairs_per_video_min: used.clone().min().unwrap_or(0),
        pairs_per_video_max: used.max().unwrap_or(0),
        bytes_per_pair,
        measured_from,
        total_bytes: bytes_per_pair * pair_videos.len() as f64,
    }
}

/// `1.23 TB`-style decimal sizes.
pub fn human_bytes(b: f64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB", "PB"];
    let mut v = b;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    format!("{v:.2} {}", units[i])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(h: usize, w: usize) -> DatasetConfig {
        serde_json::from_value(serde_json::json!({
            "name": "x", "layout": {"kind": "folder", "extensions": ["mp4"]},
            "sampling": {"kind": "per_video", "pairs_per_video": 10, "dt_min": 15, "dt_max": 30},
            "height": h, "width": w
        }))
        .unwrap()
    }

    #[test]
    fn reference_figure_scales_with_pixels_and_counts_pools() {
        let none = Path::new("/nonexistent-poodle-out");
        let (b, from) = bytes_per_pair(&cfg(720, 1280), none);
        assert!((b - 5.60e6).abs() < 1.0 && from.is_none());
        let p = plan(&cfg(360, 640), 3, &[0, 0, 0, 2, 2], none);
        assert_eq!(
            (p.pairs, p.pairs_per_video_min, p.pairs_per_video_max),
            (5, 2, 3)
        );
        assert!((p.total_bytes - 5.0 * 5.60e6 / 4.0).abs() < 1.0);
        // BDD100K train: 70,000 videos x 10 pairs at 720p.
        let bdd = 70_000.0 * 10.0 * 5.60e6;
        assert_eq!(human_bytes(bdd), "3.92 TB");
        assert_eq!(human_bytes(999.0), "999.00 B");
    }
}
