//! Parity with HF transformers' DeepseekV4ForCausalLM on the `v4-tiny-a` fixture (see
//! tests/fixtures/v4-tiny-a/PROVENANCE.md): logits and the residual streams entering every layer.

#[macro_use]
#[path = "../../tests/support/backends.rs"]
mod backends;

use burn::tensor::backend::Backend;
use burn::tensor::TensorData;
use safetensors::SafeTensors;
use std::path::PathBuf;
use v4_checkpoint::read_config;
use v4_model::{ModelCache, Pass, Recorder, Tokens, V4Model};

fn fixture_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v4-tiny-a")
}

/// A tensor of the fixture's io file: (shape, f32 values or i64 values as f32-free vec).
fn io_tensor(name: &str) -> (Vec<usize>, Vec<u8>, safetensors::Dtype) {
    let bytes = std::fs::read(fixture_dir().join("io.safetensors")).expect("fixture io file");
    let st = SafeTensors::deserialize(&bytes).expect("valid fixture");
    let t = st.tensor(name).expect("tensor in fixture");
    (t.shape().to_vec(), t.data().to_vec(), t.dtype())
}

fn io_f32(name: &str) -> (Vec<usize>, Vec<f32>) {
    let (shape, data, _) = io_tensor(name);
    (
        shape,
        data.chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    )
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn to_vec(data: &TensorData) -> Vec<f32> {
    data.clone().convert::<f32>().into_vec::<f32>().unwrap()
}

fn full_forward_matches_hf_logits_and_streams<B: Backend>() {
    let dir = fixture_dir().join("hf");
    let config = read_config(&dir).unwrap();
    let source = v4_checkpoint::open(&dir).unwrap();
    let device = Default::default();
    let model = V4Model::<B>::load(&config, &*source, &device).unwrap();

    let (shape, ids, _) = io_tensor("input_ids");
    let ids: Vec<i64> = ids
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let tokens = Tokens::new(&ids, shape[0], shape[1], config.vocab_size).unwrap();

    // `layers.N.input` (streams entering layer N) and the final normed hidden state.
    let mut recorder = Recorder::new(|name: &str| {
        (name.ends_with(".input") && name.split('.').count() == 3) || name == "final.hidden"
    });
    let mut cache = ModelCache::new(config.num_layers());
    let out = model
        .forward_with(&tokens, &mut cache, Pass::new().probe(&mut recorder))
        .unwrap();

    let (expected_shape, expected) = io_f32("logits");
    assert_eq!(out.logits.dims().to_vec(), expected_shape);
    let logits = to_vec(&out.logits.to_data());
    let diff = max_abs_diff(&logits, &expected);
    println!("logits max |diff| = {diff:e}");

    for (name, data) in &recorder.records {
        let fixture_name = match name.as_str() {
            "final.hidden" => format!("hidden.{}", config.num_layers()),
            other => format!(
                "hidden.{}",
                other.trim_start_matches("layers.").trim_end_matches(".input")
            ),
        };
        let (shape, expected) = io_f32(&fixture_name);
        assert_eq!(data.shape.to_vec(), shape, "{fixture_name}");
        let d = max_abs_diff(&to_vec(data), &expected);
        println!("{fixture_name}: max |diff| = {d:e}");
        assert!(d <= 2e-5, "{fixture_name}: max |diff| {d} > 2e-5");
    }
    assert_eq!(recorder.records.len(), config.num_layers() + 1);
    assert!(diff <= 2e-5, "logits max |diff| {diff} > 2e-5");
}

fn gathered_and_dense_csa_paths_agree_with_hf<B: Backend>() {
    let dir = fixture_dir().join("hf");
    let config = read_config(&dir).unwrap();
    let source = v4_checkpoint::open(&dir).unwrap();
    let mut model = V4Model::<B>::load(&config, &*source, &Default::default()).unwrap();
    // Force the gather path on every CSA layer (the fixture's few entries would pick the dense one).
    for layer in model.layers.iter_mut() {
        layer.attn.dense_selection_factor = 0;
    }
    let (shape, ids, _) = io_tensor("input_ids");
    let ids: Vec<i64> = ids
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let tokens = Tokens::new(&ids, shape[0], shape[1], config.vocab_size).unwrap();
    let logits = to_vec(&model.forward(&tokens).unwrap().to_data());
    let (_, expected) = io_f32("logits");
    let diff = max_abs_diff(&logits, &expected);
    println!("gathered CSA: logits max |diff| {diff:e}");
    assert!(diff <= 2e-5, "gathered CSA: logits max |diff| {diff} > 2e-5");
}

on_both_backends!(
    full_forward_matches_hf_logits_and_streams,
    gathered_and_dense_csa_paths_agree_with_hf
);
