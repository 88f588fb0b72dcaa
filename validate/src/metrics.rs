//! Per-tensor metrics: float comparisons and discrete top-k comparisons with near-tie classification.

use serde::{Deserialize, Serialize};

/// Float comparison of a candidate against a reference (f64 arithmetic).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct FloatMetrics {
    pub count: usize,
    pub cosine: f64,
    pub max_abs: f64,
    pub mean_abs: f64,
    /// `|c - r| / max(|r|, floor)`
    pub max_rel: f64,
    pub mean_rel: f64,
    pub rmse: f64,
    /// `||c - r|| / ||r||`
    pub rel_l2: f64,
    /// Signal-to-quantization-noise ratio `10 log10(||r||² / ||c - r||²)` in dB (PyTorch's numeric
    /// suite); infinite for identical tensors.
    pub sqnr_db: f64,
    /// Share of elements whose relative error is within 1/1000 (msProbe's "thousandth ratio").
    pub within_1e3: f64,
    /// Share within 5/1000.
    pub within_5e3: f64,
    /// ULP error measured on the grid of the candidate's compute dtype.
    pub ulp_max: f64,
    pub ulp_mean: f64,
    /// Share of elements more than one ULP away.
    pub ulp_beyond_1: f64,
    /// Mean KL(softmax(r) || softmax(c)) over the last dimension (probability outputs: logits).
    pub kl: Option<f64>,
    /// Elements where exactly one side is NaN, or where both are infinite with different signs or
    /// exactly one side is infinite.
    pub nonfinite_mismatch: usize,
    pub candidate_nonfinite: usize,
    pub reference_nonfinite: usize,
}

/// The spacing of the `mantissa_bits` grid at `x` (normal numbers; subnormal spacing below).
pub fn ulp(x: f64, mantissa_bits: i32) -> f64 {
    let a = x.abs().max(f32::MIN_POSITIVE as f64);
    let e = a.log2().floor() as i32;
    2f64.powi(e - mantissa_bits)
}

/// Compares `candidate` with `reference` element by element. `floor`: the small-value floor of the
/// relative error; `mantissa_bits`: the ULP grid; `softmax_dim`: last-dimension size when the tensor is
/// a logit (KL computed), else None.
pub fn compare_f32(
    reference: &[f32],
    candidate: &[f32],
    floor: f64,
    mantissa_bits: i32,
    softmax_dim: Option<usize>,
) -> FloatMetrics {
    let mut m = FloatMetrics {
        count: reference.len(),
        ..Default::default()
    };
    let (mut dot, mut nr, mut nc, mut sq) = (0.0, 0.0, 0.0, 0.0);
    let (mut sum_abs, mut sum_rel, mut sum_ulp) = (0.0, 0.0, 0.0);
    let (mut w3, mut w5, mut beyond, mut finite) = (0usize, 0usize, 0usize, 0usize);
    for (&r, &c) in reference.iter().zip(candidate) {
        let (r, c) = (r as f64, c as f64);
        m.reference_nonfinite += !r.is_finite() as usize;
        m.candidate_nonfinite += !c.is_finite() as usize;
        if !r.is_finite() || !c.is_finite() {
            let same = (r.is_nan() && c.is_nan()) || (r.is_infinite() && r == c);
            m.nonfinite_mismatch += !same as usize;
            continue;
        }
        finite += 1;
        let d = (c - r).abs();
        dot += r * c;
        nr += r * r;
        nc += c * c;
        sq += d * d;
        sum_abs += d;
        m.max_abs = m.max_abs.max(d);
        let rel = d / r.abs().max(floor);
        sum_rel += rel;
        m.max_rel = m.max_rel.max(rel);
        w3 += (rel <= 1e-3) as usize;
        w5 += (rel <= 5e-3) as usize;
        let u = d / ulp(r, mantissa_bits);
        sum_ulp += u;
        m.ulp_max = m.ulp_max.max(u);
        beyond += (u > 1.0) as usize;
    }
    let n = finite.max(1) as f64;
    m.cosine = if nr == 0.0 && nc == 0.0 {
        1.0
    } else if nr == 0.0 || nc == 0.0 {
        0.0
    } else {
        dot / (nr.sqrt() * nc.sqrt())
    };
    m.mean_abs = sum_abs / n;
    m.mean_rel = sum_rel / n;
    m.rmse = (sq / n).sqrt();
    m.rel_l2 = if nr > 0.0 {
        sq.sqrt() / nr.sqrt()
    } else {
        sq.sqrt()
    };
    m.sqnr_db = 10.0 * (nr / sq).log10();
    m.within_1e3 = w3 as f64 / n;
    m.within_5e3 = w5 as f64 / n;
    m.ulp_mean = sum_ulp / n;
    m.ulp_beyond_1 = beyond as f64 / n;
    if let Some(dim) = softmax_dim.filter(|&d| d > 0) {
        let rows = reference.len() / dim;
        let mut total = 0.0;
        for (rr, cr) in reference.chunks_exact(dim).zip(candidate.chunks_exact(dim)) {
            let p = softmax(rr);
            let q = softmax(cr);
            total += p
                .iter()
                .zip(&q)
                .filter(|(p, _)| **p > 0.0)
                .map(|(p, q)| p * (p / q.max(1e-300)).ln())
                .sum::<f64>();
        }
        m.kl = Some(total / rows.max(1) as f64);
    }
    m
}

fn softmax(x: &[f32]) -> Vec<f64> {
    let max = x.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b as f64));
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|v| v / s).collect()
}

/// How close two selection scores must be for a flip between them to count as a near tie.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct TieRule {
    /// Absolute margin.
    pub abs: f64,
    /// Margin relative to the row's largest |score|.
    pub rel: f64,
}

/// Comparison of discrete top-k selections (rows of `k` ids; negative ids = empty slots).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct IndexMetrics {
    pub rows: usize,
    /// Rows selecting the same set.
    pub exact_rows: usize,
    pub exact_match: f64,
    /// Mean intersection-over-union of the selected sets.
    pub iou: f64,
    /// Rows whose sets differ with every swapped pair within the near-tie margin.
    pub benign_flips: usize,
    /// Rows whose sets differ beyond the margin (or with no scores to judge by).
    pub harmful_flips: usize,
    /// The largest score gap of a swapped pair, divided by its margin (<= 1: near tie).
    pub worst_gap_ratio: f64,
}

/// Scores used to judge flips: one row of `width` scores per selection row.
pub struct TieScores<'a> {
    pub reference: &'a [f32],
    /// The candidate's scores for the same rows; their deviation from the reference widens the margin
    /// (a flip explained by the observed score error is benign).
    pub candidate: Option<&'a [f32]>,
    pub width: usize,
    /// Selection-only bias added to the scores before ranking (MoE top-k layers), `[width]`.
    pub bias: Option<&'a [f32]>,
    pub rule: TieRule,
}

/// Compares two top-k selections row by row. Without `scores` (hash routing), every flip is harmful.
pub fn compare_topk(
    reference: &[i64],
    candidate: &[i64],
    k: usize,
    scores: Option<&TieScores>,
) -> IndexMetrics {
    let mut m = IndexMetrics::default();
    let mut iou_sum = 0.0;
    for (row, (rr, cr)) in reference
        .chunks(k.max(1))
        .zip(candidate.chunks(k.max(1)))
        .enumerate()
    {
        m.rows += 1;
        let a: Vec<i64> = sorted_set(rr);
        let b: Vec<i64> = sorted_set(cr);
        let inter = a.iter().filter(|x| b.contains(x)).count();
        let union = a.len() + b.len() - inter;
        iou_sum += if union == 0 {
            1.0
        } else {
            inter as f64 / union as f64
        };
        if a == b {
            m.exact_rows += 1;
            continue;
        }
        let only_ref: Vec<i64> = a.iter().copied().filter(|x| !b.contains(x)).collect();
        let only_cand: Vec<i64> = b.iter().copied().filter(|x| !a.contains(x)).collect();
        let ratio = scores.and_then(|s| flip_gap_ratio(s, row, &only_ref, &only_cand));
        match ratio {
            Some(r) if r <= 1.0 => {
                m.benign_flips += 1;
                m.worst_gap_ratio = m.worst_gap_ratio.max(r);
            }
            Some(r) => {
                m.harmful_flips += 1;
                m.worst_gap_ratio = m.worst_gap_ratio.max(r);
            }
            None => {
                m.harmful_flips += 1;
                m.worst_gap_ratio = f64::INFINITY;
            }
        }
    }
    m.exact_match = m.exact_rows as f64 / m.rows.max(1) as f64;
    m.iou = iou_sum / m.rows.max(1) as f64;
    m
}

fn sorted_set(row: &[i64]) -> Vec<i64> {
    let mut v: Vec<i64> = row.iter().copied().filter(|&x| x >= 0).collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// max over swapped pairs of |s(x) - s(y)| / margin, or None when the scores cannot judge the row.
fn flip_gap_ratio(s: &TieScores, row: usize, only_ref: &[i64], only_cand: &[i64]) -> Option<f64> {
    let w = s.width;
    let r = s.reference.get(row * w..(row + 1) * w)?;
    let biased = |e: i64| -> Option<f64> {
        let e = usize::try_from(e).ok().filter(|&e| e < w)?;
        Some(r[e] as f64 + s.bias.map_or(0.0, |b| b[e] as f64))
    };
    let scale = r.iter().fold(0.0f64, |a, &x| a.max((x as f64).abs()));
    // The candidate's own score error on the swapped ids: differences of that size can reorder them.
    let mut observed = 0.0f64;
    if let Some(c) = s.candidate.and_then(|c| c.get(row * w..(row + 1) * w)) {
        for &e in only_ref.iter().chain(only_cand) {
            if let Ok(e) = usize::try_from(e) {
                if e < w {
                    observed = observed.max((c[e] as f64 - r[e] as f64).abs());
                }
            }
        }
    }
    let margin = s.rule.abs + s.rule.rel * scale + 2.0 * observed;
    let mut worst = 0.0f64;
    // A selection that only grew or shrank (empty slots) has nothing to pair: judge by the boundary.
    if only_ref.is_empty() || only_cand.is_empty() {
        return None;
    }
    for &x in only_ref {
        for &y in only_cand {
            let gap = (biased(x)? - biased(y)?).abs();
            worst = worst.max(gap / margin.max(f64::MIN_POSITIVE));
        }
    }
    Some(worst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_metrics_basics() {
        let r = [1.0f32, -2.0, 3.0, 0.0];
        let m = compare_f32(&r, &r, 1e-6, 23, None);
        assert_eq!(m.max_abs, 0.0);
        assert!((m.cosine - 1.0).abs() < 1e-12);
        assert_eq!(m.within_1e3, 1.0);
        assert_eq!(m.sqnr_db, f64::INFINITY);
        let c = [1.001f32, -2.0, 3.0, 1e-7];
        let m = compare_f32(&r, &c, 1e-6, 23, Some(4));
        // ||r||² = 14, noise ≈ 0.001² + 1e-14.
        assert!(
            (m.sqnr_db - 10.0 * (14.0f64 / 1e-6).log10()).abs() < 1e-3,
            "{}",
            m.sqnr_db
        );
        assert!((m.max_abs - 0.001).abs() < 1e-6);
        // 1e-7 against 0 with a floor of 1e-6: rel 0.1, not infinity.
        assert!((m.max_rel - 0.1).abs() < 1e-3);
        assert!(m.kl.unwrap() > 0.0 && m.kl.unwrap() < 1e-5);
        assert_eq!(m.within_1e3, 0.5);
        let nan = [1.0f32, f32::NAN, 3.0, 0.0];
        assert_eq!(compare_f32(&r, &nan, 1e-6, 23, None).nonfinite_mismatch, 1);
        // ULPs: bf16 grid at 1.0 is 2^-7.
        let m = compare_f32(&[1.0], &[1.0 + 1.0 / 64.0], 1e-6, 7, None);
        assert!((m.ulp_max - 2.0).abs() < 1e-9);
    }

    /// Synthetic router: 8 experts, top-3. Row 0 identical; row 1 swaps experts 2 and 5 whose scores
    /// differ by 1e-6 (a near tie: benign); row 2 swaps experts 0 and 7 whose scores differ by 0.5
    /// (harmful).
    #[test]
    fn routing_overlap_and_near_ties() {
        let scores: Vec<f32> = vec![
            0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1, 0.1, // row 0 picks 0,1,2
            0.9, 0.8, 0.5, 0.1, 0.1, 0.499999, 0.1, 0.1, // row 1: 2 vs 5 near tie
            0.9, 0.8, 0.7, 0.1, 0.1, 0.1, 0.1, 0.4, // row 2: 0 (0.9) vs 7 (0.4)
        ];
        let reference = [0, 1, 2, 0, 1, 2, 0, 1, 2];
        let candidate = [0, 1, 2, 0, 1, 5, 7, 1, 2];
        let rule = TieRule { abs: 1e-5, rel: 1e-4 };
        let ties = TieScores {
            reference: &scores,
            candidate: None,
            width: 8,
            bias: None,
            rule,
        };
        let m = compare_topk(&reference, &candidate, 3, Some(&ties));
        assert_eq!(m.rows, 3);
        assert_eq!(m.exact_rows, 1);
        assert_eq!(m.benign_flips, 1);
        assert_eq!(m.harmful_flips, 1);
        // IoU: 1, 2/4, 2/4.
        assert!((m.iou - (1.0 + 0.5 + 0.5) / 3.0).abs() < 1e-12);
        assert!(m.worst_gap_ratio > 1.0);

        // The bias moves the boundary: with +0.5 on expert 7, row 2's swap is a near tie.
        let mut bias = [0.0f32; 8];
        bias[7] = 0.5;
        let ties = TieScores {
            bias: Some(&bias),
            ..ties
        };
        let m = compare_topk(&reference, &candidate, 3, Some(&ties));
        assert_eq!((m.benign_flips, m.harmful_flips), (2, 0));

        // Candidate scores that moved by 0.3 explain a 0.5 gap (margin = 2 * 0.3).
        let mut cand = scores.clone();
        cand[16 + 7] = 0.7;
        let ties = TieScores {
            reference: &scores,
            candidate: Some(&cand),
            width: 8,
            bias: None,
            rule,
        };
        assert_eq!(
            compare_topk(&reference, &candidate, 3, Some(&ties)).harmful_flips,
            0
        );

        // Without scores (hash routing) every flip is harmful; order within a row does not matter.
        let m = compare_topk(&reference, &[2, 1, 0, 0, 1, 5, 7, 1, 2], 3, None);
        assert_eq!((m.exact_rows, m.benign_flips, m.harmful_flips), (1, 0, 2));
    }
}
