//! An ONNX optical-flow model plus its model card, run through ort on CPU or CUDA.
//!
//! The card (JSON beside the model) says how to feed the model: input names and layout,
//! channel order, value range, the size multiple the model needs, the output name and its
//! units. Frames are resized to the nearest size multiple, and the flow is resized back to
//! store resolution with its vectors rescaled (`flowmath::resize_flow`).

use crate::tools::ort_environment;
use crate::{PrepError, Result};
use ort::session::Session;
use ort::value::TensorRef;
use poodle_common::flowmath::{resize_bilinear, resize_flow, Map};
use poodle_common::manifest::hex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelCard {
    pub name: String,
    /// Model file, relative to the card.
    pub onnx: String,
    pub inputs: [String; 2],
    pub input_layout: String,
    pub channel_order: String,
    pub value_range: [f32; 2],
    pub size_multiple: usize,
    /// Smallest height or width the model accepts (RAFT: 128).
    #[serde(default)]
    pub min_size: usize,
    pub output: String,
    pub output_layout: String,
    pub units: String,
    /// SHA-256 of the model file; checked when present.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// Where a model runs. An unavailable provider is an error, never a silent CPU fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(i32),
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if s == "cpu" {
            return Ok(Device::Cpu);
        }
        if let Some(id) = s.strip_prefix("cuda") {
            let id = id.strip_prefix(':').unwrap_or("0");
            return id
                .parse()
                .map(Device::Cuda)
                .map_err(|_| format!("bad CUDA device {s:?} (use cuda:0)"));
        }
        Err(format!("unknown device {s:?}: use cpu or cuda:N"))
    }
}

pub struct FlowModel {
    pub card: ModelCard,
    /// The card as JSON, kept whole for the store's attributes.
    pub card_json: serde_json::Value,
    pub card_path: PathBuf,
    pub model_sha256: String,
    session: Session,
    _env: ort::environment::Environment,
}

/// A frame in the model's input form: planar f32 RGB 0..255 at store resolution.
pub type Image = Map;

impl FlowModel {
    /// Loads the card and model, checks the model's inputs and outputs against the card and
    /// runs one tiny inference, all before any work starts.
    pub fn load(card_path: &Path, device: Device, ort_lib: &Path, threads: usize) -> Result<Self> {
        let merr = |reason: String| PrepError::Model {
            path: card_path.to_path_buf(),
            reason,
        };
        let card_json: serde_json::Value = poodle_common::atomic::read_json(card_path)?;
        let card: ModelCard = serde_json::from_value(card_json.clone())
            .map_err(|e| merr(format!("model card: {e}")))?;
        if card.input_layout != "NCHW" || card.output_layout != "N2HW" {
            return Err(merr(format!(
                "unsupported layouts {} -> {} (supported: NCHW -> N2HW)",
                card.input_layout, card.output_layout
            )));
        }
        if card.units != "pixels" {
            return Err(merr(format!(
                "unsupported flow units {:?} (supported: pixels)",
                card.units
            )));
        }
        if !matches!(card.channel_order.as_str(), "RGB" | "BGR") || card.size_multiple == 0 {
            return Err(merr(
                "channel_order must be RGB or BGR and size_multiple > 0".into(),
            ));
        }
        let onnx = card_path
            .parent()
            .unwrap_or(Path::new("."))
            .join(&card.onnx);
        let bytes = std::fs::read(&onnx).map_err(|e| merr(format!("{}: {e}", onnx.display())))?;
        let model_sha256 = hex(&Sha256::digest(&bytes));
        if let Some(want) = &card.sha256 {
            if want != &model_sha256 {
                return Err(merr(format!(
                    "{} has sha256 {model_sha256}, the card says {want}",
                    onnx.display()
                )));
            }
        }
        let env = ort_environment(ort_lib)?;
        let mut builder = Session::builder(&env)?
            .with_intra_threads(threads.max(1))
            .map_err(|e| PrepError::from(ort::Error::from(e)))?;
        if let Device::Cuda(id) = device {
            builder = builder
                .with_execution_providers([ort::ep::CUDA::default()
                    .with_device_id(id)
                    .build()
                    .error_on_failure()])
                .map_err(|source| PrepError::Ort {
                    context: format!(
                        " (CUDA execution provider for cuda:{id} unavailable: use an \
                         onnxruntime-gpu library with --ort-lib, or --device cpu)"
                    ),
                    source: source.into(),
                })?;
        }
        let session = builder
            .commit_from_memory(&bytes)
            .map_err(|e| merr(format!("ONNX Runtime cannot load the model: {e}")))?;
        let names_in: Vec<String> = session
            .inputs()
            .iter()
            .map(|i| i.name().to_string())
            .collect();
        let names_out: Vec<String> = session
            .outputs()
            .iter()
            .map(|o| o.name().to_string())
            .collect();
        for want in &card.inputs {
            if !names_in.contains(want) {
                return Err(merr(format!(
                    "card input {want:?} is not a model input; the model has {names_in:?}"
                )));
            }
        }
        if !names_out.contains(&card.output) {
            return Err(merr(format!(
                "card output {:?} is not a model output; the model has {names_out:?}",
                card.output
            )));
        }
        let mut model = FlowModel {
            card,
            card_json,
            card_path: card_path.to_path_buf(),
            model_sha256,
            session,
            _env: env,
        };
        // One tiny inference proves the card's shapes and units match the model.
        let side = model.card.min_size.max(2 * model.card.size_multiple);
        let probe = Map::zeros(3, side, side);
        let flows = model.flow(&[(&probe, &probe)])?;
        if flows.len() != 1 || flows[0].c != 2 {
            return Err(merr("model output is not (N, 2, H, W)".into()));
        }
        Ok(model)
    }

    fn model_size(&self, h: usize, w: usize) -> (usize, usize) {
        let m = self.card.size_multiple;
        let min = self.card.min_size;
        let round = |x: usize| {
            let r = (((x as f64 / m as f64).round() as usize).max(1)) * m;
            r.max(min.div_ceil(m) * m)
        };
        (round(h), round(w))
    }

    fn to_input(&self, img: &Image, mh: usize, mw: usize, out: &mut Vec<f32>) {
        let resized;
        let src = if (img.h, img.w) == (mh, mw) {
            img
        } else {
            resized = resize_bilinear(img, mh, mw);
            &resized
        };
        let [lo, hi] = self.card.value_range;
        let scale = (hi - lo) / 255.0;
        let n = mh * mw;
        let order: [usize; 3] = if self.card.channel_order == "BGR" {
            [2, 1, 0]
        } else {
            [0, 1, 2]
        };
        for &c in &order {
            out.extend(src.data[c * n..(c + 1) * n].iter().map(|&v| v * scale + lo));
        }
    }

    /// Flow from the first to the second image of each pair, at the images' resolution,
    /// in pixels. All images of one call must have the same size.
    pub fn flow(&mut self, pairs: &[(&Image, &Image)]) -> Result<Vec<Map>> {
        let Some((first, _)) = pairs.first() else {
            return Ok(vec![]);
        };
        let (h, w) = (first.h, first.w);
        let (mh, mw) = self.model_size(h, w);
        let b = pairs.len();
        let mut in1 = Vec::with_capacity(b * 3 * mh * mw);
        let mut in2 = Vec::with_capacity(b * 3 * mh * mw);
        for (a, c) in pairs {
            if (a.h, a.w, c.h, c.w) != (h, w, h, w) {
                return Err(PrepError::Usage(
                    "all images of a flow batch must share one size".into(),
                ));
            }
            self.to_input(a, mh, mw, &mut in1);
            self.to_input(c, mh, mw, &mut in2);
        }
        let shape = [b as i64, 3, mh as i64, mw as i64];
        let t1 = TensorRef::from_array_view((shape, in1.as_slice()))?;
        let t2 = TensorRef::from_array_view((shape, in2.as_slice()))?;
        let (n1, n2, no) = (
            self.card.inputs[0].clone(),
            self.card.inputs[1].clone(),
            self.card.output.clone(),
        );
        let outputs = self
            .session
            .run(ort::inputs![n1.as_str() => t1, n2.as_str() => t2])
            .map_err(|e| PrepError::Model {
                path: self.card_path.clone(),
                reason: format!("inference failed on a {b}x3x{mh}x{mw} batch: {e}"),
            })?;
        let (oshape, data) = outputs[no.as_str()].try_extract_tensor::<f32>()?;
        let dims: Vec<i64> = oshape.iter().copied().collect();
        if dims.len() != 4 || dims[0] != b as i64 || dims[1] != 2 {
            return Err(PrepError::Model {
                path: self.card_path.clone(),
                reason: format!("output {no:?} has shape {dims:?}, expected [{b}, 2, H, W]"),
            });
        }
        let (oh, ow) = (dims[2] as usize, dims[3] as usize);
        let per = 2 * oh * ow;
        Ok((0..b)
            .map(|i| {
                let m = Map {
                    c: 2,
                    h: oh,
                    w: ow,
                    data: data[i * per..(i + 1) * per].to_vec(),
                };
                if (oh, ow) == (h, w) {
                    m
                } else {
                    resize_flow(&m, h, w)
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_strings() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda:1".parse::<Device>(), Ok(Device::Cuda(1)));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert!("gpu".parse::<Device>().unwrap_err().contains("cpu or cuda"));
    }
}
