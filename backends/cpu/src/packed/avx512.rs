//! The fused AVX-512 GEMV kernels (AVX-512F + BW).
//!
//! Each decoder turns 64 columns of a row into four vectors of sixteen f32, in a lane order that
//! needs no interleaving: per 32 columns the even ones, then the odd ones (`EVEN_ODD`), because each
//! storage packs a column pair into one 32-bit lane (two BF16 values, two sign-extended FP8 codes,
//! or one MXFP4 byte widened). With twice the lanes and `vpermps`'s sixteen-entry lookups they do
//! about half the AVX2 kernels' instructions per byte; MXFP4, whose AVX2 decoding is bound by
//! shuffles rather than by memory, gains the most.

use super::storage::{Bf16, Columns, Fp8, Mxfp4};
use super::RowTask;
use std::arch::x86_64::*;

super::fused_gemv! {
    features: "avx512f,avx512bw,avx2,fma",
    vector: __m512,
    lanes: 16,
    ops: (_mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_add_ps, _mm512_reduce_add_ps),
    streams: [4, 2, 2, 2],
}

/// Per 32 columns: the 16 even ones, then the 16 odd ones.
const EVEN_ODD: [usize; 64] = {
    let mut order = [0; 64];
    let mut p = 0;
    while p < 64 {
        let k = p % 32;
        order[p] = p - k + if k < 16 { 2 * k } else { 2 * (k - 16) + 1 };
        p += 1;
    }
    order
};

impl Decoder for Fp8<'_> {
    const ORDER: [usize; 64] = EVEN_ODD;

    /// As the AVX2 decoder: 32 codes sign-extended to 16 bits, each 32-bit lane shifted by 20 (the
    /// even code) or 4 (the odd one) and masked to the code's value times 2^-120, times the tile's
    /// factor. A chunk of 64 columns lies inside one 128-column tile.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn chunk(&self, r: usize, c: usize) -> [__m512; 4] {
        // SAFETY (all reads): (r, 64c) and the 63 codes after it lie inside the part.
        let f = _mm512_set1_ps(unsafe { self.factor(r, 64 * c) });
        let codes = unsafe { self.at(r, 64 * c) };
        let mask = _mm512_set1_epi32(0x87F0_0000u32 as i32);
        let decode = |bits: __m512i| _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(bits, mask)), f);
        let lo = _mm512_cvtepi8_epi16(unsafe { _mm256_loadu_si256(codes.cast()) });
        let hi = _mm512_cvtepi8_epi16(unsafe { _mm256_loadu_si256(codes.add(32).cast()) });
        [
            decode(_mm512_slli_epi32(lo, 20)),
            decode(_mm512_slli_epi32(lo, 4)),
            decode(_mm512_slli_epi32(hi, 20)),
            decode(_mm512_slli_epi32(hi, 4)),
        ]
    }
}

impl Decoder for Mxfp4<'_> {
    const ORDER: [usize; 64] = EVEN_ODD;

    /// Each block's 16 bytes widen to sixteen 32-bit lanes. `vpermps` reads only the low four bits
    /// of an index, so a lane indexes its even column's code as it is and its odd column's after a
    /// shift by 4, in the block's sixteen `value * scale` (exact: a power-of-two scale).
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn chunk(&self, r: usize, c: usize) -> [__m512; 4] {
        // SAFETY (all reads): blocks 2c and 2c + 1 of row r lie inside the part; a table holds 16 f32.
        let block = |b: usize| unsafe {
            let table = self.value_tables.get_unchecked(self.scale(r, b) as usize);
            let bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(self.block(r, b).cast()));
            (_mm512_loadu_ps(table.as_ptr()), bytes)
        };
        let ((t0, b0), (t1, b1)) = (block(2 * c), block(2 * c + 1));
        [
            _mm512_permutexvar_ps(b0, t0),
            _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), t0),
            _mm512_permutexvar_ps(b1, t1),
            _mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), t1),
        ]
    }
}

impl Decoder for Bf16<'_> {
    const ORDER: [usize; 64] = EVEN_ODD;

    /// Each 32-bit lane holds two values: the low one shifted up, the high one masked, are f32.
    #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
    unsafe fn chunk(&self, r: usize, c: usize) -> [__m512; 4] {
        // SAFETY: the 64 values at (r, 64c) lie inside the part.
        let values = unsafe { self.at(r, 64 * c) };
        let (lo, hi) = unsafe {
            (
                _mm512_loadu_si512(values.cast()),
                _mm512_loadu_si512(values.add(64).cast()),
            )
        };
        let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        [
            _mm512_castsi512_ps(_mm512_slli_epi32(lo, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(lo, high)),
            _mm512_castsi512_ps(_mm512_slli_epi32(hi, 16)),
            _mm512_castsi512_ps(_mm512_and_si512(hi, high)),
        ]
    }
}
