//! Incremental decoding with the cache reproduces the fixture's `decode_logits` (HF's prefill of 45
//! tokens, then one token per call), and any chunking of the same tokens gives the same logits.

#[macro_use]
#[path = "../../tests/support/backends.rs"]
mod backends;
#[path = "../../tests/support/tiny_a.rs"]
mod common;

use burn::tensor::backend::Backend;
use common::max_abs_diff;
use v4_model::{LogitsFor, ModelCache, PaddedTokens, Padding, Pass, SequenceCaches, Tokens};

/// Runs sequence `b` of the fixture through the cache in chunks of the given sizes; returns the logits of
/// every position, `[80 * vocab]`.
fn run_chunks<B: Backend>(f: &common::Fixture<B>, b: usize, chunks: &[usize]) -> Vec<f32> {
    let mut cache = ModelCache::<B>::new(f.model.layers.len());
    let mut out = Vec::new();
    let mut start = 0;
    for &len in chunks {
        let ids = &f.input_ids[b * 80 + start..b * 80 + start + len];
        let tokens = Tokens::new(ids, 1, len, 1024).unwrap();
        let logits = f
            .model
            .forward_with(&tokens, &mut cache, Pass::new())
            .unwrap()
            .logits;
        out.extend(logits.into_data().into_vec::<f32>().unwrap());
        start += len;
    }
    assert_eq!(start, 80);
    out
}

fn prefill_then_single_token_decode_matches_hf<B: Backend>() {
    let f = common::fixture_on::<B>();
    let vocab = 1024;
    let mut chunks = vec![45];
    chunks.extend(std::iter::repeat_n(1, 35));
    for b in 0..2 {
        let logits = run_chunks(&f, b, &chunks);
        let decoded = &logits[45 * vocab..];
        let expected = &f.decode_logits[b * 35 * vocab..][..35 * vocab];
        let d = max_abs_diff(decoded, expected);
        println!("sequence {b}: decode logits max |diff| from HF {d:.2e}");
        assert!(d <= 2e-5, "sequence {b}: decode logits differ by {d}");
    }
}

fn chunks_of_seven_give_the_same_logits_as_one_pass<B: Backend>() {
    let f = common::fixture_on::<B>();
    let whole = run_chunks(&f, 1, &[80]);
    let mut chunks = vec![7; 11];
    chunks.push(3);
    let chunked = run_chunks(&f, 1, &chunks);
    let d = max_abs_diff(&whole, &chunked);
    assert!(d <= 2e-5, "chunked prefill differs by {d}");
}

fn decoding_from_a_prompt_shorter_than_a_window_matches_one_pass<B: Backend>() {
    // Two tokens, then one per call: the indexer's compressor must see the tokens of calls that end
    // before the first complete window (a regression found by the inference runner).
    let f = common::fixture_on::<B>();
    let whole = run_chunks(&f, 0, &[80]);
    let mut chunks = vec![2];
    chunks.extend(std::iter::repeat_n(1, 78));
    let stepped = run_chunks(&f, 0, &chunks);
    let d = max_abs_diff(&whole, &stepped);
    assert!(d <= 2e-5, "short-prompt decode differs by {d}");
}

/// `LogitsFor::Last` (what generation uses) gives the last row of a full forward, and leaves the
/// cache in the same state: the next decode step matches HF's `decode_logits`.
fn last_position_logits_equal_the_full_forwards_last_row<B: Backend>() {
    let f = common::fixture_on::<B>();
    let vocab = 1024;
    let ids = &f.input_ids[..45];
    let tokens = Tokens::new(ids, 1, 45, vocab).unwrap();
    let mut full_cache = ModelCache::<B>::new(f.model.layers.len());
    let full = f
        .model
        .forward_with(&tokens, &mut full_cache, Pass::new())
        .unwrap()
        .logits;
    let mut cache = ModelCache::<B>::new(f.model.layers.len());
    let last = f
        .model
        .forward_with(&tokens, &mut cache, Pass::new().logits(LogitsFor::Last))
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

    let next = Tokens::new(&f.input_ids[45..46], 1, 1, vocab).unwrap();
    let step = f
        .model
        .forward_with(&next, &mut cache, Pass::new().logits(LogitsFor::Last))
        .unwrap()
        .logits
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    let d = max_abs_diff(&step, &f.decode_logits[..vocab]);
    assert!(
        d <= 2e-5,
        "decode after a last-only prefill differs from HF by {d}"
    );
}

/// Logits of `ids` (one sequence) in one full forward: `[len * vocab]`.
fn alone<B: Backend>(f: &common::Fixture<B>, ids: &[i64]) -> Vec<f32> {
    let tokens = Tokens::new(ids, 1, ids.len(), 1024).unwrap();
    f.model
        .forward(&tokens)
        .unwrap()
        .into_data()
        .into_vec::<f32>()
        .unwrap()
}

/// A padded batch (either side) gives each row the logits of that row run alone, zeros at the padding;
/// the rows then decode at their own positions, in one packed call per step, one of them matching HF's
/// `decode_logits`; a row of padding only does not advance.
fn padded_batches_give_each_sequence_its_own_logits<B: Backend>() {
    let f = common::fixture_on::<B>();
    let vocab = 1024;
    let (a, b) = (&f.input_ids[..80], &f.input_ids[80..160]);
    let expect_a = alone(&f, a);
    let expect_b = alone(&f, &b[..75]);
    for side in [Padding::Right, Padding::Left] {
        let rows: Vec<Vec<u32>> = [&a[..45], &b[..30]]
            .iter()
            .map(|r| r.iter().map(|&t| t as u32).collect())
            .collect();
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let tokens = PaddedTokens::pad(&refs, side, 1023);
        let mut caches = SequenceCaches::<B>::new(f.model.layers.len(), 2);
        let logits = f
            .model
            .forward_padded(&tokens, &mut caches, Pass::new())
            .unwrap()
            .logits;
        assert_eq!(logits.dims(), [2, 45, vocab]);
        let logits = logits.into_data().into_vec::<f32>().unwrap();
        let shift = if side == Padding::Left { 15 } else { 0 };
        let row_b = &logits[45 * vocab..];
        let d = max_abs_diff(&logits[..45 * vocab], &expect_a[..45 * vocab]).max(max_abs_diff(
            &row_b[shift * vocab..][..30 * vocab],
            &expect_b[..30 * vocab],
        ));
        assert!(
            d <= 1e-5,
            "{side:?} padding: prefill logits differ from single runs by {d}"
        );
        // The exact, independent answer: HF's logits of the two sequences (causal, so a prefix's logits
        // are the full sequence's first rows).
        let hf_a = &f.logits[..45 * vocab];
        let hf_b = &f.logits[80 * vocab..][..30 * vocab];
        let d = max_abs_diff(&logits[..45 * vocab], hf_a)
            .max(max_abs_diff(&row_b[shift * vocab..][..30 * vocab], hf_b));
        println!("{side:?} padding: max |diff| from HF {d:.2e}");
        assert!(
            d <= 2e-5,
            "{side:?} padding: prefill logits differ from HF's by {d}"
        );
        let pad_cols = if side == Padding::Left { 0..15 } else { 30..45 };
        assert!(row_b[pad_cols.start * vocab..pad_cols.end * vocab]
            .iter()
            .all(|&x| x == 0.0));
        assert_eq!((caches.position(0), caches.position(1)), (45, 30));

        // One token per row and call, rows at positions 45+t and 30+t; on the 6th step row 1 sits out.
        let (mut pa, mut pb) = (45, 30);
        for step in 0..35 {
            let idle = step == 5;
            let ids = [a[pa], if idle { -1 } else { b[pb] }];
            let mask = [1, if idle { 0 } else { 1 }];
            let tokens = PaddedTokens::from_mask(&ids, &mask, 2, 1, vocab).unwrap();
            let out = f
                .model
                .forward_padded(&tokens, &mut caches, Pass::new().logits(LogitsFor::Last))
                .unwrap()
                .logits
                .into_data()
                .into_vec::<f32>()
                .unwrap();
            let d = max_abs_diff(&out[..vocab], &f.decode_logits[step * vocab..][..vocab]);
            assert!(
                d <= 2e-5,
                "{side:?}, step {step}: row 0 differs from HF's decode by {d}"
            );
            if idle {
                assert!(out[vocab..].iter().all(|&x| x == 0.0));
            } else {
                let d = max_abs_diff(&out[vocab..], &expect_b[pb * vocab..][..vocab]);
                assert!(
                    d <= 2e-5,
                    "{side:?}, step {step}: row 1 differs from its single run by {d}"
                );
                pb += 1;
            }
            pa += 1;
            assert_eq!((caches.position(0), caches.position(1)), (pa, pb));
        }
    }
}

fn bad_masks_and_mismatched_states_are_refused<B: Backend>() {
    let f = common::fixture_on::<B>();
    let vocab = 1024;
    let gap = PaddedTokens::from_mask(&[1, 2, 3], &[1, 0, 1], 1, 3, vocab).unwrap_err();
    assert!(gap.to_string().contains("contiguous"), "{gap}");
    let value = PaddedTokens::from_mask(&[1, 2], &[1, 2], 1, 2, vocab).unwrap_err();
    assert!(value.to_string().contains("value 2"), "{value}");
    let oov = PaddedTokens::from_mask(&[5000, 2], &[1, 1], 1, 2, vocab).unwrap_err();
    assert!(oov.to_string().contains("5000"), "{oov}");
    // Out-of-vocabulary ids under padding are ignored.
    let ok = PaddedTokens::from_mask(&[-1, 7, 8], &[0, 1, 1], 1, 3, vocab).unwrap();
    assert_eq!(ok.spans().len(), 1);
    assert_eq!((ok.spans()[0].clone(), ok.mask()), (1..3, vec![0, 1, 1]));

    let mut caches = SequenceCaches::<B>::new(f.model.layers.len(), 2);
    let padding = PaddedTokens::from_mask(&[1, 2], &[0, 0], 2, 1, vocab).unwrap();
    let run = |t: &PaddedTokens, c: &mut SequenceCaches<B>| {
        f.model
            .forward_padded(t, c, Pass::new().logits(LogitsFor::Last))
            .unwrap_err()
            .to_string()
    };
    assert!(run(&padding, &mut caches).contains("padding"));
    let three = PaddedTokens::pad(&[&[1], &[2], &[3]], Padding::Right, 0);
    assert!(run(&three, &mut caches).contains("3 rows"));
    assert_eq!((caches.position(0), caches.position(1)), (0, 0));
}

/// Speculative steps that feed tokens which are then taken back ([`ModelCache::speculate`] and
/// [`V4Model::rewind`]) leave exactly the state of never having fed them: decoding goes on to reproduce
/// HF's logits. The rejected tokens are wrong ones (another sequence's) and cross compression boundaries
/// (CSA every 4, HCA every 16 positions) and the window, so every part of the state is rolled back.
fn rewound_speculation_leaves_the_state_of_the_kept_tokens<B: Backend>() {
    let f = common::fixture_on::<B>();
    let vocab = 1024;
    let tokens = |ids: &[i64]| Tokens::new(ids, 1, ids.len(), vocab).unwrap();
    let feed = |cache: &mut ModelCache<B>, ids: &[i64]| {
        f.model
            .forward_with(&tokens(ids), cache, Pass::new())
            .unwrap()
            .logits
            .into_data()
            .into_vec::<f32>()
            .unwrap()
    };
    let (own, other) = (&f.input_ids[..80], &f.input_ids[80..]);
    let mut cache = ModelCache::<B>::new(f.model.layers.len());
    feed(&mut cache, &own[..45]);
    let mut position = 45;
    // (kept, fed): keep the first `kept` of `fed` tokens, the rest being another sequence's.
    for (kept, fed) in [(2, 6), (0, 3), (1, 17), (3, 3), (1, 2)] {
        let mut chunk = own[position..position + kept].to_vec();
        chunk.extend_from_slice(&other[position + kept..position + fed]);
        cache.speculate();
        feed(&mut cache, &chunk[..fed / 2]);
        feed(&mut cache, &chunk[fed / 2..]);
        assert_eq!(cache.position(), position + fed);
        f.model.rewind(&mut cache, kept);
        assert_eq!(cache.position(), position + kept);
        position += kept;
    }
    let rest = feed(&mut cache, &own[position..]);
    let expected = &f.logits[position * vocab..80 * vocab];
    let d = max_abs_diff(&rest, expected);
    println!("after rewinds, logits of positions {position}..80: max |diff| from HF {d:.2e}");
    assert!(d <= 2e-5, "logits after rewinding differ by {d}");
}

on_both_backends!(
    rewound_speculation_leaves_the_state_of_the_kept_tokens,
    prefill_then_single_token_decode_matches_hf,
    chunks_of_seven_give_the_same_logits_as_one_pass,
    decoding_from_a_prompt_shorter_than_a_window_matches_one_pass,
    last_position_logits_equal_the_full_forwards_last_row,
    padded_batches_give_each_sequence_its_own_logits,
    bad_masks_and_mismatched_states_are_refused
);
