//! V4's MTP layer end to end through the CLI, against DeepSeek's own outputs (`v4-tiny-mtp`, produced by
//! DeepSeek's `inference/model.py`): `v4 forward` writes the main logits and `mtp_logits`, and
//! `v4 convert` keeps the layer in both layouts.

use safetensors::SafeTensors;
use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/cli.rs"]
mod cli;
#[path = "support/scratch.rs"]
mod support;

use cli::max_abs_diff;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v4-tiny-mtp")
}

fn scratch(name: &str) -> PathBuf {
    support::fresh("mtp_cli", name)
}

fn v4(args: &[&str]) -> String {
    String::from_utf8_lossy(&cli::v4_ok(args).stdout).into_owned()
}

/// An f32 tensor of a safetensors file, with its shape.
fn f32s(path: &Path, name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("{}: {name}: {e}", path.display()));
    let values = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    (t.shape().to_vec(), values)
}

/// `v4 forward` of the fixture's tokens on the checkpoint in `dir`; returns the output file.
fn forward(dir: &Path, tag: &str) -> PathBuf {
    let out = scratch(&format!("{tag}.safetensors"));
    let input = fixture().join("io.safetensors");
    let printed = v4(&[
        "forward",
        "--model",
        dir.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(printed.contains("mtp_logits"), "{printed}");
    out
}

/// The fixture converted to v4's HF layout (f32), in scratch directory `tag`.
fn in_hf_layout(tag: &str) -> PathBuf {
    let (native, hf) = (fixture().join("native"), scratch(tag));
    v4(&[
        "convert",
        "--input",
        native.to_str().unwrap(),
        "--output",
        hf.to_str().unwrap(),
        "--to",
        "f32",
        "--layout",
        "hf",
    ]);
    hf
}

/// Compares `name` of `out` with the fixture's; returns the max |diff|.
fn against_deepseek(out: &Path, name: &str) -> f32 {
    let (shape, got) = f32s(out, name);
    let (want_shape, want) = f32s(&fixture().join("io.safetensors"), name);
    assert_eq!(shape, want_shape, "{name}");
    max_abs_diff(&got, &want)
}

#[test]
fn forward_matches_deepseeks_main_and_mtp_logits() {
    let _scratch = support::RemoveOnSuccess;
    let out = forward(&fixture().join("native"), "native");
    // DeepSeek's code is a second oracle beside HF's (v4-tiny-a): the main model must match it too.
    for (name, bound) in [("logits", 2e-5), ("streams", 2e-5), ("mtp_logits", 2e-5)] {
        let d = against_deepseek(&out, name);
        println!("{name}: max |diff| from DeepSeek's {d:.2e}");
        assert!(d <= bound, "{name} differ from DeepSeek's by {d}");
    }
}

#[test]
fn convert_keeps_the_mtp_layer_in_both_layouts() {
    let _scratch = support::RemoveOnSuccess;
    let hf = in_hf_layout("hf");
    let d = against_deepseek(&forward(&hf, "hf"), "mtp_logits");
    println!("HF layout (f32): mtp_logits max |diff| {d:.2e}");
    assert!(
        d <= 2e-5,
        "mtp_logits after conversion to the HF layout differ by {d}"
    );

    // Back to the release layout in the release's precisions: FP8 e_proj / h_proj and FP4 experts.
    let fp4 = scratch("fp4");
    v4(&[
        "convert",
        "--input",
        hf.to_str().unwrap(),
        "--output",
        fp4.to_str().unwrap(),
        "--to",
        "fp4-mx",
    ]);
    let out = forward(&fp4, "fp4");
    let (_, got) = f32s(&out, "mtp_logits");
    let (_, want) = f32s(&fixture().join("io.safetensors"), "mtp_logits");
    let (num, den) = got.iter().zip(&want).fold((0f64, 0f64), |(n, d), (g, w)| {
        (n + ((g - w) as f64).powi(2), d + (*w as f64).powi(2))
    });
    let rel = (num / den).sqrt();
    println!("release layout (FP8 + MXFP4): mtp_logits relative L2 {rel:.3}");
    // Quantization error, not a bug: nonzero, and of the size FP4 experts give on the main logits.
    assert!(rel > 0.05 && rel < 0.2, "relative L2 {rel} (measured 0.144)");
}

/// `validation loss A (step s) -> B (step t)` lines of `v4 train`'s summary: (A, B).
fn losses(printed: &str, prefix: &str) -> (f64, f64) {
    let line = printed
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` line in:\n{printed}"));
    let numbers: Vec<f64> = line
        .split_whitespace()
        .filter_map(|w| w.trim_matches(|c| c == '(' || c == ')').parse().ok())
        .collect();
    // [A, s, B, t]
    assert_eq!(numbers.len(), 4, "{line}");
    (numbers[0], numbers[2])
}

#[test]
fn fine_tuning_with_the_mtp_loss_lowers_both_losses_and_keeps_the_layer() {
    let _scratch = support::RemoveOnSuccess;
    let hf = in_hf_layout("finetune-hf");
    let dir = scratch("finetune");
    std::fs::create_dir_all(&dir).unwrap();
    let data = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/shakespeare");
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\ncheckpoint = \"{}\"\n\n[data]\ntrain = \"{d}/train.jsonl\"\nvalidation = \"{d}/valid.jsonl\"\n\
             tokenizer = \"bytes\"\nseq_len = 24\nvalidation_batches = 2\n\n[optimizer]\nlr = 3e-3\n\n\
             [schedule]\nsteps = 8\nwarmup = 1\n\n[training]\nbatch = 4\neval_interval = 0\n\n[mtp]\nweight = 0.3\n\n\
             [checkpoint]\ndir = \"{}\"\n",
            hf.display(),
            dir.join("ckpt").display(),
            d = data.display(),
        ),
    )
    .unwrap();
    let printed = v4(&["train", config.to_str().unwrap()]);
    let (main_before, main_after) = losses(&printed, "validation loss");
    let (mtp_before, mtp_after) = losses(&printed, "MTP validation loss");
    println!("validation: main {main_before:.3} -> {main_after:.3}, MTP {mtp_before:.3} -> {mtp_after:.3}");
    assert!(
        main_after < main_before - 1.0,
        "main validation loss {main_before} -> {main_after}"
    );
    assert!(
        mtp_after < mtp_before - 1.0,
        "MTP validation loss {mtp_before} -> {mtp_after}"
    );

    // The checkpoint keeps the MTP layer, in the HF layout every v4 command loads.
    let ckpt = dir.join("ckpt/step-00000008");
    let bytes = std::fs::read(ckpt.join("model.safetensors")).unwrap();
    let names = SafeTensors::deserialize(&bytes).unwrap().names().len();
    let mtp = SafeTensors::deserialize(&bytes)
        .unwrap()
        .names()
        .into_iter()
        .filter(|n| n.starts_with("model.mtp.0."))
        .count();
    println!("checkpoint: {mtp} of {names} tensors are the MTP layer's");
    assert!(mtp >= 30, "{mtp} MTP tensors in the checkpoint");
    let out = forward(&ckpt, "finetuned");
    let (shape, _) = f32s(&out, "mtp_logits");
    assert_eq!(shape, vec![2, 79, 1024]);
}

/// A random checkpoint with V4's vocabulary, an MTP layer and V4's tokenizer (what `v4 chat` needs).
fn chat_model_with_mtp() -> PathBuf {
    let dir = support::scratch("mtp_cli", "chat-model");
    let mut config = cli::v4_vocab_config();
    config["num_nextn_predict_layers"] = serde_json::json!(1);
    let config_path = dir.join("config.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let model = dir.join("model");
    v4(&[
        "synth",
        model.to_str().unwrap(),
        "--config",
        config_path.to_str().unwrap(),
        "--seed",
        "3",
    ]);
    std::fs::copy(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/deepseek-v4/tokenizer.json"),
        model.join("tokenizer.json"),
    )
    .unwrap();
    model
}

/// `v4 chat` over two turns from stdin; returns (stdout, stderr).
fn chat(model: &Path, extra: &[&str]) -> (String, String) {
    use std::io::Write;
    let mut args = vec![
        "chat",
        "--model",
        model.to_str().unwrap(),
        "--greedy",
        "--max-tokens",
        "6",
    ];
    args.extend(extra);
    let mut child = Command::new(env!("CARGO_BIN_EXE_v4"))
        .args(&args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"Hello there\nWhat is 1+1?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "v4 {args:?}: {err}");
    (String::from_utf8_lossy(&out.stdout).into_owned(), err)
}

#[test]
fn chat_with_mtp_speculation_replies_as_plain_greedy_chat() {
    let _scratch = support::RemoveOnSuccess;
    let model = chat_model_with_mtp();
    let (plain, _) = chat(&model, &[]);
    let (speculative, err) = chat(&model, &["--speculative", "mtp", "--draft-tokens", "2"]);
    assert_eq!(plain.lines().count(), 2, "two replies: {plain}");
    assert_eq!(speculative, plain, "{err}");
    let reports: Vec<&str> = err
        .lines()
        .filter(|l| l.starts_with("[speculative (MTP): accepted"))
        .collect();
    assert_eq!(reports.len(), 2, "{err}");
}
