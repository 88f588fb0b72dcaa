//! Corrupt inputs and refused outputs: each gives a clear error naming the file (and tensor) and
//! leaves no output and no temporary directory behind.

mod common;

use common::*;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use v4_convert::{convert, ConvertError, ConvertOptions, Target};

/// Copies checkpoint file `src` into `dir/model.safetensors` with its header edited by `edit`
/// (data bytes unchanged), plus the HF fixture's config.
fn with_header(src: &Path, dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::copy(fixture("hf/config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(src).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = Value::Object(header).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(dir.join("model.safetensors"), out).unwrap();
}

fn corrupt_header(dir: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    with_header(&fixture("hf/model.safetensors"), dir, edit);
}

/// Runs a conversion expected to fail; checks the message names `file` and `tensor` and that
/// nothing was left behind.
fn expect_failure(s: &Scratch, input: PathBuf, file: &str, tensor: &str) -> ConvertError {
    let out = s.join("out");
    let mut o = ConvertOptions::new(input, out.clone(), Target::Fp4Mx);
    o.progress = false;
    let err = convert(&o).expect_err("corrupt input must fail");
    let msg = err.to_string();
    assert!(msg.contains(file), "message names the file `{file}`: {msg}");
    assert!(msg.contains(tensor), "message names `{tensor}`: {msg}");
    assert!(!out.exists(), "no output directory");
    assert!(!s.join("out.tmp-v4convert").exists(), "no temporary directory");
    err
}

#[test]
fn truncated_shard() {
    let s = Scratch::new("truncated");
    let input = s.join("in");
    std::fs::create_dir(&input).unwrap();
    let bytes = std::fs::read(fixture("hf/model.safetensors")).unwrap();
    std::fs::write(input.join("model.safetensors"), &bytes[..bytes.len() - 100]).unwrap();
    // The last tensor in the file is model.norm.weight.
    let err = expect_failure(&s, input, "model.safetensors", "model.norm.weight");
    assert!(
        matches!(err, ConvertError::Truncated { needed, actual, .. } if needed == actual + 100),
        "{err:?}"
    );
    // Cut inside the header.
    let input2 = s.join("in2");
    std::fs::create_dir(&input2).unwrap();
    std::fs::write(input2.join("model.safetensors"), &bytes[..1000]).unwrap();
    let err = convert(&ConvertOptions::new(input2, s.join("out"), Target::Bf16)).unwrap_err();
    assert!(
        matches!(
            err,
            ConvertError::Truncated {
                tensor: None,
                actual: 1000,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!s.join("out").exists());
}

#[test]
fn header_lies_about_size() {
    let s = Scratch::new("size");
    let input = s.join("in");
    corrupt_header(&input, |h| {
        h["model.norm.weight"]["shape"] = Value::from(vec![255])
    });
    let err = expect_failure(&s, input, "model.safetensors", "model.norm.weight");
    assert!(
        matches!(
            err,
            ConvertError::SizeMismatch {
                expected: 1020,
                declared: 1024,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn header_lies_about_offsets() {
    let s = Scratch::new("offsets");
    let input = s.join("in");
    // Point lm_head.weight at the bytes of the embedding (same size, overlapping).
    corrupt_header(&input, |h| {
        let emb = h["model.embed_tokens.weight"]["data_offsets"].clone();
        h["lm_head.weight"]["data_offsets"] = emb;
    });
    let err = expect_failure(&s, input, "model.safetensors", "weight");
    assert!(matches!(err, ConvertError::BadOffsets { .. }), "{err:?}");
    assert!(
        err.to_string().contains("lm_head.weight") && err.to_string().contains("model.embed_tokens.weight")
    );
    // Offsets past the end of the file.
    let input = s.join("in2");
    corrupt_header(&input, |h| {
        h["model.norm.weight"]["data_offsets"] = Value::from(vec![30_000_000u64, 30_001_024])
    });
    let err = expect_failure(&s, input, "model.safetensors", "model.norm.weight");
    assert!(matches!(err, ConvertError::Truncated { .. }), "{err:?}");
}

#[test]
fn unknown_dtype() {
    let s = Scratch::new("dtype");
    let input = s.join("in");
    corrupt_header(&input, |h| h["model.norm.weight"]["dtype"] = "F33".into());
    let err = expect_failure(&s, input, "model.safetensors", "model.norm.weight");
    assert!(
        matches!(err, ConvertError::UnknownDtype { ref dtype, .. } if dtype == "F33"),
        "{err:?}"
    );
}

#[test]
fn index_names_a_missing_shard() {
    let s = Scratch::new("index");
    let input = s.join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(
        fixture("hf/model.safetensors"),
        input.join("model-00001-of-00002.safetensors"),
    )
    .unwrap();
    let mut map = Map::new();
    map.insert("lm_head.weight".into(), "model-00001-of-00002.safetensors".into());
    map.insert(
        "model.norm.weight".into(),
        "model-00002-of-00002.safetensors".into(),
    );
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(input.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let err = expect_failure(
        &s,
        input,
        "model.safetensors.index.json",
        "model-00002-of-00002.safetensors",
    );
    assert!(matches!(err, ConvertError::MissingShard { .. }), "{err:?}");
}

#[test]
fn nan_and_inf_inputs_name_the_tensor() {
    let s = Scratch::new("nan");
    for (i, bad) in [f32::NAN, f32::INFINITY].into_iter().enumerate() {
        let input = s.join(&format!("in{i}"));
        std::fs::create_dir_all(&input).unwrap();
        let mut bytes = std::fs::read(fixture("hf/model.safetensors")).unwrap();
        let f = v4_convert::st::ShardFile::open(&fixture("hf/model.safetensors")).unwrap();
        // Element 5 of expert 1's w3 (row 128 + 5 / 256 of gate_up_proj[1]) in layer 2.
        let t = &f.tensors["model.layers.2.mlp.experts.gate_up_proj"];
        let elem = 256 * 256 + 128 * 256 + 5;
        bytes[t.start + 4 * elem..t.start + 4 * elem + 4].copy_from_slice(&bad.to_le_bytes());
        std::fs::write(input.join("model.safetensors"), bytes).unwrap();
        let err = expect_failure(
            &s,
            input,
            "model.safetensors",
            "model.layers.2.mlp.experts.gate_up_proj",
        );
        assert!(
            matches!(err, ConvertError::NonFinite { index, .. } if index == elem),
            "{err:?}"
        );
    }
}

#[test]
fn refuses_to_overwrite_input_or_non_empty_output() {
    let s = Scratch::new("refuse");
    let input = s.join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(fixture("hf/model.safetensors"), input.join("model.safetensors")).unwrap();
    let before = std::fs::read(input.join("model.safetensors")).unwrap();
    for out in [input.clone(), input.join("sub"), s.0.clone()] {
        let err = convert(&ConvertOptions::new(&input, &out, Target::Bf16)).unwrap_err();
        assert!(
            matches!(err, ConvertError::OutputIsInput { .. }),
            "{}: {err:?}",
            out.display()
        );
    }
    let busy = s.join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), b"x").unwrap();
    let err = convert(&ConvertOptions::new(&input, &busy, Target::Bf16)).unwrap_err();
    assert!(matches!(err, ConvertError::OutputExists { .. }), "{err:?}");
    assert!(err.to_string().contains("busy"));
    assert_eq!(ls(&busy), ["keep.txt"]);
    assert_eq!(ls(&input), ["model.safetensors"]);
    assert_eq!(std::fs::read(input.join("model.safetensors")).unwrap(), before);
    // An existing empty directory is fine.
    let empty = s.join("empty");
    std::fs::create_dir(&empty).unwrap();
    let mut o = ConvertOptions::new(&input, &empty, Target::Bf16);
    o.progress = false;
    let r = convert(&o).expect("empty output directory is accepted");
    assert!(r.complete);
    assert!(r.notes.iter().any(|n| n.contains("no config.json")));
}

#[test]
fn missing_scale_is_named() {
    let s = Scratch::new("inconsistent");
    for (i, (drop, weight)) in [
        ("layers.0.attn.wq_a.scale", "layers.0.attn.wq_a.weight"),
        (
            "layers.0.ffn.experts.3.w2.scale",
            "layers.0.ffn.experts.3.w2.weight",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let input = s.join(&format!("in{i}"));
        with_header(&fixture("native/model.safetensors"), &input, |h| {
            h.remove(drop);
        });
        let err = expect_failure(&s, input, "model.safetensors", weight);
        assert!(err.to_string().contains("without a scale"), "{err}");
    }
}
