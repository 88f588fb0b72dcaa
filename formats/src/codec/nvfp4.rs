//! NVFP4 as NVIDIA ModelOpt 0.47 writes it (and NVIDIA's DeepSeek FP8 -> FP4 script): E2M1
//! elements packed two per byte (low nibble first), one E4M3FN scale per 16 elements along the
//! input dimension, and one F32 scale per tensor.
//!
//! - tensor scale `sf2 = amax / (6 * 448)` (1 for an all-zero tensor);
//! - block scale `E4M3_RNE_sat(clamp(amax_blk / (6 * sf2), 2^-9, 448))`, a zero block gets 1;
//! - element `E2M1_RNE(x / (f32(block_scale) * sf2))`, clamp ±6, with ModelOpt's sign rule
//!   (sign bit set only for `x < 0`);
//! - dequantisation `value * (f32(block_scale) * sf2)`.
//!
//! Tensors: `weight` U8 `[out, in/2]`, `weight_scale` F8_E4M3 `[out, in/16]`, `weight_scale_2` F32
//! `[]`. ModelOpt's `input_scale` is an activation statistic and is not produced by weight-only
//! conversion.
//!
//! Weight-only calibration ([`ScaleSearch::MinSquaredError`]) sweeps the E4M3 block-scale codes
//! from two below the RTN code to one above the code that maps the block maximum to 4 ("four over
//! six"), keeping the least (importance-weighted) squared error; ties keep the RTN code.

use super::{
    amax, e4m3_finite_to_f32, f32_to_e4m3_sat, pack_pairs, round_e2m1, Acc, ErrStats, ScaleSearch, E2M1_MAX,
    E2M1_VALUES, E4M3_MAX, LANES,
};
use rayon::prelude::*;

/// Elements per NVFP4 block scale.
pub const NV_BLOCK: usize = 16;

/// Smallest block scale the rule allows: 2^-9, the least E4M3 subnormal.
const MIN_BLOCK_SCALE: f32 = 1.0 / 512.0;

/// Per-tensor F32 scale from the tensor's largest magnitude.
#[inline]
pub fn tensor_scale(amax: f32) -> f32 {
    if amax > 0.0 {
        amax / (E2M1_MAX * E4M3_MAX)
    } else {
        1.0
    }
}

/// The f32 block scale before its E4M3 rounding: `amax_blk / (6 * sf2)`.
#[inline(always)]
pub fn block_scale_f32(block_amax: f32, sf2: f32) -> f32 {
    block_amax / (E2M1_MAX * sf2)
}

/// E4M3 block-scale code for a block whose maximum should map to `target` (6 for RTN).
#[inline(always)]
fn scale_code(block_amax: f32, sf2: f32, target: f32) -> u8 {
    let s = block_amax / (target * sf2);
    let s = if s == 0.0 {
        1.0
    } else {
        s.clamp(MIN_BLOCK_SCALE, E4M3_MAX)
    };
    f32_to_e4m3_sat(s)
}

/// E4M3 block-scale code of the ModelOpt rule.
#[inline(always)]
pub fn block_scale(block_amax: f32, sf2: f32) -> u8 {
    scale_code(block_amax, sf2, E2M1_MAX)
}

/// E2M1 code of one element with ModelOpt's sign rule, and its magnitude.
#[inline(always)]
fn encode_elem(x: f32, divisor: f32) -> (u8, f32) {
    let y = x / divisor;
    let (m, q) = round_e2m1(y.abs());
    ((((y < 0.0) as u32) << 3 | m) as u8, q)
}

/// Encodes one 16-block with block-scale code `sc` (8 packed bytes), adding its error to `acc`.
#[inline(always)]
fn encode_block(x: &[f32], sc: u8, sf2: f32, packed: &mut [u8], acc: &mut Acc) {
    let d = e4m3_finite_to_f32(sc) * sf2;
    let mut codes = [0u8; NV_BLOCK];
    for (cb, xb) in codes.chunks_exact_mut(LANES).zip(x.chunks_exact(LANES)) {
        for i in 0..LANES {
            let (code, q) = encode_elem(xb[i], d);
            cb[i] = code;
            acc.add(i, xb[i], xb[i].abs() - q * d);
        }
    }
    pack_pairs(&codes, packed);
}

/// Weighted squared error of a candidate block-scale code.
fn block_error(x: &[f32], w: Option<&[f32]>, sc: u8, sf2: f32) -> f64 {
    let d = e4m3_finite_to_f32(sc) * sf2;
    x.iter()
        .enumerate()
        .map(|(j, &v)| {
            let (_, q) = encode_elem(v, d);
            let e = (v.abs() - q * d) as f64;
            e * e * w.map_or(1.0, |w| w[j] as f64)
        })
        .sum()
}

simd_dispatch! {
    /// Quantises rows of `cols` values (`cols % 16 == 0`) with tensor scale `sf2` into `packed`
    /// (`[rows, cols/2]`) and E4M3 `scales` (`[rows, cols/16]`).
    pub fn quantize_rows = quantize_rows_impl(
        x: &[f32],
        cols: usize,
        sf2: f32,
        search: ScaleSearch<'_>,
        packed: &mut [u8],
        scales: &mut [u8],
    ) -> ErrStats
}

#[inline(always)]
fn quantize_rows_impl(
    x: &[f32],
    cols: usize,
    sf2: f32,
    search: ScaleSearch<'_>,
    packed: &mut [u8],
    scales: &mut [u8],
) -> ErrStats {
    let mut st = ErrStats::default();
    let rows = x
        .chunks_exact(cols)
        .zip(packed.chunks_exact_mut(cols / 2))
        .zip(scales.chunks_exact_mut(cols / NV_BLOCK));
    for ((xr, pr), sr) in rows {
        let mut acc = Acc::new();
        let mut extra_rtn = 0f64;
        let blocks = xr
            .chunks_exact(NV_BLOCK)
            .zip(pr.chunks_exact_mut(NV_BLOCK / 2))
            .zip(sr.iter_mut());
        for (b, ((xb, pb), sb)) in blocks.enumerate() {
            let amax = amax(xb);
            let sc = block_scale(amax, sf2);
            *sb = sc;
            let ScaleSearch::MinSquaredError { importance } = search else {
                encode_block(xb, sc, sf2, pb, &mut acc);
                continue;
            };
            let w = importance.map(|w| &w[b * NV_BLOCK..(b + 1) * NV_BLOCK]);
            let hi = scale_code(amax, sf2, 4.0).saturating_add(1).min(0x7E);
            let lo = sc.saturating_sub(2).max(1);
            let mut best = (block_error(xb, w, sc, sf2), sc);
            for cand in lo..=hi {
                let err = block_error(xb, w, cand, sf2);
                if err < best.0 {
                    best = (err, cand);
                }
            }
            if best.1 == sc {
                encode_block(xb, sc, sf2, pb, &mut acc);
            } else {
                let (mut rtn, mut chosen) = (Acc::new(), Acc::new());
                encode_block(xb, sc, sf2, pb, &mut rtn);
                encode_block(xb, best.1, sf2, pb, &mut chosen);
                *sb = best.1;
                extra_rtn += rtn.sse() as f64 - chosen.sse() as f64;
                acc.merge(&chosen);
            }
        }
        st = st.merge(acc.stats(extra_rtn));
    }
    st
}

/// An NVFP4-quantised matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Nvfp4 {
    /// E2M1 codes packed low nibble first, `[rows, cols/2]`.
    pub packed: Vec<u8>,
    /// E4M3 block scales, `[rows, cols/16]`.
    pub scales: Vec<u8>,
    /// The F32 tensor scale (`weight_scale_2`).
    pub scale2: f32,
}

/// Quantises a `[rows, cols]` matrix to NVFP4.
///
/// # Panics
/// If `x.len() != rows * cols`, `cols % 16 != 0`, or an importance vector is not `cols` long.
pub fn quantize(x: &[f32], rows: usize, cols: usize, search: ScaleSearch<'_>) -> (Nvfp4, ErrStats) {
    assert!(
        x.len() == rows * cols && cols.is_multiple_of(NV_BLOCK),
        "x must be [rows, cols], cols % 16 == 0"
    );
    if let ScaleSearch::MinSquaredError { importance: Some(w) } = search {
        assert_eq!(w.len(), cols, "importance must have one weight per input channel");
    }
    let amax = x.par_iter().map(|v| v.abs()).reduce(|| 0.0, f32::max);
    let sf2 = tensor_scale(amax);
    let mut packed = vec![0u8; rows * cols / 2];
    let mut scales = vec![0u8; rows * cols / NV_BLOCK];
    let st = packed
        .par_chunks_mut(cols / 2)
        .zip(scales.par_chunks_mut(cols / NV_BLOCK))
        .zip(x.par_chunks(cols))
        .map(|((p, s), xr)| quantize_rows(xr, cols, sf2, search, p, s))
        .reduce(ErrStats::default, ErrStats::merge);
    let q = Nvfp4 {
        packed,
        scales,
        scale2: sf2,
    };
    (q, st)
}

simd_dispatch! {
    /// Dequantises rows (`out` is `[n, cols]`, `packed` `[n, cols/2]`, `scales`
    /// `[n, cols/block]`). Returns the index of the first element whose block scale is a NaN
    /// code, if any.
    pub fn dequantize_rows = dequantize_rows_impl(
        packed: &[u8],
        scales: &[u8],
        scale2: f32,
        block: usize,
        out: &mut [f32],
    ) -> Option<usize>
}

#[inline(always)]
fn dequantize_rows_impl(
    packed: &[u8],
    scales: &[u8],
    scale2: f32,
    block: usize,
    out: &mut [f32],
) -> Option<usize> {
    let mut bad = None;
    for (b, ((ob, pb), &sc)) in out
        .chunks_exact_mut(block)
        .zip(packed.chunks_exact(block / 2))
        .zip(scales)
        .enumerate()
    {
        if sc & 0x7F == 0x7F && bad.is_none() {
            bad = Some(b * block);
        }
        let d = e4m3_finite_to_f32(sc) * scale2;
        for (o2, &byte) in ob.chunks_exact_mut(2).zip(pb) {
            o2[0] = E2M1_VALUES[(byte & 0xF) as usize] * d;
            o2[1] = E2M1_VALUES[(byte >> 4) as usize] * d;
        }
    }
    bad
}

/// Dequantises an NVFP4 matrix.
pub fn dequantize(q: &Nvfp4, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols)
        .zip(q.packed.par_chunks(cols / 2))
        .zip(q.scales.par_chunks(cols / NV_BLOCK))
        .for_each(|((o, p), s)| {
            dequantize_rows(p, s, q.scale2, NV_BLOCK, o);
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
        let x = test_data(rows * cols, 9);
        let sf2 = tensor_scale(x.iter().fold(0f32, |m, v| m.max(v.abs())));
        let w: Vec<f32> = (0..cols).map(|j| (j % 3) as f32 + 0.5).collect();
        let searches = [
            ScaleSearch::Off,
            ScaleSearch::MinSquaredError { importance: None },
            ScaleSearch::MinSquaredError { importance: Some(&w) },
        ];
        for search in searches {
            let (mut p1, mut s1) = (vec![0u8; rows * cols / 2], vec![0u8; rows * cols / 16]);
            let (mut p2, mut s2) = (p1.clone(), s1.clone());
            let a = quantize_rows(&x, cols, sf2, search, &mut p1, &mut s1);
            let b = quantize_rows_impl(&x, cols, sf2, search, &mut p2, &mut s2);
            assert_eq!((&p1, &s1, a), (&p2, &s2, b), "{search:?}");
            let (mut o1, mut o2) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
            dequantize_rows(&p1, &s1, sf2, NV_BLOCK, &mut o1);
            dequantize_rows_impl(&p1, &s1, sf2, NV_BLOCK, &mut o2);
            assert_eq!(o1, o2);
        }
    }

    #[test]
    fn four_over_six_search_lowers_error() {
        let (rows, cols) = (16, 512);
        // Cubed: most values small, a few large (like trained weights), so scales matter.
        let x: Vec<f32> = test_data(rows * cols, 13).iter().map(|v| v * v * v).collect();
        let (_, rtn) = quantize(&x, rows, cols, ScaleSearch::Off);
        let (q, cal) = quantize(&x, rows, cols, ScaleSearch::MinSquaredError { importance: None });
        assert!(cal.sse < rtn.sse);
        let back = dequantize(&q, rows, cols);
        let sse: f64 = x.iter().zip(&back).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        assert!((sse - cal.sse).abs() <= 1e-4 * sse, "{sse} vs {}", cal.sse);
    }
}
