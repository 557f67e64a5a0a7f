//! `inspect`: a summary of a store; `show`: one pair as a PNG (both frames, the flow as a
//! colour wheel, the occlusion mask).

use crate::quality::{agg, group_quality, quality_lines, GroupQuality};
use crate::{PrepError, Result};
use poodle_common::flowmath::{flow_to_color, write_png_rgb, Map};
use poodle_common::store::PoodleStore;
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Serialize)]
pub struct StatSummary {
    pub name: String,
    pub mean: f32,
    pub median: f32,
    pub min: f32,
    pub max: f32,
}

#[derive(Debug, Serialize)]
pub struct FlowGroupSummary {
    pub name: String,
    pub model_name: String,
    pub model_sha256: String,
    pub backward: bool,
    pub stats: Vec<StatSummary>,
    /// Occluded fraction, forward-backward and photometric error per store and per video.
    pub quality: GroupQuality,
}

#[derive(Debug, Serialize)]
pub struct Inspection {
    pub store: String,
    pub schema_version: u32,
    pub tool_version: String,
    pub dataset: String,
    pub part: String,
    pub pairs: usize,
    pub valid_pairs: usize,
    pub frame_size: [usize; 2],
    pub pairs_per_shard: usize,
    pub videos: usize,
    pub manifest_sha256: String,
    pub bytes: Vec<(String, u64)>,
    pub bytes_per_valid_pair: f64,
    pub flow_groups: Vec<FlowGroupSummary>,
}

/// Summarises the store at `path`; flow groups whose median occluded fraction is above
/// `max_occluded_median` carry a warning.
pub fn inspect(path: &Path, max_occluded_median: f32) -> Result<Inspection> {
    let s = PoodleStore::open(path)?;
    let a = &s.attrs;
    let valid = s.read_all_valid()?;
    let nvalid = valid.iter().filter(|&&v| v).count();
    let mut groups = Vec::new();
    for (name, fa) in &s.flow_groups {
        let all = s.read_all_stats(name)?;
        let k = fa.stat_names.len();
        let stats = fa
            .stat_names
            .iter()
            .enumerate()
            .map(|(j, sname)| {
                let mut col: Vec<f32> = all
                    .chunks_exact(k)
                    .zip(&valid)
                    .filter(|(_, &v)| v)
                    .map(|(r, _)| r[j])
                    .collect();
                col.sort_by(|x, y| x.total_cmp(y));
                let a = agg(&col.iter().map(|&v| f64::from(v)).collect::<Vec<_>>());
                StatSummary {
                    name: sname.clone(),
                    mean: a.mean as f32,
                    median: a.median as f32,
                    min: col.first().copied().unwrap_or(f32::NAN),
                    max: col.last().copied().unwrap_or(f32::NAN),
                }
            })
            .collect();
        groups.push(FlowGroupSummary {
            name: name.clone(),
            model_name: fa.model_name.clone(),
            model_sha256: fa.model_sha256.clone(),
            backward: fa.backward,
            stats,
            quality: group_quality(&s, name, max_occluded_median)?,
        });
    }
    let bytes = s.disk_usage();
    let total: u64 = bytes.iter().map(|b| b.1).sum();
    Ok(Inspection {
        store: path.display().to_string(),
        schema_version: a.schema_version,
        tool_version: a.tool_version.clone(),
        dataset: a.dataset.name.clone(),
        part: format!("{} of {}", a.part_index, a.num_parts),
        pairs: s.num_pairs(),
        valid_pairs: nvalid,
        frame_size: [a.geometry.height, a.geometry.width],
        pairs_per_shard: a.geometry.pairs_per_shard,
        videos: a.videos.len(),
        manifest_sha256: a.manifest_sha256.clone(),
        bytes,
        bytes_per_valid_pair: total as f64 / nvalid.max(1) as f64,
        flow_groups: groups,
    })
}

pub fn print_inspection(i: &Inspection) {
    println!("store      {}", i.store);
    println!(
        "schema     v{} (written by poodle {})",
        i.schema_version, i.tool_version
    );
    println!(
        "dataset    {}  part {}  manifest {}",
        i.dataset,
        i.part,
        &i.manifest_sha256[..12.min(i.manifest_sha256.len())]
    );
    println!(
        "pairs      {} ({} valid) from {} videos, {}x{} frames, {} pairs per shard",
        i.pairs, i.valid_pairs, i.videos, i.frame_size[0], i.frame_size[1], i.pairs_per_shard
    );
    println!("arrays     frames (N,2,3,H,W) uint8, pairs (N,3) int64, valid (N,) bool");
    for (name, b) in &i.bytes {
        println!("  {name:<24} {:>12} bytes", b);
    }
    println!("bytes/pair {:.0}", i.bytes_per_valid_pair);
    for g in &i.flow_groups {
        println!(
            "flow group {}  model {} ({}), backward {}",
            g.name,
            g.model_name,
            &g.model_sha256[..12.min(g.model_sha256.len())],
            g.backward
        );
        println!(
            "  {:<20} {:>10} {:>10} {:>10} {:>10}",
            "statistic", "mean", "median", "min", "max"
        );
        for s in &g.stats {
            println!(
                "  {:<20} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
                s.name, s.mean, s.median, s.min, s.max
            );
        }
        for line in quality_lines(&g.quality) {
            println!("{line}");
        }
        if let Some(w) = &g.quality.warning {
            println!("warning: {w}");
        }
    }
}

/// Writes pair `i` as a 2x2 PNG: frame t, frame t+dt / flow colour wheel, occlusion mask.
pub fn show(path: &Path, i: usize, group: Option<&str>, out: &Path) -> Result<()> {
    let s = PoodleStore::open(path)?;
    let rec = s.read_pair(i)?;
    if !rec.valid {
        return Err(PrepError::Usage(format!(
            "pair {i} of {} was skipped when the store was written (see its summary)",
            path.display()
        )));
    }
    let (name, _) = s.flow_group(group)?;
    let flow = s.read_flow(name, i)?;
    let (h, w) = (s.attrs.geometry.height, s.attrs.geometry.width);
    let n = h * w;
    let mut canvas = vec![0u8; (2 * h) * (2 * w) * 3];
    let mut put = |oy: usize, ox: usize, rgb: &dyn Fn(usize) -> [u8; 3]| {
        for y in 0..h {
            for x in 0..w {
                let px = rgb(y * w + x);
                let o = ((oy + y) * 2 * w + ox + x) * 3;
                canvas[o..o + 3].copy_from_slice(&px);
            }
        }
    };
    let fr = &rec.frames;
    put(0, 0, &|p| [fr[p], fr[n + p], fr[2 * n + p]]);
    put(0, w, &|p| [fr[3 * n + p], fr[4 * n + p], fr[5 * n + p]]);
    let fmap = Map {
        c: 2,
        h,
        w,
        data: flow.forward.clone(),
    };
    let col = flow_to_color(&fmap, None);
    put(h, 0, &|p| [col[3 * p], col[3 * p + 1], col[3 * p + 2]]);
    let occ = &flow.occlusion;
    put(h, w, &|p| if occ[p] { [255, 255, 255] } else { [0, 0, 0] });
    write_png_rgb(out, (2 * w) as u32, (2 * h) as u32, &canvas)
        .map_err(|e| poodle_common::Error::io(out, e))?;
    Ok(())
}
