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

pub mod filter;
pub mod metrics;
pub mod report;
pub mod rules;
pub mod run;
pub mod trace;

pub use filter::ProbeFilter;
pub use report::{Report, Status};
pub use rules::{Dtype, OpClass, Tolerances};
pub use run::{record, validate, RunMode, ValidateOptions};
pub use trace::{Trace, TraceInfo, TraceMode};

/// An error of this crate: a message for the user.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// The layer index of a probe name (`layers.N....`), if any.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("layers.")?.split('.').next()?.parse().ok()
}
