//! An ONNX optical-flow model plus its model card, run through ort on CPU or CUDA.
//!
//! The card (JSON beside the model) says how to feed the model: input names and layout,
//! channel order, value range, the size multiple the model needs, the output name and its
//! units. Frames are resized to the nearest size multiple, and the flow is resized back to
//! store resolution with its vectors rescaled (`flowmath::resize_flow`).

use crate::tools::ort_environment;
use crate::{PrepError, Result};
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::{IoBinding, Session};
use ort::value::{Tensor, TensorRef};
use poodle_common::flowmath::{resize_bilinear, resize_flow, Map};
use poodle_common::manifest::hex;
use rayon::prelude::*;
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
    device: Device,
    /// The I/O binding path, when on (see [`FlowModel::set_io_binding`]).
    bound: Option<Bound>,
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
            device,
            bound: None,
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

    /// Runs every later batch through an I/O binding: inputs are written straight into
    /// tensors of the session's input memory (pinned host memory for CUDA, so the upload is
    /// one DMA copy) and bound once per batch, and the output is bound to host memory, so it
    /// comes back in one copy after the run. Off: plain `Session::run` with host arrays.
    pub fn set_io_binding(&mut self, on: bool) -> Result<()> {
        self.bound = if on {
            Some(Bound::new(&self.session, self.device)?)
        } else {
            None
        };
        Ok(())
    }

    pub fn io_binding(&self) -> bool {
        self.bound.is_some()
    }

    /// Flow from the first to the second image of each pair, at the images' resolution,
    /// in pixels. All images of one call must have the same size.
    pub fn flow(&mut self, pairs: &[(&Image, &Image)]) -> Result<Vec<Map>> {
        let Some((first, _)) = pairs.first() else {
            return Ok(vec![]);
        };
        let (h, w) = (first.h, first.w);
        if pairs
            .iter()
            .any(|(a, c)| (a.h, a.w, c.h, c.w) != (h, w, h, w))
        {
            return Err(PrepError::Usage(
                "all images of a flow batch must share one size".into(),
            ));
        }
        let (mh, mw) = self.model_size(h, w);
        let shape = [pairs.len() as i64, 3, mh as i64, mw as i64];
        if self.bound.is_some() {
            self.run_bound(pairs, shape, (h, w))
        } else {
            self.run_plain(pairs, shape, (h, w))
        }
    }

    fn run_plain(
        &mut self,
        pairs: &[(&Image, &Image)],
        shape: [i64; 4],
        hw: (usize, usize),
    ) -> Result<Vec<Map>> {
        let len = (shape[0] * 3 * shape[2] * shape[3]) as usize;
        let (mut in1, mut in2) = (vec![0f32; len], vec![0f32; len]);
        fill_inputs(
            &self.card,
            pairs,
            (shape[2] as usize, shape[3] as usize),
            &mut in1,
            &mut in2,
        );
        let t1 = TensorRef::from_array_view((shape, in1.as_slice()))?;
        let t2 = TensorRef::from_array_view((shape, in2.as_slice()))?;
        let (n1, n2) = (self.card.inputs[0].clone(), self.card.inputs[1].clone());
        let (no, path) = (self.card.output.clone(), self.card_path.clone());
        let outputs = match self
            .session
            .run(ort::inputs![n1.as_str() => t1, n2.as_str() => t2])
        {
            Ok(o) => o,
            Err(e) => return Err(infer_err(&path, shape, e)),
        };
        let (oshape, data) = outputs[no.as_str()].try_extract_tensor::<f32>()?;
        split_output(&self.card_path, &no, oshape, data, shape[0] as usize, hw)
    }

    fn run_bound(
        &mut self,
        pairs: &[(&Image, &Image)],
        shape: [i64; 4],
        hw: (usize, usize),
    ) -> Result<Vec<Map>> {
        let mut bound = self.bound.take().expect("bound path");
        let r = self.run_with(&mut bound, pairs, shape, hw);
        self.bound = Some(bound);
        r
    }

    /// One batch through `bound`: fill its input tensors, bind them, run, copy out.
    fn run_with(
        &mut self,
        bound: &mut Bound,
        pairs: &[(&Image, &Image)],
        shape: [i64; 4],
        hw: (usize, usize),
    ) -> Result<Vec<Map>> {
        let (t1, t2) = bound.inputs(shape, &self.card.output)?;
        let (mh, mw) = (shape[2] as usize, shape[3] as usize);
        fill_inputs(
            &self.card,
            pairs,
            (mh, mw),
            t1.extract_tensor_mut().1,
            t2.extract_tensor_mut().1,
        );
        bound.bind(&self.card.inputs)?;
        let (no, path) = (self.card.output.clone(), self.card_path.clone());
        let outputs = match self.session.run_binding(&bound.binding) {
            Ok(o) => o,
            Err(e) => return Err(infer_err(&path, shape, e)),
        };
        let (oshape, data) = outputs[no.as_str()].try_extract_tensor::<f32>()?;
        split_output(&self.card_path, &no, oshape, data, shape[0] as usize, hw)
    }
}

/// Writes `img` in the model's input form (resized, value range, channel order) into
/// `out` (3 x mh x mw).
fn to_input(card: &ModelCard, img: &Image, mh: usize, mw: usize, out: &mut [f32]) {
    let resized;
    let src = if (img.h, img.w) == (mh, mw) {
        img
    } else {
        resized = resize_bilinear(img, mh, mw);
        &resized
    };
    let [lo, hi] = card.value_range;
    let scale = (hi - lo) / 255.0;
    let n = mh * mw;
    let order: [usize; 3] = if card.channel_order == "BGR" {
        [2, 1, 0]
    } else {
        [0, 1, 2]
    };
    for (k, &c) in order.iter().enumerate() {
        for (o, &v) in out[k * n..(k + 1) * n]
            .iter_mut()
            .zip(&src.data[c * n..(c + 1) * n])
        {
            *o = v * scale + lo;
        }
    }
}

/// Fills both input batches (first and second images of each pair), one image per task.
fn fill_inputs(
    card: &ModelCard,
    pairs: &[(&Image, &Image)],
    (mh, mw): (usize, usize),
    in1: &mut [f32],
    in2: &mut [f32],
) {
    let len = 3 * mh * mw;
    in1.par_chunks_mut(len)
        .zip(in2.par_chunks_mut(len))
        .zip(pairs.par_iter())
        .for_each(|((a, b), (x, y))| {
            to_input(card, x, mh, mw, a);
            to_input(card, y, mh, mw, b);
        });
}

/// An inference failure, naming the model and the batch shape.
fn infer_err(card_path: &Path, shape: [i64; 4], e: impl std::fmt::Display) -> PrepError {
    PrepError::Model {
        path: card_path.to_path_buf(),
        reason: format!(
            "inference failed on a {}x{}x{}x{} batch: {e}",
            shape[0], shape[1], shape[2], shape[3]
        ),
    }
}

/// The model's (N, 2, H', W') output as N flows at (h, w), vectors rescaled when resized.
fn split_output(
    card_path: &Path,
    name: &str,
    oshape: &ort::value::Shape,
    data: &[f32],
    b: usize,
    (h, w): (usize, usize),
) -> Result<Vec<Map>> {
    let dims: Vec<i64> = oshape.iter().copied().collect();
    if dims.len() != 4 || dims[0] != b as i64 || dims[1] != 2 {
        return Err(PrepError::Model {
            path: card_path.to_path_buf(),
            reason: format!("output {name:?} has shape {dims:?}, expected [{b}, 2, H, W]"),
        });
    }
    let (oh, ow) = (dims[2] as usize, dims[3] as usize);
    let per = 2 * oh * ow;
    Ok(data
        .par_chunks(per)
        .map(|c| {
            let m = Map {
                c: 2,
                h: oh,
                w: ow,
                data: c.to_vec(),
            };
            if (oh, ow) == (h, w) {
                m
            } else {
                resize_flow(&m, h, w)
            }
        })
        .collect())
}

/// The I/O binding of a session and its input tensors, reused while the batch shape stays.
struct Bound {
    binding: IoBinding,
    allocator: Allocator,
    inputs: Option<([i64; 4], Tensor<f32>, Tensor<f32>)>,
}

impl Bound {
    fn new(session: &Session, device: Device) -> Result<Self> {
        let allocator = match device {
            Device::Cpu => Allocator::default(),
            // Pinned host memory: the upload to the GPU is a single DMA transfer.
            Device::Cuda(id) => Allocator::new(
                session,
                MemoryInfo::new(
                    AllocationDevice::CUDA_PINNED,
                    id,
                    AllocatorType::Device,
                    MemoryType::CPUInput,
                )?,
            )?,
        };
        let binding = session.create_binding()?;
        Ok(Bound {
            binding,
            allocator,
            inputs: None,
        })
    }

    /// The input tensors for a batch of `shape`, allocated when the shape changes; the output
    /// is bound anew then too (ORT keeps the first output it allocated, of the old shape).
    fn inputs(
        &mut self,
        shape: [i64; 4],
        output: &str,
    ) -> Result<(&mut Tensor<f32>, &mut Tensor<f32>)> {
        if self.inputs.as_ref().is_none_or(|(s, _, _)| *s != shape) {
            self.binding.clear_outputs();
            // Output into host memory: one copy back per batch, whatever the device.
            let host = MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )?;
            self.binding.bind_output_to_device(output, &host)?;
            let (a, b) = (
                Tensor::new(&self.allocator, shape)?,
                Tensor::new(&self.allocator, shape)?,
            );
            self.inputs = Some((shape, a, b));
        }
        let (_, a, b) = self.inputs.as_mut().expect("allocated");
        Ok((a, b))
    }

    /// Binds the filled input tensors (for a device session, this is where they are copied).
    fn bind(&mut self, names: &[String; 2]) -> Result<()> {
        let (_, a, b) = self.inputs.as_ref().expect("filled");
        self.binding.bind_input(names[0].as_str(), a)?;
        self.binding.bind_input(names[1].as_str(), b)?;
        Ok(())
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
