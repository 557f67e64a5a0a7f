//! `poodle-train gpu-check --device cpu --tiny`: the GPU session runs gpu-check once, so its
//! control flow (guards, comparisons, floors, synthetic batches, Learner setup, JSON lines)
//! runs here on the CPU at tiny sizes, every part and the default precisions (tf32 and bf16
//! are skipped on the CPU, with a reason).

mod common;

use serde_json::Value;
use std::process::Command;

#[test]
fn gpu_check_runs_on_the_cpu() {
    let dir = common::tmpdir("gpu-check");
    let t0 = std::time::Instant::now();
    let run = Command::new(env!("CARGO_BIN_EXE_poodle-train"))
        .args([
            "gpu-check",
            "--device",
            "cpu",
            "--tiny",
            "--iters",
            "1",
            "--out",
        ])
        .arg(&*dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let text = std::fs::read_to_string(dir.join("candle.jsonl")).unwrap_or_default();
    assert!(run.status.success(), "gpu-check failed: {stderr}\n{text}");
    eprintln!("gpu-check on the CPU: {:.1} s", t0.elapsed().as_secs_f64());
    let rows: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |kind: &'static str| rows.iter().filter(move |r| r["kind"] == kind);
    let info: Vec<_> = of("info").collect();
    assert_eq!(info.len(), 1, "{text}");
    assert_eq!(info[0]["device"], "cpu");

    // Every row passes; rows that cannot run on the CPU say why.
    for r in &rows {
        assert!(r.get("error").is_none() && r["ok"] != false, "{r}");
    }
    let skipped = |kind: &str, p: &str| {
        rows.iter()
            .any(|r| r["kind"] == kind && r["precision"] == p && r["skipped"].is_string())
    };
    assert!(skipped("nccl", "f32"), "{text}");
    for p in ["tf32", "bf16"] {
        for kind in ["parity", "trunk", "step"] {
            assert!(skipped(kind, p), "{kind} {p} not skipped: {text}");
        }
    }
    assert!(
        skipped("parity", "f32"),
        "algorithm cache not skipped: {text}"
    );

    // Parity: the cuDNN ops, the dense loss's ops and the whole step, each compared (the CPU
    // on both sides agrees within the tolerance).
    let parity: Vec<_> = of("parity").filter(|r| r["rel_err"].is_number()).collect();
    assert!(parity.len() >= 60, "{} parity rows: {text}", parity.len());
    for op in [
        "conv2d",
        "batchnorm",
        "sync batchnorm",
        "maxpool3x3s2",
        "relu",
        "bilinear sample",
        "normalized sq diff",
        "plan taps (exact)",
        "dense loss, fused",
        "train step (tiny)",
    ] {
        assert!(
            parity
                .iter()
                .any(|r| r["op"].as_str().unwrap().starts_with(op)),
            "no parity row for {op}: {text}"
        );
    }
    let step_rows = parity
        .iter()
        .filter(|r| r["op"] == "train step (tiny)")
        .count();
    // 5 loss terms, the worst gradient, weights after AdamW, target after EMA.
    assert_eq!(step_rows, 8, "{text}");

    // One result per benchmark at f32, with finite timings.
    let finite = |r: &Value, k: &str| r[k].as_f64().is_some_and(|v| v.is_finite() && v > 0.0);
    let results = |kind: &'static str| -> Vec<&Value> {
        of(kind)
            .filter(|r| r["precision"] == "f32" && r.get("skipped").is_none())
            .collect()
    };
    let dense = results("dense");
    assert_eq!(dense.len(), 1, "{text}");
    let forms = dense[0]["forms"].as_array().unwrap();
    assert_eq!(forms.len(), 2);
    assert!(
        forms
            .iter()
            .all(|f| finite(f, "s") && f["loss"].is_number()),
        "{text}"
    );
    // BatchNorm alone: the unsynchronised path against synchronised BatchNorm's fused passes.
    let bn = results("batchnorm");
    assert_eq!(bn.len(), 1, "{text}");
    let forms = bn[0]["forms"].as_array().unwrap();
    assert!(
        forms.len() == 2 && forms.iter().all(|f| finite(f, "s")),
        "{text}"
    );
    assert!(finite(bn[0], "fused_over_unsynchronised"), "{text}");
    assert!(skipped("batchnorm", "bf16"), "{text}");
    for kind in ["trunk", "step"] {
        let r = results(kind);
        assert_eq!(r.len(), 1, "{kind}: {text}");
        assert!(finite(r[0], "step_s"), "{kind}: {text}");
    }
    assert_eq!(results("step")[0]["res"], serde_json::json!([64, 128]));
}
