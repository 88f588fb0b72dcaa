//! The report of a validation: each probe's verdict, the per-layer summaries, the localisation and the
//! verdict. Judging the probes is in [`crate::judge`], localising in `localise.rs`, writing in `render.rs`.

use crate::layer_of;
use crate::metrics::{FloatMetrics, IndexMetrics};
use crate::options::{RunMode, ValidateOptions};
use crate::rules::{op_class, Dtype, OpClass};
use crate::trace::{Trace, TraceInfo};
use serde::{Deserialize, Serialize};

/// A probe's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pass,
    /// Passes the gates, with warnings.
    Warn,
    Fail,
    /// Not judged (tolerance `skip`).
    Skip,
}

impl ProbeResult {
    /// A passing result of candidate probe `name` against reference probe `reference`, with no metrics yet.
    pub fn new(mode: RunMode, name: &str, reference: &str) -> Self {
        Self {
            mode,
            name: name.to_string(),
            reference: reference.to_string(),
            layer: layer_of(name),
            class: op_class(reference),
            status: Status::Pass,
            reasons: vec![],
            warnings: vec![],
            float: None,
            index: None,
            golden_rel_l2: None,
            rel_l2_bound: None,
            elementwise_beyond: None,
            stats_l2_diff: None,
            checksum_equal: None,
            severity: 0.0,
            candidate_nonfinite: 0,
            reference_nonfinite: 0,
        }
    }

    /// Whether this propagated probe exceeded its bounds through drift only (see `demote_propagated_drift`).
    pub fn drifted(&self) -> bool {
        self.warnings.iter().any(|w| w.starts_with(DRIFT))
    }
}

/// The prefix of a propagated failure reason kept as a warning.
pub(crate) const DRIFT: &str = "propagated drift: ";

/// Routing facts of one layer, from the candidate model.
#[derive(Debug, Clone)]
pub struct RoutingInfo {
    /// Hash routing: ids depend on token ids only, every flip is an error.
    pub hash: bool,
    /// Selection-only bias of top-k routing.
    pub bias: Vec<f32>,
}

/// The comparison of one probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeResult {
    pub mode: RunMode,
    /// The candidate's probe name.
    pub name: String,
    /// The reference probe it is compared with.
    pub reference: String,
    pub layer: Option<usize>,
    pub class: OpClass,
    pub status: Status,
    pub reasons: Vec<String>,
    pub warnings: Vec<String>,
    pub float: Option<FloatMetrics>,
    pub index: Option<IndexMetrics>,
    /// Relative L2 of the reference against the golden (the reference-relative gate's baseline).
    pub golden_rel_l2: Option<f64>,
    /// The gate's bound on `rel_l2`.
    pub rel_l2_bound: Option<f64>,
    /// Share of elements whose relative error exceeds the dtype's element-wise threshold.
    pub elementwise_beyond: Option<f64>,
    /// Stats-only comparison: relative difference of the L2 norms, of the means (scaled by the RMS).
    pub stats_l2_diff: Option<f64>,
    pub checksum_equal: Option<bool>,
    /// error / allowed (> 1 fails): the ordering key of "worst first".
    pub severity: f64,
    pub candidate_nonfinite: u64,
    pub reference_nonfinite: u64,
}

/// One layer's worst error in one mode (the per-layer plot).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSummary {
    pub mode: RunMode,
    /// None: the head (`final.*`, `logits`).
    pub layer: Option<usize>,
    pub max_rel_l2: f64,
    pub worst_probe: String,
    pub failed: usize,
    pub probes: usize,
}

/// Where a mode's run first diverged.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Localisation {
    pub first_divergent_layer: Option<usize>,
    /// The first failing probe inside that layer, in forward order (or the first failing head probe).
    pub first_divergent_probe: Option<String>,
    /// The first probe, in forward order, where the candidate has NaN/Inf the reference has not.
    pub first_nonfinite: Option<String>,
}

/// A policy difference: key, reference value, candidate value.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyDiff {
    pub key: String,
    pub reference: String,
    pub candidate: String,
}

/// The whole comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub reference: TraceInfo,
    pub reference_path: String,
    pub candidate: TraceInfo,
    pub dtype: Dtype,
    pub mode: RunMode,
    pub golden: Option<String>,
    pub policy_diff: Vec<PolicyDiff>,
    pub results: Vec<ProbeResult>,
    pub layers: Vec<LayerSummary>,
    pub localisation: Vec<(RunMode, Localisation)>,
    pub notes: Vec<String>,
    pub passed: bool,
}

/// Differences between two precision policies (flat JSON objects; nested values compared as text).
pub fn policy_diff(reference: &TraceInfo, candidate: &TraceInfo) -> Vec<PolicyDiff> {
    let flat = |i: &TraceInfo| -> Vec<(String, String)> {
        let mut v = vec![
            ("backend".to_string(), i.backend.clone()),
            ("dtype".to_string(), i.dtype.clone()),
        ];
        if let Some(o) = i.precision_policy.as_object() {
            for (k, x) in o {
                v.push((
                    k.clone(),
                    x.as_str().map_or_else(|| x.to_string(), str::to_string),
                ));
            }
        }
        v
    };
    let (r, c) = (flat(reference), flat(candidate));
    let mut keys: Vec<&String> = r.iter().chain(&c).map(|(k, _)| k).collect();
    keys.dedup();
    let mut seen = std::collections::HashSet::new();
    let get = |v: &[(String, String)], k: &str| {
        v.iter()
            .find(|(x, _)| x == k)
            .map_or_else(|| "(unrecorded)".to_string(), |(_, y)| y.clone())
    };
    keys.into_iter()
        .filter(|k| seen.insert(k.to_string()))
        .filter_map(|k| {
            let (a, b) = (get(&r, k), get(&c, k));
            (a != b).then(|| PolicyDiff {
                key: k.clone(),
                reference: a,
                candidate: b,
            })
        })
        .collect()
}

impl Report {
    pub fn new(reference: &Trace, opts: &ValidateOptions, policy_diff: Vec<PolicyDiff>) -> Self {
        Self {
            reference: reference.meta.info.clone(),
            reference_path: reference.path.display().to_string(),
            candidate: opts.candidate.clone(),
            dtype: opts.dtype,
            mode: opts.mode,
            golden: opts.golden.as_ref().map(|g| g.path.display().to_string()),
            policy_diff,
            results: vec![],
            layers: vec![],
            localisation: vec![],
            notes: vec![],
            passed: false,
        }
    }

    /// Results worst first.
    pub fn worst_first(&self) -> Vec<&ProbeResult> {
        let mut v: Vec<&ProbeResult> = self.results.iter().collect();
        let rank = |s: Status| match s {
            Status::Fail => 0,
            Status::Warn => 1,
            Status::Pass => 2,
            Status::Skip => 3,
        };
        v.sort_by(|a, b| {
            rank(a.status)
                .cmp(&rank(b.status))
                .then(b.severity.total_cmp(&a.severity))
        });
        v
    }

    /// The worst relative L2 per layer for `mode` (the plotted curve).
    pub fn layer_curve(&self, mode: RunMode) -> Vec<(Option<usize>, f64)> {
        self.layers
            .iter()
            .filter(|l| l.mode == mode)
            .map(|l| (l.layer, l.max_rel_l2))
            .collect()
    }
}
