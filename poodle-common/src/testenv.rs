//! How tests treat missing inputs (real data, the ONNX Runtime library, fixtures): locally
//! they skip with a message; under `CI=true` they fail and name what is missing, so that CI
//! never passes by skipping.

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
        match old {
            Some(v) => std::env::set_var("CI", v),
            None => std::env::remove_var("CI"),
        }
    }
}
