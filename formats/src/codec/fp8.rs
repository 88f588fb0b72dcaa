//! DeepSeek FP8 block quantisation: E4M3FN codes `[out, in]` with one power-of-two scale per
//! `block x block` tile (128 in the releases), stored as E8M0 `[ceil(out/b), ceil(in/b)]` (V4)
//! or as F32 `weight_scale_inv` on the same grid (V3, multiplied despite its name). Edge tiles
//! are partial.
//!
//! Quantisation: `scale = 2^ceil(log2(max(amax, 448 * 2^-126) / 448))` per tile (so no code
//! saturates), `code = E4M3_RNE(x / scale)`. Dequantisation: `f32(code) * f32(scale)` in f32.

use super::{
    amax, e4m3_finite_to_f32, e8m0_ceil_div, e8m0_reciprocal, e8m0_to_f32, f32_to_e4m3_sat, Acc, ErrStats,
    E4M3_MAX, LANES,
};
use rayon::prelude::*;

/// The block edge of DeepSeek's FP8 weights.
pub const FP8_BLOCK: usize = 128;

/// The scale grid of an FP8 block-quantised matrix, `[ceil(rows/block), ceil(cols/block)]`.
#[derive(Clone, Copy, Debug)]
pub enum Fp8Scales<'a> {
    /// One E8M0 byte per tile (V4 `.scale`).
    E8m0(&'a [u8]),
    /// One little-endian f32 per tile (V3 `weight_scale_inv`), given as raw bytes because
    /// memory-mapped tensors need not be 4-byte aligned.
    F32Le(&'a [u8]),
}

impl Fp8Scales<'_> {
    /// Scale of tile `i` (row-major over the grid).
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Fp8Scales::E8m0(b) => e8m0_to_f32(b[i]),
            Fp8Scales::F32Le(b) => f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]]),
        }
    }
}

/// An FP8 block-quantised matrix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fp8Blocks {
    pub rows: usize,
    pub cols: usize,
    /// Tile edge.
    pub block: usize,
    /// E4M3FN codes, `[rows, cols]`.
    pub codes: Vec<u8>,
    /// E8M0 scales, `[ceil(rows/block), ceil(cols/block)]`.
    pub scales: Vec<u8>,
}

/// Number of tiles along an axis of length `n`.
#[inline]
pub fn grid(n: usize, block: usize) -> usize {
    n.div_ceil(block)
}

/// E8M0 scale of a tile whose largest magnitude is `amax` (RCEIL of amax/448; amax is floored at
/// 448 * 2^-126 so an all-zero tile gets the smallest normal scale).
#[inline(always)]
pub fn fp8_block_scale(amax: f32) -> u8 {
    // ceil(log2(amax / 448)), 448 = 1.75 * 2^8.
    e8m0_ceil_div(amax.max(E4M3_MAX * f32::MIN_POSITIVE), 8, 0x60_0000)
}

simd_dispatch! {
    /// Quantises one band of `x.len() / cols <= block` rows (one row of the tile grid): writes
    /// the band's codes and its `ceil(cols/block)` scales, returns the error statistics.
    pub fn quantize_band = quantize_band_impl(
        x: &[f32],
        cols: usize,
        block: usize,
        codes: &mut [u8],
        scales: &mut [u8],
    ) -> ErrStats
}

#[inline(always)]
fn quantize_band_impl(x: &[f32], cols: usize, block: usize, codes: &mut [u8], scales: &mut [u8]) -> ErrStats {
    let rows = x.len() / cols;
    let mut stats = ErrStats::default();
    for (tb, scale) in scales.iter_mut().enumerate() {
        let c0 = tb * block;
        let c1 = (c0 + block).min(cols);
        let tile_amax = (0..rows)
            .map(|r| amax(&x[r * cols + c0..r * cols + c1]))
            .fold(0f32, f32::max);
        *scale = fp8_block_scale(tile_amax);
        let (s, inv) = (e8m0_to_f32(*scale), e8m0_reciprocal(*scale));
        let mut acc = Acc::new();
        let mut encode = |i: usize, c: &mut u8, v: f32| {
            *c = f32_to_e4m3_sat(v * inv);
            acc.add(i, v, v - e4m3_finite_to_f32(*c) * s);
        };
        for r in 0..rows {
            let xs = &x[r * cols + c0..r * cols + c1];
            let cs = &mut codes[r * cols + c0..r * cols + c1];
            let mut cc = cs.chunks_exact_mut(LANES);
            let mut xc = xs.chunks_exact(LANES);
            for (cb, xb) in (&mut cc).zip(&mut xc) {
                for i in 0..LANES {
                    encode(i, &mut cb[i], xb[i]);
                }
            }
            for (c, &v) in cc.into_remainder().iter_mut().zip(xc.remainder()) {
                encode(0, c, v);
            }
        }
        let (ss, se, mx) = acc.finish();
        stats = stats.merge(ErrStats {
            sum_sq: ss as f64,
            sse: se as f64,
            sse_rtn: se as f64,
            max_abs: mx,
        });
    }
    stats
}

/// Quantises a `[rows, cols]` f32 matrix to FP8 with E8M0 scales on a `block x block` grid.
pub fn quantize(x: &[f32], rows: usize, cols: usize, block: usize) -> (Fp8Blocks, ErrStats) {
    assert_eq!(x.len(), rows * cols, "x must be [rows, cols]");
    let gc = grid(cols, block);
    let mut codes = vec![0u8; rows * cols];
    let mut scales = vec![0u8; grid(rows, block) * gc];
    let stats = codes
        .par_chunks_mut(block * cols)
        .zip(scales.par_chunks_mut(gc))
        .zip(x.par_chunks(block * cols))
        .map(|((c, s), xb)| quantize_band(xb, cols, block, c, s))
        .reduce(ErrStats::default, ErrStats::merge);
    let q = Fp8Blocks {
        rows,
        cols,
        block,
        codes,
        scales,
    };
    (q, stats)
}

/// Quantises onto a given E8M0 scale grid (re-encoding on DeepSeek's grid after a BF16 round
/// trip): `code = E4M3_RNE_sat(x / scale)`.
pub fn quantize_with_scales(x: &[f32], rows: usize, cols: usize, block: usize, scales: &[u8]) -> Vec<u8> {
    assert_eq!(x.len(), rows * cols, "x must be [rows, cols]");
    let gc = grid(cols, block);
    let mut codes = vec![0u8; rows * cols];
    codes
        .par_chunks_mut(cols)
        .zip(x.par_chunks(cols))
        .enumerate()
        .for_each(|(r, (cs, xs))| {
            for (tb, (cb, xb)) in cs.chunks_mut(block).zip(xs.chunks(block)).enumerate() {
                let inv = e8m0_reciprocal(scales[(r / block) * gc + tb]);
                for (c, &v) in cb.iter_mut().zip(xb) {
                    *c = f32_to_e4m3_sat(v * inv);
                }
            }
        });
    codes
}

simd_dispatch! {
    /// Dequantises rows `[r0, r0 + out.len()/cols)` of an FP8 block matrix whose full codes and
    /// scales are given. Returns the index (within `out`) of the first NaN code, if any.
    pub fn dequantize_rows = dequantize_rows_impl(
        codes: &[u8],
        scales: Fp8Scales<'_>,
        cols: usize,
        block: usize,
        r0: usize,
        out: &mut [f32],
    ) -> Option<usize>
}

#[inline(always)]
fn dequantize_rows_impl(
    codes: &[u8],
    scales: Fp8Scales<'_>,
    cols: usize,
    block: usize,
    r0: usize,
    out: &mut [f32],
) -> Option<usize> {
    let gc = grid(cols, block);
    let mut nan = false;
    for (i, orow) in out.chunks_exact_mut(cols).enumerate() {
        let r = r0 + i;
        let crow = &codes[r * cols..(r + 1) * cols];
        for (tb, (ob, cb)) in orow.chunks_mut(block).zip(crow.chunks(block)).enumerate() {
            let s = scales.get((r / block) * gc + tb);
            let mut bad = 0u8;
            for (o, &c) in ob.iter_mut().zip(cb) {
                bad |= ((c & 0x7F) == 0x7F) as u8;
                *o = e4m3_finite_to_f32(c) * s;
            }
            nan |= bad != 0 || !s.is_finite();
        }
    }
    if nan {
        // Slow path only on bad input: locate the first offending element.
        out.iter().position(|v| !v.is_finite()).or(Some(0))
    } else {
        None
    }
}

/// Dequantises a whole FP8 block matrix: `f32(code) * f32(scale)`, one f32 rounding.
pub fn dequantize(codes: &[u8], scales: Fp8Scales<'_>, rows: usize, cols: usize, block: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols).enumerate().for_each(|(r, o)| {
        dequantize_rows(codes, scales, cols, block, r, o);
    });
    out
}

/// The lossless FP4 -> FP8 direction: re-encodes an MXFP4 matrix (E2M1 packed low nibble first,
/// `[rows, cols/2]`, E8M0 scales `[rows, cols/32]`) as FP8 with 32x32 tiles. Each tile's scale is
/// the largest of its 32x1 E8M0 scales divided by 2^6 (6 * 2^6 = 384 <= 448); each value
/// `v * 2^(e - e_tile)` is exact in E4M3 while the tile's exponents span at most 14. Returns
/// `None` if some value would not be exact (exponent spread too wide).
pub fn from_mxfp4_blocks32(packed: &[u8], mx_scales: &[u8], rows: usize, cols: usize) -> Option<Fp8Blocks> {
    const B: usize = 32;
    if !cols.is_multiple_of(B) || packed.len() != rows * cols / 2 || mx_scales.len() != rows * cols / B {
        return None;
    }
    let gc = cols / B;
    let mut scales = vec![0u8; grid(rows, B) * gc];
    for (tr, srow) in scales.chunks_mut(gc).enumerate() {
        for r in tr * B..((tr + 1) * B).min(rows) {
            for (s, &e) in srow.iter_mut().zip(&mx_scales[r * gc..(r + 1) * gc]) {
                *s = (*s).max(e);
            }
        }
        for s in srow.iter_mut() {
            *s = s.checked_sub(6)?;
        }
    }
    let mut codes = vec![0u8; rows * cols];
    for r in 0..rows {
        for g in 0..gc {
            let tile = scales[(r / B) * gc + g];
            let e = mx_scales[r * gc + g];
            // v * 2^(e - tile): e - tile in [-inf, 6]; build the factor from its exponent.
            let shift = e as i32 - tile as i32;
            if shift < -126 {
                return None;
            }
            let factor = f32::from_bits(((127 + shift) as u32) << 23);
            for k in 0..B {
                let c = cols * r + g * B + k;
                let nib = (packed[c / 2] >> ((c % 2) * 4)) & 0xF;
                let v = super::e2m1_to_f32(nib) * factor;
                let code = f32_to_e4m3_sat(v);
                if e4m3_finite_to_f32(code) != v {
                    return None;
                }
                codes[c] = code;
            }
        }
    }
    Some(Fp8Blocks {
        rows,
        cols,
        block: B,
        codes,
        scales,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::test_data;

    #[test]
    fn vector_and_baseline_kernels_agree_with_partial_tiles() {
        let (rows, cols, block) = (100, 300, 128);
        let x = test_data(rows * cols, 17);
        let gc = grid(cols, block);
        let (mut c1, mut s1) = (vec![0u8; rows * cols], vec![0u8; gc]);
        let (mut c2, mut s2) = (c1.clone(), s1.clone());
        let a = quantize_band(&x, cols, block, &mut c1, &mut s1);
        let b = quantize_band_impl(&x, cols, block, &mut c2, &mut s2);
        assert_eq!((&c1, &s1, a), (&c2, &s2, b));
        let (mut o1, mut o2) = (vec![0f32; rows * cols], vec![0f32; rows * cols]);
        assert_eq!(
            dequantize_rows(&c1, Fp8Scales::E8m0(&s1), cols, block, 0, &mut o1),
            None
        );
        dequantize_rows_impl(&c1, Fp8Scales::E8m0(&s1), cols, block, 0, &mut o2);
        assert_eq!(o1, o2);
        // Every tile's maximum lands in (224, 448]: the scale is the least that avoids saturation.
        let sse: f64 = x.iter().zip(&o1).map(|(p, q)| ((p - q) as f64).powi(2)).sum();
        assert!((sse - a.sse).abs() <= 1e-4 * sse);
        for (t, &sc) in s1.iter().enumerate() {
            let c0 = t * block;
            let tile = (0..rows).flat_map(|r| x[r * cols + c0..r * cols + (c0 + block).min(cols)].iter());
            let m = tile.fold(0f32, |m, v| m.max(v.abs()));
            let r = m / e8m0_to_f32(sc);
            assert!(r <= 448.0 && r > 224.0, "tile {t}: amax/scale = {r}");
        }
    }

    #[test]
    fn fp4_to_fp8_refuses_a_lossy_exponent_spread() {
        // Two rows of one 32x32 tile with scales 2^0 and 2^-20: 0.5 * 2^-20 is below E4M3's range
        // relative to the tile scale 2^-6.
        let packed = vec![0x11u8; 2 * 16];
        let scales = [127u8, 107];
        assert!(from_mxfp4_blocks32(&packed, &scales, 2, 32).is_none());
        let ok = from_mxfp4_blocks32(&packed, &[127, 120], 2, 32).expect("spread 7 is exact");
        assert_eq!(ok.scales, [121]);
    }
}
