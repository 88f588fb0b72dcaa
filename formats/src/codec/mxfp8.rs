//! MXFP8 (OCP Microscaling, E4M3 elements): one E8M0 scale per 32 consecutive elements of a row, the
//! format of Ascend 950's MX cube (msModelSlim's `W8A8_MXFP8`). Storage `[out, in]` E4M3FN codes +
//! `[out, ceil(in/32)]` E8M0 bytes; a row whose length is not a multiple of 32 ends in a shorter block.
//!
//! Scale rule (OCP MX v1.0, section 6.3): `X = floor(log2 amax) - 8`, 8 being E4M3's largest exponent,
//! clamped to E8M0's range; elements are `E4M3_RNE(x / 2^X)` saturated to ±448 (a block's largest
//! element can round up to 512, which the spec clamps). An all-zero block gets `2^-127`.
//! Dequantisation: `code * 2^X` in f32, exact.
//!
//! MXFP4 converts to MXFP8 without loss: an E2M1 block `c_i * 2^S` (|c| <= 6) gets `X = S - 8 + ⌊log2 max|c|⌋`
//! (or -127 where that is smaller), and every `c_i * 2^(S-X)` lies in [2^-1, 384] with at most two
//! significant bits: one of E4M3's values.

use super::{
    amax, e4m3_finite_to_f32, e8m0_floor, e8m0_reciprocal, e8m0_to_f32, f32_to_e4m3_sat, Acc, ErrStats,
};

/// Elements per MX scale.
pub const MX8_BLOCK: usize = 32;

/// log2 of E4M3's largest power of two (448 = 1.75 * 2^8).
const E4M3_EMAX: u8 = 8;

/// Scales per row of `cols` elements.
pub fn scales_per_row(cols: usize) -> usize {
    cols.div_ceil(MX8_BLOCK)
}

/// E8M0 scale byte of a block whose largest magnitude is `amax`.
#[inline(always)]
pub fn block_scale(amax: f32) -> u8 {
    e8m0_floor(amax).saturating_sub(E4M3_EMAX)
}

simd_dispatch! {
    /// Quantises rows of `cols` values into `codes` (`[rows, cols]`) and `scales`
    /// (`[rows, ceil(cols/32)]`), returning the error statistics.
    pub fn quantize_rows = quantize_rows_impl(x: &[f32], cols: usize, codes: &mut [u8], scales: &mut [u8]) -> ErrStats
}

#[inline(always)]
fn quantize_rows_impl(x: &[f32], cols: usize, codes: &mut [u8], scales: &mut [u8]) -> ErrStats {
    let per_row = scales_per_row(cols);
    let mut acc = Acc::new();
    for ((xr, cr), sr) in x
        .chunks_exact(cols)
        .zip(codes.chunks_exact_mut(cols))
        .zip(scales.chunks_exact_mut(per_row))
    {
        for ((xb, cb), sb) in xr
            .chunks(MX8_BLOCK)
            .zip(cr.chunks_mut(MX8_BLOCK))
            .zip(sr.iter_mut())
        {
            *sb = block_scale(amax(xb));
            let (s, inv) = (e8m0_to_f32(*sb), e8m0_reciprocal(*sb));
            for (i, (c, &v)) in cb.iter_mut().zip(xb).enumerate() {
                *c = f32_to_e4m3_sat(v * inv);
                acc.add(i % super::LANES, v, v - e4m3_finite_to_f32(*c) * s);
            }
        }
    }
    acc.stats(0.0)
}

/// Decodes rows of `cols` values from `codes` and their `scales` into `out`. Returns the index of the
/// first element whose code or scale is NaN (E4M3 0x7F/0xFF, E8M0 0xFF), if any.
pub fn dequantize_rows(codes: &[u8], scales: &[u8], cols: usize, out: &mut [f32]) -> Option<usize> {
    let per_row = scales_per_row(cols);
    let mut bad = None;
    for (r, ((or, cr), sr)) in out
        .chunks_exact_mut(cols)
        .zip(codes.chunks_exact(cols))
        .zip(scales.chunks_exact(per_row))
        .enumerate()
    {
        for (b, ((ob, cb), &e)) in or
            .chunks_mut(MX8_BLOCK)
            .zip(cr.chunks(MX8_BLOCK))
            .zip(sr)
            .enumerate()
        {
            let s = e8m0_to_f32(e);
            for (o, &c) in ob.iter_mut().zip(cb) {
                *o = e4m3_finite_to_f32(c) * s;
            }
            if bad.is_none() {
                let nan = cb
                    .iter()
                    .position(|&c| c & 0x7F == 0x7F)
                    .or((e == 0xFF).then_some(0));
                bad = nan.map(|i| r * cols + b * MX8_BLOCK + i);
            }
        }
    }
    bad
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{mxfp4, ScaleSearch};

    #[test]
    fn scale_is_floor_log2_amax_minus_8() {
        assert_eq!(block_scale(1.0), 127 - 8);
        assert_eq!(block_scale(1.99), 127 - 8);
        assert_eq!(block_scale(448.0), 127);
        assert_eq!(block_scale(0.0), 0);
    }

    #[test]
    fn mxfp4_blocks_convert_to_mxfp8_without_loss() {
        // Every E2M1 code at every position, over scales from tiny to large.
        let cols = 64;
        let mut x = Vec::new();
        for k in 0..40 {
            let s = 2f32.powi(k * 3 - 60);
            for i in 0..cols {
                x.push(crate::codec::E2M1_VALUES[(i * 7 + k as usize) % 16] * s);
            }
        }
        let rows = x.len() / cols;
        let (mut packed, mut s4) = (vec![0u8; rows * cols / 2], vec![0u8; rows * cols / 32]);
        let st = mxfp4::quantize_rows(
            &x,
            cols,
            mxfp4::MxRule::Rceil,
            ScaleSearch::Off,
            &mut packed,
            &mut s4,
        );
        assert_eq!(st.sse, 0.0, "the input is made of MXFP4 values");
        let mut fp4 = vec![0f32; x.len()];
        mxfp4::dequantize_rows(&packed, &s4, 32, &mut fp4);
        let (mut codes, mut s8) = (vec![0u8; x.len()], vec![0u8; rows * scales_per_row(cols)]);
        let st = quantize_rows(&fp4, cols, &mut codes, &mut s8);
        let mut back = vec![0f32; x.len()];
        assert_eq!(dequantize_rows(&codes, &s8, cols, &mut back), None);
        assert_eq!(back.len(), fp4.len());
        assert_eq!(st.sse, 0.0);
        for (i, (a, b)) in fp4.iter().zip(&back).enumerate() {
            assert_eq!(a.to_bits(), b.to_bits(), "element {i}");
        }
    }

    #[test]
    fn a_short_last_block_has_its_own_scale() {
        let x: Vec<f32> = (0..40).map(|i| if i < 32 { 384.0 } else { 0.5 }).collect();
        let (mut codes, mut scales) = (vec![0u8; 40], vec![0u8; 2]);
        quantize_rows(&x, 40, &mut codes, &mut scales);
        assert_eq!(scales, [block_scale(384.0), block_scale(0.5)]);
        let mut back = vec![0f32; 40];
        dequantize_rows(&codes, &scales, 40, &mut back);
        assert_eq!(back, x);
    }
}
