//! What a validation run is asked to do: how the candidate is fed, and the options of [`validate`](crate::validate).

use crate::rules::{Dtype, Tolerances};
use crate::trace::{Trace, TraceInfo};
use crate::{Error, Result};

/// How the candidate is fed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    /// End to end on the reference's input ids: shows how errors accumulate (drift).
    Propagated,
    /// Each layer fed the reference's `layers.N.input` streams: errors do not accumulate, so the first
    /// failing layer is the faulty one.
    Isolated,
    /// Both, propagated first.
    Both,
}

impl std::str::FromStr for RunMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "propagated" => Ok(Self::Propagated),
            "isolated" => Ok(Self::Isolated),
            "both" => Ok(Self::Both),
            _ => Err(Error::Options(format!(
                "unknown mode `{s}` (propagated, isolated, both)"
            ))),
        }
    }
}

/// What [`validate`](crate::validate) needs besides the model and the reference.
#[derive(Debug, Clone)]
pub struct ValidateOptions {
    pub mode: RunMode,
    /// The candidate's compute dtype (picks the default tolerances).
    pub dtype: Dtype,
    pub tolerances: Tolerances,
    /// A high-precision golden trace (full mode) for the reference-relative gate; None: the reference.
    pub golden: Option<Trace>,
    /// The candidate's backend and precision policy (diffed against the reference's).
    pub candidate: TraceInfo,
}
