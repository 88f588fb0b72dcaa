//! Scratch space of the integration tests (included with `#[path]` by the test files of the `v4` binary
//! and of `v4-train`): under cargo's per-target temporary directory (`target/tmp`), one directory per test
//! file and case, emptied when the case starts. A rerun replaces the last run's files (they stay for
//! inspecting a failure), so repeated runs do not fill the disk; `cargo clean` removes them.
#![allow(dead_code)] // each test file uses some of these

use std::path::{Path, PathBuf};

/// An empty directory for case `name` of test file `suite`.
pub fn scratch(suite: &str, name: &str) -> PathBuf {
    let dir = fresh(suite, name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A path for case `name` of test file `suite` that does not exist yet (its parent does): where a command
/// is to create its output.
pub fn fresh(suite: &str, name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join(suite).join(name);
    let _ = std::fs::remove_dir_all(&path);
    let _ = std::fs::remove_file(&path);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    path
}
