//! The one error type of the crate.
//!
//! Every variant that concerns a checkpoint names the file and, where there is one, the tensor, so
//! that a user holding an 800 GB checkpoint knows which shard to re-download.

use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong while reading, converting or writing a checkpoint.
#[derive(Debug)]
pub enum ConvertError {
    /// An operating-system error on `path`.
    Io { path: PathBuf, source: std::io::Error },
    /// The file is shorter than its own header says: `needed` bytes, `actual` present.
    /// `tensor` is the first tensor whose data lies (partly) past the end, if any.
    Truncated {
        file: PathBuf,
        tensor: Option<String>,
        needed: u64,
        actual: u64,
    },
    /// The safetensors header is not valid (length prefix, JSON, missing fields).
    BadHeader { file: PathBuf, reason: String },
    /// A header entry whose byte range does not match `dtype x shape`.
    SizeMismatch {
        file: PathBuf,
        tensor: String,
        expected: u64,
        declared: u64,
    },
    /// Two header entries claim overlapping bytes, or an offset range is reversed.
    BadOffsets {
        file: PathBuf,
        tensor: String,
        reason: String,
    },
    /// A dtype string that safetensors does not define.
    UnknownDtype {
        file: PathBuf,
        tensor: String,
        dtype: String,
    },
    /// `model.safetensors.index.json` names a shard that is not there.
    MissingShard { index: PathBuf, shard: String },
    /// The index maps a tensor to a shard whose header does not contain it.
    MissingTensor { file: PathBuf, tensor: String },
    /// The same tensor name appears in two shards.
    DuplicateTensor {
        tensor: String,
        first: PathBuf,
        second: PathBuf,
    },
    /// A NaN or infinite value (or a NaN code of FP8/E8M0) in the input.
    NonFinite {
        file: PathBuf,
        tensor: String,
        index: usize,
    },
    /// The checkpoint is self-consistent as safetensors but not as a DeepSeek-V4 checkpoint
    /// (unknown tensor name, missing scale, shapes that do not fit together, ...).
    Checkpoint {
        file: PathBuf,
        tensor: String,
        reason: String,
    },
    /// A tensor name that the caller asked for is not in the checkpoint.
    NoSuchTensor { name: String },
    /// The requested conversion cannot be done for this tensor (e.g. MXFP4 needs `in % 32 == 0`).
    Unsupported { tensor: String, reason: String },
    /// The output directory is the input, lies inside it or contains it.
    OutputIsInput { input: PathBuf, output: PathBuf },
    /// The output directory already exists and is not empty.
    OutputExists { output: PathBuf },
    /// `config.json` (or the index) could not be parsed.
    Json { file: PathBuf, reason: String },
    /// Invalid options (e.g. a channel-importance vector of the wrong length).
    Options { reason: String },
}

impl ConvertError {
    /// Wraps an I/O error with the path it concerns.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ConvertError::Io {
            path: path.into(),
            source,
        }
    }
}

impl fmt::Display for ConvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ConvertError::*;
        match self {
            Io { path, source } => write!(f, "{}: {source}", path.display()),
            Truncated {
                file,
                tensor,
                needed,
                actual,
            } => {
                write!(
                    f,
                    "{}: truncated file: the header needs {needed} bytes, the file has {actual}",
                    file.display()
                )?;
                if let Some(t) = tensor {
                    write!(f, " (tensor `{t}` lies past the end)")?;
                }
                Ok(())
            }
            BadHeader { file, reason } => {
                write!(f, "{}: invalid safetensors header: {reason}", file.display())
            }
            SizeMismatch {
                file,
                tensor,
                expected,
                declared,
            } => write!(
                f,
                "{}: tensor `{tensor}`: header declares {declared} bytes but its dtype and shape need {expected}",
                file.display()
            ),
            BadOffsets {
                file,
                tensor,
                reason,
            } => write!(
                f,
                "{}: tensor `{tensor}`: bad data offsets: {reason}",
                file.display()
            ),
            UnknownDtype {
                file,
                tensor,
                dtype,
            } => write!(
                f,
                "{}: tensor `{tensor}`: unknown dtype `{dtype}`",
                file.display()
            ),
            MissingShard { index, shard } => write!(
                f,
                "{}: names shard `{shard}`, which does not exist",
                index.display()
            ),
            MissingTensor { file, tensor } => write!(
                f,
                "{}: the index maps tensor `{tensor}` to this file, but its header does not contain it",
                file.display()
            ),
            DuplicateTensor {
                tensor,
                first,
                second,
            } => write!(
                f,
                "tensor `{tensor}` appears in both {} and {}",
                first.display(),
                second.display()
            ),
            NonFinite {
                file,
                tensor,
                index,
            } => write!(
                f,
                "{}: tensor `{tensor}`: NaN or infinite value at element {index}",
                file.display()
            ),
            Checkpoint {
                file,
                tensor,
                reason,
            } => write!(f, "{}: tensor `{tensor}`: {reason}", file.display()),
            NoSuchTensor { name } => write!(f, "no tensor named `{name}` in this checkpoint"),
            Unsupported { tensor, reason } => {
                write!(f, "tensor `{tensor}`: cannot convert: {reason}")
            }
            OutputIsInput { input, output } => write!(
                f,
                "refusing to write {} : it is, contains or lies inside the input {}",
                output.display(),
                input.display()
            ),
            OutputExists { output } => write!(
                f,
                "refusing to overwrite {}: it exists and is not empty",
                output.display()
            ),
            Json { file, reason } => write!(f, "{}: {reason}", file.display()),
            Options { reason } => write!(f, "invalid options: {reason}"),
        }
    }
}

impl std::error::Error for ConvertError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ConvertError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}
