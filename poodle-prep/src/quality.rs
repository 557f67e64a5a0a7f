//! Flow quality of a store, per store and per video: occluded fraction, forward-backward
//! error and photometric error (median and mean over valid pairs), from the per-pair
//! statistics every flow group stores (`flow/<group>/stats`). A store whose median occluded
//! fraction is above a threshold gets a warning naming the model and the worst videos: the
//! dense loss only learns from non-occluded pixels, so a model that marks most of a frame
//! occluded silently starves it.

use crate::Result;
use poodle_common::flowmath::FLOW_STAT_NAMES;
use poodle_common::store::PoodleStore;
use serde::{Deserialize, Serialize};

/// Default threshold on a store's median occluded fraction above which prep warns.
pub const DEFAULT_MAX_OCCLUDED_MEDIAN: f32 = 0.4;

/// The statistics reported as quality, by their names in [`FLOW_STAT_NAMES`].
pub const QUALITY_STATS: [&str; 3] = ["occluded_frac", "fb_error", "photometric_error"];

/// Median and mean of one statistic over pairs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Agg {
    /// Mean of the two middle values for an even count (as numpy's median).
    pub median: f64,
    pub mean: f64,
}

/// Occluded fraction (0..1), forward-backward error (px) and photometric error (0..255) of a
/// set of pairs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Quality {
    pub pairs: usize,
    pub occluded_frac: Agg,
    pub fb_error: Agg,
    pub photometric_error: Agg,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VideoQuality {
    pub video: String,
    #[serde(flatten)]
    pub quality: Quality,
}

/// The quality of one flow group of a store, and its warning when there is one.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GroupQuality {
    pub flow_group: String,
    pub model_name: String,
    pub store: Quality,
    pub videos: Vec<VideoQuality>,
    pub max_occluded_median: f32,
    pub warning: Option<String>,
}

/// Median and mean of `v` (NaN when empty).
pub fn agg(v: &[f64]) -> Agg {
    if v.is_empty() {
        return Agg {
            median: f64::NAN,
            mean: f64::NAN,
        };
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    };
    Agg {
        median,
        mean: s.iter().sum::<f64>() / n as f64,
    }
}

/// Quality of the pairs whose stat rows are `rows` (rows in [`FLOW_STAT_NAMES`] order).
pub fn quality_of(rows: &[&[f32]]) -> Quality {
    let col = |name: &str| {
        let j = FLOW_STAT_NAMES
            .iter()
            .position(|n| *n == name)
            .expect("known statistic");
        agg(&rows.iter().map(|r| f64::from(r[j])).collect::<Vec<_>>())
    };
    Quality {
        pairs: rows.len(),
        occluded_frac: col("occluded_frac"),
        fb_error: col("fb_error"),
        photometric_error: col("photometric_error"),
    }
}

/// The warning for a store above `max` median occluded fraction, naming the model and the
/// videos above `max` (all videos when none is above on its own).
fn warning(model: &str, store: &Quality, videos: &[VideoQuality], max: f32) -> Option<String> {
    let med = store.occluded_frac.median;
    if med.is_nan() || med <= f64::from(max) {
        return None;
    }
    let mut bad: Vec<&VideoQuality> = videos
        .iter()
        .filter(|v| v.quality.occluded_frac.median > f64::from(max))
        .collect();
    if bad.is_empty() {
        bad = videos.iter().collect();
    }
    let names: Vec<String> = bad
        .iter()
        .map(|v| {
            format!(
                "{} ({:.0}%)",
                v.video,
                100.0 * v.quality.occluded_frac.median
            )
        })
        .collect();
    Some(format!(
        "flow model {model} marks a median {:.0}% of pixels occluded (forward-backward \
         inconsistent), above the {:.0}% threshold: the dense loss learns from the rest only. \
         Videos: {}. Try a better flow model (--model), or check the frame gaps",
        100.0 * med,
        100.0 * max,
        names.join(", ")
    ))
}

/// Quality of flow group `group` of `store`, per store and per video, over valid pairs.
pub fn group_quality(store: &PoodleStore, group: &str, max: f32) -> Result<GroupQuality> {
    let (_, fa) = store.flow_group(Some(group))?;
    let k = fa.stat_names.len();
    let all = store.read_all_stats(group)?;
    let valid = store.read_all_valid()?;
    let pairs = store.read_all_pairs()?;
    let rows: Vec<(usize, &[f32])> = all
        .chunks_exact(k)
        .zip(valid.iter().zip(&pairs))
        .filter(|(_, (&ok, _))| ok)
        .map(|(r, (_, p))| (p[0] as usize, r))
        .collect();
    let videos: Vec<VideoQuality> = store
        .attrs
        .videos
        .iter()
        .enumerate()
        .filter_map(|(vi, name)| {
            let mine: Vec<&[f32]> = rows.iter().filter(|r| r.0 == vi).map(|r| r.1).collect();
            (!mine.is_empty()).then(|| VideoQuality {
                video: name.clone(),
                quality: quality_of(&mine),
            })
        })
        .collect();
    let whole = quality_of(&rows.iter().map(|r| r.1).collect::<Vec<_>>());
    Ok(GroupQuality {
        flow_group: group.to_string(),
        model_name: fa.model_name.clone(),
        warning: warning(&fa.model_name, &whole, &videos, max),
        store: whole,
        videos,
        max_occluded_median: max,
    })
}

/// A group's quality as table lines (stderr for jobs, stdout for `inspect`).
pub fn quality_lines(q: &GroupQuality) -> Vec<String> {
    let row = |name: &str, q: &Quality| {
        format!(
            "  {name:<32} {:>5} {:>8.3} {:>8.3} {:>8.3} {:>8.3} {:>8.2} {:>8.2}",
            q.pairs,
            q.occluded_frac.median,
            q.occluded_frac.mean,
            q.fb_error.median,
            q.fb_error.mean,
            q.photometric_error.median,
            q.photometric_error.mean
        )
    };
    let mut out = vec![
        format!(
            "flow quality of group {} (model {}): median / mean over valid pairs",
            q.flow_group, q.model_name
        ),
        format!(
            "  {:<32} {:>5} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
            "", "pairs", "occ med", "occ mean", "fb med", "fb mean", "photo md", "photo mn"
        ),
        row("store", &q.store),
    ];
    out.extend(q.videos.iter().map(|v| row(&v.video, &v.quality)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_mean_hand_cases() {
        assert_eq!(agg(&[3.0, 1.0, 2.0]).median, 2.0);
        assert_eq!(agg(&[4.0, 1.0, 3.0, 2.0]).median, 2.5);
        assert_eq!(agg(&[4.0, 1.0, 3.0, 2.0]).mean, 2.5);
        assert!(agg(&[]).median.is_nan());
    }

    fn video(name: &str, occ: f64) -> VideoQuality {
        let mut q = Quality::default();
        q.occluded_frac.median = occ;
        VideoQuality {
            video: name.into(),
            quality: q,
        }
    }

    #[test]
    fn warning_names_the_model_and_the_videos_above_the_threshold() {
        let vids = [video("a.mp4", 0.7), video("b.mp4", 0.2)];
        let mut store = Quality::default();
        store.occluded_frac.median = 0.45;
        let w = warning("tvl1_flow", &store, &vids, 0.4).expect("above threshold");
        assert!(w.contains("tvl1_flow") && w.contains("a.mp4 (70%)"), "{w}");
        assert!(!w.contains("b.mp4"), "{w}");
        assert_eq!(warning("tvl1_flow", &store, &vids, 0.5), None);
        // No video above on its own: all are named.
        let vids = [video("a.mp4", 0.39), video("b.mp4", 0.38)];
        let w = warning("m", &store, &vids, 0.4).unwrap();
        assert!(w.contains("a.mp4") && w.contains("b.mp4"), "{w}");
    }

    #[test]
    fn quality_reads_the_named_columns() {
        let r1 = [0.0, 0.0, 0.0, 0.5, 1.0, 10.0];
        let r2 = [0.0, 0.0, 0.0, 0.3, 3.0, 20.0];
        let q = quality_of(&[&r1, &r2]);
        assert_eq!(q.pairs, 2);
        assert!((q.occluded_frac.median - 0.4).abs() < 1e-6);
        assert_eq!(q.fb_error.mean, 2.0);
        assert_eq!(q.photometric_error.median, 15.0);
    }
}
