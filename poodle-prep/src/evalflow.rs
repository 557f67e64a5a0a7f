//! `eval-flow`: accuracy of a flow model against ground truth: average endpoint error (AEE),
//! KITTI Fl-all (endpoint error > 3 px and > 5% of the true magnitude) and the photometric
//! error after warping the second frame by the predicted flow.
//!
//! Ground truth formats: Middlebury `.flo` ('PIEH', width, height as int32, then float32
//! (u, v) interleaved; |value| > 1e9 is unknown) and KITTI 16-bit PNG (u = (R - 2^15) / 64,
//! v = (G - 2^15) / 64, valid where B > 0).
//!
//! Real videos without ground truth (the sample dashcam clips) get a consistency check
//! instead: the pairs a dataset config draws from them, flowed forward and backward exactly as
//! `prep` does, report the occluded fraction, the forward-backward error and the photometric
//! error, the numbers a prep summary shows for the same model.

use crate::decode::{decode_frames, decode_image};
use crate::discover::{probe_all, probe_video};
use crate::flowmodel::FlowModel;
use crate::flowstage::flow_batch;
use crate::quality::{agg, Agg};
use crate::{PrepError, Result};
use poodle_common::config::DatasetConfig;
use poodle_common::flowmath::{warp_backward, Map, FLOW_STAT_NAMES};
use poodle_common::manifest::{sample_pairs, Pair, VideoInfo};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// Dense or sparse ground truth: flow (2, H, W) and a validity mask.
pub struct GroundTruth {
    pub flow: Map,
    pub valid: Vec<bool>,
}

fn gt_err(path: &Path, reason: impl Into<String>) -> PrepError {
    PrepError::Video {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

pub fn read_flo(path: &Path) -> Result<GroundTruth> {
    let b = std::fs::read(path).map_err(|e| poodle_common::Error::io(path, e))?;
    if b.len() < 12 || &b[0..4] != b"PIEH" {
        return Err(gt_err(path, "not a Middlebury .flo file (no PIEH tag)"));
    }
    let w = i32::from_le_bytes(b[4..8].try_into().expect("4 bytes")) as usize;
    let h = i32::from_le_bytes(b[8..12].try_into().expect("4 bytes")) as usize;
    if b.len() != 12 + w * h * 8 {
        return Err(gt_err(
            path,
            format!("size {} does not match {w}x{h}", b.len()),
        ));
    }
    let mut flow = Map::zeros(2, h, w);
    let mut valid = vec![true; w * h];
    for (i, ok) in valid.iter_mut().enumerate() {
        let o = 12 + i * 8;
        let u = f32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let v = f32::from_le_bytes(b[o + 4..o + 8].try_into().expect("4 bytes"));
        if !(u.abs() < 1e9 && v.abs() < 1e9) {
            *ok = false;
            continue;
        }
        flow.data[i] = u;
        flow.data[w * h + i] = v;
    }
    Ok(GroundTruth { flow, valid })
}

pub fn read_kitti_png(path: &Path) -> Result<GroundTruth> {
    let f = std::fs::File::open(path).map_err(|e| poodle_common::Error::io(path, e))?;
    let mut dec = png::Decoder::new(std::io::BufReader::new(f));
    dec.set_transformations(png::Transformations::IDENTITY);
    let mut reader = dec
        .read_info()
        .map_err(|e| gt_err(path, format!("PNG: {e}")))?;
    let mut buf = vec![0u8; reader.output_buffer_size()];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| gt_err(path, format!("PNG: {e}")))?;
    if info.bit_depth != png::BitDepth::Sixteen || info.color_type != png::ColorType::Rgb {
        return Err(gt_err(
            path,
            format!(
                "KITTI flow must be 16-bit RGB PNG, got {:?} {:?}",
                info.bit_depth, info.color_type
            ),
        ));
    }
    let (w, h) = (info.width as usize, info.height as usize);
    let px = |i: usize, c: usize| {
        let o = (i * 3 + c) * 2;
        u16::from_be_bytes([buf[o], buf[o + 1]])
    };
    let mut flow = Map::zeros(2, h, w);
    let mut valid = vec![false; w * h];
    for (i, ok) in valid.iter_mut().enumerate() {
        if px(i, 2) > 0 {
            *ok = true;
            flow.data[i] = (f32::from(px(i, 0)) - 32768.0) / 64.0;
            flow.data[w * h + i] = (f32::from(px(i, 1)) - 32768.0) / 64.0;
        }
    }
    Ok(GroundTruth { flow, valid })
}

pub fn read_gt(path: &Path) -> Result<GroundTruth> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("flo") => read_flo(path),
        Some("png") => read_kitti_png(path),
        _ => Err(gt_err(
            path,
            "unknown ground-truth format (use .flo or KITTI .png)",
        )),
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct FlowEval {
    pub name: String,
    pub size: [usize; 2],
    pub valid_px: usize,
    /// Average endpoint error over valid ground-truth pixels (px).
    pub aee: f64,
    /// Percentage of valid pixels with error > 3 px and > 5% of the true magnitude.
    pub fl_all: f64,
    /// Mean |frame1 - warp(frame2, flow)| over in-bounds pixels (0..255, mean over RGB),
    /// for the predicted flow and, as references, for zero flow and the ground truth.
    pub photometric_pred: f64,
    pub photometric_zero: f64,
    pub photometric_gt: f64,
    pub seconds: f64,
}

/// Endpoint-error metrics of `pred` against `gt` (same size).
pub fn endpoint_metrics(pred: &Map, gt: &GroundTruth) -> (f64, f64, usize) {
    let n = gt.flow.h * gt.flow.w;
    let (mut sum, mut outliers, mut count) = (0.0f64, 0usize, 0usize);
    for i in 0..n {
        if !gt.valid[i] {
            continue;
        }
        let (gu, gv) = (gt.flow.data[i], gt.flow.data[n + i]);
        let (du, dv) = (pred.data[i] - gu, pred.data[n + i] - gv);
        let epe = (du * du + dv * dv).sqrt();
        let mag = (gu * gu + gv * gv).sqrt();
        sum += f64::from(epe);
        count += 1;
        if epe > 3.0 && epe > 0.05 * mag {
            outliers += 1;
        }
    }
    let c = count.max(1) as f64;
    (sum / c, 100.0 * outliers as f64 / c, count)
}

/// Mean absolute RGB difference between `f1` and `f2` warped by `flow` (in-bounds pixels).
pub fn photometric_error(f1: &Map, f2: &Map, flow: &Map) -> f64 {
    let (warped, inb) = warp_backward(f2, flow);
    let n = f1.h * f1.w;
    let (mut s, mut c) = (0.0f64, 0usize);
    for (i, _) in inb.iter().enumerate().filter(|(_, &v)| v) {
        for ch in 0..3 {
            s += f64::from((f1.data[ch * n + i] - warped.data[ch * n + i]).abs());
        }
        c += 3;
    }
    s / c.max(1) as f64
}

fn load_rgb(path: &Path) -> Result<Map> {
    let info = probe_video(path, &path.display().to_string())?;
    let f = decode_image(path, info.height as usize, info.width as usize)?;
    Ok(Map::from_hwc_u8(f.height, f.width, &f.rgb))
}

/// Evaluates one pair: frames `img1`, `img2`, ground truth `gt`.
pub fn eval_pair(
    model: &mut FlowModel,
    name: &str,
    img1: &Path,
    img2: &Path,
    gt: &Path,
) -> Result<FlowEval> {
    let (f1, f2, gt) = (load_rgb(img1)?, load_rgb(img2)?, read_gt(gt)?);
    if (f1.h, f1.w) != (gt.flow.h, gt.flow.w) || (f2.h, f2.w) != (f1.h, f1.w) {
        return Err(PrepError::Usage(format!(
            "{name}: frames {}x{} and ground truth {}x{} differ in size",
            f1.w, f1.h, gt.flow.w, gt.flow.h
        )));
    }
    let t0 = std::time::Instant::now();
    let pred = model.flow(&[(&f1, &f2)])?.remove(0);
    let seconds = t0.elapsed().as_secs_f64();
    let (aee, fl_all, valid_px) = endpoint_metrics(&pred, &gt);
    let mut gt_dense = gt.flow.clone();
    let n = gt.flow.h * gt.flow.w;
    for i in 0..n {
        if !gt.valid[i] {
            gt_dense.data[i] = f32::NAN;
        }
    }
    Ok(FlowEval {
        name: name.to_string(),
        size: [f1.h, f1.w],
        valid_px,
        aee,
        fl_all,
        photometric_pred: photometric_error(&f1, &f2, &pred),
        photometric_zero: photometric_error(&f1, &f2, &Map::zeros(2, f1.h, f1.w)),
        photometric_gt: photometric_error(&f1, &f2, &gt_dense),
        seconds,
    })
}

/// The pairs of `../shared/data/flow` (name, frame 1, frame 2, ground truth) that exist.
pub fn known_pairs(dir: &Path) -> Vec<(String, PathBuf, PathBuf, PathBuf)> {
    [
        (
            "middlebury-rubberwhale",
            "rubberwhale1.png",
            "rubberwhale2.png",
            "Middlebury_flow_gt.flo",
        ),
        (
            "kitti",
            "KITTI_frame1.png",
            "KITTI_frame2.png",
            "KITTI_flow_gt.png",
        ),
    ]
    .iter()
    .map(|(n, a, b, g)| (n.to_string(), dir.join(a), dir.join(b), dir.join(g)))
    .filter(|(_, a, b, g)| a.exists() && b.exists() && g.exists())
    .collect()
}

/// One real-video pair without ground truth: what the flow model makes of it.
#[derive(Clone, Debug, Serialize)]
pub struct PairConsistency {
    pub t: u64,
    pub dt: u64,
    pub occluded_frac: f64,
    /// Mean |f + b'| over non-occluded pixels (px).
    pub fb_error: f64,
    /// Mean |frame t - warp(frame t+dt)| over non-occluded pixels (0..255), as prep stores it.
    pub photometric_error: f64,
    /// The same with zero flow over all pixels, for scale.
    pub photometric_zero: f64,
}

/// The consistency check of one clip: its pairs and their median and mean.
#[derive(Clone, Debug, Serialize)]
pub struct ClipConsistency {
    pub video: String,
    pub size: [usize; 2],
    pub occluded_frac: Agg,
    pub fb_error: Agg,
    pub photometric_error: Agg,
    pub photometric_zero: Agg,
    pub seconds: f64,
    pub pairs: Vec<PairConsistency>,
}

/// Flows the first `per_video` pairs that `cfg` draws from each video under `root` (at the
/// config's frame size and gaps) and reports their consistency, one row per video.
pub fn eval_clips(
    model: &mut FlowModel,
    cfg: &DatasetConfig,
    root: &Path,
    per_video: usize,
) -> Result<Vec<ClipConsistency>> {
    let manifest = probe_all(cfg, root, &indicatif::ProgressBar::hidden())?;
    let (pairs, _) = sample_pairs(cfg, &manifest.videos);
    let mut out = Vec::new();
    for (vi, v) in manifest.videos.iter().enumerate() {
        let mine: Vec<Pair> = pairs
            .iter()
            .filter(|p| p.video as usize == vi)
            .take(per_video)
            .copied()
            .collect();
        if !mine.is_empty() {
            out.push(eval_clip(model, cfg, &root.join(&v.path), v, &mine)?);
        }
    }
    Ok(out)
}

fn eval_clip(
    model: &mut FlowModel,
    cfg: &DatasetConfig,
    path: &Path,
    video: &VideoInfo,
    pairs: &[Pair],
) -> Result<ClipConsistency> {
    let idx: Vec<u64> = pairs.iter().flat_map(|p| [p.t, p.t + p.dt]).collect();
    let frames = decode_frames(path, &idx, cfg.height, cfg.width)?;
    let map = |k: u64| -> Result<Map> {
        let f = frames.get(&k).ok_or_else(|| PrepError::Video {
            path: path.display().to_string(),
            reason: format!("frame {k} could not be decoded"),
        })?;
        Ok(Map::from_hwc_u8(f.height, f.width, &f.rgb))
    };
    let col = |name: &str| {
        FLOW_STAT_NAMES
            .iter()
            .position(|n| *n == name)
            .expect("stat")
    };
    let t0 = std::time::Instant::now();
    let mut rows = Vec::new();
    for p in pairs {
        let (f1, f2) = (map(p.t)?, map(p.t + p.dt)?);
        let zero = photometric_error(&f1, &f2, &Map::zeros(2, f1.h, f1.w));
        // One pair per batch, as `prep --batch-size 1` computes it.
        let st = flow_batch(model, &[(f1, f2)], false)?.remove(0).stats;
        rows.push(PairConsistency {
            t: p.t,
            dt: p.dt,
            occluded_frac: f64::from(st[col("occluded_frac")]),
            fb_error: f64::from(st[col("fb_error")]),
            photometric_error: f64::from(st[col("photometric_error")]),
            photometric_zero: zero,
        });
    }
    let of = |g: fn(&PairConsistency) -> f64| agg(&rows.iter().map(g).collect::<Vec<_>>());
    Ok(ClipConsistency {
        video: video.path.clone(),
        size: [cfg.height, cfg.width],
        occluded_frac: of(|r| r.occluded_frac),
        fb_error: of(|r| r.fb_error),
        photometric_error: of(|r| r.photometric_error),
        photometric_zero: of(|r| r.photometric_zero),
        seconds: t0.elapsed().as_secs_f64(),
        pairs: rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_metrics_hand_case() {
        // 2x2 field; GT (10, 0) everywhere, one pixel invalid.
        let mut gt = GroundTruth {
            flow: Map::zeros(2, 2, 2),
            valid: vec![true, true, true, false],
        };
        for i in 0..4 {
            gt.flow.data[i] = 10.0;
        }
        let mut pred = gt.flow.clone();
        pred.data[0] = 14.0; // error 4 > 3 and > 0.5: outlier
        pred.data[4] = 0.0;
        pred.data[1] = 12.0; // error 2: not an outlier
        pred.data[3] = 100.0; // invalid pixel: ignored
        let (aee, fl, n) = endpoint_metrics(&pred, &gt);
        assert_eq!(n, 3);
        assert!((aee - 2.0).abs() < 1e-9, "{aee}");
        assert!((fl - 100.0 / 3.0).abs() < 1e-9, "{fl}");
    }

    #[test]
    fn photometric_error_is_zero_for_the_true_shift() {
        let (h, w) = (6, 8);
        let mut f1 = Map::zeros(3, h, w);
        let mut f2 = Map::zeros(3, h, w);
        for c in 0..3 {
            for y in 0..h {
                for x in 0..w {
                    f1.data[(c * h + y) * w + x] = (x * 10 + c) as f32;
                    f2.data[(c * h + y) * w + x] = (x * 10 + c) as f32 - 10.0; // content moved +1 px
                }
            }
        }
        let mut flow = Map::zeros(2, h, w);
        for i in 0..h * w {
            flow.data[i] = 1.0;
        }
        assert!(photometric_error(&f1, &f2, &flow) < 1e-6);
        assert!((photometric_error(&f1, &f2, &Map::zeros(2, h, w)) - 10.0).abs() < 1e-6);
    }

    #[test]
    fn real_ground_truth_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/flow");
        let Some(dir) = poodle_common::testenv::require(dir, "real test data") else {
            return;
        };
        let m = read_flo(&dir.join("Middlebury_flow_gt.flo")).unwrap();
        assert_eq!((m.flow.w, m.flow.h), (584, 388));
        assert!(m.valid.iter().filter(|&&v| v).count() > 584 * 388 * 9 / 10);
        let k = read_kitti_png(&dir.join("KITTI_flow_gt.png")).unwrap();
        assert_eq!((k.flow.w, k.flow.h), (1242, 375));
        let frac = k.valid.iter().filter(|&&v| v).count() as f64 / (1242.0 * 375.0);
        assert!(
            (0.1..0.25).contains(&frac),
            "KITTI GT is ~16% valid, got {frac}"
        );
        let n = 1242 * 375;
        let max = (0..n)
            .filter(|&i| k.valid[i])
            .map(|i| k.flow.data[i].hypot(k.flow.data[n + i]))
            .fold(0.0f32, f32::max);
        assert!(
            (170.0..200.0).contains(&max),
            "largest KITTI flow ~184 px, got {max}"
        );
    }
}
