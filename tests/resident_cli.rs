//! Weights kept in their checkpoint precision (the default) against the same checkpoint decoded to f32
//! at load (`--dequantize`): the release fixture and every `v4 convert` target must give the same logits
//! (up to f32 summation order: measured <= 4.8e-7 of the logits' scale, gated at 2e-6; the issue asks
//! 1e-5) and the same greedy ids, through the CLI.

use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v4-tiny-a")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("v4-resident-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    let _ = std::fs::remove_dir_all(&path);
    path
}

fn v4(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_v4"))
        .args(args)
        .output()
        .expect("run v4");
    assert!(
        out.status.success(),
        "v4 {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Logits of `v4 forward` on the fixture's tokens, with `extra` flags.
fn logits(dir: &Path, tag: &str, extra: &[&str]) -> Vec<f32> {
    let out = scratch(&format!("{tag}.safetensors"));
    let input = fixtures().join("io.safetensors");
    let mut args = vec![
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ];
    args.extend(extra);
    v4(&args);
    let bytes = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let data = st.tensor("logits").unwrap().data().to_vec();
    data.chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// Greedy ids of `v4 generate` from a fixed prompt.
fn greedy(dir: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "5,17,300,42,9,100,7,7,3",
        "--greedy",
        "--max-tokens",
        "12",
        "--json",
    ];
    args.extend(extra);
    let out = v4(&args);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    json["generated_ids"].to_string()
}

/// The release fixture, and the HF fixture converted to each target.
fn checkpoints() -> Vec<(String, PathBuf)> {
    let mut dirs = vec![("release".to_string(), fixtures().join("native"))];
    let hf = fixtures().join("hf");
    for to in ["fp8", "fp4-mx", "fp4-nv", "bf16"] {
        let out = scratch(to);
        v4(&[
            "convert",
            "--input",
            hf.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--to",
            to,
        ]);
        dirs.push((to.to_string(), out));
    }
    dirs
}

#[test]
fn stored_precision_gives_the_logits_and_ids_of_dequantize_at_load() {
    for (tag, dir) in checkpoints() {
        let resident = logits(&dir, &format!("{tag}-resident"), &[]);
        let dequantized = logits(&dir, &format!("{tag}-f32"), &["--dequantize"]);
        assert_eq!(resident.len(), dequantized.len(), "{tag}: logits lengths");
        assert_eq!(resident.len(), 160 * 1024, "{tag}: [1, 160, 1024] logits");
        let scale = dequantized.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = resident
            .iter()
            .zip(&dequantized)
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        println!("{tag}: max |diff| {diff:.3e}, logits scale {scale:.3}");
        assert!(
            diff <= 2e-6 * scale,
            "{tag}: logits differ by {diff} (scale {scale})"
        );
        assert_eq!(
            greedy(&dir, &[]),
            greedy(&dir, &["--dequantize"]),
            "{tag}: greedy ids"
        );
    }
}

#[test]
fn a_synthesized_checkpoint_converts_and_runs_in_its_stored_precision() {
    let dir = scratch("synth");
    let config = fixtures().join("hf/config.json");
    let synth = |dir: &Path| {
        Command::new(env!("CARGO_BIN_EXE_v4"))
            .args([
                "synth",
                dir.to_str().unwrap(),
                "--config",
                config.to_str().unwrap(),
                "--seed",
                "7",
            ])
            .output()
            .unwrap()
    };
    assert!(synth(&dir).status.success());
    let again = synth(&dir);
    assert!(!again.status.success(), "synth overwrote an existing directory");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let release = scratch("synth-fp4-mx");
    v4(&[
        "convert",
        "--input",
        dir.to_str().unwrap(),
        "--output",
        release.to_str().unwrap(),
        "--to",
        "fp4-mx",
    ]);
    let resident = logits(&release, "synth-resident", &[]);
    let dequantized = logits(&release, "synth-dequantized", &["--dequantize"]);
    assert_eq!(resident.len(), 160 * 1024);
    assert_eq!(resident.len(), dequantized.len());
    let scale = dequantized.iter().fold(0f32, |m, v| m.max(v.abs()));
    let diff = resident
        .iter()
        .zip(&dequantized)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        diff <= 2e-6 * scale,
        "synth: logits differ by {diff} (scale {scale})"
    );
    // The seed alone decides the weights.
    let twin = scratch("synth-twin");
    assert!(synth(&twin).status.success());
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(
        weights(&dir),
        weights(&twin),
        "the same seed wrote different weights"
    );
}
