//! Judging each candidate probe against the reference: float metrics, index (top-k) agreement with near-tie
//! tolerance, statistics-only probes, and amplification warnings.

use crate::metrics::{compare_f32, compare_topk, TieRule, TieScores};
use crate::options::{RunMode, ValidateOptions};
use crate::report::{ProbeResult, RoutingInfo, Status};
use crate::rules::{Dtype, OpClass, Tolerance};
use crate::trace::{Stats, Trace, Values};
use crate::Result;
use crate::{layer_input, layer_of, point_of};
use burn::tensor::TensorData;
use std::collections::HashMap;
use std::ops::Range;
use v4_model::probe::{point, Scope};

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
        let mut res = ProbeResult::new(mode, name, &ref_name);
        res.reference_nonfinite = r.stats.nan + r.stats.inf;
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
                let mut missing = ProbeResult::new(mode, &e.name, &e.name);
                missing.status = if tol.skip { Status::Skip } else { Status::Fail };
                missing.reasons.push("missing in the candidate run".into());
                missing.severity = f64::INFINITY;
                out.push(missing);
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
