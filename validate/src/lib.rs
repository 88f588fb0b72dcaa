//! Cross-backend validation of DeepSeek-V4 (issue 5): record a *trace* of the model's probe points on one
//! backend, replay the same inputs on a candidate backend, compare every probe and localise the first
//! divergence.
//!
//! - [`trace`]: the trace file, one self-describing safetensors file (tensors + JSON in `__metadata__`:
//!   config hash, backend, dtype, precision policy, input ids, v4 version); modes stats / full / checksum;
//!   HF fixtures (`hidden.N`, `logits`) are read through a name mapping;
//! - [`filter`]: which probes to record (layer range, simple globs);
//! - [`metrics`]: per-tensor float metrics (cosine, abs/rel errors with a small-value floor, RMSE,
//!   relative L2, thousandth ratios, ULP, KL) and discrete top-k comparisons with near-tie classification;
//! - [`rules`]: op classes, per-dtype default tolerances, TOML overrides, the pass/fail judgement;
//! - [`run`]: running a model with probes, in propagated mode (end to end) or isolated mode (each layer
//!   fed the reference's input streams); [`validate`] ties everything into a [`report::Report`];
//! - [`report`]: localisation (first divergent layer, then op; first NaN/Inf origin), the precision
//!   policy diff, JSON / CSV / HTML / terminal reports.
//!
//! Probe names are the model's (see `v4_model`): `layers.N.input`, `layers.N.attn.{input,q,kv,
//! compressor.entries,indexer.scores,indexer.topk,core,output}`, `layers.N.ffn.{input,router.scores,
//! router.indices,router.weights,output}`, `final.streams`, `final.hidden`, `logits`. Isolated mode adds
//! `layers.N.output` (the streams leaving layer N, compared with the reference's `layers.N+1.input`, or
//! `final.streams` for the last layer).

use std::path::{Path, PathBuf};
use v4_model::probe::{point, Scope};

pub mod filter;
pub mod judge;
mod localise;
pub mod metrics;
pub mod options;
mod render;
pub mod report;
pub mod rules;
pub mod run;
pub mod trace;

pub use filter::ProbeFilter;
pub use options::{RunMode, ValidateOptions};
pub use report::{Report, Status};
pub use rules::{Dtype, OpClass, Tolerances};
pub use run::{record, validate};
pub use trace::{Trace, TraceInfo, TraceMode};

/// Why a trace or a validation could not be made: each variant names the file or the option concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A trace (or forward-output) file that cannot be read, parsed or written.
    #[error("{}: {reason}", path.display())]
    Trace { path: PathBuf, reason: String },
    /// A report or tolerance file that cannot be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An option: a layer range, a probe filter, a mode, a dtype, a tolerance file's contents.
    #[error("{0}")]
    Options(String),
    /// The reference does not fit the candidate model (shapes, missing probes, kinds of values).
    #[error("{0}")]
    Reference(String),
    /// The candidate model refuses the reference's inputs.
    #[error(transparent)]
    Input(#[from] v4_model::InputError),
}

impl Error {
    /// `Io` at `path`, as a `map_err` argument.
    pub(crate) fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
        move |source| Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// `Trace` of `path` for `reason`.
    pub(crate) fn trace(path: &Path, reason: impl std::fmt::Display) -> Error {
        Error::Trace {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// The main layer of a probe name (`layers.N....`), if any.
pub fn layer_of(name: &str) -> Option<usize> {
    match Scope::parse(name)? {
        (Scope::Layer(n), _) => Some(n),
        (Scope::Mtp(_), _) => None,
    }
}

/// The point of probe `name` (`layers.3.attn.q` -> `attn.q`; a model-level name is its own point).
pub fn point_of(name: &str) -> &str {
    Scope::parse(name).map_or(name, |(_, point)| point)
}

/// The reference's name for the input of main layer `i` of `layers`: its own input streams, or for one
/// past the last, the final streams.
pub fn layer_input(i: usize, layers: usize) -> String {
    if i < layers {
        Scope::Layer(i).name(point::INPUT)
    } else {
        point::FINAL_STREAMS.into()
    }
}
