//! Ascend precision paths end to end through the CLI: `v4 convert --to w8a8|mxfp8` (msModelSlim's AscendV1
//! files), the 910B W8A8_DYNAMIC and 950 MX emulation (`v4 forward --device npu`), and `v4 port-report`.

use safetensors::SafeTensors;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[path = "support/cli.rs"]
mod cli;
#[path = "support/scratch.rs"]
mod scratch;

use cli::{f32s, rel_l2, v4_ok};

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v4-tiny-a")
}

fn release() -> PathBuf {
    fixture().join("native")
}

fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `v4 convert --to target` of the release fixture into a fresh directory.
fn convert(case: &str, target: &str) -> PathBuf {
    let out = scratch::fresh("ascend_cli", case);
    v4_ok(&[
        "convert",
        "--input",
        arg(&release()),
        "--output",
        arg(&out),
        "--to",
        target,
    ]);
    out
}

/// Logits of `v4 forward` over the fixture's tokens, and its stderr (the NPU report).
fn forward(case: &str, model: &Path, extra: &[&str]) -> (Vec<f32>, String) {
    let out = scratch::fresh("ascend_cli", &format!("{case}.safetensors"));
    let input = fixture().join("io.safetensors");
    let mut args = vec![
        "forward",
        "--model",
        arg(model),
        "--input",
        arg(&input),
        "--output",
        arg(&out),
    ];
    args.extend(extra);
    let run = v4_ok(&args);
    (
        f32s(&out, "logits"),
        String::from_utf8_lossy(&run.stderr).into_owned(),
    )
}

/// The `calls` column of op `op` in an NPU report (0 when absent).
fn calls(report: &str, op: &str) -> u64 {
    report
        .lines()
        .find(|l| l.split_whitespace().next() == Some(op))
        .and_then(|l| l.split_whitespace().nth(2))
        .map_or(0, |c| c.parse().unwrap())
}

fn fallbacks(report: &str) -> u64 {
    let line = report
        .lines()
        .find(|l| l.starts_with("fallbacks:"))
        .expect("a fallback line");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn description(dir: &Path) -> serde_json::Map<String, Value> {
    let text = std::fs::read(dir.join("quant_model_description.json")).unwrap();
    serde_json::from_slice::<Value>(&text)
        .unwrap()
        .as_object()
        .unwrap()
        .clone()
}

#[test]
fn w8a8_writes_ascendv1_files_with_the_recipe_and_a_description_vllm_ascend_can_key() {
    let dir = convert("w8a8", "w8a8");
    let bytes = std::fs::read(dir.join("quant_model_weights.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let desc = description(&dir);
    assert_eq!(desc["model_quant_type"], "W8A8_DYNAMIC");
    assert_eq!(desc["hc_head_fn"], "FLOAT");
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    for n in &names {
        assert!(desc.contains_key(n), "description lacks `{n}`");
    }
    // The recipe: query/KV projections and experts INT8, output projections float.
    for (linear, quantised) in [
        ("layers.0.attn.wq_a", true),
        ("layers.1.attn.wkv", true),
        ("layers.0.ffn.experts.0.w2", true),
        ("layers.0.ffn.shared_experts.w1", true),
        ("layers.0.attn.wo_a", false),
        ("layers.0.attn.wo_b", false),
    ] {
        let w = st.tensor(&format!("{linear}.weight")).unwrap();
        if quantised {
            assert_eq!(w.dtype(), safetensors::Dtype::I8, "{linear}");
            let s = st.tensor(&format!("{linear}.weight_scale")).unwrap();
            assert_eq!(
                (s.dtype(), s.shape()),
                (safetensors::Dtype::F32, &[w.shape()[0], 1][..]),
                "{linear}"
            );
            let o = st.tensor(&format!("{linear}.weight_offset")).unwrap();
            assert!(o.data().iter().all(|&b| b == 0), "{linear}: offsets are zero");
            assert_eq!(desc[&format!("{linear}.weight")], "W8A8_DYNAMIC");
        } else {
            assert_eq!(w.dtype(), safetensors::Dtype::BF16, "{linear}");
            assert_eq!(desc[&format!("{linear}.weight")], "FLOAT");
        }
    }
    let config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert!(
        config.get("quantization_config").is_none(),
        "AscendV1 configs carry no quantization_config"
    );
}

/// The bound W8A8 logits must meet, derived from the two rounding effects measured one at a time on the
/// same tokens (first-order error analysis: independent zero-mean rounding errors add in quadrature):
/// - `r_w`, INT8 weights alone (the w8a8 checkpoint on the f32 `cpu` backend);
/// - `r_x`, INT8 activations: the same per-row rule applied to token vectors of the same lengths, taken
///   equal to `r_w`;
/// - `r_16`, the bf16 mixed-precision cube the W8A8 chip runs everything else on (the release checkpoint
///   under `npu-910b-bf16.toml`).
///
/// So `||Δ|| / ||ref|| <= sqrt(r_w² + r_x² + r_16²) = sqrt(2 r_w² + r_16²)`.
#[test]
fn w8a8_on_the_910b_emulator_runs_without_fallbacks_within_the_int8_rounding_bound() {
    let dir = convert("w8a8-forward", "w8a8");
    let (reference, _) = forward("reference", &release(), &[]);
    let (weights_only, _) = forward("weights-only", &dir, &[]);
    let bf16_config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/npu-910b-bf16.toml");
    let (bf16, _) = forward(
        "bf16",
        &release(),
        &["--device", "npu", "--npu-config", bf16_config],
    );
    let w8a8_config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/npu-910b-w8a8.toml");
    let (w8a8, report) = forward("w8a8", &dir, &["--device", "npu", "--npu-config", w8a8_config]);
    assert_eq!(fallbacks(&report), 0, "{report}");
    assert!(
        calls(&report, "npu_quant_matmul") > 0,
        "INT8 linears ran on the INT8 cube: {report}"
    );
    assert_eq!(
        calls(&report, "npu_quant_matmul"),
        calls(&report, "npu_dynamic_quant")
    );
    let (r_w, r_16) = (rel_l2(&weights_only, &reference), rel_l2(&bf16, &reference));
    assert!(r_w > 0.0 && r_16 > 0.0);
    let bound = (2.0 * r_w * r_w + r_16 * r_16).sqrt();
    let observed = rel_l2(&w8a8, &reference);
    assert!(
        observed <= bound && observed > r_16,
        "W8A8 logits rel L2 {observed:.4e}: bound {bound:.4e} (r_w {r_w:.4e}, r_16 {r_16:.4e})"
    );
}

/// `dir` converted to F32 (the converter's dequantisation), to compare stored values bit for bit.
fn as_f32_checkpoint(case: &str, dir: &Path) -> PathBuf {
    let out = scratch::fresh("ascend_cli", case);
    v4_ok(&[
        "convert",
        "--input",
        arg(dir),
        "--output",
        arg(&out),
        "--to",
        "f32",
    ]);
    out
}

fn tensor_f32(dir: &Path, name: &str) -> Vec<u32> {
    f32s(&dir.join("model.safetensors"), name)
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

#[test]
fn mxfp4_experts_become_mxfp8_and_fp8_becomes_bf16_without_loss() {
    let f32_release = as_f32_checkpoint("release-f32", &release());
    let mx8_dir = convert("mxfp8", "mxfp8");
    let mx8 = as_f32_checkpoint("mxfp8-f32", &mx8_dir);
    let bf16 = as_f32_checkpoint("bf16-f32", &convert("bf16", "bf16"));
    let desc = description(&mx8_dir);
    assert_eq!(
        (desc["model_quant_type"].as_str(), desc["group_size"].as_u64()),
        (Some("W8A8_MXFP8"), Some(32))
    );
    for expert in [
        "layers.0.ffn.experts.0.w1.weight",
        "layers.3.ffn.experts.5.w2.weight",
    ] {
        let want = tensor_f32(&f32_release, expert);
        assert!(!want.is_empty());
        assert_eq!(tensor_f32(&mx8, expert), want, "{expert}: MXFP4 -> MXFP8");
    }
    for fp8 in [
        "layers.0.attn.wq_a.weight",
        "layers.2.attn.wo_b.weight",
        "layers.1.ffn.shared_experts.w2.weight",
    ] {
        let want = tensor_f32(&f32_release, fp8);
        assert!(!want.is_empty());
        assert_eq!(tensor_f32(&bf16, fp8), want, "{fp8}: FP8 -> BF16");
    }
}

#[test]
fn port_report_writes_one_row_per_path_all_without_fallbacks() {
    let out = scratch::fresh("ascend_cli", "port-report");
    let input = fixture().join("io.safetensors");
    v4_ok(&[
        "port-report",
        "--model",
        arg(&release()),
        "--input",
        arg(&input),
        "--output",
        arg(&out),
    ]);
    let md = std::fs::read_to_string(out.join("port-report.md")).unwrap();
    let rows: Vec<Vec<&str>> = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| path"))
        .map(|l| l.trim_matches('|').split(" | ").map(str::trim).collect())
        .collect();
    assert_eq!(rows.len(), 5, "{md}");
    assert!(rows[0][0].starts_with("reference"));
    assert_eq!(
        rows[0][2].parse::<f64>().unwrap(),
        0.0,
        "the reference agrees with itself"
    );
    for r in &rows[1..] {
        assert_eq!(r.len(), 9, "{r:?}");
        assert_eq!(r[8], "0", "{}: fallbacks", r[0]);
        let rel: f64 = r[2].parse().unwrap();
        assert!(rel > 0.0 && rel < 0.5, "{}: rel L2 {rel}", r[0]);
        assert!(r[7].parse::<f64>().unwrap() > 0.0, "{}: an estimated time", r[0]);
    }
    let bytes = |name: &str| {
        rows.iter().find(|r| r[0] == name).unwrap()[6]
            .parse::<u64>()
            .unwrap()
    };
    assert!(
        bytes("910B W8A8_DYNAMIC") < bytes("910B BF16"),
        "INT8 holds fewer bytes than BF16"
    );
    assert!(std::fs::read_to_string(out.join("port-report.html"))
        .unwrap()
        .contains("<table>"));
}

/// SmoothQuant folds power-of-two factors into the norms and their readers: an f32 conversion with
/// smoothing computes the same logits bit for bit as one without, while its norm weights differ.
#[test]
fn smoothing_changes_the_weights_but_not_the_function() {
    let calib = scratch::scratch("ascend_cli", "calib").join("calib.jsonl");
    let ids: Vec<String> = (0..4)
        .map(|r| {
            let row: Vec<String> = (0..64).map(|i| ((i * 37 + r * 101) % 1024).to_string()).collect();
            format!("{{\"ids\": [{}]}}", row.join(", "))
        })
        .collect();
    std::fs::write(&calib, ids.join("\n")).unwrap();
    let plain = convert("plain-f32", "f32");
    let smoothed = scratch::fresh("ascend_cli", "smoothed-f32");
    let run = v4_ok(&[
        "convert",
        "--input",
        arg(&release()),
        "--output",
        arg(&smoothed),
        "--to",
        "f32",
        "--calibrate",
        "smooth",
        "--calib-data",
        arg(&calib),
    ]);
    assert!(String::from_utf8_lossy(&run.stdout).contains("SmoothQuant factors of 8 norms"));
    let norm = |dir: &Path| tensor_f32(dir, "layers.1.ffn_norm.weight");
    let (a, b) = (norm(&plain), norm(&smoothed));
    assert_eq!(a.len(), b.len());
    assert!(a != b, "the factors are not all 1");
    let (reference, _) = forward("plain-f32", &plain, &[]);
    let (candidate, _) = forward("smoothed-f32", &smoothed, &[]);
    assert_eq!(reference.len(), candidate.len());
    let differing = reference
        .iter()
        .zip(&candidate)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(differing, 0, "smoothing changed {differing} logits");

    let missing = cli::v4(&[
        "convert",
        "--input",
        arg(&release()),
        "--output",
        arg(&scratch::fresh("ascend_cli", "x")),
        "--to",
        "w8a8",
        "--calibrate",
        "smooth",
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("--calib-data"));
}
