//! Speculative decoding with the MTP layer: its greedy output is plain greedy decoding's, for one prompt
//! and for a batch of three of different lengths, with one and with two drafts per step, and when every
//! draft is rejected (each step then rolls the state back). On `v4-tiny-mtp` (DeepSeek's own random
//! weights, release layout) no draft is ever accepted; on `v4-shakespeare-mtp` (trained with
//! `configs/shakespeare-mtp.toml`) most are, and the rows of a batch accept different numbers.

#[macro_use]
#[path = "../../tests/support/backends.rs"]
mod backends;

use burn::tensor::backend::Backend;
use std::path::PathBuf;
use v4_checkpoint::read_config;
use v4_infer::{Flow, GenerateParams, Generation, Generator, SpeculativeParams};
use v4_model::V4Model;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn trained<B: Backend>() -> V4Model<B> {
    let dir = fixtures().join("v4-shakespeare-mtp");
    let config = read_config(&dir).unwrap();
    let model = V4Model::load(&config, &*v4_checkpoint::open(&dir).unwrap(), &Default::default()).unwrap();
    assert_eq!(model.mtp.len(), 1, "the trained model has one MTP layer");
    model
}

/// Three held-out Shakespeare prompts (Twelfth Night, bytes) of different lengths.
fn held_out_prompts() -> Vec<Vec<u32>> {
    let text = std::fs::read_to_string(fixtures().join("data/shakespeare/valid.jsonl")).unwrap();
    let scene: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    let bytes = scene["text"].as_str().unwrap().as_bytes();
    [(0, 61), (400, 127), (900, 90)]
        .iter()
        .map(|&(at, len)| bytes[at..at + len].iter().map(|&b| b as u32).collect())
        .collect()
}

fn model<B: Backend>() -> V4Model<B> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v4-tiny-mtp/native");
    let config = read_config(&dir).unwrap();
    let source = v4_checkpoint::open(&dir).unwrap();
    let model = V4Model::load(&config, source.as_ref(), &Default::default()).unwrap();
    assert_eq!(model.mtp.len(), 1, "the fixture has one MTP layer");
    model
}

/// Three prompts of different lengths (ids from a fixed LCG; any ids work on random weights).
fn prompts() -> Vec<Vec<u32>> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    [5usize, 23, 12]
        .iter()
        .map(|&len| {
            (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % 1024) as u32
                })
                .collect()
        })
        .collect()
}

fn params() -> GenerateParams {
    GenerateParams {
        max_tokens: 40,
        ..GenerateParams::default()
    }
}

fn plain<B: Backend>(model: &V4Model<B>, prompts: &[&[u32]]) -> Vec<Generation> {
    Generator::new(model)
        .generate_batch(prompts, &params(), |_, _| Flow::Continue)
        .unwrap()
        .0
}

fn speculative_greedy_equals_plain_greedy<B: Backend>() {
    lossless(&model::<B>(), &prompts(), false);
}

fn speculation_on_the_trained_model_is_lossless_and_accepts_drafts<B: Backend>() {
    lossless(&trained::<B>(), &held_out_prompts(), true);
}

/// Speculative greedy output equals plain greedy output on `model` for 1 and 3 `prompts`, k = 1 and 2,
/// with and without rejecting every draft; `accepts`: most first drafts stand.
fn lossless<B: Backend>(model: &V4Model<B>, prompts: &[Vec<u32>], accepts: bool) {
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let generator = Generator::new(model);
    for draft_tokens in [1, 2] {
        for reject_all in [false, true] {
            let spec = SpeculativeParams {
                draft_tokens,
                reject_all,
            };
            for prompts in [&refs[1..2], &refs[..]] {
                let expected = plain(model, prompts);
                let mut streamed = vec![Vec::new(); prompts.len()];
                let (got, timings, acceptance) = generator
                    .generate_speculative(prompts, &params(), spec, |i, id| {
                        streamed[i].push(id);
                        Flow::Continue
                    })
                    .unwrap();
                assert_eq!(got, expected, "{spec:?}, {} prompts", prompts.len());
                for (g, s) in got.iter().zip(&streamed) {
                    assert_eq!(&g.ids, s, "the callback saw every token once, in order");
                }
                assert_eq!(timings.generated_tokens, 40 * prompts.len());
                assert_eq!(acceptance.proposed.len(), draft_tokens);
                let accepted: usize = acceptance.accepted.iter().sum();
                if reject_all {
                    assert_eq!(accepted, 0);
                    // One token per step and sequence: 39 steps after the first token.
                    assert_eq!(acceptance.steps, 39 * prompts.len());
                } else {
                    // Every step yields its accepted drafts plus one.
                    assert_eq!(acceptance.steps + accepted, 39 * prompts.len());
                    if accepts {
                        assert!(
                            acceptance.rate(0) > 0.5,
                            "first drafts accepted: {:?}",
                            acceptance
                        );
                    }
                }
                println!(
                    "{spec:?}, {} prompts: accepted {:?} of {:?} drafts in {} steps",
                    prompts.len(),
                    acceptance.accepted,
                    acceptance.proposed,
                    acceptance.steps
                );
            }
        }
    }
}

/// Stop ids and token budgets end a sequence inside a step's accepted drafts exactly where plain
/// decoding ends it.
fn speculation_stops_where_plain_decoding_stops<B: Backend>() {
    let model = model::<B>();
    let prompts = prompts();
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let unbounded = plain(&model, &refs);
    // A stop id that sequence 0 produces mid-generation, and an odd budget.
    let stop = unbounded[0].ids[7];
    let params = GenerateParams {
        max_tokens: 13,
        stop_ids: vec![stop],
        ..GenerateParams::default()
    };
    let expected = Generator::new(&model)
        .generate_batch(&refs, &params, |_, _| Flow::Continue)
        .unwrap()
        .0;
    let spec = SpeculativeParams {
        draft_tokens: 2,
        reject_all: false,
    };
    let got = Generator::new(&model)
        .generate_speculative(&refs, &params, spec, |_, _| Flow::Continue)
        .unwrap()
        .0;
    assert_eq!(got, expected);
}

fn a_model_without_mtp_is_refused<B: Backend>() {
    let mut model = model::<B>();
    model.mtp.clear();
    let err = Generator::new(&model)
        .generate_speculative(&[&[1, 2, 3]], &params(), SpeculativeParams::default(), |_, _| {
            Flow::Continue
        })
        .unwrap_err();
    assert!(err.to_string().contains("MTP layer"), "{err}");
}

on_both_backends!(
    speculative_greedy_equals_plain_greedy,
    speculation_on_the_trained_model_is_lossless_and_accepts_drafts,
    speculation_stops_where_plain_decoding_stops,
    a_model_without_mtp_is_refused
);
