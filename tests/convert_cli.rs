//! `v4 convert` and release-layout loading, end to end through the CLI; weights kept in their checkpoint
//! precision (the default) against the same checkpoint decoded to f32 at load (`--dequantize`).

use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/cli.rs"]
mod cli;
#[path = "support/scratch.rs"]
mod support;

use cli::{f32s, max_abs_diff, rel_l2, v4_ok as v4};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v4-tiny-a")
}

fn scratch(name: &str) -> PathBuf {
    support::fresh("convert_cli", name)
}

/// Logits of `v4 forward` on the fixture's tokens for the model in `dir`.
fn logits(dir: &Path, tag: &str) -> Vec<f32> {
    logits_with(dir, tag, &[])
}

/// [`logits`] with `extra` flags.
fn logits_with(dir: &Path, tag: &str, extra: &[&str]) -> Vec<f32> {
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
    f32s(&out, "logits")
}

#[test]
fn release_layout_runs_directly_and_converted_hf_reproduces_it() {
    let _scratch = support::RemoveOnSuccess;
    let io = fixtures().join("io.safetensors");
    let expected = f32s(&io, "native_logits");
    // The DeepSeek-layout fixture (FP8 + FP4), dequantized at load.
    let native = logits(&fixtures().join("native"), "native");
    let d = max_abs_diff(&native, &expected);
    println!("native logits: max |diff| {d:.2e}");
    assert!(d <= 2e-5, "native logits differ by {d}");

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
    let d = max_abs_diff(&again, &expected);
    println!("converted logits: max |diff| {d:.2e}");
    assert!(d <= 2e-5, "converted logits differ from native_logits by {d}");
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
    let _scratch = support::RemoveOnSuccess;
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
        // Against the unweighted search, the logits of this random-weight model do not order the two
        // (fp4-nv: 0.1340 against 0.1326): what activation-aware calibration lowers is the
        // importance-weighted weight error, asserted against the unweighted search's in
        // `convert/tests/fixture.rs`. Here it must beat round-to-nearest end to end.
        assert!(
            activation < rtn,
            "{to}: activation-aware calibration did not help ({activation} >= {rtn})"
        );
    }
}

#[test]
fn activation_calibration_refuses_bad_calibration_data_and_writes_nothing() {
    let _scratch = support::RemoveOnSuccess;
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

// Stored precision against `--dequantize`: the release fixture and every `v4 convert` target must give the
// same logits (up to f32 summation order: measured <= 4.8e-7 of the logits' scale, gated at 2e-6; the
// issue asks 1e-5) and the same greedy ids.

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
        let out = scratch(&format!("resident-{to}"));
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
    let _scratch = support::RemoveOnSuccess;
    for (tag, dir) in checkpoints() {
        let resident = logits_with(&dir, &format!("{tag}-resident"), &[]);
        let dequantized = logits_with(&dir, &format!("{tag}-f32"), &["--dequantize"]);
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
    let _scratch = support::RemoveOnSuccess;
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
    let resident = logits_with(&release, "synth-resident", &[]);
    let dequantized = logits_with(&release, "synth-dequantized", &["--dequantize"]);
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

/// The dtype, shape and bytes of tensor `name` of the checkpoint in `dir` (sharded or not).
fn stored_tensor(dir: &Path, name: &str) -> (safetensors::Dtype, Vec<usize>, Vec<u8>) {
    let file = match std::fs::read_to_string(dir.join("model.safetensors.index.json")) {
        Ok(index) => {
            let index: serde_json::Value = serde_json::from_str(&index).unwrap();
            index["weight_map"][name].as_str().unwrap().to_string()
        }
        Err(_) => "model.safetensors".into(),
    };
    let bytes = std::fs::read(dir.join(file)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    (t.dtype(), t.shape().to_vec(), t.data().to_vec())
}

#[test]
fn synth_streams_a_layer_slice_into_bf16_shards_with_each_layer_kind_kept() {
    let _scratch = support::RemoveOnSuccess;
    let config = fixtures().join("hf/config.json");
    let full = scratch("synth-full");
    let slice = scratch("synth-slice");
    let (config, seed) = (config.to_str().unwrap(), "5");
    v4(&[
        "synth",
        full.to_str().unwrap(),
        "--config",
        config,
        "--seed",
        seed,
    ]);
    v4(&[
        "synth",
        slice.to_str().unwrap(),
        "--config",
        config,
        "--seed",
        seed,
        "--layers",
        "0,2,3",
        "--dtype",
        "bf16",
        "--shard-size",
        "0.001",
    ]);
    // The slice keeps layers 0, 2, 3 of the fixture: each with its own attention and routing kind.
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(slice.join("config.json")).unwrap()).unwrap();
    assert_eq!(written["num_hidden_layers"], 3);
    assert_eq!(
        written["layer_types"],
        serde_json::json!([
            "sliding_attention",
            "heavily_compressed_attention",
            "compressed_sparse_attention"
        ])
    );
    assert_eq!(
        written["mlp_layer_types"],
        serde_json::json!(["hash_moe", "moe", "moe"])
    );
    let shards = std::fs::read_dir(&slice)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "safetensors")
        })
        .count();
    assert!(shards > 1, "a 1 MB shard limit wrote {shards} shard(s)");
    // Tensors named alike hold the full checkpoint's values rounded to bf16 (the generator starts any
    // tensor at any element, so streaming in chunks changes nothing).
    for name in [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.mlp.experts.gate_up_proj",
        "model.layers.0.mlp.gate.tid2eid",
    ] {
        let (dtype, shape, bytes) = stored_tensor(&slice, name);
        let (full_dtype, full_shape, full_bytes) = stored_tensor(&full, name);
        assert_eq!(shape, full_shape, "{name}");
        let expected: Vec<u8> = match full_dtype {
            safetensors::Dtype::F32 => {
                assert_eq!(dtype, safetensors::Dtype::BF16, "{name}");
                full_bytes
                    .chunks_exact(4)
                    .flat_map(|b| {
                        let x = f32::from_le_bytes(b.try_into().unwrap());
                        v4_convert::codec::f32_to_bf16(x).to_le_bytes()
                    })
                    .collect()
            }
            _ => full_bytes,
        };
        assert_eq!(bytes.len(), expected.len(), "{name}");
        assert!(
            bytes == expected,
            "{name}: the slice's values differ from the full checkpoint's"
        );
    }
    let logits = logits(&slice, "synth-slice");
    assert_eq!(logits.len(), 160 * 1024);
    assert!(logits.iter().all(|x| x.is_finite()));
}

#[test]
fn a_load_that_cannot_fit_is_refused_before_anything_is_read() {
    let _scratch = support::RemoveOnSuccess;
    let dir = scratch("too-big");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(fixtures().join("hf/config.json"), dir.join("config.json")).unwrap();
    // A header declaring a 1 TiB f32 embedding; the file is sparse, so nothing is written to disk.
    let (rows, cols) = (1u64 << 24, 1u64 << 14);
    let bytes = rows * cols * 4;
    let mut header = serde_json::json!({
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, bytes]}
    })
    .to_string();
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let path = dir.join("model.safetensors");
    let mut file = std::fs::File::create(&path).unwrap();
    use std::io::Write;
    file.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    file.write_all(header.as_bytes()).unwrap();
    file.set_len(8 + header.len() as u64 + bytes).unwrap();
    let output = scratch("never-written.safetensors");
    let input = fixtures().join("io.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_v4"))
        .args([
            "forward",
            "--model",
            dir.to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
        ])
        .args(["--output", output.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a 1.1 TB load was not refused");
    assert!(
        err.contains("the weights need 1099.5 GB resident") && err.contains("GB available"),
        "{err}"
    );
    assert!(!output.exists());
}
