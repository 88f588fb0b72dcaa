//! Helpers shared by the train crate's integration tests (each test file includes this module).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// The workspace root (fixtures and configs live there).
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A fresh scratch directory `v4-train-{suite}-{name}-{pid}`.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("v4-train-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
