//! The Generator's incremental decoding reproduces HF's decode logits (v4-tiny-a's `decode_logits`), with
//! any prefill chunking, and batches of sequences of different lengths (fed chunks of different lengths)
//! give each sequence's own result.

#[macro_use]
#[path = "../../tests/support/backends.rs"]
mod backends;

#[path = "../../tests/support/tiny_a.rs"]
mod common;

use burn::tensor::backend::Backend;
use common::{fixture_on, max_abs_diff, SEQ, VOCAB};
use v4_infer::{Batch, Generator};

/// Feeds sequence `row` to a one-sequence batch, `len` tokens per call from `from`, and returns each
/// call's logits (of the last position, or of all positions).
fn feed_calls<B: Backend>(
    gen: &Generator<'_, B>,
    batch: &mut Batch<B>,
    row: &[u32],
    calls: &[usize],
    all: bool,
) -> Vec<f32> {
    let mut out = Vec::new();
    let mut t = batch.position(0);
    for &len in calls {
        out.extend(
            gen.feed_batch(batch, &[&row[t..t + len]], None, all)
                .unwrap()
                .remove(0),
        );
        t += len;
    }
    out
}

fn prefill_45_then_one_token_per_call_matches_hf_decode_logits<B: Backend>() {
    let f = fixture_on::<B>();
    let gen = Generator::new(&f.model);
    for b in 0..2 {
        let row = f.row(b);
        let (mut batch, _) = gen.prefill_batch(&[&row[..45]], None).unwrap();
        let decoded = feed_calls(&gen, &mut batch, row, &[1; 35], false);
        assert_eq!(batch.position(0), SEQ);
        let expected = &f.decode_logits[b * 35 * VOCAB..(b + 1) * 35 * VOCAB];
        let d = max_abs_diff(&decoded, expected);
        assert!(d <= 2e-5, "sequence {b}: decode logits differ from HF by {d}");
    }
}

fn prefill_in_chunks_of_seven_then_decode_matches_hf<B: Backend>() {
    let f = fixture_on::<B>();
    let gen = Generator::new(&f.model);
    for b in 0..2 {
        let row = f.row(b);
        let (mut batch, last) = gen.prefill_batch(&[&row[..45]], Some(7)).unwrap();
        // The prefill's last logits are position 44's, which HF's full forward gives too.
        let full44 = &f.logits[(b * SEQ + 44) * VOCAB..][..VOCAB];
        assert!(max_abs_diff(&last[0], full44) <= 2e-5);
        let decoded = feed_calls(&gen, &mut batch, row, &[1; 35], false);
        let expected = &f.decode_logits[b * 35 * VOCAB..(b + 1) * 35 * VOCAB];
        let d = max_abs_diff(&decoded, expected);
        assert!(
            d <= 2e-5,
            "sequence {b}: chunked prefill then decode differs from HF by {d}"
        );
    }
}

fn decode_chunks_of_any_size_give_the_full_forward_logits<B: Backend>() {
    let f = fixture_on::<B>();
    let gen = Generator::new(&f.model);
    let row = f.row(1);
    let mut batch = gen.new_batch(1);
    let all = feed_calls(&gen, &mut batch, row, &[5, 1, 3, 16, 2, 1, 20, 32], true);
    assert_eq!(batch.position(0), SEQ);
    let d = max_abs_diff(&all, &f.logits[SEQ * VOCAB..2 * SEQ * VOCAB]);
    assert!(d <= 2e-5, "chunked decode differs from HF's full forward by {d}");
}

/// Three sequences of different lengths in one batch, fed chunks of different lengths per call (one
/// sitting out a call), give each sequence's result alone, and HF's decode logits where HF has them.
fn batch_of_sequences_with_different_lengths_equals_each_alone<B: Backend>() {
    let f = fixture_on::<B>();
    let gen = Generator::new(&f.model);
    let a = f.row(0);
    let b = f.row(1);
    let prompts: Vec<&[u32]> = vec![&a[..45], &b[..38], &b[..45]];
    let (mut batch, first) = gen.prefill_batch(&prompts, Some(16)).unwrap();
    let mut got: Vec<Vec<f32>> = first;
    // Per call: (tokens for a, for b[..38], for b[..45]).
    let plan = [(1, 1, 1), (1, 2, 1), (1, 0, 1), (1, 3, 1), (1, 1, 1)];
    let mut pos = [45, 38, 45];
    let rows = [&a, &b, &b];
    for lens in plan {
        let lens = [lens.0, lens.1, lens.2];
        let chunks: Vec<&[u32]> = (0..3).map(|i| &rows[i][pos[i]..pos[i] + lens[i]]).collect();
        for (i, l) in gen
            .feed_batch(&mut batch, &chunks, None, true)
            .unwrap()
            .into_iter()
            .enumerate()
        {
            assert_eq!(l.len(), lens[i] * VOCAB);
            got[i].extend(l);
            pos[i] += lens[i];
        }
    }
    assert_eq!(
        (batch.position(0), batch.position(1), batch.position(2)),
        (50, 45, 50)
    );
    // Each alone: a one-sequence prefill, then one token per call.
    for (i, (row, len)) in [(&a, 45), (&b, 38), (&b, 45)].into_iter().enumerate() {
        let (mut single, last) = gen.prefill_batch(&[&row[..len]], None).unwrap();
        let mut alone = last.into_iter().next().unwrap();
        alone.extend(feed_calls(&gen, &mut single, row, &vec![1; pos[i] - len], false));
        let d = max_abs_diff(&got[i], &alone);
        assert!(
            d <= 2e-5,
            "sequence {i} in the batch differs from running alone by {d}"
        );
    }
    // And against HF: sequence 0's decode steps are decode_logits[0, 0..5], sequence 2's are [1, 0..5].
    let hf0 = &f.decode_logits[..5 * VOCAB];
    let hf2 = &f.decode_logits[35 * VOCAB..40 * VOCAB];
    assert!(max_abs_diff(&got[0][VOCAB..], hf0) <= 2e-5);
    assert!(max_abs_diff(&got[2][VOCAB..], hf2) <= 2e-5);
}

fn feed_batch_checks_the_number_of_chunks_and_the_context<B: Backend>() {
    let f = fixture_on::<B>();
    let gen = Generator::<B>::new(&f.model);
    let a = f.row(0);
    let (mut batch, _) = gen.prefill_batch(&[&a[..10], &a[..12]], None).unwrap();
    let err = gen
        .feed_batch(&mut batch, &[&a[10..12]], None, false)
        .expect_err("one chunk for two sequences");
    assert!(err.to_string().contains("1 chunks for 2 sequences"), "{err}");
    let long = vec![1u32; f.model.config.max_position_embeddings];
    let err = gen
        .feed_batch(&mut batch, &[&a[10..11], &long], None, false)
        .expect_err("beyond the context");
    assert!(err.to_string().contains("max"), "{err}");
    assert_eq!((batch.position(0), batch.position(1)), (10, 12));
}

on_both_backends!(
    prefill_45_then_one_token_per_call_matches_hf_decode_logits,
    prefill_in_chunks_of_seven_then_decode_matches_hf,
    decode_chunks_of_any_size_give_the_full_forward_logits,
    batch_of_sequences_with_different_lengths_equals_each_alone,
    feed_batch_checks_the_number_of_chunks_and_the_context
);
