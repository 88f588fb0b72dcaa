//! Symmetric INT8 with one f32 scale per row: the weights of Ascend's W8A8 (msModelSlim `W8A8_DYNAMIC`,
//! one scale per output channel) and, applied per token at run time, its activations
//! (`npu_dynamic_quant`).
//!
//! `scale = amax / 127`, `q = RNE(x / scale)` clamped to [-127, 127], so the row's largest magnitude
//! maps to ±127 and -128 is never used. An all-zero row gets scale 0 and zero codes. Dequantisation is
//! `q * scale` in f32.
//!
//! Error bound (used by the W8A8 emulation's tests): each element is off by at most `scale / 2`, so
//! `|x - q * scale| <= amax / 254` per row.

/// The largest code.
pub const INT8_MAX: f32 = 127.0;

/// Quantises one row into `codes`, returning its scale.
pub fn quantize_row(x: &[f32], codes: &mut [i8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        codes.fill(0);
        return 0.0;
    }
    let scale = amax / INT8_MAX;
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = (v / scale).round_ties_even().clamp(-INT8_MAX, INT8_MAX) as i8;
    }
    scale
}

/// Quantises rows of `cols` values into `codes` (`[rows, cols]`, two's complement bytes) and `scales`
/// (`[rows]`), returning (Σx², Σ(x-q)², max|x-q|).
pub fn quantize_rows(x: &[f32], cols: usize, codes: &mut [u8], scales: &mut [f32]) -> (f64, f64, f32) {
    let mut row = vec![0i8; cols];
    let (mut ss, mut se, mut mx) = (0f64, 0f64, 0f32);
    for ((xr, cr), s) in x
        .chunks_exact(cols)
        .zip(codes.chunks_exact_mut(cols))
        .zip(scales.iter_mut())
    {
        *s = quantize_row(xr, &mut row);
        for ((c, &q), &v) in cr.iter_mut().zip(&row).zip(xr) {
            *c = q as u8;
            let d = v - q as f32 * *s;
            ss += (v as f64).powi(2);
            se += (d as f64).powi(2);
            mx = mx.max(d.abs());
        }
    }
    (ss, se, mx)
}

/// Decodes rows of `cols` codes with their per-row `scales` into `out`.
pub fn dequantize_rows(codes: &[u8], scales: &[f32], cols: usize, out: &mut [f32]) {
    for ((or, cr), &s) in out
        .chunks_exact_mut(cols)
        .zip(codes.chunks_exact(cols))
        .zip(scales)
    {
        for (o, &c) in or.iter_mut().zip(cr) {
            *o = c as i8 as f32 * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_round_to_even_and_the_extreme_is_127() {
        let x = [127.0, 0.5, 1.5, 2.5, -2.5, -127.0];
        let mut q = [0i8; 6];
        assert_eq!(quantize_row(&x, &mut q), 1.0);
        assert_eq!(q, [127, 0, 2, 2, -2, -127]);
    }

    #[test]
    fn error_is_within_half_a_step() {
        let x: Vec<f32> = (0..1000)
            .map(|i| ((i * 7919) % 1013) as f32 / 37.0 - 13.0)
            .collect();
        let mut codes = vec![0u8; x.len()];
        let mut scales = vec![0f32; 10];
        quantize_rows(&x, 100, &mut codes, &mut scales);
        let mut back = vec![0f32; x.len()];
        dequantize_rows(&codes, &scales, 100, &mut back);
        for (r, (xr, br)) in x.chunks(100).zip(back.chunks(100)).enumerate() {
            let amax = xr.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in xr.iter().zip(br) {
                assert!(
                    (a - b).abs() <= amax / 254.0 * (1.0 + 1e-6),
                    "row {r}: {a} -> {b}"
                );
            }
        }
    }

    #[test]
    fn a_zero_row_stays_zero() {
        let mut q = [5i8; 4];
        assert_eq!(quantize_row(&[0.0; 4], &mut q), 0.0);
        assert_eq!(q, [0; 4]);
    }
}
