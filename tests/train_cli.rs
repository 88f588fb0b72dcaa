//! `v4 train`: config printing, unknown keys, a short run whose checkpoint `v4 forward` loads.

use std::path::{Path, PathBuf};
use std::process::Command;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("v4-train-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn v4(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_v4"))
        .args(args)
        .output()
        .unwrap()
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        "[model]\ncheckpoint = \"{}\"\n\n[data]\ntrain = \"{d}/train.jsonl\"\nvalidation = \"{d}/valid.jsonl\"\n\
         tokenizer = \"bytes\"\nseq_len = 16\nvalidation_batches = 1\n\n[schedule]\nsteps = 2\n\n\
         [training]\nbatch = 2\n\n[checkpoint]\ndir = \"{}\"\n{extra}",
        root.join("tests/fixtures/v4-tiny-a/hf").display(),
        dir.join("ckpt").display(),
        d = root.join("tests/fixtures/data/shakespeare").display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn train_prints_config_refuses_unknown_keys_and_writes_a_loadable_checkpoint() {
    let dir = scratch("run");
    let config = write_config(&dir, "");
    let out = v4(&["train", "--print-config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("[optimizer]") && text.contains("weight_decay") && text.contains("keep_last"),
        "{text}"
    );

    let bad = write_config(&scratch("bad"), "bogus_key = 1\n");
    let out = v4(&["train", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bogus_key"), "{err}");

    let out = v4(&["train", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let ckpt = dir.join("ckpt/step-00000002");
    assert!(ckpt.join("model.safetensors").is_file());

    let ids: Vec<u8> = [72i64, 101, 108, 108, 111]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 5], &ids).unwrap();
    let input = dir.join("ids.safetensors");
    safetensors::serialize_to_file(vec![("input_ids", view)], None, &input).unwrap();
    let output = dir.join("out.safetensors");
    let out = v4(&[
        "forward",
        "--model",
        ckpt.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(output.is_file());
}
