//! Helpers shared by poodle-train's integration tests: the repository, scratch folders, the
//! ONNX Runtime library that `make setup` installs, and the workspace's poodle-prep binary.
#![allow(dead_code)] // each test binary uses its own subset

pub mod synthetic;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh scratch folder, unique per test binary run and tag.
pub fn tmpdir(tag: &str) -> Scratch {
    let d = std::env::temp_dir().join(format!("poodle-train-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    Scratch(d)
}

/// A test's scratch folder: removed when the test passes (runs and checkpoints take up to a
/// GiB each, and `make test` is run often), kept for a look when it fails.
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for Scratch {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test scratch kept: {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `../shared/data/<rel>` if it exists; `None` (skip, with a message; a failure under
/// `CI=true`) otherwise.
pub fn shared_data(rel: &str) -> Option<PathBuf> {
    poodle_common::testenv::require(repo().join("../shared/data").join(rel), "real test data")
}

/// The ONNX Runtime library of the `.venv` that `make setup` creates, whatever its Python
/// version; `None` (skip, with a message) before `make setup`.
pub fn ort_library() -> Option<PathBuf> {
    poodle_common::testenv::venv_ort_library(&repo().join(".venv"))
}

/// The workspace's debug poodle-prep binary, built if needed; `None` (skip) when it cannot be.
pub fn prep_binary() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let bin = target.join("debug/poodle-prep");
    if !bin.exists() {
        let ok = Command::new(env!("CARGO"))
            .args(["build", "-p", "poodle-prep"])
            .current_dir(repo())
            .status()
            .is_ok_and(|s| s.success());
        if !ok || !bin.exists() {
            poodle_common::testenv::missing(&format!(
                "could not build poodle-prep ({})",
                bin.display()
            ));
            return None;
        }
    }
    Some(bin)
}
