//! `v4 convert` and release-layout loading, end to end through the CLI.

use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v4-tiny-a")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("v4-convert-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_dir_all(&path);
    path
}

fn v4(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_v4"))
        .args(args)
        .output()
        .expect("run v4");
    assert!(
        out.status.success(),
        "v4 {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn f32s(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Logits of `v4 forward` on the fixture's tokens for the model in `dir`.
fn logits(dir: &Path, tag: &str) -> Vec<f32> {
    let out = scratch(&format!("{tag}.safetensors"));
    let input = fixtures().join("io.safetensors");
    v4(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    f32s(&out, "logits")
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn release_layout_runs_directly_and_converted_hf_reproduces_it() {
    let io = fixtures().join("io.safetensors");
    let expected = f32s(&io, "native_logits");
    // The DeepSeek-layout fixture (FP8 + FP4), dequantized at load.
    let native = logits(&fixtures().join("native"), "native");
    let d = native
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d <= 1e-4, "native logits differ by {d}");

    // hf -> DeepSeek layout, MXFP4 experts (RCEIL): the same model as the release.
    let converted = scratch("fp4-mx");
    let hf = fixtures().join("hf");
    v4(&[
        "convert",
        "--input",
        hf.to_str().unwrap(),
        "--output",
        converted.to_str().unwrap(),
        "--to",
        "fp4-mx",
    ]);
    let again = logits(&converted, "converted");
    let d = again
        .iter()
        .zip(&expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max);
    assert!(d <= 1e-4, "converted logits differ from native_logits by {d}");
}

/// Calibration text for the tiny model (no tokenizer: raw ids), drawn uniformly from its vocabulary like
/// the fixture's tokens but from another generator, so the fixture's 160 tokens stay held out.
fn calibration_ids(path: &Path) {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut lines = String::new();
    for _ in 0..16 {
        let ids: Vec<String> = (0..256)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 33) % 1024).to_string()
            })
            .collect();
        lines.push_str(&format!("{{\"ids\": [{}]}}\n", ids.join(",")));
    }
    std::fs::write(path, lines).unwrap();
}

#[test]
fn calibration_brings_fp4_logits_closer_to_f32_on_held_out_tokens() {
    let reference = f32s(&fixtures().join("io.safetensors"), "logits");
    let hf = fixtures().join("hf");
    let calib = scratch("calib.jsonl");
    calibration_ids(&calib);
    for to in ["fp4-mx", "fp4-nv"] {
        let mut errors = Vec::new();
        for method in ["rtn", "weight-search", "activation"] {
            let out = scratch(&format!("{to}-{method}"));
            let mut args = vec![
                "convert",
                "--input",
                hf.to_str().unwrap(),
                "--output",
                out.to_str().unwrap(),
                "--to",
                to,
                "--calibrate",
                method,
            ];
            if method == "activation" {
                args.extend(["--calib-data", calib.to_str().unwrap()]);
            }
            v4(&args);
            errors.push(rel_l2(&logits(&out, &format!("{to}-{method}")), &reference));
        }
        let [rtn, search, activation] = errors[..] else {
            unreachable!()
        };
        println!(
            "{to}: logits rel L2 vs f32: rtn {rtn:.4}, weight search {search:.4}, activation {activation:.4}"
        );
        assert!(
            search < rtn,
            "{to}: weight search did not help ({search} >= {rtn})"
        );
        assert!(
            activation < rtn,
            "{to}: activation-aware calibration did not help ({activation} >= {rtn})"
        );
    }
}

#[test]
fn activation_calibration_refuses_bad_calibration_data_and_writes_nothing() {
    let hf = fixtures().join("hf");
    let cases = [
        ("missing", None, "needs --calib-data"),
        (
            "text",
            Some("{\"text\": \"no tokenizer here\"}\n"),
            "no tokenizer.json",
        ),
        (
            "vocab",
            Some("{\"ids\": [1, 2, 5000]}\n"),
            "line 1: token id 5000 is outside",
        ),
        ("json", Some("{\"ids\": [1, 2]}\n{oops\n"), "line 2"),
        ("empty", Some("\n"), "no calibration tokens"),
    ];
    for (tag, data, expected) in cases {
        let out = scratch(&format!("bad-calib-{tag}"));
        let mut args = vec![
            "convert".to_string(),
            "--input".into(),
            hf.display().to_string(),
            "--output".into(),
            out.display().to_string(),
            "--to".into(),
            "fp4-mx".into(),
            "--calibrate".into(),
            "activation".into(),
        ];
        if let Some(data) = data {
            let path = scratch(&format!("bad-calib-{tag}.jsonl"));
            std::fs::write(&path, data).unwrap();
            args.extend(["--calib-data".into(), path.display().to_string()]);
        }
        let run = Command::new(env!("CARGO_BIN_EXE_v4"))
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{tag}: accepted");
        assert!(stderr.contains(expected), "{tag}: {stderr}");
        assert!(!out.exists(), "{tag}: left output behind");
    }
}
