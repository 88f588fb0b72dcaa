//! Scratch space of the integration tests (included with `#[path]` by the test files of the `v4` binary
//! and of `v4-train`): under cargo's per-target temporary directory (`target/tmp`), one directory per test
//! file and case, emptied when the case starts. A rerun replaces the last run's files (they stay for
//! inspecting a failure), so repeated runs do not fill the disk; `cargo clean` removes them. Tests that
//! write checkpoints hold a [`RemoveOnSuccess`], so a passing run leaves nothing behind (CI's disk).
#![allow(dead_code)] // each test file uses some of these

use std::cell::RefCell;
use std::path::{Path, PathBuf};

thread_local! {
    /// The scratch paths this test's thread handed out.
    static HANDED_OUT: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
}

/// Held by a test from its start: when the test ends without a panic, the scratch paths it was handed are
/// removed; a failing test keeps them for inspection.
pub struct RemoveOnSuccess;

impl Drop for RemoveOnSuccess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        for path in HANDED_OUT.with(|h| std::mem::take(&mut *h.borrow_mut())) {
            let _ = std::fs::remove_dir_all(&path);
            let _ = std::fs::remove_file(&path);
        }
    }
}

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
    HANDED_OUT.with(|h| h.borrow_mut().push(path.clone()));
    path
}
