//! Interrupted conversions resume: finished, verified shards are kept; damaged ones are rewritten;
//! a different conversion starts over. The result equals an uninterrupted run byte for byte.

mod common;

use common::*;
use std::path::Path;
use v4_convert::{convert, ConvertOptions, ConvertReport, Target};

fn opts(out: &Path, stop: Option<usize>) -> ConvertOptions {
    let mut o = ConvertOptions::new(fixture("hf"), out, Target::Fp4Mx);
    o.shard_size = 1_000_000;
    o.progress = false;
    o.stop_after_shards = stop;
    o
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    ls(dir)
        .into_iter()
        .map(|n| (n.clone(), std::fs::read(dir.join(&n)).unwrap()))
        .collect()
}

fn stop_after_two(out: &Path) -> ConvertReport {
    let r = convert(&opts(out, Some(2))).unwrap();
    assert!(!r.complete);
    assert_eq!((r.shards_written, r.shards_resumed), (2, 0));
    assert!(!out.exists(), "nothing at the output until the end");
    r
}

#[test]
fn resume_after_interruption() {
    let s = Scratch::new("resume");
    let fresh = convert(&opts(&s.join("fresh"), None)).unwrap();
    assert!(fresh.shards_total > 3);
    let want = files(&s.join("fresh"));

    // Interrupted after two shards, then resumed.
    let out = s.join("out");
    let tmp = s.join("out.tmp-v4convert");
    stop_after_two(&out);
    let kept = ls(&tmp);
    assert_eq!(
        kept.iter().filter(|n| n.ends_with(".safetensors")).count(),
        2,
        "{kept:?}"
    );
    let r = convert(&opts(&out, None)).unwrap();
    assert!(r.complete);
    assert_eq!((r.shards_resumed, r.shards_written), (2, fresh.shards_total - 2));
    assert!(
        r.tensors.iter().filter(|t| t.stats.is_none()).count() > 0,
        "resumed tensors have no stats"
    );
    assert_eq!(files(&out), want);
    assert!(!tmp.exists());
    assert_same(&out);

    // A damaged finished shard is detected and rewritten.
    let out = s.join("out2");
    let tmp = s.join("out2.tmp-v4convert");
    stop_after_two(&out);
    let first = format!("model-00001-of-{:05}.safetensors", fresh.shards_total);
    let mut bytes = std::fs::read(tmp.join(&first)).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xFF;
    std::fs::write(tmp.join(&first), bytes).unwrap();
    let r = convert(&opts(&out, None)).unwrap();
    assert_eq!((r.shards_resumed, r.shards_written), (1, fresh.shards_total - 1));
    assert_eq!(files(&out), want);

    // A left-over temporary directory of a different conversion is discarded.
    let out = s.join("out3");
    stop_after_two(&out);
    let mut other = opts(&out, None);
    other.target = Target::Fp8;
    let r = convert(&other).unwrap();
    assert_eq!(r.shards_resumed, 0);
    assert!(r.complete);
}

/// The resumed output holds the release's tensors.
fn assert_same(out: &Path) {
    let got = raw_tensors(out);
    let want = raw_tensors(&fixture("native"));
    assert_eq!(got, want);
}

#[test]
fn foreign_temporary_directory_is_not_touched() {
    let s = Scratch::new("foreign");
    let tmp = s.join("out.tmp-v4convert");
    std::fs::create_dir(&tmp).unwrap();
    std::fs::write(tmp.join("precious.txt"), b"mine").unwrap();
    let err = convert(&opts(&s.join("out"), None)).unwrap_err();
    assert!(err.to_string().contains("out.tmp-v4convert"), "{err}");
    assert_eq!(std::fs::read(tmp.join("precious.txt")).unwrap(), b"mine");
}
