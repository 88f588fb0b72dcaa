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

#[test]
fn weight_search_calibration_brings_fp4_logits_closer_to_f32() {
    let reference = f32s(&fixtures().join("io.safetensors"), "logits");
    let hf = fixtures().join("hf");
    for to in ["fp4-mx", "fp4-nv"] {
        let rtn = scratch(&format!("{to}-rtn"));
        let search = scratch(&format!("{to}-search"));
        v4(&[
            "convert",
            "--input",
            hf.to_str().unwrap(),
            "--output",
            rtn.to_str().unwrap(),
            "--to",
            to,
        ]);
        v4(&[
            "convert",
            "--input",
            hf.to_str().unwrap(),
            "--output",
            search.to_str().unwrap(),
            "--to",
            to,
            "--calibrate",
            "weight-search",
        ]);
        let e_rtn = rel_l2(&logits(&rtn, &format!("{to}-rtn")), &reference);
        let e_search = rel_l2(&logits(&search, &format!("{to}-search")), &reference);
        println!("{to}: logits rel L2 vs f32: rtn {e_rtn:.4}, weight search {e_search:.4}");
        assert!(
            e_search < e_rtn,
            "{to}: calibration did not help ({e_search} >= {e_rtn})"
        );
    }
}
