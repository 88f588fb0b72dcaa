//! Running the `v4` binary and reading what it writes, for the integration tests of the binary (included
//! with `#[path]`).
#![allow(dead_code)] // each test file uses some of these

use safetensors::SafeTensors;
use std::path::Path;
use std::process::{Command, Output};

/// `v4 args`, which must succeed (the failure shows its stderr); returns its output.
pub fn v4_ok(args: &[&str]) -> Output {
    let out = v4(args);
    assert!(
        out.status.success(),
        "v4 {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `v4 args`, whatever its exit status.
pub fn v4(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_v4"))
        .args(args)
        .output()
        .expect("run v4")
}

/// The f32 tensor `name` of the safetensors file `path`.
pub fn f32s(path: &Path, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st
        .tensor(name)
        .unwrap_or_else(|_| panic!("{}: no `{name}`", path.display()));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// `||a - b|| / ||b||`.
pub fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den).sqrt()
}

/// max |a - b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The tiny fixture's config shrunk to two layers (sliding/hash, CSA/top-k) with V4's real vocabulary, so
/// that V4's tokenizer fits: what the chat and generation tests run on random weights.
pub fn v4_vocab_config() -> serde_json::Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v4-tiny-a/hf/config.json");
    let mut json: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    for (k, v) in [
        ("vocab_size", 129_280),
        ("hidden_size", 64),
        ("num_hidden_layers", 2),
        ("num_attention_heads", 2),
        ("head_dim", 64),
        ("qk_rope_head_dim", 16),
        ("q_lora_rank", 32),
        ("o_lora_rank", 16),
        ("moe_intermediate_size", 32),
        ("index_head_dim", 32),
        ("index_n_heads", 2),
    ] {
        json[k] = serde_json::json!(v);
    }
    json["layer_types"] = serde_json::json!(["sliding_attention", "compressed_sparse_attention"]);
    json["mlp_layer_types"] = serde_json::json!(["hash_moe", "moe"]);
    json
}
