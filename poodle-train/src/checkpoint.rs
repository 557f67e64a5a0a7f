//! Atomic safetensors checkpoints of the online network, the EMA target and the optimiser,
//! with a small JSON pointer (`latest.json`) written after the tensors: a crash at any moment
//! leaves the previous checkpoint intact and `latest.json` naming a complete file.

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use poodle_common::atomic::{write_json_atomic, write_with};
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
    /// Ranks of the data-parallel job that wrote it (batch indices depend on it).
    #[serde(default = "one")]
    pub world_size: usize,
}

fn one() -> usize {
    1
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

/// Checkpoints kept after each save (the newest by step; the one `latest.json` names is
/// never deleted).
pub const KEEP_CHECKPOINTS: usize = 2;

/// The step a checkpoint file name encodes (`checkpoint-<step>.safetensors`).
fn checkpoint_step(name: &str) -> Option<u64> {
    name.strip_prefix("checkpoint-")?
        .strip_suffix(".safetensors")?
        .parse()
        .ok()
}

/// Deletes all but the `keep` highest-step checkpoints of `dir`, never `latest` (the file
/// `latest.json` names, which may be older than a stray higher-step file left by another
/// job). Steps are compared as numbers, so names of different widths sort right.
pub fn prune(dir: &Path, keep: usize, latest: &str) -> Result<Vec<PathBuf>> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .with_context(|| format!("listing checkpoints in {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = checkpoint_step(p.file_name()?.to_str()?)?;
            Some((step, p))
        })
        .collect();
    found.sort_by_key(|(step, _)| std::cmp::Reverse(*step));
    let mut removed = Vec::new();
    for (_, p) in found.into_iter().skip(keep) {
        if p.file_name().and_then(|n| n.to_str()) == Some(latest) {
            continue;
        }
        std::fs::remove_file(&p).with_context(|| format!("pruning {}", p.display()))?;
        removed.push(p);
    }
    Ok(removed)
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
    write_with(&path, |tmp| candle_core::safetensors::save(&all, tmp))?;
    progress.file = name;
    write_json_atomic(&dir.join("latest.json"), &progress)?;
    prune(dir, KEEP_CHECKPOINTS, &progress.file)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_highest_steps_and_the_latest_file() {
        let dir = std::env::temp_dir().join(format!("poodle-prune-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        // Unpadded names: a name sort would put step 900 above step 10000.
        for name in [
            "checkpoint-900.safetensors",
            "checkpoint-10000.safetensors",
            "checkpoint-20000.safetensors",
            "checkpoint-00000500.safetensors",
            "checkpoint-7.safetensors",
            "notes.txt",
        ] {
            std::fs::write(dir.join(name), b"x").unwrap();
        }
        prune(&dir, 2, "checkpoint-00000500.safetensors").unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "checkpoint-00000500.safetensors",
                "checkpoint-10000.safetensors",
                "checkpoint-20000.safetensors",
                "notes.txt"
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
