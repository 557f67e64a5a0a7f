//! Records the git commit at build time (`POODLE_GIT_SHA`), so that a run launched from a
//! copied binary, outside the source tree, still writes which code it is.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let o = Command::new("git").args(args).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).trim().to_string())
}

fn main() {
    let sha = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=POODLE_GIT_SHA={sha}");
    // Rebuild when HEAD moves: HEAD itself (branch switches) and the branch's ref file.
    if let Some(head) = git(&["rev-parse", "--git-path", "HEAD"]) {
        println!("cargo:rerun-if-changed={head}");
    }
    // (A missing file would rerun this script on every build: fall back to packed-refs.)
    if let Some(r) = git(&["symbolic-ref", "-q", "HEAD"]) {
        let loose =
            git(&["rev-parse", "--git-path", &r]).filter(|p| std::path::Path::new(p).exists());
        if let Some(p) = loose.or_else(|| git(&["rev-parse", "--git-path", "packed-refs"])) {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    println!("cargo:rerun-if-changed=build.rs");
}
