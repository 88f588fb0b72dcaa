//! Generation: greedy decoding equals the argmax of an independent full forward over prompt + generated
//! tokens, is deterministic; seeded sampling is reproducible; stop ids, max tokens and errors behave.

#[path = "../../tests/support/tiny_a.rs"]
mod common;

use common::{argmax, fixture, SEQ, VOCAB};
use v4_infer::{FinishReason, Flow, GenerateParams, Generator, InferError, SamplingParams};
use v4_model::Tokens;

fn greedy(max_tokens: usize) -> GenerateParams {
    GenerateParams {
        max_tokens,
        ..GenerateParams::default()
    }
}

/// Checks `generated` against the model's full (cache-less) forward over prompt + generated: each token
/// must be the argmax of the logits before it.
fn check_against_full_forward(f: &common::Fixture, prompt: &[u32], generated: &[u32]) {
    let all: Vec<i64> = prompt.iter().chain(generated).map(|&t| t as i64).collect();
    let tokens = Tokens::new(&all, 1, all.len(), VOCAB).unwrap();
    let logits = f
        .model
        .forward(&tokens)
        .unwrap()
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    for (j, &id) in generated.iter().enumerate() {
        let pos = prompt.len() + j - 1;
        let row = &logits[pos * VOCAB..(pos + 1) * VOCAB];
        let best = argmax(row);
        // Allow a near-tie (the cache and the full pass differ by ~1e-5).
        let margin = row[best as usize] - row[id as usize];
        assert!(
            id == best || margin < 1e-4,
            "token {j}: generated {id}, the full forward's argmax is {best} (margin {margin})"
        );
    }
}

#[test]
fn greedy_generation_equals_argmax_of_full_forward_and_is_deterministic() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    for (prompt, chunk) in [(&f.row(0)[..30], None), (&f.row(1)[..13], Some(5))] {
        let params = GenerateParams {
            prefill_chunk: chunk,
            ..greedy(24)
        };
        let mut streamed = Vec::new();
        let (out, timings) = gen
            .generate(prompt, &params, |id| {
                streamed.push(id);
                Flow::Continue
            })
            .unwrap();
        assert_eq!(out.ids.len(), 24);
        assert_eq!(out.finish, FinishReason::Length);
        assert_eq!(streamed, out.ids);
        assert_eq!(timings.prompt_tokens, prompt.len());
        assert_eq!(timings.decode_tokens, 23);
        check_against_full_forward(&f, prompt, &out.ids);
        let (again, _) = gen.generate(prompt, &params, |_| Flow::Continue).unwrap();
        assert_eq!(again.ids, out.ids, "greedy generation is not deterministic");
    }
}

#[test]
fn short_prompts_shorter_than_a_compression_window_decode_correctly() {
    // Prompts of 1..=3 tokens: the CSA compressors (m = 4) complete their first window during decoding.
    let f = fixture();
    let gen = Generator::new(&f.model);
    for len in [1, 3] {
        let prompt = &f.row(0)[..len];
        let (out, _) = gen.generate(prompt, &greedy(40), |_| Flow::Continue).unwrap();
        check_against_full_forward(&f, prompt, &out.ids);
    }
}

#[test]
fn batch_generation_equals_single_generation() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    let a = &f.row(0)[..20];
    let b = &f.row(1)[..33];
    let c = &f.row(1)[40..60];
    let params = GenerateParams {
        sampling: SamplingParams {
            temperature: 0.8,
            top_k: 50,
            top_p: 0.95,
            seed: 11,
            ..SamplingParams::greedy()
        },
        ..greedy(12)
    };
    let (batch, _) = gen
        .generate_batch(&[a, b, c], &params, |_, _| Flow::Continue)
        .unwrap();
    for (i, p) in [a, b, c].into_iter().enumerate() {
        let single = GenerateParams {
            sampling: SamplingParams {
                seed: 11 + i as u64,
                ..params.sampling.clone()
            },
            ..params.clone()
        };
        let (alone, _) = gen.generate(p, &single, |_| Flow::Continue).unwrap();
        assert_eq!(batch[i].ids, alone.ids, "sequence {i}");
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seeds_differ() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    let prompt = &f.row(1)[..20];
    let sample = |seed: u64| {
        let params = GenerateParams {
            sampling: SamplingParams {
                temperature: 1.0,
                top_p: 0.98,
                repetition_penalty: 1.1,
                seed,
                ..SamplingParams::greedy()
            },
            ..greedy(20)
        };
        gen.generate(prompt, &params, |_| Flow::Continue).unwrap().0.ids
    };
    let a = sample(1);
    assert_eq!(a, sample(1), "the same seed gave different tokens");
    assert_ne!(a, sample(2), "different seeds gave the same 20 tokens");
    let greedy_ids = gen
        .generate(prompt, &greedy(20), |_| Flow::Continue)
        .unwrap()
        .0
        .ids;
    assert_ne!(a, greedy_ids, "sampling at temperature 1 equals greedy");
}

#[test]
fn stops_on_stop_ids_and_on_the_callback() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    let prompt = &f.row(0)[..30];
    let (free, _) = gen.generate(prompt, &greedy(10), |_| Flow::Continue).unwrap();
    // Make the 4th greedy token a stop id: generation ends with it.
    let params = GenerateParams {
        stop_ids: vec![free.ids[3]],
        ..greedy(10)
    };
    let (stopped, _) = gen.generate(prompt, &params, |_| Flow::Continue).unwrap();
    let first = free.ids.iter().position(|&t| t == free.ids[3]).unwrap();
    assert_eq!(stopped.ids, free.ids[..=first]);
    assert_eq!(stopped.finish, FinishReason::Eos);
    let mut n = 0;
    let (cut, _) = gen
        .generate(prompt, &greedy(10), |_| {
            n += 1;
            if n == 2 {
                Flow::Stop
            } else {
                Flow::Continue
            }
        })
        .unwrap();
    assert_eq!(cut.ids, free.ids[..2]);
    assert_eq!(cut.finish, FinishReason::Stop);
}

#[test]
fn generation_stops_at_the_maximum_context() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    let max = f.model.config.max_position_embeddings; // 4096
    let prompt: Vec<u32> = f.ids.iter().cycle().take(max - 2).copied().collect();
    let params = GenerateParams {
        prefill_chunk: Some(1024),
        ..greedy(10)
    };
    let (out, _) = gen.generate(&prompt, &params, |_| Flow::Continue).unwrap();
    // Positions max-2 and max-1 can still be fed: 3 tokens in all, then the context is full.
    assert_eq!(out.ids.len(), 3);
    assert_eq!(out.finish, FinishReason::Context);
}

#[test]
fn bad_prompts_are_clear_errors() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    let run = |p: &[u32]| gen.generate(p, &greedy(2), |_| Flow::Continue).err().unwrap();
    assert_eq!(run(&[]), InferError::EmptyPrompt);
    assert_eq!(
        run(&[5, 1024]),
        InferError::OutOfVocabulary {
            id: 1024,
            vocab: VOCAB
        }
    );
    let long = vec![3u32; 4097];
    assert_eq!(
        run(&long),
        InferError::PromptTooLong {
            tokens: 4097,
            max: 4096
        }
    );
    assert!(run(&[]).to_string().contains("empty"));
    assert!(run(&long).to_string().contains("4096"));
    let _ = SEQ;
}
