//! Why training could not start or go on: one error type for the crate, each variant naming the file,
//! config section or rank concerned.

use std::path::{Path, PathBuf};
use v4_model::{InputError, LoadError};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The TOML configuration: unreadable, not TOML, or inconsistent.
    #[error("{}: {reason}", path.display())]
    Config { path: PathBuf, reason: String },
    /// The training or validation data (`path`: the data file, or the tokenizer's).
    #[error("{}: {reason}", path.display())]
    Data { path: PathBuf, reason: String },
    /// A file the run reads or writes.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint that is incomplete, corrupt, or does not match the model.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    /// The model could not be built or loaded.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// Tokens the model refuses.
    #[error(transparent)]
    Input(#[from] InputError),
    /// The ranks of a parallel run disagree, or another rank failed.
    #[error("parallel run: {0}")]
    Parallel(String),
    /// The configuration, the model and the data do not fit together (a vocabulary, an MTP weight
    /// without an MTP layer, optimizer state of another model, a process count).
    #[error("{0}")]
    Mismatch(String),
}

impl TrainError {
    /// `Io` at `path`, as a `map_err` argument.
    pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
        move |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// `Checkpoint` of `path` for `reason`.
    pub(crate) fn checkpoint(path: &Path, reason: impl Into<String>) -> TrainError {
        TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}
