//! MXFP4: E2M1 elements packed two per byte (low nibble first), one E8M0 scale per 32 elements
//! along the input dimension. Storage `[out, in/2]` codes + `[out, in/32]` scales.
//!
//! Two scale rules ([`MxRule`]):
//! - `Rceil` (DeepSeek-V4 experts, cuBLAS, ModelOpt MXFP4): `2^ceil(log2(amax/6))`, amax floored
//!   at 6 * 2^-126, so no element clips;
//! - `Floor` (OCP MX spec): `2^(floor(log2 amax) - 2)`; values in (6, 8) * scale saturate to 6.
//!
//! Elements: `E2M1_RNE(x / scale)` clamped to ±6, sign bit copied. Dequantisation:
//! `value * 2^(e-127)` in f32.
//!
//! Weight-only calibration ([`ScaleSearch::MinSquaredError`]) tries exponents e-1, e, e+1 around
//! the rule's choice and keeps the one with the least (importance-weighted) squared error; ties keep
//! the rule's exponent.

use super::{
    amax, e8m0_ceil_div, e8m0_floor, e8m0_reciprocal, e8m0_to_f32, pack_pairs, round_e2m1, Acc, ErrStats,
    ScaleSearch, E2M1_MAX, E2M1_VALUES, LANES,
};
use rayon::prelude::*;

/// Elements per MX scale.
pub const MX_BLOCK: usize = 32;

/// How an MX block's E8M0 scale is derived from its largest magnitude.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MxRule {
    /// `2^ceil(log2(amax / 6))`: DeepSeek-V4's rule.
    Rceil,
    /// `2^(floor(log2 amax) - 2)`: the OCP MX specification.
    Floor,
}

/// E8M0 scale of a block with largest magnitude `amax`.
#[inline(always)]
pub fn block_scale(amax: f32, rule: MxRule) -> u8 {
    match rule {
        // ceil(log2(amax / 6)), 6 = 1.5 * 2^2.
        MxRule::Rceil => e8m0_ceil_div(amax.max(E2M1_MAX * f32::MIN_POSITIVE), 2, 0x40_0000),
        MxRule::Floor => e8m0_floor(amax).saturating_sub(2),
    }
}

/// Encodes one block with scale byte `e` into `packed` (len/2 bytes), adding its error (in real
/// units) to `acc`.
#[inline(always)]
fn encode_block(x: &[f32], e: u8, packed: &mut [u8], acc: &mut Acc) {
    let (s, inv) = (e8m0_to_f32(e), e8m0_reciprocal(e));
    let mut codes = [0u8; MX_BLOCK];
    for (cb, xb) in codes.chunks_exact_mut(LANES).zip(x.chunks_exact(LANES)) {
        for i in 0..LANES {
            let v = xb[i];
            let a = (v * inv).abs();
            let (m, q) = round_e2m1(a);
            cb[i] = (m | ((v.to_bits() >> 28) & 0x8)) as u8;
            acc.add(i, v, (a - q) * s);
        }
    }
    pack_pairs(&codes, packed);
}

/// Weighted squared error of quantising a block with scale byte `e` (no output).
#[inline]
fn block_error(x: &[f32], w: Option<&[f32]>, e: u8) -> f64 {
    let (s, inv) = (e8m0_to_f32(e), e8m0_reciprocal(e));
    let mut se = 0f64;
    for (j, &v) in x.iter().enumerate() {
        let (_, q) = round_e2m1((v * inv).abs());
        let d = (v.abs() - q * s) as f64;
        se += d * d * w.map_or(1.0, |w| w[j] as f64);
    }
    se
}

simd_dispatch! {
    /// Quantises rows of `cols` values (`cols % 32 == 0`) into `packed` (`[rows, cols/2]`) and
    /// `scales` (`[rows, cols/32]`).
    pub fn quantize_rows = quantize_rows_impl(
        x: &[f32],
        cols: usize,
        rule: MxRule,
        search: ScaleSearch<'_>,
        packed: &mut [u8],
        scales: &mut [u8],
    ) -> ErrStats
}

#[inline(always)]
fn quantize_rows_impl(
    x: &[f32],
    cols: usize,
    rule: MxRule,
    search: ScaleSearch<'_>,
    packed: &mut [u8],
    scales: &mut [u8],
) -> ErrStats {
    let mut st = ErrStats::default();
    let rows = x
        .chunks_exact(cols)
        .zip(packed.chunks_exact_mut(cols / 2))
        .zip(scales.chunks_exact_mut(cols / MX_BLOCK));
    for ((xr, pr), sr) in rows {
        // Lane accumulators keep the loops vectorised, f64 totals per row keep the statistics
        // precise.
        let mut acc = Acc::new();
        let mut extra_rtn = 0f64;
        let blocks = xr
            .chunks_exact(MX_BLOCK)
            .zip(pr.chunks_exact_mut(MX_BLOCK / 2))
            .zip(sr.iter_mut());
        for (b, ((xb, pb), sb)) in blocks.enumerate() {
            let e = block_scale(amax(xb), rule);
            *sb = e;
            let ScaleSearch::MinSquaredError { importance } = search else {
                encode_block(xb, e, pb, &mut acc);
                continue;
            };
            let w = importance.map(|w| &w[b * MX_BLOCK..(b + 1) * MX_BLOCK]);
            let mut best = (block_error(xb, w, e), e);
            for cand in [e.checked_sub(1), e.checked_add(1).filter(|&c| c < 255)]
                .into_iter()
                .flatten()
            {
                let err = block_error(xb, w, cand);
                if err < best.0 {
                    best = (err, cand);
                }
            }
            if best.1 == e {
                encode_block(xb, e, pb, &mut acc);
            } else {
                let (mut rtn, mut chosen) = (Acc::new(), Acc::new());
                encode_block(xb, e, pb, &mut rtn);
                encode_block(xb, best.1, pb, &mut chosen);
                *sb = best.1;
                extra_rtn += rtn.sse() as f64 - chosen.sse() as f64;
                acc.merge(&chosen);
            }
        }
        st = st.merge(acc.stats(extra_rtn));
    }
    st
}

/// Quantises a `[rows, cols]` matrix to MXFP4. Returns packed codes `[rows, cols/2]`, E8M0 scales
/// `[rows, cols/32]` and error statistics.
///
/// # Panics
/// If `x.len() != rows * cols`, `cols % 32 != 0`, or an importance vector is not `cols` long.
pub fn quantize(
    x: &[f32],
    rows: usize,
    cols: usize,
    rule: MxRule,
    search: ScaleSearch<'_>,
) -> (Vec<u8>, Vec<u8>, ErrStats) {
    assert!(
        x.len() == rows * cols && cols.is_multiple_of(MX_BLOCK),
        "x must be [rows, cols], cols % 32 == 0"
    );
    if let ScaleSearch::MinSquaredError { importance: Some(w) } = search {
        assert_eq!(w.len(), cols, "importance must have one weight per input channel");
    }
    let mut packed = vec![0u8; rows * cols / 2];
    let mut scales = vec![0u8; rows * cols / MX_BLOCK];
    let st = packed
        .par_chunks_mut(cols / 2)
        .zip(scales.par_chunks_mut(cols / MX_BLOCK))
        .zip(x.par_chunks(cols))
        .map(|((p, s), xr)| quantize_rows(xr, cols, rule, search, p, s))
        .reduce(ErrStats::default, ErrStats::merge);
    (packed, scales, st)
}

simd_dispatch! {
    /// Dequantises rows: `packed` `[n, cols/2]` and `scales` `[n, cols/block]` for the rows in
    /// `out` (`[n, cols]`). Returns the index of the first element with a NaN scale (0xFF), if any.
    pub fn dequantize_rows = dequantize_rows_impl(packed: &[u8], scales: &[u8], block: usize, out: &mut [f32]) -> Option<usize>
}

#[inline(always)]
fn dequantize_rows_impl(packed: &[u8], scales: &[u8], block: usize, out: &mut [f32]) -> Option<usize> {
    let mut bad = false;
    for ((ob, pb), &e) in out
        .chunks_exact_mut(block)
        .zip(packed.chunks_exact(block / 2))
        .zip(scales)
    {
        bad |= e == 0xFF;
        let s = e8m0_to_f32(e);
        for (o2, &b) in ob.chunks_exact_mut(2).zip(pb) {
            o2[0] = E2M1_VALUES[(b & 0xF) as usize] * s;
            o2[1] = E2M1_VALUES[(b >> 4) as usize] * s;
        }
    }
    if bad {
        let i = scales.iter().position(|&e| e == 0xFF).unwrap_or(0);
        Some(i * block)
    } else {
        None
    }
}

/// Dequantises an MXFP4 matrix with `block` elements per scale (32 for V4).
pub fn dequantize(packed: &[u8], scales: &[u8], rows: usize, cols: usize, block: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols)
        .zip(packed.par_chunks(cols / 2))
        .zip(scales.par_chunks(cols / block))
        .for_each(|((o, p), s)| {
            dequantize_rows(p, s, block, o);
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::test_data;

    #[test]
    fn vector_and_baseline_kernels_agree() {
        let (rows, cols) = (8, 256);
        let x = test_data(rows * cols, 3);
        let w: Vec<f32> = (0..cols).map(|j| (j % 5) as f32).collect();
        let searches = [
            ScaleSearch::Off,
            ScaleSearch::MinSquaredError { importance: None },
            ScaleSearch::MinSquaredError { importance: Some(&w) },
        ];
        for rule in [MxRule::Rceil, MxRule::Floor] {
            for search in searches {
                let (mut p1, mut s1) = (vec![0u8; rows * cols / 2], vec![0u8; rows * cols / 32]);
                let (mut p2, mut s2) = (p1.clone(), s1.clone());
                let a = quantize_rows(&x, cols, rule, search, &mut p1, &mut s1);
                let b = quantize_rows_impl(&x, cols, rule, search, &mut p2, &mut s2);
                assert_eq!((&p1, &s1), (&p2, &s2), "{rule:?} {search:?}");
                assert_eq!(a, b);
                let (mut o1, mut o2) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
                dequantize_rows(&p1, &s1, MX_BLOCK, &mut o1);
                dequantize_rows_impl(&p1, &s1, MX_BLOCK, &mut o2);
                assert_eq!(o1, o2);
            }
        }
    }

    #[test]
    fn search_never_loses_to_rtn_and_stats_match_the_bytes() {
        let (rows, cols) = (16, 512);
        // Cubed: most values small, a few large (like trained weights), so scales matter.
        let x: Vec<f32> = test_data(rows * cols, 5).iter().map(|v| v * v * v).collect();
        let (p0, s0, rtn) = quantize(&x, rows, cols, MxRule::Rceil, ScaleSearch::Off);
        let (p1, s1, cal) = quantize(
            &x,
            rows,
            cols,
            MxRule::Rceil,
            ScaleSearch::MinSquaredError { importance: None },
        );
        assert!(cal.sse < rtn.sse, "{} !< {}", cal.sse, rtn.sse);
        assert!((cal.sse_rtn - rtn.sse).abs() <= 1e-6 * rtn.sse);
        for (p, s, st) in [(p0, s0, rtn), (p1, s1, cal)] {
            let q = dequantize(&p, &s, rows, cols, MX_BLOCK);
            let sse: f64 = x.iter().zip(&q).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
            assert!((sse - st.sse).abs() <= 1e-4 * sse, "{sse} vs {}", st.sse);
        }
    }
}
