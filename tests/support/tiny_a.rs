//! The v4-tiny-a fixture (HF transformers' weights and outputs), shared by the model's and infer's tests
//! (`#[path]`-included by crates one level below the workspace root).
#![allow(dead_code)]

use burn::tensor::backend::Backend;
use burn_ndarray::NdArray;
use safetensors::SafeTensors;
use std::path::PathBuf;
use v4_checkpoint::read_config;
use v4_model::V4Model;

pub type B = NdArray<f32>;
pub const VOCAB: usize = 1024;
pub const SEQ: usize = 80;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub struct Fixture<M: Backend = B> {
    pub model: V4Model<M>,
    /// `[2, 80]`
    pub ids: Vec<u32>,
    /// The same ids as [`v4_model::Tokens`] takes them.
    pub input_ids: Vec<i64>,
    /// `[2, 35, 1024]`: HF's logits of positions 45..79 from its own cache (prefill 45, then 1 per call).
    pub decode_logits: Vec<f32>,
    /// `[2, 80, 1024]`: HF's full forward.
    pub logits: Vec<f32>,
}

impl<M: Backend> Fixture<M> {
    pub fn row(&self, b: usize) -> &[u32] {
        &self.ids[b * SEQ..(b + 1) * SEQ]
    }
}

fn f32s(io: &SafeTensors, name: &str) -> Vec<f32> {
    io.tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The fixture on plain burn-ndarray.
pub fn fixture() -> Fixture {
    fixture_on::<B>()
}

/// The fixture with its model on backend `M`.
pub fn fixture_on<M: Backend>() -> Fixture<M> {
    let dir = root().join("tests/fixtures/v4-tiny-a");
    let config = read_config(&dir.join("hf")).unwrap();
    let model = V4Model::load(
        &config,
        &*v4_checkpoint::open(&dir.join("hf")).unwrap(),
        &Default::default(),
    )
    .unwrap();
    let bytes = std::fs::read(dir.join("io.safetensors")).unwrap();
    let io = SafeTensors::deserialize(&bytes).unwrap();
    let input_ids: Vec<i64> = io
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Fixture {
        model,
        ids: input_ids.iter().map(|&i| i as u32).collect(),
        input_ids,
        decode_logits: f32s(&io, "decode_logits"),
        logits: f32s(&io, "logits"),
    }
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared slices differ in length");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Argmax, lowest index on ties (independent of the crate's own).
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for i in 1..row.len() {
        if row[i] > row[best] {
            best = i;
        }
    }
    best as u32
}
