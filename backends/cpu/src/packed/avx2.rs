//! The fused AVX2 + FMA GEMV kernels.
//!
//! Each decoder turns 32 columns of a row into four vectors of eight f32 with as few shuffles as it
//! can (shuffles and shifts share two of Zen's four vector pipes), so the lanes hold the columns in
//! a fixed order of the decoder's (`Decoder::ORDER`); `x` is permuted once per call to match.

use super::storage::{Bf16, Columns, Fp8, Mxfp4};
use super::RowTask;
use std::arch::x86_64::*;

super::fused_gemv! {
    features: "avx2,fma",
    vector: __m256,
    lanes: 8,
    ops: (_mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, _mm256_add_ps, hsum),
    streams: [2, 1, 1, 1],
}

/// The sum of the eight lanes.
#[target_feature(enable = "avx2,fma")]
fn hsum(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
}

/// The order of 16-bit values split into the low and high halves of 32-bit lanes: per 16 columns,
/// the even ones, then the odd ones.
const EVEN_ODD: [usize; 32] = {
    let mut order = [0; 32];
    let mut p = 0;
    while p < 32 {
        let k = p % 16;
        order[p] = p - k + if k < 8 { 2 * k } else { 2 * (k - 8) + 1 };
        p += 1;
    }
    order
};

impl Decoder for Fp8<'_> {
    const ORDER: [usize; 32] = EVEN_ODD;

    /// Sign-extends 16 codes to 16 bits; shifting the 32-bit lanes left by 20 (the even code) or
    /// 4 (the odd one) puts a code's 7 magnitude bits at f32 bits 20..27 and a copy of its sign at
    /// bit 31, and a mask clears the rest. That is the code's value times 2^-120 (an f32
    /// subnormal for an E4M3 subnormal, so those are exact too), which one multiplication by the
    /// tile's factor rounds to `value * scale` as the converter does.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk(&self, r: usize, c: usize) -> [__m256; 4] {
        // SAFETY (all reads): (r, 32c) and the 31 codes after it lie inside the part.
        let f = _mm256_set1_ps(unsafe { self.factor(r, 32 * c) });
        let codes = unsafe { self.at(r, 32 * c) };
        let mask = _mm256_set1_epi32(0x87F0_0000u32 as i32);
        let decode = |bits: __m256i| _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(bits, mask)), f);
        let lo = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(codes.cast()) });
        let hi = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(codes.add(16).cast()) });
        [
            decode(_mm256_slli_epi32(lo, 20)),
            decode(_mm256_slli_epi32(lo, 4)),
            decode(_mm256_slli_epi32(hi, 20)),
            decode(_mm256_slli_epi32(hi, 4)),
        ]
    }
}

impl Decoder for Mxfp4<'_> {
    /// Per 16 columns: 0, 4, 8, 12, 1, 5, 9, 13, then 2, 6, 10, 14, 3, 7, 11, 15.
    const ORDER: [usize; 32] = {
        let mut order = [0; 32];
        let mut p = 0;
        while p < 32 {
            let k = p % 8;
            order[p] = 16 * (p / 16) + 2 * (p / 8 % 2) + 4 * (k % 4) + k / 4;
            p += 1;
        }
        order
    };

    /// The block's 16 bytes go to both 128-bit lanes; the low lane keeps the low nibbles (even
    /// columns), the high lane the high ones (odd columns). Two byte shuffles look up the top two
    /// bytes of each `value * scale` in the scale's byte table; interleaving them gives 16-bit
    /// values whose 32-bit pairs become two f32 vectors by a shift (low half) and a mask (high half).
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk(&self, r: usize, c: usize) -> [__m256; 4] {
        // SAFETY (all reads): block c of row r lies inside the part; a table is 32 bytes.
        let e = unsafe { self.scale(r, c) };
        let table = unsafe { self.byte_tables.get_unchecked(e as usize).as_ptr() };
        let load = |p: *const u8| _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(p.cast()) });
        let (top, next) = (load(table), load(unsafe { table.add(16) }));
        let v = load(unsafe { self.block(r, c) });
        let shift = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
        let codes = _mm256_and_si256(_mm256_srlv_epi32(v, shift), _mm256_set1_epi8(0x0F));
        let (hi, lo) = (_mm256_shuffle_epi8(top, codes), _mm256_shuffle_epi8(next, codes));
        let (w0, w1) = (_mm256_unpacklo_epi8(lo, hi), _mm256_unpackhi_epi8(lo, hi));
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        [
            _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(w0, high)),
            _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(w1, high)),
        ]
    }
}

impl Decoder for Bf16<'_> {
    const ORDER: [usize; 32] = EVEN_ODD;

    /// Each 32-bit lane holds two values: the low one shifted up, the high one masked, are f32.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn chunk(&self, r: usize, c: usize) -> [__m256; 4] {
        // SAFETY: the 32 values at (r, 32c) lie inside the part.
        let values = unsafe { self.at(r, 32 * c) };
        let (lo, hi) = unsafe {
            (
                _mm256_loadu_si256(values.cast()),
                _mm256_loadu_si256(values.add(32).cast()),
            )
        };
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        [
            _mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(lo, high)),
            _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16)),
            _mm256_castsi256_ps(_mm256_and_si256(hi, high)),
        ]
    }
}
