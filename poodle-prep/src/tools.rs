//! External tools: ffmpeg/ffprobe on the PATH and the ONNX Runtime shared library. Both are
//! checked before any work starts, with an error that says how to get them.

use crate::{PrepError, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Fails with a clear message when ffmpeg or ffprobe cannot be run.
pub fn check_ffmpeg() -> Result<()> {
    for tool in ["ffmpeg", "ffprobe"] {
        let ok = Command::new(tool)
            .arg("-version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !ok {
            return Err(PrepError::MissingTool {
                tool: tool.into(),
                hint: "install it (Debian: apt-get install ffmpeg) and put it on the PATH".into(),
            });
        }
    }
    Ok(())
}

/// Where the ONNX Runtime library is: `--ort-lib`, else `ORT_DYLIB_PATH`, else the project's
/// `.venv` (PyPI's onnxruntime, installed by `make setup`).
pub fn find_ort_library(explicit: Option<&Path>) -> Result<PathBuf> {
    let candidates: Vec<PathBuf> = if let Some(p) = explicit {
        vec![p.to_path_buf()]
    } else if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        vec![PathBuf::from(p)]
    } else {
        venv_ort_candidates(Path::new(".venv"))
    };
    for c in &candidates {
        if c.is_file() {
            return Ok(c.clone());
        }
    }
    Err(PrepError::MissingTool {
        tool: "ONNX Runtime library (libonnxruntime.so)".into(),
        hint: format!(
            "looked at {:?}; run `make setup` (installs PyPI onnxruntime into .venv), or pass --ort-lib / set ORT_DYLIB_PATH",
            candidates
        ),
    })
}

fn venv_ort_candidates(venv: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(libs) = std::fs::read_dir(venv.join("lib")) else {
        return vec![venv.join("lib/python3*/site-packages/onnxruntime/capi/libonnxruntime.so*")];
    };
    for py in libs.filter_map(|e| e.ok()) {
        let capi = py.path().join("site-packages/onnxruntime/capi");
        if let Ok(rd) = std::fs::read_dir(&capi) {
            let mut names: Vec<PathBuf> = rd
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with("libonnxruntime.so"))
                })
                .collect();
            names.sort();
            out.extend(names);
        }
    }
    out
}

/// Loads ONNX Runtime from `path` (once per process) and returns the process's environment,
/// built on first use and shared: ONNX Runtime allows one environment per process, so a second
/// model (or a model loaded after another was dropped) must reuse it.
pub fn ort_environment(path: &Path) -> Result<ort::environment::Environment> {
    static ENV: std::sync::Mutex<Option<ort::environment::Environment>> =
        std::sync::Mutex::new(None);
    static LOADED: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            ort::init_from(path)
                .map(|_| ())
                .map_err(|e| format!("cannot load {}: {e}", path.display()))
        })
        .clone()
        .map_err(PrepError::OrtLibrary)?;
    let mut env = ENV.lock().expect("ort environment");
    if let Some(e) = env.as_ref() {
        return Ok(e.clone());
    }
    let e = ort::init().with_name("poodle-prep").build()?;
    *env = Some(e.clone());
    Ok(e)
}
