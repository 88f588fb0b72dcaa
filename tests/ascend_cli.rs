//! Ascend precision paths end to end through the CLI: `v4 convert --to w8a8|w4a8|mxfp8` (msModelSlim's
//! AscendV1 files), the 910B W8A8_DYNAMIC / W4A8_DYNAMIC and 950 MX emulation (`v4 forward --device npu`), and `v4 port-report`.

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
    let _scratch = scratch::RemoveOnSuccess;
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
    let _scratch = scratch::RemoveOnSuccess;
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

/// A tensor of `st` as f32 values (F32 or I8 storage).
fn values(st: &SafeTensors, name: &str) -> (Vec<f64>, Vec<usize>) {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    let v = match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f64)
            .collect(),
        safetensors::Dtype::I8 => t.data().iter().map(|&b| b as i8 as f64).collect(),
        d => panic!("{name}: {d:?}"),
    };
    (v, t.shape().to_vec())
}

/// The W4A8 expert layout as vllm-ascend's W4A8_DYNAMIC MoE reads it (`shared/reference/ascend-quant-formats.md`):
/// INT4 codes two rows per byte along the output dimension (row 2j low nibble), a per-row scale, zero offsets,
/// and `scale_bias = 8 Σ_k q[r, k] · scale[r]` per chunk of K (16 chunks for `w2`, one for `w1`/`w3`), here
/// recomputed in f64 from the unpacked bytes. The decoded experts stay within INT4's half step
/// (`amax / 14` per row) of the release's values; the shared expert stays INT8 (V4-Pro's recipe).
#[test]
fn w4a8_packs_expert_row_pairs_with_vllm_ascends_scale_bias() {
    let _scratch = scratch::RemoveOnSuccess;
    let dir = convert("w4a8", "w4a8");
    let bytes = std::fs::read(dir.join("quant_model_weights.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let desc = description(&dir);
    assert_eq!(
        (desc["model_quant_type"].as_str(), desc["group_size"].as_u64()),
        (Some("W4A8_DYNAMIC"), Some(0))
    );
    assert_eq!(desc["layers.0.ffn.shared_experts.w1.weight"], "W8A8_DYNAMIC");
    let shared = st.tensor("layers.0.ffn.shared_experts.w1.weight").unwrap();
    let f32_release = as_f32_checkpoint("w4a8-release-f32", &release());
    let f32_release_bytes = std::fs::read(f32_release.join("model.safetensors")).unwrap();
    let release_st = SafeTensors::deserialize(&f32_release_bytes).unwrap();
    let shared_release = release_st
        .tensor("layers.0.ffn.shared_experts.w1.weight")
        .unwrap();
    assert_eq!(
        shared.shape(),
        shared_release.shape(),
        "shared experts stay one INT8 code per weight"
    );
    for (expert, chunks) in [
        ("layers.0.ffn.experts.0.w1", 1),
        ("layers.2.ffn.experts.3.w3", 1),
        ("layers.3.ffn.experts.5.w2", 16),
    ] {
        for part in ["weight", "weight_scale", "weight_offset", "scale_bias"] {
            assert_eq!(
                desc[&format!("{expert}.{part}")],
                "W4A8_DYNAMIC",
                "{expert}.{part}"
            );
        }
        let (packed, pshape) = values(&st, &format!("{expert}.weight"));
        let (scale, sshape) = values(&st, &format!("{expert}.weight_scale"));
        let (offset, _) = values(&st, &format!("{expert}.weight_offset"));
        let (bias, bshape) = values(&st, &format!("{expert}.scale_bias"));
        let (want, wshape) = values(&release_st, &format!("{expert}.weight"));
        let (rows, cols) = (wshape[0], wshape[1]);
        assert_eq!(pshape, [rows / 2, cols], "{expert}: two rows per byte");
        assert_eq!((sshape, bshape), (vec![rows, 1], vec![rows, chunks]), "{expert}");
        assert_eq!(
            (packed.len(), scale.len(), bias.len(), want.len()),
            (rows * cols / 2, rows, rows * chunks, rows * cols)
        );
        assert!(offset.iter().all(|&o| o == 0.0), "{expert}: symmetric");
        let code = |r: usize, c: usize| {
            let b = packed[(r / 2) * cols + c] as i64;
            let nibble = if r.is_multiple_of(2) {
                b & 0xF
            } else {
                (b >> 4) & 0xF
            };
            (if nibble >= 8 { nibble - 16 } else { nibble }) as f64
        };
        for r in 0..rows {
            let row = &want[r * cols..(r + 1) * cols];
            let amax = row.iter().fold(0f64, |m, v| m.max(v.abs()));
            for (c, w) in row.iter().enumerate() {
                let err = (w - code(r, c) * scale[r]).abs();
                assert!(
                    err <= amax / 14.0 * (1.0 + 1e-6),
                    "{expert}[{r}, {c}]: {w} off by {err}"
                );
            }
            for k in 0..chunks {
                let span = cols / chunks;
                let sum: f64 = (k * span..(k + 1) * span).map(|c| code(r, c)).sum();
                let expect = 8.0 * sum * scale[r];
                let got = bias[r * chunks + k];
                assert!(
                    (got - expect).abs() <= 1e-6 * expect.abs().max(scale[r]),
                    "{expert} scale_bias[{r}, {k}]: {got} against {expect}"
                );
            }
        }
    }
}

/// W4A8's logits bound, derived as W8A8's (below): the weights' rounding measured alone (`r_w`, the w4a8
/// checkpoint on the f32 `cpu` backend: INT4 experts, INT8 attention), the INT8 activations' taken equal to
/// INT8 weight rounding (`r_x`, the w8a8 checkpoint on `cpu`), and the bf16 cube's (`r_16`):
/// `||Δ|| / ||ref|| <= sqrt(r_w² + r_x² + r_16²)`.
#[test]
fn w4a8_on_the_910b_emulator_runs_without_fallbacks_within_its_rounding_bound() {
    let _scratch = scratch::RemoveOnSuccess;
    let dir = convert("w4a8-forward", "w4a8");
    let (reference, _) = forward("w4a8-reference", &release(), &[]);
    let (weights_only, _) = forward("w4a8-weights-only", &dir, &[]);
    let (int8_weights, _) = forward("w4a8-int8-weights", &convert("w4a8-w8a8", "w8a8"), &[]);
    let bf16_config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/npu-910b-bf16.toml");
    let (bf16, _) = forward(
        "w4a8-bf16",
        &release(),
        &["--device", "npu", "--npu-config", bf16_config],
    );
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/configs/npu-910b-w8a8.toml");
    let (w4a8, report) = forward("w4a8", &dir, &["--device", "npu", "--npu-config", config]);
    assert_eq!(fallbacks(&report), 0, "{report}");
    assert!(calls(&report, "npu_quant_matmul") > 0, "{report}");
    let (r_w, r_x, r_16) = (
        rel_l2(&weights_only, &reference),
        rel_l2(&int8_weights, &reference),
        rel_l2(&bf16, &reference),
    );
    assert!(r_w > r_x && r_x > 0.0 && r_16 > 0.0, "INT4 rounds more than INT8");
    let bound = (r_w * r_w + r_x * r_x + r_16 * r_16).sqrt();
    let observed = rel_l2(&w4a8, &reference);
    assert!(
        observed <= bound && observed > r_16,
        "W4A8 logits rel L2 {observed:.4e}: bound {bound:.4e} (r_w {r_w:.4e}, r_x {r_x:.4e}, r_16 {r_16:.4e})"
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
    let _scratch = scratch::RemoveOnSuccess;
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
    let _scratch = scratch::RemoveOnSuccess;
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
    assert_eq!(rows.len(), 6, "{md}");
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
    assert!(
        bytes("910B W4A8 experts + W8A8") < bytes("910B W8A8_DYNAMIC"),
        "INT4 experts hold fewer bytes than INT8 ones"
    );
    assert!(std::fs::read_to_string(out.join("port-report.html"))
        .unwrap()
        .contains("<table>"));
}

/// SmoothQuant folds power-of-two factors into the norms and their readers: an f32 conversion with
/// smoothing computes the same logits bit for bit as one without, while its norm weights differ.
#[test]
fn smoothing_changes_the_weights_but_not_the_function() {
    let _scratch = scratch::RemoveOnSuccess;
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
