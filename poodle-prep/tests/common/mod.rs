//! Helpers shared by the integration tests: the repository, the ONNX Runtime library that
//! `make setup` installs, temporary folders and running the binary.
#![allow(dead_code)] // each test file uses a subset

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `../shared/data/<rel>` when `probe` exists inside it; otherwise reports it missing (a
/// failure under CI=true, a skip message locally) and returns `None`.
pub fn shared_data(rel: &str, probe: &str) -> Option<PathBuf> {
    let dir = repo().join("../shared/data").join(rel);
    poodle_common::testenv::require(dir.join(probe), "real test data").map(|_| dir)
}

/// PyPI onnxruntime's library in the project's .venv; panics with the fix when absent (the
/// prep binary cannot run without it).
pub fn ort_lib() -> PathBuf {
    poodle_common::testenv::venv_ort_library(&repo().join(".venv"))
        .expect("no ONNX Runtime library in .venv: run `make setup`")
}

/// A fresh folder under the temp dir, unique per test process and tag.
pub fn tmpdir(prefix: &str, tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("poodle-{prefix}-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The poodle-prep binary, run from the repository with the RAFT test model and the
/// .venv's ONNX Runtime, and without a Slurm environment.
pub fn prep_bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_poodle-prep"));
    c.current_dir(repo())
        .env("ORT_DYLIB_PATH", ort_lib())
        .env("POODLE_FLOW_MODEL", "models/raft_small_random.json")
        .env_remove("SLURM_ARRAY_TASK_ID")
        .env_remove("SLURM_ARRAY_TASK_COUNT");
    c
}

/// Runs a command that must succeed and print a JSON summary on stdout.
pub fn run_json(mut c: Command) -> serde_json::Value {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}
