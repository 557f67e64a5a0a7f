//! The flow stage shared by `prep` and `flow`: forward and backward flow in one batch, then
//! occlusion, statistics and quantisation per pair on rayon.

use crate::flowmodel::{Device, FlowModel};
use crate::tools::find_ort_library;
use crate::{PrepError, Result};
use poodle_common::flowmath::{
    flow_stats, occlusion_fb, quantize_flow, Map, FLOW_QUANT_SCALE, FLOW_STAT_NAMES, OCC_ALPHA1,
    OCC_ALPHA2,
};
use poodle_common::store::{FlowArrays, FlowAttrs, Geometry, StoreArrays};
use rayon::prelude::*;
use std::path::PathBuf;

/// The flow model of a job (`prep`, `flow`, `eval-flow`) and the flow group it writes.
#[derive(Clone, Debug)]
pub struct FlowModelOptions {
    /// The model card (JSON beside the ONNX file).
    pub card: PathBuf,
    pub device: Device,
    /// The ONNX Runtime library; `None` finds it.
    pub ort_lib: Option<PathBuf>,
    /// ONNX Runtime's intra-op threads on the CPU.
    pub threads: usize,
    /// Run the model through an ort I/O binding (see `FlowModel::set_io_binding`).
    pub io_binding: bool,
    /// Flow group name; defaults to the model card's name.
    pub flow_group: Option<String>,
}

impl FlowModelOptions {
    /// Loads the model card's ONNX model through ort.
    pub fn load(&self) -> Result<FlowModel> {
        let ort_lib = find_ort_library(self.ort_lib.as_deref())?;
        let mut model = FlowModel::load(&self.card, self.device, &ort_lib, self.threads)?;
        model.set_io_binding(self.io_binding)?;
        Ok(model)
    }

    /// Loads the model and names its flow group: `flow_group`, else the model card's name.
    /// A name the store cannot hold is refused here, before any work.
    pub fn open(&self) -> Result<(FlowModel, String)> {
        let model = self.load()?;
        let group = self
            .flow_group
            .clone()
            .unwrap_or_else(|| model.card.name.clone());
        poodle_common::store::validate_group_name(&group).map_err(PrepError::Usage)?;
        Ok((model, group))
    }
}

/// The attributes of a flow group written by `model`.
pub fn flow_attrs(model: &FlowModel, backward: bool) -> FlowAttrs {
    FlowAttrs {
        model_name: model.card.name.clone(),
        model_sha256: model.model_sha256.clone(),
        card: model.card_json.clone(),
        flow_scale: FLOW_QUANT_SCALE,
        backward,
        occlusion: format!(
            "DDFlow forward-backward check: |f + b'|^2 > {OCC_ALPHA1} (|f|^2 + |b'|^2) + {OCC_ALPHA2}"
        ),
        stat_names: FLOW_STAT_NAMES.iter().map(|s| s.to_string()).collect(),
    }
}

/// What the flow stage produces for one pair, ready for the store.
pub struct FlowOut {
    pub forward: Vec<i16>,
    /// Backward flow and the occlusion of frame t+dt in t, when kept.
    pub backward: Option<(Vec<i16>, Vec<bool>)>,
    pub occlusion: Vec<bool>,
    pub stats: Vec<f32>,
    /// Median forward flow magnitude (px), for the near-static filter.
    pub median_mag: f32,
}

/// One shard's flow-group arrays, filled pair by pair and written in one go: `prep`'s writer
/// and `flow` both write whole shards.
pub struct ShardFlow {
    g: Geometry,
    forward: Vec<i16>,
    /// Backward flow and the occlusion of frame t+dt in t: empty unless kept.
    backward: Vec<i16>,
    occlusion_bwd: Vec<bool>,
    occlusion: Vec<bool>,
    stats: Vec<f32>,
    keep_bwd: bool,
}

impl ShardFlow {
    /// Zeroed arrays for `n` pairs (a pair left unfilled is an invalid one).
    pub fn new(g: Geometry, n: usize, keep_bwd: bool) -> Self {
        let kept = |len: usize| if keep_bwd { len } else { 0 };
        ShardFlow {
            g,
            forward: vec![0; n * g.flow_len()],
            backward: vec![0; kept(n * g.flow_len())],
            occlusion_bwd: vec![false; kept(n * g.mask_len())],
            occlusion: vec![false; n * g.mask_len()],
            stats: vec![0.0; n * FLOW_STAT_NAMES.len()],
            keep_bwd,
        }
    }

    /// Puts the flow of the shard's `j`-th pair.
    pub fn put(&mut self, j: usize, f: &FlowOut) {
        let (fl, ml, ns) = (self.g.flow_len(), self.g.mask_len(), FLOW_STAT_NAMES.len());
        self.forward[j * fl..(j + 1) * fl].copy_from_slice(&f.forward);
        if let Some((b, ob)) = &f.backward {
            self.backward[j * fl..(j + 1) * fl].copy_from_slice(b);
            self.occlusion_bwd[j * ml..(j + 1) * ml].copy_from_slice(ob);
        }
        self.occlusion[j * ml..(j + 1) * ml].copy_from_slice(&f.occlusion);
        self.stats[j * ns..(j + 1) * ns].copy_from_slice(&f.stats);
    }

    /// Writes the arrays as shard `k` of the flow group `fa`.
    pub fn write(&self, arrays: &StoreArrays, fa: &FlowArrays, k: usize) -> Result<()> {
        let backward = (self.backward.as_slice(), self.occlusion_bwd.as_slice());
        arrays.write_flow_shard(
            fa,
            k,
            &self.forward,
            self.keep_bwd.then_some(backward),
            &self.occlusion,
            &self.stats,
        )?;
        Ok(())
    }
}

/// Flow for a batch of frame pairs (planar RGB 0..255), then occlusion and statistics.
pub fn flow_batch(
    model: &mut FlowModel,
    imgs: &[(Map, Map)],
    keep_bwd: bool,
) -> Result<Vec<FlowOut>> {
    let flows = infer_batch(model, imgs)?;
    Ok(finish_batch(imgs, &flows, keep_bwd))
}

/// The model's part: forward flows of the batch, then backward flows, from one model call
/// ((f1, f2) for every pair, then (f2, f1)), so the inputs go to the device once.
pub fn infer_batch(model: &mut FlowModel, imgs: &[(Map, Map)]) -> Result<Vec<Map>> {
    let mut inputs: Vec<(&Map, &Map)> = imgs.iter().map(|(a, b)| (a, b)).collect();
    inputs.extend(imgs.iter().map(|(a, b)| (b, a)));
    model.flow(&inputs)
}

/// The CPU part after the model, per pair on rayon: occlusion, statistics, quantisation.
/// Runs beside the next batch's inference in the prep pipeline.
pub fn finish_batch(imgs: &[(Map, Map)], flows: &[Map], keep_bwd: bool) -> Vec<FlowOut> {
    let n = imgs.len();
    (0..n)
        .into_par_iter()
        .map(|i| {
            let (fwd, bwd) = (&flows[i], &flows[n + i]);
            let occ = occlusion_fb(fwd, bwd, OCC_ALPHA1, OCC_ALPHA2);
            let st = flow_stats(&imgs[i].0, &imgs[i].1, fwd, bwd, &occ);
            FlowOut {
                forward: quantize_flow(fwd, FLOW_QUANT_SCALE),
                backward: keep_bwd.then(|| {
                    (
                        quantize_flow(bwd, FLOW_QUANT_SCALE),
                        occlusion_fb(bwd, fwd, OCC_ALPHA1, OCC_ALPHA2),
                    )
                }),
                occlusion: occ,
                stats: st.to_array().to_vec(),
                median_mag: st.median_mag,
            }
        })
        .collect()
}

/// Why a pair is degenerate, if it is: a black frame (mean below 8 of 255) or frozen frames
/// (mean absolute difference below 0.5 grey levels: a stalled stream or duplicated frames).
pub fn degenerate(f1: &[u8], f2: &[u8]) -> Option<String> {
    let mean =
        |f: &[u8]| f.iter().map(|&v| u64::from(v)).sum::<u64>() as f64 / f.len().max(1) as f64;
    let (m1, m2) = (mean(f1), mean(f2));
    if m1 < 8.0 || m2 < 8.0 {
        return Some(format!("black frame (mean intensity {:.1})", m1.min(m2)));
    }
    let diff = f1
        .iter()
        .zip(f2)
        .map(|(&a, &b)| u64::from(a.abs_diff(b)))
        .sum::<u64>() as f64
        / f1.len().max(1) as f64;
    if diff < 0.5 {
        return Some(format!("frozen frames (mean difference {diff:.2})"));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn black_and_frozen_pairs_are_named() {
        let black = vec![3u8; 300];
        let img: Vec<u8> = (0..300).map(|i| (i % 200) as u8 + 20).collect();
        assert!(degenerate(&black, &img).unwrap().starts_with("black frame"));
        assert!(degenerate(&img, &img).unwrap().starts_with("frozen frames"));
        let moved: Vec<u8> = img.iter().map(|&v| v + 3).collect();
        assert_eq!(degenerate(&img, &moved), None);
    }
}
