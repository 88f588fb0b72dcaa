//! The Generator's incremental decoding reproduces HF's decode logits (v4-tiny-a's `decode_logits`), with
//! any prefill chunking, and batches of sequences of different lengths give each sequence's own result.

mod common;

use common::{fixture, max_abs_diff, B, SEQ, VOCAB};
use v4_infer::Generator;

#[test]
fn prefill_45_then_one_token_per_call_matches_hf_decode_logits() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    for b in 0..2 {
        let row = f.row(b);
        let (mut cache, _) = gen.prefill(&[&row[..45]], None).unwrap();
        let mut decoded = Vec::new();
        for t in 45..SEQ {
            let logits = gen.feed(&mut cache, &[&row[t..t + 1]], None, false).unwrap();
            decoded.extend_from_slice(&logits[0]);
        }
        assert_eq!(cache.position(), SEQ);
        let expected = &f.decode_logits[b * 35 * VOCAB..(b + 1) * 35 * VOCAB];
        let d = max_abs_diff(&decoded, expected);
        assert!(d <= 1e-4, "sequence {b}: decode logits differ from HF by {d}");
    }
}

#[test]
fn prefill_in_chunks_of_seven_then_decode_matches_hf() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    for b in 0..2 {
        let row = f.row(b);
        let (mut cache, last) = gen.prefill(&[&row[..45]], Some(7)).unwrap();
        // The prefill's last logits are position 44's, which HF's full forward gives too.
        let full44 = &f.logits[(b * SEQ + 44) * VOCAB..][..VOCAB];
        assert!(max_abs_diff(&last[0], full44) <= 1e-4);
        let mut decoded = Vec::new();
        for t in 45..SEQ {
            decoded.extend(
                gen.feed(&mut cache, &[&row[t..t + 1]], None, false)
                    .unwrap()
                    .remove(0),
            );
        }
        let expected = &f.decode_logits[b * 35 * VOCAB..(b + 1) * 35 * VOCAB];
        let d = max_abs_diff(&decoded, expected);
        assert!(
            d <= 1e-4,
            "sequence {b}: chunked prefill then decode differs from HF by {d}"
        );
    }
}

#[test]
fn decode_chunks_of_any_size_give_the_full_forward_logits() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    let row = f.row(1);
    let mut cache = gen.new_cache();
    let mut all = Vec::new();
    let mut t = 0;
    for len in [5, 1, 3, 16, 2, 1, 20, 32] {
        all.extend(
            gen.feed(&mut cache, &[&row[t..t + len]], None, true)
                .unwrap()
                .remove(0),
        );
        t += len;
    }
    assert_eq!(t, SEQ);
    let d = max_abs_diff(&all, &f.logits[SEQ * VOCAB..2 * SEQ * VOCAB]);
    assert!(d <= 1e-4, "chunked decode differs from HF's full forward by {d}");
}

#[test]
fn batch_of_sequences_with_different_lengths_equals_each_alone() {
    let f = fixture();
    let gen = Generator::new(&f.model);
    // Three sequences: two of length 45 (one cache, batched [2, S] forwards), one of length 38.
    let a = f.row(0);
    let b = f.row(1);
    let prompts: Vec<&[u32]> = vec![&a[..45], &b[..38], &b[..45]];
    let (mut batch, first) = gen.prefill_batch(&prompts, Some(16)).unwrap();
    assert_eq!(batch.num_groups(), 2);
    let mut got: Vec<Vec<f32>> = first;
    for step in 0..10 {
        let chunks: Vec<&[u32]> = vec![
            &a[45 + step..46 + step],
            &b[38 + step..39 + step],
            &b[45 + step..46 + step],
        ];
        for (g, l) in got
            .iter_mut()
            .zip(gen.feed_batch(&mut batch, &chunks, None, false).unwrap())
        {
            g.extend(l);
        }
    }
    assert_eq!((batch.position(0), batch.position(1)), (55, 48));
    // Each alone, with the plain prefill + one token per call.
    for (i, (row, len)) in [(a, 45), (b, 38), (b, 45)].into_iter().enumerate() {
        let (mut cache, last) = gen.prefill(&[&row[..len]], None).unwrap();
        let mut alone = last.into_iter().next().unwrap();
        for t in len..len + 10 {
            alone.extend(
                gen.feed(&mut cache, &[&row[t..t + 1]], None, false)
                    .unwrap()
                    .remove(0),
            );
        }
        let d = max_abs_diff(&got[i], &alone);
        assert!(
            d <= 1e-4,
            "sequence {i} in the batch differs from running alone by {d}"
        );
    }
    // And against HF: sequence 0's decode steps are decode_logits[0, 0..10], sequence 2's are [1, 0..10].
    let hf0 = &f.decode_logits[..10 * VOCAB];
    let hf2 = &f.decode_logits[35 * VOCAB..45 * VOCAB];
    assert!(max_abs_diff(&got[0][VOCAB..], hf0) <= 1e-4);
    assert!(max_abs_diff(&got[2][VOCAB..], hf2) <= 1e-4);
}

#[test]
fn feed_batch_rejects_unequal_chunks_within_a_group() {
    let f = fixture();
    let gen = Generator::<B>::new(&f.model);
    let a = f.row(0);
    let (mut batch, _) = gen.prefill_batch(&[&a[..10], &a[..10]], None).unwrap();
    let err = gen
        .feed_batch(&mut batch, &[&a[10..12], &a[10..11]], None, false)
        .expect_err("unequal chunks in one cache");
    assert!(err.to_string().contains("equal length"), "{err}");
}
