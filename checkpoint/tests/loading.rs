//! Loading errors: each names the file or tensor at fault instead of panicking or running wrong.

use burn_ndarray::NdArray;
use safetensors::tensor::{SafeTensors, TensorView};
use std::path::{Path, PathBuf};
use v4_checkpoint::read_config;
use v4_model::{InputError, LoadError, Tokens, V4Model};

#[path = "../../tests/support/scratch.rs"]
mod support;

type B = NdArray<f32>;

fn hf_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v4-tiny-a/hf")
}

/// A scratch copy of the fixture whose tensors pass through `edit` (which may rename, reshape or drop).
fn edited_copy(tag: &str, edit: impl Fn(&str, TensorView<'_>) -> Option<(String, Vec<usize>)>) -> PathBuf {
    let dir = support::scratch("loading", tag);
    std::fs::copy(hf_dir().join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(hf_dir().join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let dtype = view.dtype();
        let data = view.data().to_vec();
        if let Some((new_name, shape)) = edit(&name, view) {
            out.push((new_name, dtype, shape, data));
        }
    }
    let views: Vec<(String, TensorView<'_>)> = out
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
    dir
}

fn load(dir: &Path) -> Result<V4Model<B>, LoadError> {
    let config = read_config(dir)?;
    let source = v4_checkpoint::open(dir)?;
    V4Model::<B>::load(&config, &*source, &Default::default())
}

#[test]
fn truncated_file_is_reported_with_its_path() {
    let dir = support::scratch("loading", "truncated");
    std::fs::copy(hf_dir().join("config.json"), dir.join("config.json")).unwrap();
    let bytes = std::fs::read(hf_dir().join("model.safetensors")).unwrap();
    std::fs::write(dir.join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    let err = load(&dir).expect_err("a truncated file must not load");
    let msg = err.to_string();
    assert!(matches!(err, LoadError::File { .. }), "{msg}");
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_names_the_tensor_and_both_shapes() {
    let target = "model.layers.2.self_attn.sinks";
    let dir = edited_copy("shape", |name, view| {
        let shape = if name == target {
            vec![2, 2]
        } else {
            view.shape().to_vec()
        };
        Some((name.to_string(), shape))
    });
    match load(&dir).expect_err("mis-shaped tensor must not load") {
        LoadError::Shape {
            name,
            expected,
            found,
            ..
        } => {
            assert_eq!(name, target);
            assert_eq!(expected, vec![4]);
            assert_eq!(found, vec![2, 2]);
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = edited_copy("missing", |name, view| {
        (name != "model.layers.1.self_attn.compressor.indexer.position_bias")
            .then(|| (name.to_string(), view.shape().to_vec()))
    });
    let msg = load(&dir).expect_err("missing tensor").to_string();
    assert!(
        msg.contains("missing tensor `model.layers.1.self_attn.compressor.indexer.position_bias`"),
        "{msg}"
    );

    let dir = edited_copy("unexpected", |name, view| {
        let name = if name == "model.norm.weight" {
            "model.norm.weight_extra"
        } else {
            name
        };
        Some((name.to_string(), view.shape().to_vec()))
    });
    // A name outside V4's vocabulary is refused when the file is opened, naming the file and the tensor.
    let msg = load(&dir).expect_err("renamed tensor").to_string();
    assert!(
        msg.contains("model.safetensors")
            && msg.contains("`model.norm.weight_extra` is not a DeepSeek-V4 tensor name"),
        "{msg}"
    );
}

#[test]
fn unused_tensor_is_reported_as_unexpected() {
    let dir = edited_copy("extra", |name, view| {
        Some((name.to_string(), view.shape().to_vec()))
    });
    // A V4 tensor of a layer this config does not have, in a second shard without an index: both files
    // are read, and the loader names what it did not use.
    let stray = [0u8; 16];
    let view = TensorView::new(safetensors::Dtype::F32, vec![4], &stray).unwrap();
    safetensors::serialize_to_file(
        vec![("model.layers.99.self_attn.sinks", view)],
        None,
        &dir.join("extra.safetensors"),
    )
    .unwrap();
    match load(&dir).expect_err("unused tensor") {
        LoadError::Unexpected { names, .. } => {
            assert_eq!(names, vec!["model.layers.99.self_attn.sinks".to_string()])
        }
        other => panic!("unexpected error {other}"),
    }
}

#[test]
fn token_ids_outside_the_vocabulary_are_rejected() {
    let err = Tokens::new(&[1, 2, 1024], 1, 3, 1024).unwrap_err();
    assert_eq!(
        err,
        InputError::OutOfVocabulary {
            batch: 0,
            position: 2,
            id: 1024,
            vocab: 1024
        }
    );
    assert!(matches!(
        Tokens::new(&[-1], 1, 1, 1024),
        Err(InputError::OutOfVocabulary { id: -1, .. })
    ));
    assert!(matches!(
        Tokens::new(&[1, 2, 3], 2, 2, 1024),
        Err(InputError::Shape { .. })
    ));

    // A batch built for a larger vocabulary is refused by the model too.
    let model = load(&hf_dir()).unwrap();
    let tokens = Tokens::new(&[5, 2000], 1, 2, 4096).unwrap();
    assert!(matches!(
        model.forward(&tokens),
        Err(InputError::OutOfVocabulary { id: 2000, .. })
    ));
}
