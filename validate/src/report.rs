//! Judging probes, localising the first divergence, and writing reports (JSON, CSV, HTML, terminal).

use crate::metrics::{compare_f32, compare_topk, FloatMetrics, IndexMetrics, TieRule, TieScores};
use crate::options::{RunMode, ValidateOptions};
use crate::rules::{op_class, Dtype, OpClass, Tolerance};
use crate::trace::{Stats, Trace, TraceInfo, Values};
use crate::{layer_input, layer_of, point_of};
use crate::{Error, Result};
use burn::tensor::TensorData;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::Path;
use v4_formats::atomic;
use v4_model::probe::{point, Scope};

/// Whether a failure reason is about error size (which accumulated drift explains) rather than structure.
fn is_drift(reason: &str) -> bool {
    ["relative L2", "cosine", "KL ", "stats differ"]
        .iter()
        .any(|p| reason.starts_with(p))
        || reason.contains("beyond near ties")
        || reason.contains(" ULP (")
}

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
    /// Whether this propagated probe exceeded its bounds through drift only (see `demote_propagated_drift`).
    pub fn drifted(&self) -> bool {
        self.warnings.iter().any(|w| w.starts_with(DRIFT))
    }
}

/// The prefix of a propagated failure reason kept as a warning.
const DRIFT: &str = "propagated drift: ";

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

/// The reference name a candidate probe is compared with (`layers.N.output` is the next layer's input).
fn reference_name(name: &str, layers: usize) -> String {
    match (layer_of(name), point_of(name)) {
        (Some(i), point::OUTPUT) => layer_input(i + 1, layers),
        _ => name.to_string(),
    }
}

/// Compares the candidate's `records` of one mode with the reference. The candidate ran main layers
/// `ran` (all of them, or a range; the head probes belong to the last layer's range).
pub fn compare(
    reference: &Trace,
    golden: Option<&Trace>,
    records: Vec<(String, TensorData)>,
    mode: RunMode,
    opts: &ValidateOptions,
    routing: &[RoutingInfo],
    ran: &Range<usize>,
) -> Result<Vec<ProbeResult>> {
    let layers = routing.len();
    let mut cand: Vec<(String, Vec<usize>, Values)> = Vec::with_capacity(records.len());
    for (name, data) in records {
        let shape = data.shape.to_vec();
        let values = Values::from_data(&name, data)?;
        cand.push((name, shape, values));
    }
    let by_name: HashMap<&str, usize> = cand.iter().enumerate().map(|(i, c)| (c.0.as_str(), i)).collect();
    let mut out = Vec::new();
    for (name, shape, values) in &cand {
        let ref_name = reference_name(name, layers);
        let Some(r) = reference.get(&ref_name) else {
            continue;
        };
        if mode == RunMode::Isolated && point_of(&ref_name) == point::INPUT && point_of(name) != point::OUTPUT
        {
            continue;
        }
        let tol = opts.tolerances.resolve(name, opts.dtype);
        let mut res = ProbeResult {
            mode,
            name: name.clone(),
            reference: ref_name.clone(),
            layer: layer_of(name),
            class: op_class(&ref_name),
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
            reference_nonfinite: r.stats.nan + r.stats.inf,
        };
        let cstats = Stats::of(values);
        res.candidate_nonfinite = cstats.nan + cstats.inf;
        if *shape != r.shape {
            res.reasons
                .push(format!("shape {:?} vs reference {:?}", shape, r.shape));
            res.severity = f64::INFINITY;
        } else {
            match (&r.values, values) {
                (Some(Values::F32(rv)), Values::F32(cv)) => {
                    judge_float(&mut res, rv, cv, shape, golden, &tol, opts.dtype)
                }
                (Some(Values::I64(rv)), Values::I64(cv)) => {
                    let k = *shape.last().unwrap_or(&1);
                    let ties = tie_scores(name, reference, &cand, &by_name, routing, &tol);
                    judge_index(&mut res, rv, cv, k, ties.as_ref(), &tol);
                }
                (None, _) => judge_stats(&mut res, &r.stats, &cstats, r.checksum.as_deref(), values, &tol),
                _ => {
                    res.reasons
                        .push(format!("dtype {} vs reference {}", values.dtype(), r.dtype));
                    res.severity = f64::INFINITY;
                }
            }
        }
        if tol.skip {
            res.status = Status::Skip;
        } else if !res.reasons.is_empty() {
            res.status = Status::Fail;
        } else if !res.warnings.is_empty() {
            res.status = Status::Warn;
        }
        out.push(res);
    }
    if mode == RunMode::Propagated {
        let expected = |name: &str| match layer_of(name) {
            Some(layer) => ran.contains(&layer),
            None => ran.end == layers,
        };
        for e in &reference.entries {
            if expected(&e.name) && !by_name.contains_key(e.name.as_str()) {
                let tol = opts.tolerances.resolve(&e.name, opts.dtype);
                out.push(ProbeResult {
                    mode,
                    name: e.name.clone(),
                    reference: e.name.clone(),
                    layer: layer_of(&e.name),
                    class: op_class(&e.name),
                    status: if tol.skip { Status::Skip } else { Status::Fail },
                    reasons: vec!["missing in the candidate run".into()],
                    warnings: vec![],
                    float: None,
                    index: None,
                    golden_rel_l2: None,
                    rel_l2_bound: None,
                    elementwise_beyond: None,
                    stats_l2_diff: None,
                    checksum_equal: None,
                    severity: f64::INFINITY,
                    candidate_nonfinite: 0,
                    reference_nonfinite: 0,
                });
            }
        }
        amplification_warnings(&mut out, layers);
    }
    Ok(out)
}

fn judge_float(
    res: &mut ProbeResult,
    rv: &[f32],
    cv: &[f32],
    shape: &[usize],
    golden: Option<&Trace>,
    tol: &Tolerance,
    dtype: Dtype,
) {
    let last = *shape.last().unwrap_or(&1);
    let logits = res.class == OpClass::Logits;
    let m = compare_f32(
        rv,
        cv,
        tol.small_value,
        dtype.mantissa_bits(),
        logits.then_some(last),
    );
    let beyond = rv
        .iter()
        .zip(cv)
        .filter(|(r, c)| {
            ((**c as f64) - (**r as f64)).abs() > tol.elementwise * (r.abs() as f64).max(tol.small_value)
        })
        .count() as f64
        / rv.len().max(1) as f64;
    res.elementwise_beyond = Some(beyond);
    if m.nonfinite_mismatch > 0 {
        res.reasons.push(format!(
            "NaN/Inf pattern differs in {} elements (candidate {} non-finite, reference {})",
            m.nonfinite_mismatch, m.candidate_nonfinite, m.reference_nonfinite
        ));
    }
    // Reference-relative gate.
    let golden_err = golden
        .and_then(|g| g.f32(&res.reference))
        .filter(|(s, _)| *s == shape)
        .map(|(_, gv)| compare_f32(gv, rv, tol.small_value, dtype.mantissa_bits(), None).rel_l2);
    let cand_err = match golden
        .and_then(|g| g.f32(&res.reference))
        .filter(|(s, _)| *s == shape)
    {
        Some((_, gv)) => compare_f32(gv, cv, tol.small_value, dtype.mantissa_bits(), None).rel_l2,
        None => m.rel_l2,
    };
    let bound = tol.k_ref * golden_err.unwrap_or(0.0) + tol.rel_l2_floor;
    res.golden_rel_l2 = golden_err;
    res.rel_l2_bound = Some(bound);
    let err = if cand_err.is_finite() {
        cand_err
    } else {
        f64::INFINITY
    };
    if err > bound {
        res.reasons
            .push(format!("relative L2 {err:.3e} > bound {bound:.3e}"));
    }
    let mut severity = err / bound;
    if m.cosine < tol.cosine_min {
        res.reasons
            .push(format!("cosine {:.6} < {}", m.cosine, tol.cosine_min));
        severity = severity.max((1.0 - m.cosine) / (1.0 - tol.cosine_min).max(1e-12));
    } else if m.cosine < 0.99 {
        res.warnings.push(format!("cosine {:.4} < 0.99", m.cosine));
    }
    if let Some(kl) = m.kl {
        if kl > tol.kl_max {
            res.reasons.push(format!("KL {kl:.3e} > {}", tol.kl_max));
            severity = severity.max(kl / tol.kl_max);
        }
    }
    if res.class == OpClass::Matmul && m.ulp_beyond_1 > tol.ulp_share && tol.ulp <= 1.0 {
        let text = format!(
            "{:.2}% of elements beyond {} ULP ({}) (max {:.1})",
            100.0 * m.ulp_beyond_1,
            tol.ulp,
            dtype.name(),
            m.ulp_max
        );
        if tol.ulp_gate {
            res.reasons.push(text);
        }
    }
    // The thousandth ratio (5/1000 for bf16, whose half-ULP is 2e-3): warn when it drops below 0.7.
    let (ratio, label) = if dtype == Dtype::Bf16 {
        (m.within_5e3, "5/1000")
    } else {
        (m.within_1e3, "1/1000")
    };
    if ratio < 0.7 {
        res.warnings
            .push(format!("only {:.1}% of elements within {label}", 100.0 * ratio));
    }
    res.severity = if severity.is_nan() {
        f64::INFINITY
    } else {
        severity
    };
    res.float = Some(m);
}

fn tie_scores<'a>(
    name: &str,
    reference: &'a Trace,
    cand: &'a [(String, Vec<usize>, Values)],
    by_name: &HashMap<&str, usize>,
    routing: &'a [RoutingInfo],
    tol: &Tolerance,
) -> Option<TieScores<'a>> {
    let layer = layer_of(name)?;
    let scope = Scope::Layer(layer);
    let (scores, bias) = match point_of(name) {
        point::ROUTER_INDICES => {
            let info = routing.get(layer)?;
            if info.hash {
                return None;
            }
            (scope.name(point::ROUTER_SCORES), Some(info.bias.as_slice()))
        }
        point::INDEXER_TOPK => (scope.name(point::INDEXER_SCORES), None),
        _ => return None,
    };
    let candidate = by_name.get(scores.as_str()).and_then(|&i| match &cand[i] {
        (_, s, Values::F32(v)) => Some((s.clone(), v.as_slice())),
        _ => None,
    });
    let (width, reference) = match reference.f32(&scores) {
        Some((s, v)) => (*s.last()?, v),
        None => {
            let (s, v) = candidate.clone()?;
            (*s.last()?, v)
        }
    };
    Some(TieScores {
        reference,
        candidate: candidate.map(|c| c.1),
        width,
        bias: bias.filter(|b| b.len() == width),
        rule: TieRule {
            abs: tol.tie_abs,
            rel: tol.tie_rel,
        },
    })
}

fn judge_index(
    res: &mut ProbeResult,
    rv: &[i64],
    cv: &[i64],
    k: usize,
    ties: Option<&TieScores>,
    tol: &Tolerance,
) {
    let m = compare_topk(rv, cv, k, ties);
    let allowed = tol.max_harmful_flips * m.rows as f64;
    if m.harmful_flips as f64 > allowed {
        res.reasons.push(format!(
            "{} of {} rows select different ids beyond near ties (IoU {:.4}, worst gap {:.1}x the margin{})",
            m.harmful_flips,
            m.rows,
            m.iou,
            m.worst_gap_ratio,
            if ties.is_none() {
                ", no scores: hash routing or unrecorded"
            } else {
                ""
            }
        ));
    }
    if m.benign_flips > 0 {
        res.warnings
            .push(format!("{} near-tie flips (benign)", m.benign_flips));
    }
    res.severity = if m.harmful_flips == 0 {
        1.0 - m.iou
    } else {
        1.0 + m.harmful_flips as f64 / m.rows.max(1) as f64
    };
    res.index = Some(m);
}

fn judge_stats(
    res: &mut ProbeResult,
    r: &Stats,
    c: &Stats,
    checksum: Option<&str>,
    values: &Values,
    tol: &Tolerance,
) {
    if r.nan != c.nan || r.inf != c.inf {
        res.reasons.push(format!(
            "NaN/Inf counts differ: candidate {}/{} vs reference {}/{}",
            c.nan, c.inf, r.nan, r.inf
        ));
    }
    let l2 = (c.l2 - r.l2).abs() / r.l2.max(tol.small_value);
    let rms = r.l2 / (r.count.max(1) as f64).sqrt();
    let mean = (c.mean - r.mean).abs() / rms.max(tol.small_value);
    let diff = l2.max(mean);
    res.stats_l2_diff = Some(diff);
    res.rel_l2_bound = Some(tol.rel_l2_floor);
    if diff.is_nan() || diff > tol.rel_l2_floor {
        res.reasons.push(format!(
            "stats differ: L2 / mean relative difference {diff:.3e} > {:.3e}",
            tol.rel_l2_floor
        ));
    }
    if let Some(sum) = checksum {
        res.checksum_equal = Some(values.checksum() == sum);
    }
    res.severity = diff / tol.rel_l2_floor;
}

/// Propagated mode: warns where a layer multiplies the error of its input streams by 10 or more.
fn amplification_warnings(results: &mut [ProbeResult], layers: usize) {
    let err = |results: &[ProbeResult], name: &str| {
        results
            .iter()
            .find(|r| r.name == name)
            .and_then(|r| r.float.map(|f| f.rel_l2))
    };
    for i in 0..layers {
        let (input, output) = (layer_input(i, layers), layer_input(i + 1, layers));
        if let (Some(a), Some(b)) = (err(results, &input), err(results, &output)) {
            if a > 0.0 && b >= 10.0 * a {
                if let Some(r) = results.iter_mut().find(|r| r.name == output) {
                    r.warnings
                        .push(format!("layer {i} amplifies the error {:.1}x", b / a));
                    if r.status == Status::Pass {
                        r.status = Status::Warn;
                    }
                }
            }
        }
    }
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

    /// Per-layer summaries, localisation, the verdict.
    pub fn finish(&mut self, num_layers: usize) {
        self.layers.clear();
        self.localisation.clear();
        self.demote_propagated_drift();
        for mode in [RunMode::Propagated, RunMode::Isolated] {
            let rs: Vec<&ProbeResult> = self.results.iter().filter(|r| r.mode == mode).collect();
            if rs.is_empty() {
                continue;
            }
            let slots: Vec<Option<usize>> = (0..num_layers).map(Some).chain([None]).collect();
            for slot in slots {
                let here: Vec<&&ProbeResult> = rs.iter().filter(|r| r.layer == slot).collect();
                if here.is_empty() {
                    continue;
                }
                let worst = here
                    .iter()
                    .filter_map(|r| Some((r.float?.rel_l2, r.name.clone())))
                    .fold((0.0f64, String::new()), |a, b| {
                        if b.0 > a.0 || b.0.is_nan() {
                            b
                        } else {
                            a
                        }
                    });
                self.layers.push(LayerSummary {
                    mode,
                    layer: slot,
                    max_rel_l2: worst.0,
                    worst_probe: worst.1,
                    failed: here.iter().filter(|r| r.status == Status::Fail).count(),
                    probes: here.len(),
                });
            }
            let mut loc = Localisation::default();
            // Results are in forward order (layer by layer, op by op).
            let key = |r: &ProbeResult| r.layer.unwrap_or(usize::MAX);
            if let Some(first) = rs
                .iter()
                .filter(|r| r.status == Status::Fail || r.drifted())
                .min_by_key(|r| key(r))
            {
                loc.first_divergent_layer = first.layer;
                loc.first_divergent_probe = Some(first.name.clone());
            }
            loc.first_nonfinite = rs
                .iter()
                .find(|r| r.candidate_nonfinite > r.reference_nonfinite)
                .map(|r| r.name.clone());
            self.localisation.push((mode, loc));
        }
        self.passed = !self.results.iter().any(|r| r.status == Status::Fail);
    }

    /// With isolated results to judge the backend by, a propagated probe that fails only on error size
    /// (not on structure: NaN/Inf, shape, dtype, a missing probe) shows drift the precision path
    /// accumulates over layers, which a correct backend has too: it becomes a warning, and the verdict
    /// rests on the isolated per-layer gates. The propagated localisation still names where drift first
    /// crossed the bounds.
    fn demote_propagated_drift(&mut self) {
        if !self.results.iter().any(|r| r.mode == RunMode::Isolated) {
            return;
        }
        let mut demoted = 0;
        for r in &mut self.results {
            if r.mode == RunMode::Propagated
                && r.status == Status::Fail
                && r.reasons.iter().all(|x| is_drift(x))
            {
                r.warnings
                    .extend(r.reasons.drain(..).map(|x| format!("{DRIFT}{x}")));
                r.status = Status::Warn;
                demoted += 1;
            }
        }
        if demoted > 0 {
            self.notes.push(format!(
                "{demoted} propagated probes exceed their bounds through accumulated drift only; \
                 the isolated per-layer gates, which a backend bug breaks, decide the result"
            ));
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

    /// The terminal summary: policy diff first, then per-layer errors, localisation, worst probes.
    pub fn summary(&self, top: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "reference: {} ({}, {})  candidate: {} ({})  tolerances: {} defaults{}",
            self.reference_path,
            self.reference.backend,
            self.reference.dtype,
            self.candidate.backend,
            self.candidate.dtype,
            self.dtype.name(),
            self.golden
                .as_ref()
                .map_or(String::new(), |g| format!(", golden {g}"))
        );
        if self.policy_diff.is_empty() {
            let _ = writeln!(s, "precision policy: identical");
        } else {
            let _ = writeln!(s, "precision policy diff (reference -> candidate):");
            let unrec = "(unrecorded)";
            for d in self
                .policy_diff
                .iter()
                .filter(|d| d.reference != unrec && d.candidate != unrec)
            {
                let _ = writeln!(s, "  {:<16} {} -> {}", d.key, d.reference, d.candidate);
            }
            for (side, only) in [("reference", true), ("candidate", false)] {
                let keys: Vec<String> = self
                    .policy_diff
                    .iter()
                    .filter(|d| {
                        if only {
                            d.candidate == unrec
                        } else {
                            d.reference == unrec
                        }
                    })
                    .map(|d| format!("{}={}", d.key, if only { &d.reference } else { &d.candidate }))
                    .collect();
                if !keys.is_empty() {
                    let _ = writeln!(s, "  recorded by the {side} only: {}", keys.join(", "));
                }
            }
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        for (mode, loc) in &self.localisation {
            let rs: Vec<&ProbeResult> = self.results.iter().filter(|r| r.mode == *mode).collect();
            let count = |st| rs.iter().filter(|r| r.status == st).count();
            let _ = writeln!(
                s,
                "\n[{mode:?}] {} probes: {} pass, {} warn, {} fail, {} skipped",
                rs.len(),
                count(Status::Pass),
                count(Status::Warn),
                count(Status::Fail),
                count(Status::Skip)
            );
            for l in self.layers.iter().filter(|l| l.mode == *mode) {
                let _ = writeln!(
                    s,
                    "  {:<8} max rel L2 {:>9.3e}  ({}){}",
                    l.layer.map_or("head".to_string(), |i| format!("layer {i}")),
                    l.max_rel_l2,
                    l.worst_probe,
                    if l.failed > 0 {
                        format!("  {} FAILED", l.failed)
                    } else {
                        String::new()
                    }
                );
            }
            match (&loc.first_divergent_layer, &loc.first_divergent_probe) {
                (Some(l), Some(p)) => {
                    let _ = writeln!(s, "  first divergent layer: {l}, first divergent op: {p}");
                }
                (None, Some(p)) => {
                    let _ = writeln!(s, "  first divergence: {p} (after the layers)");
                }
                _ => {
                    let _ = writeln!(s, "  no divergence");
                }
            }
            if let Some(p) = &loc.first_nonfinite {
                let _ = writeln!(s, "  first NaN/Inf origin: {p}");
            }
        }
        let _ = writeln!(s, "\nworst probes:");
        let _ = writeln!(
            s,
            "  {:<10} {:<6} {:<34} {:>10} {:>10} {:>10} {:>10}  detail",
            "mode", "status", "probe", "rel_l2", "cosine", "max_abs", "within1e-3"
        );
        for r in self.worst_first().into_iter().take(top) {
            let (rel, cos, abs, w) = r
                .float
                .map_or(("-".into(), "-".into(), "-".into(), "-".into()), |f| {
                    (
                        format!("{:.3e}", f.rel_l2),
                        format!("{:.6}", f.cosine),
                        format!("{:.3e}", f.max_abs),
                        format!("{:.4}", f.within_1e3),
                    )
                });
            let mut detail: Vec<String> = r.reasons.iter().chain(&r.warnings).cloned().collect();
            if let Some(i) = &r.index {
                detail.insert(0, format!("exact {:.4} IoU {:.4}", i.exact_match, i.iou));
            }
            let _ = writeln!(
                s,
                "  {:<10} {:<6} {:<34} {:>10} {:>10} {:>10} {:>10}  {}",
                format!("{:?}", r.mode).to_lowercase(),
                format!("{:?}", r.status).to_uppercase(),
                r.name,
                rel,
                cos,
                abs,
                w,
                detail.join("; ")
            );
        }
        let _ = writeln!(s, "\nRESULT: {}", if self.passed { "PASS" } else { "FAIL" });
        s
    }

    /// CSV, one row per probe.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "mode,probe,reference,layer,class,status,rel_l2,bound,golden_rel_l2,sqnr_db,cosine,max_abs,mean_abs,max_rel,mean_rel,rmse,within_1e3,within_5e3,ulp_max,ulp_mean,ulp_beyond_1,kl,elementwise_beyond,exact_match,iou,benign_flips,harmful_flips,stats_diff,checksum_equal,reasons\n",
        );
        let o = |x: Option<f64>| x.map_or(String::new(), |v| format!("{v:e}"));
        for r in &self.results {
            let f = r.float;
            let i = r.index;
            let _ = writeln!(
                s,
                "{:?},{},{},{},{:?},{:?},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},\"{}\"",
                r.mode,
                r.name,
                r.reference,
                r.layer.map_or(String::new(), |l| l.to_string()),
                r.class,
                r.status,
                o(f.map(|f| f.rel_l2)),
                o(r.rel_l2_bound),
                o(r.golden_rel_l2),
                o(f.map(|f| f.sqnr_db)),
                o(f.map(|f| f.cosine)),
                o(f.map(|f| f.max_abs)),
                o(f.map(|f| f.mean_abs)),
                o(f.map(|f| f.max_rel)),
                o(f.map(|f| f.mean_rel)),
                o(f.map(|f| f.rmse)),
                o(f.map(|f| f.within_1e3)),
                o(f.map(|f| f.within_5e3)),
                o(f.map(|f| f.ulp_max)),
                o(f.map(|f| f.ulp_mean)),
                o(f.map(|f| f.ulp_beyond_1)),
                o(f.and_then(|f| f.kl)),
                o(r.elementwise_beyond),
                o(i.map(|i| i.exact_match)),
                o(i.map(|i| i.iou)),
                i.map_or(String::new(), |i| i.benign_flips.to_string()),
                i.map_or(String::new(), |i| i.harmful_flips.to_string()),
                o(r.stats_l2_diff),
                r.checksum_equal.map_or(String::new(), |b| b.to_string()),
                r.reasons.join("; ").replace('"', "'")
            );
        }
        s
    }

    /// A self-contained HTML page: verdict, policy diff, localisation, a per-layer error plot (inline
    /// SVG, log scale) and the probe table worst first.
    pub fn html(&self) -> String {
        let esc = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
        let mut h = String::from(
            "<!doctype html><html><head><meta charset=\"utf-8\"><title>v4 validate</title><style>\
             body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}\
             td,th{border:1px solid #ccc;padding:2px 6px}.fail{background:#fdd}.warn{background:#ffd}\
             .pass{background:#dfd}</style></head><body>",
        );
        let _ = write!(
            h,
            "<h1>v4 validate: <span class=\"{}\">{}</span></h1><p>reference <code>{}</code> ({}, {}) vs candidate ({}, {}); tolerances: {} defaults</p>",
            if self.passed { "pass" } else { "fail" },
            if self.passed { "PASS" } else { "FAIL" },
            esc(&self.reference_path),
            esc(&self.reference.backend),
            esc(&self.reference.dtype),
            esc(&self.candidate.backend),
            esc(&self.candidate.dtype),
            self.dtype.name()
        );
        h.push_str(
            "<h2>Precision policy diff</h2><table><tr><th>key</th><th>reference</th><th>candidate</th></tr>",
        );
        for d in &self.policy_diff {
            let _ = write!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&d.key),
                esc(&d.reference),
                esc(&d.candidate)
            );
        }
        h.push_str("</table><h2>Localisation</h2><ul>");
        for (mode, l) in &self.localisation {
            let _ = write!(
                h,
                "<li>{mode:?}: first divergent layer {}, op {}; first NaN/Inf {}</li>",
                l.first_divergent_layer.map_or("none".into(), |x| x.to_string()),
                esc(l.first_divergent_probe.as_deref().unwrap_or("none")),
                esc(l.first_nonfinite.as_deref().unwrap_or("none"))
            );
        }
        h.push_str("</ul><h2>Worst relative L2 per layer</h2>");
        h.push_str(&self.svg());
        h.push_str("<h2>Probes (worst first)</h2><table><tr><th>mode</th><th>status</th><th>probe</th><th>class</th><th>rel L2</th><th>bound</th><th>cosine</th><th>max abs</th><th>max rel</th><th>within 1e-3</th><th>ULP max</th><th>KL</th><th>IoU</th><th>detail</th></tr>");
        for r in self.worst_first() {
            let f = r.float;
            let g = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.3e}"));
            let _ = write!(
                h,
                "<tr class=\"{}\"><td>{:?}</td><td>{:?}</td><td>{}</td><td>{:?}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                format!("{:?}", r.status).to_lowercase(),
                r.mode,
                r.status,
                esc(&r.name),
                r.class,
                g(f.map(|f| f.rel_l2)),
                g(r.rel_l2_bound),
                f.map_or("-".into(), |f| format!("{:.6}", f.cosine)),
                g(f.map(|f| f.max_abs)),
                g(f.map(|f| f.max_rel)),
                f.map_or("-".into(), |f| format!("{:.4}", f.within_1e3)),
                g(f.map(|f| f.ulp_max)),
                g(f.and_then(|f| f.kl)),
                r.index.map_or("-".into(), |i| format!("{:.4}", i.iou)),
                esc(&r.reasons.iter().chain(&r.warnings).cloned().collect::<Vec<_>>().join("; "))
            );
        }
        h.push_str("</table>");
        for n in &self.notes {
            let _ = write!(h, "<p>note: {}</p>", esc(n));
        }
        h.push_str("</body></html>\n");
        h
    }

    #[allow(clippy::type_complexity)]
    fn svg(&self) -> String {
        let (w, hgt, pad) = (640.0, 280.0, 50.0);
        let curves: Vec<(RunMode, &str, Vec<(Option<usize>, f64)>)> =
            [(RunMode::Propagated, "#c33"), (RunMode::Isolated, "#36c")]
                .into_iter()
                .map(|(m, c)| (m, c, self.layer_curve(m)))
                .filter(|c| !c.2.is_empty())
                .collect();
        let n = curves.iter().map(|c| c.2.len()).max().unwrap_or(1).max(2);
        let logs: Vec<f64> = curves
            .iter()
            .flat_map(|c| c.2.iter().map(|p| p.1.max(1e-12).log10()))
            .collect();
        let lo = logs
            .iter()
            .cloned()
            .fold(f64::INFINITY, f64::min)
            .floor()
            .min(-8.0);
        let hi = logs
            .iter()
            .cloned()
            .fold(f64::NEG_INFINITY, f64::max)
            .ceil()
            .max(lo + 1.0);
        let x = |i: usize| pad + (w - 2.0 * pad) * i as f64 / (n - 1) as f64;
        let y = |v: f64| hgt - pad - (hgt - 2.0 * pad) * (v.max(1e-12).log10() - lo) / (hi - lo);
        let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{hgt}\">");
        let _ = write!(
            s,
            "<rect width=\"{w}\" height=\"{hgt}\" fill=\"white\" stroke=\"#999\"/>"
        );
        for e in (lo as i64)..=(hi as i64) {
            let yy = y(10f64.powi(e as i32));
            let _ = write!(
                s,
                "<line x1=\"{pad}\" x2=\"{}\" y1=\"{yy}\" y2=\"{yy}\" stroke=\"#eee\"/><text x=\"4\" y=\"{}\" font-size=\"10\">1e{e}</text>",
                w - pad,
                yy + 3.0
            );
        }
        if let Some((_, _, pts)) = curves.first() {
            for (i, (l, _)) in pts.iter().enumerate() {
                let label = l.map_or("head".to_string(), |l| format!("L{l}"));
                let _ = write!(
                    s,
                    "<text x=\"{}\" y=\"{}\" font-size=\"10\">{label}</text>",
                    x(i) - 8.0,
                    hgt - pad + 15.0
                );
            }
        }
        for (k, (mode, color, pts)) in curves.iter().enumerate() {
            let path: Vec<String> = pts
                .iter()
                .enumerate()
                .map(|(i, p)| format!("{:.1},{:.1}", x(i), y(p.1)))
                .collect();
            let _ = write!(
                s,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
                path.join(" ")
            );
            for (i, p) in pts.iter().enumerate() {
                let _ = write!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{:.3e}</title></circle>", x(i), y(p.1), p.1);
            }
            let _ = write!(
                s,
                "<text x=\"{}\" y=\"{}\" font-size=\"11\" fill=\"{color}\">{mode:?}</text>",
                w - pad - 80.0,
                15.0 + 14.0 * k as f64
            );
        }
        s.push_str("</svg>");
        s
    }

    /// Writes `report.json`, `report.csv` and `report.html` into `dir` (created).
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
        let put = |name: &str, text: String| -> Result<()> {
            atomic::write_bytes(&dir.join(name), text.as_bytes()).map_err(|e| Error::io(&e.path)(e.source))
        };
        let json =
            serde_json::to_string_pretty(self).map_err(|e| Error::trace(&dir.join("report.json"), e))?;
        put("report.json", json)?;
        put("report.csv", self.csv())?;
        put("report.html", self.html())
    }
}
