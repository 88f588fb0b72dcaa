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

#[path = "../../../tests/support/scratch.rs"]
mod shared;

/// An empty scratch directory for case `name` of test file `suite` (under `target/tmp`).
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    shared::scratch(&format!("train-{suite}"), name)
}
