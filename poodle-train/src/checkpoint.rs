//! Atomic safetensors checkpoints of the online network, the EMA target and the optimiser,
//! with a small JSON pointer (`latest.json`) written after the tensors: a crash at any moment
//! leaves the previous checkpoint intact and `latest.json` naming a complete file.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Where training stands; saved beside the tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Optimiser steps done.
    pub step: u64,
    /// The next micro-batch to run: epoch and batch index within it.
    pub epoch: u64,
    pub batch: usize,
    pub file: String,
    /// SHA-256-free identity of the config (its JSON), to refuse resuming another run.
    pub config_json: String,
}

fn put(map: &VarMap, prefix: &str, out: &mut HashMap<String, Tensor>) -> Result<()> {
    for (name, var) in crate::model::named_vars(map) {
        out.insert(format!("{prefix}.{name}"), var.as_tensor().copy()?);
    }
    Ok(())
}

fn take(map: &VarMap, prefix: &str, all: &HashMap<String, Tensor>, file: &Path) -> Result<()> {
    for (name, var) in crate::model::named_vars(map) {
        let key = format!("{prefix}.{name}");
        let t = all
            .get(&key)
            .with_context(|| format!("checkpoint {}: missing {key}", file.display()))?;
        var.set(&t.to_device(var.device())?)
            .with_context(|| format!("checkpoint {}: {key}", file.display()))?;
    }
    Ok(())
}

pub fn save(
    dir: &Path,
    online: &VarMap,
    target: &VarMap,
    optim_state: HashMap<String, Tensor>,
    mut progress: Progress,
) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let mut all = optim_state;
    put(online, "online", &mut all)?;
    put(target, "target", &mut all)?;
    let name = format!("checkpoint-{:08}.safetensors", progress.step);
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    candle_core::safetensors::save(&all, &tmp).with_context(|| format!("{}", tmp.display()))?;
    std::fs::File::open(&tmp)?.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    progress.file = name;
    poodle_common::atomic::write_json_atomic(&dir.join("latest.json"), &progress)?;
    // Keep the two newest checkpoints.
    let mut old: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("checkpoint-") && n.ends_with(".safetensors"))
        })
        .collect();
    old.sort();
    for p in old.iter().rev().skip(2) {
        let _ = std::fs::remove_file(p);
    }
    Ok(path)
}

/// Loads `latest.json` and its tensors into the maps; returns the progress and the
/// optimiser's tensors. `None` when the folder has no checkpoint.
pub fn load(
    dir: &Path,
    online: &VarMap,
    target: &VarMap,
    device: &Device,
) -> Result<Option<(Progress, HashMap<String, Tensor>)>> {
    let latest = dir.join("latest.json");
    if !latest.exists() {
        return Ok(None);
    }
    let progress: Progress = poodle_common::atomic::read_json(&latest)?;
    let file = dir.join(&progress.file);
    let all = candle_core::safetensors::load(&file, device)
        .with_context(|| format!("checkpoint {}", file.display()))?;
    take(online, "online", &all, &file)?;
    take(target, "target", &all, &file)?;
    let optim = all
        .into_iter()
        .filter(|(k, _)| k.starts_with("adam."))
        .collect();
    Ok(Some((progress, optim)))
}
