//! Incremental decoding with the cache reproduces the fixture's `decode_logits` (HF's prefill of 45
//! tokens, then one token per call), and any chunking of the same tokens gives the same logits.

use burn_ndarray::NdArray;
use safetensors::SafeTensors;
use std::path::PathBuf;
use v4_model::{read_config, LocalExperts, LogitsFor, ModelCache, NoProbe, SafetensorsDir, Tokens, V4Model};

type B = NdArray<f32>;

struct Fixture {
    model: V4Model<B>,
    ids: Vec<i64>,
    decode_logits: Vec<f32>,
}

fn fixture() -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v4-tiny-a");
    let config = read_config(&dir.join("hf")).unwrap();
    let model = V4Model::load(
        &config,
        &SafetensorsDir::open(&dir.join("hf")).unwrap(),
        &Default::default(),
    )
    .unwrap();
    let bytes = std::fs::read(dir.join("io.safetensors")).unwrap();
    let io = SafeTensors::deserialize(&bytes).unwrap();
    let ids = io
        .tensor("input_ids")
        .unwrap()
        .data()
        .chunks_exact(8)
        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let decode_logits = io
        .tensor("decode_logits")
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Fixture {
        model,
        ids,
        decode_logits,
    }
}

/// Runs sequence `b` of the fixture through the cache in chunks of the given sizes; returns the logits of
/// every position, `[80 * vocab]`.
fn run_chunks(f: &Fixture, b: usize, chunks: &[usize]) -> Vec<f32> {
    let mut cache = ModelCache::<B>::new(f.model.layers.len());
    let mut out = Vec::new();
    let mut start = 0;
    for &len in chunks {
        let ids = &f.ids[b * 80 + start..b * 80 + start + len];
        let tokens = Tokens::new(ids, 1, len, 1024).unwrap();
        let logits = f
            .model
            .forward_with(&tokens, &mut cache, &LocalExperts, &mut NoProbe)
            .unwrap()
            .logits;
        out.extend(logits.into_data().into_vec::<f32>().unwrap());
        start += len;
    }
    assert_eq!(start, 80);
    out
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn prefill_then_single_token_decode_matches_hf() {
    let f = fixture();
    let vocab = 1024;
    let mut chunks = vec![45];
    chunks.extend(std::iter::repeat_n(1, 35));
    for b in 0..2 {
        let logits = run_chunks(&f, b, &chunks);
        let decoded = &logits[45 * vocab..];
        let expected = &f.decode_logits[b * 35 * vocab..][..35 * vocab];
        let d = max_abs_diff(decoded, expected);
        assert!(d <= 1e-4, "sequence {b}: decode logits differ by {d}");
    }
}

#[test]
fn chunks_of_seven_give_the_same_logits_as_one_pass() {
    let f = fixture();
    let whole = run_chunks(&f, 1, &[80]);
    let mut chunks = vec![7; 11];
    chunks.push(3);
    let chunked = run_chunks(&f, 1, &chunks);
    let d = max_abs_diff(&whole, &chunked);
    assert!(d <= 1e-4, "chunked prefill differs by {d}");
}

#[test]
fn decoding_from_a_prompt_shorter_than_a_window_matches_one_pass() {
    // Two tokens, then one per call: the indexer's compressor must see the tokens of calls that end
    // before the first complete window (a regression found by the inference runner).
    let f = fixture();
    let whole = run_chunks(&f, 0, &[80]);
    let mut chunks = vec![2];
    chunks.extend(std::iter::repeat_n(1, 78));
    let stepped = run_chunks(&f, 0, &chunks);
    let d = max_abs_diff(&whole, &stepped);
    assert!(d <= 1e-4, "short-prompt decode differs by {d}");
}

/// `LogitsFor::Last` (what generation uses) gives the last row of a full forward, and leaves the
/// cache in the same state: the next decode step matches HF's `decode_logits`.
#[test]
fn last_position_logits_equal_the_full_forwards_last_row() {
    let f = fixture();
    let vocab = 1024;
    let ids = &f.ids[..45];
    let tokens = Tokens::new(ids, 1, 45, vocab).unwrap();
    let mut full_cache = ModelCache::<B>::new(f.model.layers.len());
    let full = f
        .model
        .forward_with(&tokens, &mut full_cache, &LocalExperts, &mut NoProbe)
        .unwrap()
        .logits;
    let mut cache = ModelCache::<B>::new(f.model.layers.len());
    let last = f
        .model
        .forward_logits_for(&tokens, &mut cache, &LocalExperts, &mut NoProbe, LogitsFor::Last)
        .unwrap()
        .logits;
    assert_eq!(last.dims(), [1, 1, vocab]);
    let full_last = full.narrow(1, 44, 1).into_data().into_vec::<f32>().unwrap();
    // Equal up to the summation order of a 1-row against a 45-row product.
    let d = max_abs_diff(&last.into_data().into_vec::<f32>().unwrap(), &full_last);
    assert!(
        d <= 1e-5,
        "last-only logits differ from the full forward's last row by {d}"
    );

    let next = Tokens::new(&f.ids[45..46], 1, 1, vocab).unwrap();
    let step = f
        .model
        .forward_logits_for(&next, &mut cache, &LocalExperts, &mut NoProbe, LogitsFor::Last)
        .unwrap()
        .logits
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    let d = max_abs_diff(&step, &f.decode_logits[..vocab]);
    assert!(
        d <= 1e-4,
        "decode after a last-only prefill differs from HF by {d}"
    );
}
