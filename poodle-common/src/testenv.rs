//! How tests treat missing inputs (real data, the ONNX Runtime library, fixtures): locally
//! they skip with a message; under `CI=true` they fail and name what is missing, so that CI
//! never passes by skipping.

use std::path::{Path, PathBuf};

/// True when the environment says this is CI (`CI=true`, as CI services set it).
pub fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Reports a missing test input: panics under CI (see [`is_ci`]), else prints `SKIP: what`.
/// Call it where the test then returns early.
pub fn missing(what: &str) {
    if is_ci() {
        panic!("missing test input under CI=true (tests may not skip): {what}");
    }
    eprintln!("SKIP: {what}");
}

/// `path` when it exists; otherwise reports it as [`missing`] (a failure under CI, naming
/// the path and `hint`, e.g. how to make it) and returns `None` for the test to return.
pub fn require(path: impl AsRef<Path>, hint: &str) -> Option<PathBuf> {
    let path = path.as_ref();
    if path.exists() {
        return Some(path.to_path_buf());
    }
    missing(&format!("{} is absent ({hint})", path.display()));
    None
}

/// The ONNX Runtime version `make setup` installs (the Makefile's `ORT_VERSION`).
pub const ORT_VERSION: &str = "1.31.1";

/// PyPI onnxruntime's library in `venv` (`lib/python3*/site-packages/onnxruntime/capi/`),
/// whatever the Python version; otherwise reported as [`missing`] and `None`.
pub fn venv_ort_library(venv: &Path) -> Option<PathBuf> {
    let rel = format!("site-packages/onnxruntime/capi/libonnxruntime.so.{ORT_VERSION}");
    let found = std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path().join(&rel))
        .find(|p| p.exists());
    if found.is_none() {
        missing(&format!(
            "no {} under {}/lib/python3*/ (run `make setup`)",
            rel,
            venv.display()
        ));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_inputs_fail_under_ci_and_skip_locally() {
        // One test owns the variable (tests of this crate run in threads of one process).
        let old = std::env::var_os("CI");
        std::env::set_var("CI", "true");
        let r = std::panic::catch_unwind(|| missing("../shared/data/video"));
        let msg = r.unwrap_err();
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("../shared/data/video"), "{msg}");
        std::env::set_var("CI", "false");
        assert!(!is_ci());
        missing("nothing"); // prints and returns
        assert_eq!(require("/no/such/path", "a hint"), None);
        assert_eq!(require("/", "root"), Some(PathBuf::from("/")));
        std::env::set_var("CI", "true");
        let r = std::panic::catch_unwind(|| require("/no/such/path", "make it"));
        let msg = r.unwrap_err();
        let msg = msg.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("/no/such/path is absent (make it)"), "{msg}");
        match old {
            Some(v) => std::env::set_var("CI", v),
            None => std::env::remove_var("CI"),
        }
    }
}
