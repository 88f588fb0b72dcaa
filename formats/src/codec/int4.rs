//! Symmetric INT4 with one f32 scale per group of a row: the routed experts of Ascend's W4A8
//! (msModelSlim `W4A8_DYNAMIC`, V4-Pro's recipe), whose activations are INT8 per token at run time.
//!
//! `scale = amax / 7`, `q = RNE(x / scale)` clamped to [-8, 7] (so -8 is never produced: the grid is
//! symmetric), over groups of `group` values along a row; `group = cols` is per output channel, the
//! only form vllm-ascend's W4A8 MoE loads today (it rejects `group_size > 0`). An all-zero group gets
//! scale 0 and zero codes. Dequantisation is `q * scale` in f32.
//!
//! On disk (AscendV1) the codes are packed two per byte **along the output dimension**: byte
//! `[j, k]` holds row `2j`'s code in its low nibble and row `2j + 1`'s in its high nibble
//! ([`pack_row_pairs`]), beside a `scale_bias` that vllm-ascend's kernel adds ([`scale_bias`]).
//!
//! Error bound: each element is off by at most `scale / 2`, so `|x - q * scale| <= amax / 14` per group.

/// The largest code magnitude used.
pub const INT4_MAX: f32 = 7.0;

/// Quantises one group into `codes` (values in [-7, 7]), returning its scale.
pub fn quantize_group(x: &[f32], codes: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        codes.fill(0);
        return 0.0;
    }
    let scale = amax / INT4_MAX;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (v / scale).round_ties_even().clamp(-8.0, INT4_MAX) as i8;
    }
    scale
}

/// Quantises rows of `cols` values in groups of `group` (which divides `cols`) into `codes`
/// (`[rows, cols]`, one code per `i8`) and `scales` (`[rows, cols / group]`), returning
/// (Σx², Σ(x-q)², max|x-q|).
pub fn quantize_rows(
    x: &[f32],
    cols: usize,
    group: usize,
    codes: &mut [i8],
    scales: &mut [f32],
) -> (f64, f64, f32) {
    assert!(
        group > 0 && cols.is_multiple_of(group),
        "group {group} must divide {cols}"
    );
    let (mut ss, mut se, mut mx) = (0f64, 0f64, 0f32);
    for ((xg, cg), s) in x
        .chunks_exact(group)
        .zip(codes.chunks_exact_mut(group))
        .zip(scales.iter_mut())
    {
        *s = quantize_group(xg, cg);
        for (&q, &v) in cg.iter().zip(xg) {
            let d = v - q as f32 * *s;
            ss += (v as f64).powi(2);
            se += (d as f64).powi(2);
            mx = mx.max(d.abs());
        }
    }
    (ss, se, mx)
}

/// Packs `[rows, cols]` codes (rows even) into `[rows / 2, cols]` bytes: row `2j` in the low nibble,
/// row `2j + 1` in the high nibble, two's complement.
pub fn pack_row_pairs(codes: &[i8], cols: usize) -> Vec<u8> {
    assert!(codes.len().is_multiple_of(2 * cols), "an even number of rows");
    codes
        .chunks_exact(2 * cols)
        .flat_map(|pair| {
            let (lo, hi) = pair.split_at(cols);
            lo.iter()
                .zip(hi)
                .map(|(&l, &h)| (l as u8 & 0x0F) | ((h as u8) << 4))
        })
        .collect()
}

/// The code of row `r`, column `c` of row-pair-packed `packed` (`[rows / 2, cols]`).
#[inline]
pub fn code_at(packed: &[u8], cols: usize, r: usize, c: usize) -> i8 {
    let b = packed[(r / 2) * cols + c] as i8;
    if r.is_multiple_of(2) {
        (b << 4) >> 4
    } else {
        b >> 4
    }
}

/// Decodes rows `[r0, r0 + out.len() / cols)` of row-pair-packed codes with one scale per row
/// (`scales[i]` belongs to row `r0 + i`) into `out`.
pub fn dequantize_rows(packed: &[u8], scales: &[f32], cols: usize, r0: usize, out: &mut [f32]) {
    for (i, (row, &s)) in out.chunks_exact_mut(cols).zip(scales).enumerate() {
        for (c, o) in row.iter_mut().enumerate() {
            *o = code_at(packed, cols, r0 + i, c) as f32 * s;
        }
    }
}

/// vllm-ascend's `scale_bias` of a per-channel W4A8 linear: for each row `r` and each of `chunks`
/// equal column ranges, `8 · Σ_k q[r, k] · scale[r]` (`[rows, chunks]`). vllm-ascend derives exactly this
/// for checkpoints that lack it (`update_bias_compressed_tensors`) and sums a stored one over its chunks;
/// msModelSlim stores one chunk for `w1`/`w3` and 16 for `w2` (so tensor parallelism up to 16 can split
/// K). It is the correction of a kernel that feeds each INT8 activation as two signed nibbles,
/// `x = 16 x_hi + (x_lo - 8) + 8`: the `+ 8` contributes `8 Σ_k w_k`.
pub fn scale_bias(codes: &[i8], scales: &[f32], cols: usize, chunks: usize) -> Vec<f32> {
    assert!(
        chunks > 0 && cols.is_multiple_of(chunks),
        "{chunks} chunks must divide {cols}"
    );
    codes
        .chunks_exact(cols)
        .zip(scales)
        .flat_map(|(row, &s)| {
            row.chunks_exact(cols / chunks).map(move |part| {
                let sum: i32 = part.iter().map(|&q| q as i32).sum();
                8.0 * sum as f32 * s
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_round_to_even_and_the_extreme_is_7() {
        let x = [7.0, 0.5, 1.5, 2.5, -2.5, -7.0];
        let mut q = [0i8; 6];
        assert_eq!(quantize_group(&x, &mut q), 1.0);
        assert_eq!(q, [7, 0, 2, 2, -2, -7]);
    }

    #[test]
    fn row_pairs_pack_low_nibble_first_and_unpack() {
        let codes: Vec<i8> = vec![-8, -1, 0, 7, 3, -3, 5, -7];
        let packed = pack_row_pairs(&codes, 4);
        assert_eq!(packed, [0x38, 0xDF, 0x50, 0x97]);
        for (i, &c) in codes.iter().enumerate() {
            assert_eq!(code_at(&packed, 4, i / 4, i % 4), c, "element {i}");
        }
    }

    #[test]
    fn error_is_within_half_a_step_per_group() {
        let x: Vec<f32> = (0..960)
            .map(|i| ((i * 7919) % 1013) as f32 / 37.0 - 13.0)
            .collect();
        let (cols, group) = (96, 32);
        let mut codes = vec![0i8; x.len()];
        let mut scales = vec![0f32; x.len() / group];
        quantize_rows(&x, cols, group, &mut codes, &mut scales);
        for (g, (xg, qg)) in x.chunks(group).zip(codes.chunks(group)).enumerate() {
            let amax = xg.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, &q) in xg.iter().zip(qg) {
                let b = q as f32 * scales[g];
                assert!(
                    (a - b).abs() <= amax / 14.0 * (1.0 + 1e-6),
                    "group {g}: {a} -> {b}"
                );
            }
        }
    }

    #[test]
    fn scale_bias_sums_each_chunk_of_a_row() {
        let codes: Vec<i8> = vec![1, 2, 3, 4, -1, -1, 7, 0];
        assert_eq!(scale_bias(&codes, &[0.5, 2.0], 4, 2), [12.0, 28.0, -32.0, 112.0]);
        assert_eq!(scale_bias(&codes, &[0.5, 2.0], 4, 1), [40.0, 80.0]);
    }
}
