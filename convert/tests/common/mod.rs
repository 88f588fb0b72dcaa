//! Shared helpers for the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use v4_convert::st::{self, ShardFile};

/// `tests/fixtures/v4-tiny-a/<sub>` of the workspace.
pub fn fixture(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/v4-tiny-a")
        .join(sub)
}

/// A fresh, empty scratch directory under the system temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("v4-convert-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create scratch dir");
        Scratch(p)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Every tensor of a checkpoint directory: name -> (dtype, shape, raw bytes), read with the
/// crate's validating reader.
pub fn raw_tensors(dir: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = BTreeMap::new();
    for f in st::open_dir(dir).expect("readable checkpoint") {
        for (name, t) in &f.tensors {
            let bytes = f.bytes()[t.start..t.start + t.len].to_vec();
            out.insert(name.clone(), (t.dtype.name().to_string(), t.shape.clone(), bytes));
        }
    }
    out
}

/// Raw tensors parsed by the independent `safetensors` crate (checks our writer's format).
pub fn raw_tensors_safetensors_crate(file: &Path) -> BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(file).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("the safetensors crate accepts the file");
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (format!("{:?}", v.dtype()), v.shape().to_vec(), v.data().to_vec()),
            )
        })
        .collect()
}

/// Shard files of a directory.
pub fn shard_files(dir: &Path) -> Vec<ShardFile> {
    st::open_dir(dir).expect("readable checkpoint")
}

/// Little-endian f32s.
pub fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Directory listing (names), sorted.
pub fn ls(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
