//! The backbone in and out of poodle-train: [`export_torchvision`] writes a checkpoint's
//! ResNet as a torchvision `state_dict` (safetensors) for downstream evaluation, and
//! [`load_init`] starts a run from pretrained backbone weights (a torchvision `.pth`, such an
//! export, or a poodle-train checkpoint), e.g. ImageNet-supervised for the paper's BDD* rows,
//! or from the authors' own PooDLe checkpoint (whole encoder and predictors; see below).
//!
//! # What is exported
//! The **online** backbone by default ([`Which::Online`]). The PooDLe and FlowE papers, like
//! BYOL, evaluate the online encoder, not the EMA target; [`Which::Target`] exports the target
//! instead. Only the ResNet is exported: the spatial decoder, projectors and predictors have no
//! counterpart in torchvision. Names are torchvision's (`layer1.0.conv1.weight`), every
//! BatchNorm gets the `num_batches_tracked` buffer torchvision keeps (int64, shape `[]`,
//! value 0; it is only read with `momentum=None`), and there is no `fc`, so torchvision loads
//! the file with `strict=True` once its classifier is removed:
//!
//! ```python
//! import torch, torchvision; from safetensors.torch import load_file
//! m = torchvision.models.resnet50(); m.fc = torch.nn.Identity()
//! m.load_state_dict(load_file("backbone.safetensors"), strict=True)
//! ```
//!
//! A backbone trained with `model.dilated` (FlowE) has the same tensors; build it with
//! `torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])`
//! ([`ExportReport::torchvision`] spells the constructor out). Inputs are RGB in [0, 1]
//! normalised with ImageNet's mean and std, as torchvision expects. `tools/to_pth.py` turns an
//! export into a `.pth` (torchvision / mmsegmentation) or a detectron2 `.pkl`.
//!
//! # What `load_init` accepts
//! * safetensors with torchvision names, or with the names under a prefix (`backbone.`,
//!   `online.backbone.` of a poodle-train checkpoint file, `module.`, ...): the prefix is found
//!   by matching the model's backbone names; a tie between two prefixes is an error, except
//!   that a checkpoint's `online.` wins over its `target.`;
//! * a PyTorch zip `.pth` (`torch.save` since PyTorch 1.6) holding a `state_dict`, either at
//!   the top level or under `"state_dict"`, `"model"` or `"module"`; the legacy non-zip format
//!   is refused with a hint. Tensors must be contiguous (as `state_dict()` returns them).
//!
//! `fc.*` and `*.num_batches_tracked` are ignored; every backbone variable of the map
//! (parameters and BN running statistics) must be present with its exact shape, and no other
//! key may sit under the prefix (a ResNet-34 file does not silently fill a ResNet-18). On any
//! error the map is left unchanged.
//!
//! # The authors' checkpoints
//! The PooDLe and FlowE checkpoints the authors publish (github.com/agentic-learning-ai-lab/
//! poodle) are zip `.pth` files written by their `save_model` (`src/utils/misc.py`):
//! `{'model': state_dict, 'optimizer': ..., 'epoch': ..., 'args': ..., 'scaler': ...}`. Only
//! `'model'` is read. [`load_init_with`] (and `load_init`, which takes the online network)
//! recognises two layouts of that state_dict:
//!
//! * **PooDLe** (their `Poodle` module; found by `decoder_blocks.*` or `teacher_backbone.*`
//!   beside `backbone.*`). The whole encoder is mapped by name, and the predictors too where
//!   the map has them. With `t` empty for the online network ([`Which::Online`], default) or
//!   `teacher_` for the EMA teacher ([`Which::Target`]):
//!
//!   | authors' key | poodle name |
//!   | --- | --- |
//!   | `{t}backbone.X` (torchvision ResNet names, no `fc`) | `backbone.X` |
//!   | `{t}decoder_blocks.{i}.X` (torchvision Bottleneck) | `decoder.blocks.{i}.bottleneck.X` |
//!   | `{t}decoder_laterals.{i}.{weight,bias}` | `decoder.blocks.{i}.lateral.*` |
//!   | `{t}dense_projector.{0,1,3}.*` (1x1 conv, BN2d, 1x1 conv) | `dense_projector.net.*` |
//!   | `{t}pooled_projector.{0,1,3}.*` (1x1 convs on `(N, C, 1, 1)`) | `pooled_projector.net.*` |
//!   | `dense_predictor.*`, `pooled_predictor.*` (online only) | `*_predictor.net.*` |
//!
//!   The pooled heads' 1x1 conv weights `(out, in, 1, 1)` become poodle's linear `(out, in)`
//!   (the same function: BatchNorm2d on `(N, C, 1, 1)` is BatchNorm1d on `(N, C)`). Ignored:
//!   `flow_model.*` (RAFT), the other network's keys, `num_batches_tracked`, and the
//!   predictors when the map has none (an `Encoder` for evaluation). The teacher has no
//!   predictors of its own: with [`Which::Target`] a map's predictors keep their values.
//!   Every other variable of the map must come from the file with its shape (or the 1x1
//!   reshape), and every key of the chosen network must find its variable (a checkpoint
//!   with a decoder does not load into a model without one); the error names the first key
//!   that does not fit, with both shapes for a mismatch. Their decoder runs in the authors'
//!   order, poodle's default `model.decoder.order`.
//! * **FlowE** (their `Flowe` module; `encoder.*` beside `target_encoder.*`): the backbone
//!   alone (timm's ResNet has torchvision's names), under `encoder.` or `target_encoder.`,
//!   with the rules of the plain backbone load above. Their projector's first conv has no
//!   bias and its BatchNorm follows, so it is not mapped.

use crate::checkpoint::Progress;
use crate::model::{named_vars, BlockKind, ResNetConfig};
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Which encoder of a checkpoint to export.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    /// The online backbone (what PooDLe, FlowE and BYOL evaluate).
    #[default]
    Online,
    /// The EMA target backbone.
    Target,
}

impl Which {
    /// The checkpoint's key prefix: `online` or `target`.
    pub fn prefix(self) -> &'static str {
        match self {
            Which::Online => "online",
            Which::Target => "target",
        }
    }
}

/// What [`export_torchvision`] wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ExportReport {
    /// The checkpoint file read.
    pub checkpoint: PathBuf,
    /// Its optimiser step, where `latest.json` or the file name says.
    pub step: Option<u64>,
    pub which: Which,
    pub out: PathBuf,
    /// Tensors written, `num_batches_tracked` included.
    pub tensors: usize,
    /// Of which `num_batches_tracked` (one per BatchNorm).
    pub num_batches_tracked: usize,
    /// Float elements written (parameters and BN running statistics).
    pub elements: usize,
    /// `resnet18`, `resnet34`, `resnet50`, `resnet101`, `resnet152` or `custom {...}`
    /// (inferred from the tensors).
    pub backbone: String,
    /// `model.dilated` of the run's config, where the run folder has it.
    pub dilated: Option<bool>,
    /// The torchvision constructor of this backbone, e.g. `torchvision.models.resnet50()`;
    /// `None` for a custom backbone or a dilated BasicBlock network (torchvision has neither).
    pub torchvision: Option<String>,
}

/// What [`load_init`] set.
#[derive(Clone, Debug, Serialize)]
pub struct InitReport {
    pub path: PathBuf,
    /// `safetensors` or `pth`.
    pub format: &'static str,
    /// The `.pth` key the state_dict sat under (`state_dict`, `model`, `module`), if any.
    pub nested_key: Option<String>,
    /// The prefix stripped from the file's names (empty for torchvision names; for the
    /// authors' PooDLe layout empty or `teacher_`).
    pub prefix: String,
    /// Backbone variables set: every parameter and BN running statistic of the backbone.
    pub set: usize,
    /// Float elements set.
    pub elements: usize,
    /// File keys not used: `fc.*`, `num_batches_tracked`, and keys outside the prefix.
    pub ignored: usize,
    /// `backbone` (a ResNet state_dict or a poodle-train checkpoint's backbone), `poodle`
    /// (the authors' PooDLe checkpoint: backbone, decoder, projectors, predictors) or `flowe`
    /// (the authors' FlowE checkpoint: backbone).
    pub layout: &'static str,
    /// The network read: `online` or `target` (the authors' `teacher_`).
    pub which: Which,
}

/// Where a checkpoint path leads: the tensors file, and the run's `latest.json` if found.
fn resolve_checkpoint(path: &Path) -> Result<(PathBuf, Option<Progress>)> {
    let read = |latest: &Path| -> Result<Progress> {
        poodle_common::atomic::read_json(latest).with_context(|| format!("{}", latest.display()))
    };
    if path.is_dir() {
        let latest = path.join("latest.json");
        if !latest.exists() {
            bail!(
                "{}: no latest.json (not a poodle-train run folder, or no checkpoint yet); \
                 pass a checkpoint-*.safetensors file instead",
                path.display()
            );
        }
        let p = read(&latest)?;
        return Ok((path.join(&p.file), Some(p)));
    }
    if !path.is_file() {
        bail!("{}: no such checkpoint file or run folder", path.display());
    }
    // A file inside a run folder: the folder's latest.json still names the run's config.
    let latest = path.parent().map(|d| d.join("latest.json"));
    let progress = latest.filter(|l| l.is_file()).and_then(|l| read(&l).ok());
    Ok((path.to_path_buf(), progress))
}

fn step_of(file: &Path, progress: Option<&Progress>) -> Option<u64> {
    let name = file.file_name()?.to_str()?;
    if let Some(p) = progress.filter(|p| p.file == name) {
        return Some(p.step);
    }
    name.strip_prefix("checkpoint-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// `model.dilated` from the run's config (latest.json's `config_json`, else config.json).
fn dilated_of(file: &Path, progress: Option<&Progress>) -> Option<bool> {
    let from_value = |v: &serde_json::Value| v.get("model")?.get("dilated")?.as_bool();
    if let Some(p) = progress {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&p.config_json) {
            if let Some(d) = from_value(&v) {
                return Some(d);
            }
        }
    }
    let cfg = file.parent()?.join("config.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(cfg).ok()?).ok()?;
    from_value(v.get("config")?)
}

/// The ResNet a set of torchvision-named tensors describes.
fn infer_resnet(shapes: &BTreeMap<String, Vec<usize>>) -> Result<ResNetConfig> {
    let out_ch = |k: &str| -> Result<usize> {
        shapes
            .get(k)
            .and_then(|s| s.first().copied())
            .with_context(|| format!("the backbone has no {k}"))
    };
    let block = if shapes.contains_key("layer1.0.conv3.weight") {
        BlockKind::Bottleneck
    } else {
        BlockKind::Basic
    };
    let mut layers = [0; 4];
    let mut widths = [0; 4];
    for i in 0..4 {
        let p = format!("layer{}.", i + 1);
        layers[i] = shapes
            .keys()
            .filter_map(|k| k.strip_prefix(&p))
            .filter_map(|r| r.strip_suffix(".conv1.weight"))
            .filter(|b| b.parse::<usize>().is_ok())
            .count();
        widths[i] = out_ch(&format!("{p}0.conv1.weight"))?;
    }
    Ok(ResNetConfig {
        block,
        layers,
        stem_width: out_ch("conv1.weight")?,
        widths,
        dilated: false,
    })
}

/// torchvision's name for a ResNet configuration, if it is one of its five.
fn torchvision_name(r: &ResNetConfig) -> Option<&'static str> {
    if r.stem_width != 64 || r.widths != [64, 128, 256, 512] {
        return None;
    }
    Some(match (r.block, r.layers) {
        (BlockKind::Basic, [2, 2, 2, 2]) => "resnet18",
        (BlockKind::Basic, [3, 4, 6, 3]) => "resnet34",
        (BlockKind::Bottleneck, [3, 4, 6, 3]) => "resnet50",
        (BlockKind::Bottleneck, [3, 4, 23, 3]) => "resnet101",
        (BlockKind::Bottleneck, [3, 8, 36, 3]) => "resnet152",
        _ => return None,
    })
}

/// Writes `tensors` as safetensors through a temporary file in the same folder, renamed into
/// place: a crash never leaves a partial file under `out`.
fn save_atomic(tensors: &HashMap<String, Tensor>, out: &Path) -> Result<()> {
    if out.is_dir() {
        bail!(
            "{}: is a folder; name the output .safetensors file",
            out.display()
        );
    }
    poodle_common::atomic::write_with(out, |tmp| -> Result<()> {
        candle_core::safetensors::save(tensors, tmp)?;
        // An export is meant to be shared: rw-r--r-- (the writer creates it rw-------).
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(tmp, std::fs::Permissions::from_mode(0o644))?;
        }
        Ok(())
    })
    .with_context(|| format!("writing {}", out.display()))
}

/// Exports the `which` backbone of a checkpoint (a run folder with `latest.json`, or a
/// `checkpoint-*.safetensors` file) as a torchvision ResNet `state_dict` in safetensors at
/// `out` (written atomically). See the module documentation for the format.
pub fn export_torchvision(
    checkpoint_dir_or_file: &Path,
    which: Which,
    out: &Path,
) -> Result<ExportReport> {
    let (file, progress) = resolve_checkpoint(checkpoint_dir_or_file)?;
    // SAFETY: the map is read-only and lives until the tensors are copied out below;
    // poodle-train writes checkpoints to a temporary name and renames them, so a file's bytes
    // never change under a reader (a rotated-out file stays mapped until it is dropped).
    let st = unsafe { candle_core::safetensors::MmapedSafetensors::new(&file) }
        .with_context(|| format!("checkpoint {}", file.display()))?;
    let prefix = format!("{}.backbone.", which.prefix());
    let mut tensors = HashMap::new();
    let mut shapes = BTreeMap::new();
    let mut elements = 0;
    for (key, _) in st.tensors() {
        let Some(name) = key.strip_prefix(&prefix) else {
            continue;
        };
        if name.starts_with("fc.") || name.ends_with("num_batches_tracked") {
            continue; // not written by poodle-train; never exported from a checkpoint
        }
        let t = st
            .load(&key, &Device::Cpu)
            .with_context(|| format!("checkpoint {}: {key}", file.display()))?;
        elements += t.elem_count();
        shapes.insert(name.to_string(), t.dims().to_vec());
        tensors.insert(name.to_string(), t);
    }
    if tensors.is_empty() {
        bail!(
            "checkpoint {}: no {prefix}* tensors (is it a poodle-train checkpoint?)",
            file.display()
        );
    }
    let bns: Vec<String> = shapes
        .keys()
        .filter_map(|k| k.strip_suffix(".running_var"))
        .map(str::to_string)
        .collect();
    for bn in &bns {
        let zero = Tensor::new(0i64, &Device::Cpu)?;
        tensors.insert(format!("{bn}.num_batches_tracked"), zero);
    }
    let resnet = infer_resnet(&shapes)
        .with_context(|| format!("checkpoint {}: {prefix}*", file.display()))?;
    let name = torchvision_name(&resnet);
    let dilated = dilated_of(&file, progress.as_ref());
    let torchvision = match (name, dilated.unwrap_or(false), resnet.block) {
        (None, _, _) => None,
        (Some(n), false, _) => Some(format!("torchvision.models.{n}()")),
        (Some(_), true, BlockKind::Basic) => None,
        (Some(n), true, BlockKind::Bottleneck) => Some(format!(
            "torchvision.models.{n}(replace_stride_with_dilation=[False, True, True])"
        )),
    };
    save_atomic(&tensors, out)?;
    Ok(ExportReport {
        step: step_of(&file, progress.as_ref()),
        checkpoint: file,
        which,
        out: out.to_path_buf(),
        tensors: tensors.len(),
        num_batches_tracked: bns.len(),
        elements,
        backbone: match name {
            Some(n) => n.to_string(),
            None => format!("custom {}", serde_json::to_string(&resnet)?),
        },
        dilated,
        torchvision,
    })
}

/// True for a zip `.pth` (`torch.save` since PyTorch 1.6), by its magic bytes.
pub fn is_pth(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"PK\x03\x04"
}

/// A weights file opened for reading: names and shapes first, tensors on demand.
enum WeightFile {
    Safetensors(candle_core::safetensors::MmapedSafetensors),
    Pth(candle_core::pickle::PthTensors),
}

impl WeightFile {
    /// Opens a zip `.pth` (by its magic bytes) or a safetensors file; returns the file, its
    /// format name, and for a `.pth` the key its state_dict was nested under.
    fn open(path: &Path) -> Result<(Self, &'static str, Option<String>)> {
        use std::io::Read;
        let mut magic = [0u8; 4];
        let n = std::fs::File::open(path)
            .with_context(|| format!("{}", path.display()))?
            .read(&mut magic)?;
        if n == 4 && &magic == b"PK\x03\x04" {
            // torch.save's zip format; the state_dict at the top or under a common key.
            for key in [None, Some("state_dict"), Some("model"), Some("module")] {
                let Ok(pth) = candle_core::pickle::PthTensors::new(path, key) else {
                    continue;
                };
                if !pth.tensor_infos().is_empty() {
                    return Ok((WeightFile::Pth(pth), "pth", key.map(str::to_string)));
                }
            }
            bail!(
                "{}: a PyTorch file without tensors at the top level or under \"state_dict\", \
                 \"model\" or \"module\"; save the state_dict itself \
                 (torch.save(model.state_dict(), path))",
                path.display()
            );
        }
        // SAFETY: read-only map, dropped when loading is done; a file rewritten in place
        // during these few milliseconds is outside what this function promises.
        let st = match unsafe { candle_core::safetensors::MmapedSafetensors::new(path) } {
            Ok(st) => st,
            Err(e) => {
                let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
                // Legacy torch.save files are a bare pickle (protocol 2: 0x80 0x02).
                if (n >= 2 && magic[..2] == [0x80, 0x02])
                    || matches!(ext, "pth" | "pt" | "tar" | "bin" | "ckpt")
                {
                    bail!(
                        "{}: neither a zip .pth nor safetensors; a PyTorch file in the legacy \
                         (pre-1.6, non-zip) format can be re-saved with \
                         torch.save(torch.load(p, map_location=\"cpu\"), p2)",
                        path.display()
                    );
                }
                return Err(anyhow::Error::from(e).context(format!(
                    "{}: neither a safetensors file nor a zip .pth",
                    path.display()
                )));
            }
        };
        Ok((WeightFile::Safetensors(st), "safetensors", None))
    }

    fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        match self {
            WeightFile::Safetensors(st) => st
                .tensors()
                .into_iter()
                .map(|(k, v)| (k, v.shape().to_vec()))
                .collect(),
            WeightFile::Pth(p) => p
                .tensor_infos()
                .iter()
                .map(|(k, i)| (k.clone(), i.layout.dims().to_vec()))
                .collect(),
        }
    }

    fn load(&self, key: &str) -> Result<Tensor> {
        Ok(match self {
            WeightFile::Safetensors(st) => st.load(key, &Device::Cpu)?,
            WeightFile::Pth(p) => p.get(key)?.with_context(|| format!("{key}: no tensor"))?,
        })
    }
}

/// The prefixes preferred on a tie, in order (a checkpoint's online network over its target).
const PREFERRED_PREFIXES: [&str; 5] = [
    "",
    "backbone.",
    "online.backbone.",
    "module.",
    "module.backbone.",
];

/// The prefix under which the file has the most of `names` (ties: see
/// [`PREFERRED_PREFIXES`], else an error).
fn find_prefix(file_keys: &BTreeSet<&str>, names: &[String], path: &Path) -> Result<String> {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for key in file_keys {
        for n in names {
            if let Some(p) = key.strip_suffix(n.as_str()) {
                if p.is_empty() || p.ends_with('.') {
                    *counts.entry(p).or_default() += 1;
                }
            }
        }
    }
    let Some(best) = counts.values().copied().max() else {
        let some: Vec<&str> = file_keys.iter().take(8).copied().collect();
        bail!(
            "{}: no ResNet backbone key matched (the model expects e.g. {}; the file has {} \
             keys, e.g. {some:?})",
            path.display(),
            names.first().map_or("conv1.weight", |s| s.as_str()),
            file_keys.len()
        );
    };
    let tied: Vec<&str> = counts
        .iter()
        .filter(|(_, c)| **c == best)
        .map(|(p, _)| *p)
        .collect();
    if tied.len() == 1 {
        return Ok(tied[0].to_string());
    }
    for p in PREFERRED_PREFIXES {
        if tied.contains(&p) {
            return Ok(p.to_string());
        }
    }
    bail!(
        "{}: backbone weights under several prefixes {tied:?}; extract one backbone first",
        path.display()
    )
}

/// "the file holds a resnet50, the model is a resnet18", as far as the shapes tell.
fn architectures(
    shapes: &BTreeMap<String, Vec<usize>>,
    prefix: &str,
    vars: &[(String, candle_core::Var)],
) -> String {
    let name = |s: &BTreeMap<String, Vec<usize>>| match infer_resnet(s) {
        Ok(r) => torchvision_name(&r)
            .map(str::to_string)
            .unwrap_or_else(|| format!("custom {}", serde_json::to_string(&r).unwrap_or_default())),
        Err(_) => "an unknown network".into(),
    };
    let file: BTreeMap<String, Vec<usize>> = shapes
        .iter()
        .filter_map(|(k, s)| Some((k.strip_prefix(prefix)?.to_string(), s.clone())))
        .collect();
    let model: BTreeMap<String, Vec<usize>> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.dims().to_vec()))
        .collect();
    format!(
        "the file holds {}, the model is {}; check model.backbone",
        name(&file),
        name(&model)
    )
}

fn list(v: &[String]) -> String {
    const SHOW: usize = 8;
    let mut s = v.iter().take(SHOW).cloned().collect::<Vec<_>>().join(", ");
    if v.len() > SHOW {
        s.push_str(&format!(", ... ({} more)", v.len() - SHOW));
    }
    s
}

/// [`load_init_with`] for the online network: what `--init` does.
pub fn load_init(map: &VarMap, path: &Path) -> Result<InitReport> {
    load_init_with(map, path, Which::Online)
}

/// Sets the variables of `map` from a weights file: safetensors or a zip `.pth` (see the
/// module documentation). The authors' PooDLe checkpoint fills the whole encoder (and the
/// predictors); every other file fills every backbone variable (`backbone.*`: parameters
/// and BN running statistics). `which` picks the online network or the EMA target / teacher
/// of a file that holds both (a plain ResNet file has only one: `Target` is an error).
/// Errors, leaving the map unchanged, when no backbone key matches, a shape differs (naming
/// the key and both shapes), a variable is missing from the file, or the file has other
/// keys under its backbone prefix (apart from `fc.*` and `num_batches_tracked`).
pub fn load_init_with(map: &VarMap, path: &Path, which: Which) -> Result<InitReport> {
    let (file, format, nested_key) = WeightFile::open(path)?;
    let shapes = file.shapes();
    let has = |k: &str| shapes.contains_key(k);
    let any = |p: &str| shapes.keys().any(|k| k.starts_with(p));
    if has("backbone.conv1.weight") && (any("decoder_blocks.") || any("teacher_backbone.")) {
        return load_authors_poodle(map, path, &file, &shapes, format, nested_key, which);
    }
    let forced = if has("encoder.conv1.weight") && has("target_encoder.conv1.weight") {
        Some(match which {
            Which::Online => "encoder.",
            Which::Target => "target_encoder.",
        })
    } else {
        None
    };
    let layout = if forced.is_some() {
        "flowe"
    } else {
        "backbone"
    };
    let vars: Vec<(String, candle_core::Var)> = named_vars(map)
        .into_iter()
        .filter_map(|(n, v)| n.strip_prefix("backbone.").map(|r| (r.to_string(), v)))
        .collect();
    if vars.is_empty() {
        bail!("load_init: the model map has no backbone.* variables");
    }
    let keys: BTreeSet<&str> = shapes.keys().map(String::as_str).collect();
    let prefix = match forced {
        Some(p) => p.to_string(),
        None => backbone_prefix(&keys, &vars, which, path)?,
    };
    let at = |what: String| format!("{}: {what}", path.display());
    let ignored = check_backbone_keys(&shapes, &vars, &prefix).map_err(|e| anyhow!(at(e)))?;
    let plan: Vec<(String, candle_core::Var)> = (vars.iter())
        .map(|(name, var)| (format!("{prefix}{name}"), var.clone()))
        .collect();
    let elements = set_all(&file, &plan, &at)?;
    Ok(InitReport {
        path: path.to_path_buf(),
        format,
        nested_key,
        prefix,
        set: vars.len(),
        elements,
        ignored,
        layout,
        which,
    })
}

/// Where a backbone's keys start in a file of one network or of a poodle-train checkpoint:
/// found from the keys for the online network; `target.backbone.` for the target.
fn backbone_prefix(
    keys: &BTreeSet<&str>,
    vars: &[(String, candle_core::Var)],
    which: Which,
    path: &Path,
) -> Result<String> {
    match which {
        Which::Online => {
            let names: Vec<String> = vars.iter().map(|(n, _)| n.clone()).collect();
            find_prefix(keys, &names, path)
        }
        Which::Target => {
            let p = "target.backbone.";
            if !keys.iter().any(|k| k.starts_with(p)) {
                bail!(
                    "{}: no {p}* (target / teacher) weights in this file; only a \
                     poodle-train checkpoint or the authors' PooDLe / FlowE checkpoints \
                     hold a second network",
                    path.display()
                );
            }
            Ok(p.to_string())
        }
    }
}

/// Checks that the file's keys under `prefix` are exactly the backbone's `vars` with their
/// shapes, but for a classifier (`fc.`) and BatchNorm's batch counters; returns how many keys
/// were ignored (those and every key outside `prefix`), or what does not match.
fn check_backbone_keys(
    shapes: &BTreeMap<String, Vec<usize>>,
    vars: &[(String, candle_core::Var)],
    prefix: &str,
) -> std::result::Result<usize, String> {
    let mut mismatched = Vec::new();
    let mut missing = Vec::new();
    for (name, var) in vars {
        let key = format!("{prefix}{name}");
        match shapes.get(&key) {
            None => missing.push(key),
            Some(s) if s.as_slice() != var.dims() => mismatched.push(format!(
                "{key}: file {s:?}, model backbone.{name} {:?}",
                var.dims()
            )),
            Some(_) => {}
        }
    }
    let wanted: BTreeSet<String> = vars.iter().map(|(n, _)| format!("{prefix}{n}")).collect();
    let mut ignored = 0;
    let mut unexpected = Vec::new();
    for key in shapes.keys() {
        let rel = match key.strip_prefix(prefix) {
            Some(rel) if !wanted.contains(key) => rel,
            Some(_) => continue,
            None => {
                ignored += 1;
                continue;
            }
        };
        if rel.starts_with("fc.")
            || rel == "num_batches_tracked"
            || rel.ends_with(".num_batches_tracked")
        {
            ignored += 1;
        } else {
            unexpected.push(key.to_string());
        }
    }
    if !mismatched.is_empty() {
        return Err(format!(
            "{} shape mismatch(es) with the model's backbone ({}): {}",
            mismatched.len(),
            architectures(shapes, prefix, vars),
            list(&mismatched)
        ));
    }
    if !missing.is_empty() {
        return Err(format!(
            "{} of the model's {} backbone tensors missing from the file (prefix {prefix:?}): {}",
            missing.len(),
            vars.len(),
            list(&missing)
        ));
    }
    if !unexpected.is_empty() {
        return Err(format!(
            "{} key(s) under prefix {prefix:?} that the model's backbone does not have \
             (a deeper ResNet?): {}",
            unexpected.len(),
            list(&unexpected)
        ));
    }
    Ok(ignored)
}

/// Reads every `(key, var)` of `plan` from `file`, converted to the variable's shape, dtype
/// and device, and only then sets them all, so that the map changes only once every tensor
/// is good; `at` names the file in errors. Returns the number of elements set.
fn set_all(
    file: &WeightFile,
    plan: &[(String, candle_core::Var)],
    at: &dyn Fn(String) -> String,
) -> Result<usize> {
    let mut values = Vec::with_capacity(plan.len());
    for (key, var) in plan {
        let value = file.load(key).with_context(|| at(key.clone()))?;
        if !matches!(
            value.dtype(),
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        ) {
            bail!(at(format!(
                "{key}: dtype {:?} is not a float type",
                value.dtype()
            )));
        }
        let value = value.reshape(var.shape())?;
        values.push(value.to_dtype(var.dtype())?.to_device(var.device())?);
    }
    let mut elements = 0;
    for ((key, var), t) in plan.iter().zip(values) {
        elements += t.elem_count();
        var.set(&t).with_context(|| at(key.clone()))?;
    }
    Ok(elements)
}

/// The authors' key of a poodle variable in their PooDLe state_dict (`t`: `""` or
/// `"teacher_"`); `None` for the predictors when reading the teacher (it has none).
fn authors_poodle_key(name: &str, t: &str) -> Result<Option<String>> {
    if let Some(r) = name.strip_prefix("backbone.") {
        return Ok(Some(format!("{t}backbone.{r}")));
    }
    if let Some(r) = name.strip_prefix("decoder.") {
        let k = crate::model::decoder::authors_name(r)
            .with_context(|| format!("{name}: no counterpart in the authors' decoder"))?;
        return Ok(Some(format!("{t}{k}")));
    }
    for head in ["dense_projector", "pooled_projector"] {
        if let Some(r) = name.strip_prefix(&format!("{head}.net.")) {
            return Ok(Some(format!("{t}{head}.{r}")));
        }
    }
    for head in ["dense_predictor", "pooled_predictor"] {
        if let Some(r) = name.strip_prefix(&format!("{head}.net.")) {
            return Ok((t.is_empty()).then(|| format!("{head}.{r}")));
        }
    }
    bail!("{name}: no counterpart in the authors' PooDLe checkpoint")
}

/// True for an authors' key that no poodle variable need take: their flow network, BN's
/// step counters, the network not chosen, and the predictors (absent from an `Encoder`).
fn authors_key_optional(key: &str, t: &str) -> bool {
    let other = if t.is_empty() {
        key.starts_with("teacher_")
    } else {
        !key.starts_with(t)
    };
    key.starts_with("flow_model.")
        || key == "num_batches_tracked"
        || key.ends_with(".num_batches_tracked")
        || other
        || key.starts_with("dense_predictor.")
        || key.starts_with("pooled_predictor.")
}

/// [`load_init_with`] for the authors' PooDLe layout (see the module documentation).
#[allow(clippy::too_many_arguments)]
fn load_authors_poodle(
    map: &VarMap,
    path: &Path,
    file: &WeightFile,
    shapes: &BTreeMap<String, Vec<usize>>,
    format: &'static str,
    nested_key: Option<String>,
    which: Which,
) -> Result<InitReport> {
    let t = match which {
        Which::Online => "",
        Which::Target => "teacher_",
    };
    let at = |what: String| {
        format!(
            "{} (the authors' PooDLe checkpoint): {what}",
            path.display()
        )
    };
    let mut plan = Vec::new();
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (name, var) in named_vars(map) {
        let Some(key) = authors_poodle_key(&name, t)? else {
            continue;
        };
        used.insert(key.clone());
        let want = var.dims().to_vec();
        match shapes.get(&key) {
            None => problems.push(format!("{key} missing (for the model's {name} {want:?})")),
            // A pooled head's 1x1 conv (out, in, 1, 1) is poodle's linear (out, in).
            Some(s) if *s == want || (want.len() == 2 && *s == [want[0], want[1], 1, 1]) => {
                plan.push((key, var))
            }
            Some(s) => problems.push(format!("{key}: file {s:?}, model {name} {want:?}")),
        }
    }
    let mut ignored = 0;
    for key in shapes.keys() {
        if used.contains(key) {
            continue;
        }
        if authors_key_optional(key, t) {
            ignored += 1;
        } else {
            problems.push(format!(
                "{key}: the model has no variable for it (a decoder, projector or backbone \
                 the model lacks? check model.backbone and model.decoder)"
            ));
        }
    }
    if let Some(first) = problems.first() {
        let more = match problems.len() {
            1 => String::new(),
            n => format!(" ({} more: {})", n - 1, list(&problems[1..])),
        };
        bail!(at(format!("{first}{more}")));
    }
    let elements = set_all(file, &plan, &at)?;
    Ok(InitReport {
        path: path.to_path_buf(),
        format,
        nested_key,
        prefix: t.to_string(),
        set: plan.len(),
        elements,
        ignored,
        layout: "poodle",
        which,
    })
}
