//! The quantised linears ([`QuantMatmul`]) against f64 arithmetic on the unquantised operands, within the
//! bounds their rounding steps imply.

mod common;

use common::*;
use v4_formats::codec::{int4, int8, mxfp8};
use v4_formats::{Bytes, PackedMatmul, PackedMatrix, PackedRows, Storage};
use v4_npu::*;

const BF16_U: f64 = 1.0 / 256.0; // unit roundoff of bf16 (7 mantissa bits, RNE)

fn install(dev: &burn_ndarray::NdArrayDevice, weight_quant: WeightQuant) {
    let policy = PrecisionPolicy {
        weight_quant,
        ..PrecisionPolicy::mix_bf16()
    };
    install_config(dev, NpuConfig::with_policy(policy));
    reset_stats(dev);
}

fn matrix(storage: Storage, rows: usize, cols: usize, codes: Vec<u8>, scales: Vec<u8>) -> PackedMatrix {
    let part = PackedRows::new(
        rows,
        cols,
        storage,
        Bytes::from_vec(codes),
        Bytes::from_vec(scales),
    )
    .unwrap();
    PackedMatrix::new(vec![part]).unwrap()
}

fn run(dev: &burn_ndarray::NdArrayDevice, x: &[f32], n: usize, w: &PackedMatrix) -> Vec<f32> {
    let kernel = QuantMatmul::new(dev);
    assert!(
        kernel.supports(w),
        "the installed path holds {}",
        w.storage_name()
    );
    let mut y = vec![0f32; n * w.rows];
    kernel.matmul_t(x, n, w, &mut y);
    y
}

/// W8A8: with `|Δw| <= s_w/2` and `|Δx| <= s_x/2` per element, `|q_x q_w s_x s_w - x·w| <=
/// Σ_k (|x_k| s_w/2 + |w_k| s_x/2 + s_x s_w/4)`; the output adds one bf16 rounding (and two f32 ones).
#[test]
fn w8a8_is_within_the_int8_rounding_bound_of_the_exact_product() {
    let _g = lock();
    let dev = Default::default();
    install(&dev, WeightQuant::W8a8Dynamic);
    let (n, rows, k) = (6, 9, 300);
    let x = rand_vec(n * k, 1, -3.0, 3.0);
    let w = rand_vec(rows * k, 2, -0.2, 0.2);
    let (mut codes, mut sw) = (vec![0u8; rows * k], vec![0f32; rows]);
    int8::quantize_rows(&w, k, &mut codes, &mut sw);
    let scales = sw.iter().flat_map(|s| s.to_le_bytes()).collect();
    let y = run(&dev, &x, n, &matrix(Storage::Int8, rows, k, codes, scales));
    assert_eq!(y.len(), n * rows);
    let mut worst_share = 0f64;
    for t in 0..n {
        let xr = &x[t * k..(t + 1) * k];
        let sx = xr.iter().fold(0f32, |m, v| m.max(v.abs())) as f64 / 127.0;
        for r in 0..rows {
            let (wr, s) = (&w[r * k..(r + 1) * k], sw[r] as f64);
            let exact: f64 = xr.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum();
            let int8: f64 = xr
                .iter()
                .zip(wr)
                .map(|(&a, &b)| (a.abs() as f64) * s / 2.0 + (b.abs() as f64) * sx / 2.0 + sx * s / 4.0)
                .sum();
            let bound = int8 * (1.0 + 1e-5) + (exact.abs() + int8) * (BF16_U + 1e-6);
            let err = (y[t * rows + r] as f64 - exact).abs();
            assert!(
                err <= bound,
                "y[{t},{r}] = {}, exact {exact}: error {err:e} > {bound:e}",
                y[t * rows + r]
            );
            worst_share = worst_share.max(err / bound);
        }
    }
    assert!(worst_share > 0.01, "the INT8 roundings show ({worst_share})");
    let report = report(&dev);
    assert_eq!(report.calls("npu_quant_matmul", Engine::Cube), 1);
    assert_eq!(report.calls("npu_dynamic_quant", Engine::Vector), 1);
    assert_eq!(report.fallback_calls(), 0);
}

/// W4A8's experts: INT4 codes packed two rows per byte. The INT32 sum of INT8 activation codes and INT4
/// weight codes is exact, so against the f64 product of the quantised operands (each token's INT8 codes
/// and scale, each row's INT4 codes and scale) only the f32 scalings and the bf16 output rounding remain.
#[test]
fn w4a8_experts_compute_the_exact_integer_product_of_their_row_pairs() {
    let _g = lock();
    let dev = Default::default();
    install(&dev, WeightQuant::W8a8Dynamic);
    let (n, rows, k) = (5, 10, 64);
    let x = rand_vec(n * k, 5, -3.0, 3.0);
    let w = rand_vec(rows * k, 6, -0.2, 0.2);
    let (mut qw, mut sw) = (vec![0i8; rows * k], vec![0f32; rows]);
    int4::quantize_rows(&w, k, k, &mut qw, &mut sw);
    let scales = sw.iter().flat_map(|s| s.to_le_bytes()).collect();
    let packed = int4::pack_row_pairs(&qw, k);
    let y = run(&dev, &x, n, &matrix(Storage::Int4, rows, k, packed, scales));
    assert_eq!(y.len(), n * rows);
    for t in 0..n {
        let mut qx = vec![0i8; k];
        let sx = int8::quantize_row(&x[t * k..(t + 1) * k], &mut qx) as f64;
        for r in 0..rows {
            let acc: i64 = qx
                .iter()
                .zip(&qw[r * k..(r + 1) * k])
                .map(|(&a, &b)| a as i64 * b as i64)
                .sum();
            let exact = acc as f64 * sw[r] as f64 * sx;
            let err = (y[t * rows + r] as f64 - exact).abs();
            assert!(
                err <= exact.abs() * (BF16_U + 2.0 * f32::EPSILON as f64),
                "y[{t},{r}] = {}, exact {exact}: error {err:e}",
                y[t * rows + r]
            );
        }
    }
    assert_eq!(report(&dev).fallback_calls(), 0);
}

/// The MX cube: products of MXFP8 activations and stored MX weights are exact, so the only errors are
/// the activations' MXFP8 rounding (relative 2^-4 per element at most), f32 accumulation and one bf16
/// rounding. Against the f64 product of the quantised operands, only the last two remain.
#[test]
fn mx_matches_the_exact_product_of_the_quantised_operands() {
    let _g = lock();
    let dev = Default::default();
    install(&dev, WeightQuant::MxDynamic);
    let (n, rows, k) = (4, 5, 96);
    let x = rand_vec(n * k, 3, -2.0, 2.0);
    let w = rand_vec(rows * k, 4, -0.5, 0.5);
    let per_row = mxfp8::scales_per_row(k);
    let quantised = |v: &[f32], r: usize| {
        let (mut c, mut s) = (vec![0u8; r * k], vec![0u8; r * per_row]);
        mxfp8::quantize_rows(v, k, &mut c, &mut s);
        let mut back = vec![0f32; r * k];
        mxfp8::dequantize_rows(&c, &s, k, &mut back);
        (c, s, back)
    };
    let (wc, ws, wq) = quantised(&w, rows);
    let (_, _, xq) = quantised(&x, n);
    let y = run(&dev, &x, n, &matrix(Storage::Mxfp8, rows, k, wc, ws));
    assert_eq!(y.len(), n * rows);
    for t in 0..n {
        for r in 0..rows {
            let terms = xq[t * k..(t + 1) * k].iter().zip(&wq[r * k..(r + 1) * k]);
            let (dot, abs): (f64, f64) = terms.fold((0.0, 0.0), |(d, a), (&p, &q)| {
                (d + p as f64 * q as f64, a + (p as f64 * q as f64).abs())
            });
            let bound = k as f64 * f32::EPSILON as f64 / 2.0 * abs + (dot.abs() + 1e-30) * BF16_U;
            let err = (y[t * rows + r] as f64 - dot).abs();
            assert!(err <= bound, "y[{t},{r}]: error {err:e} > {bound:e}");
        }
    }
}

#[test]
fn a_path_declines_the_weights_it_does_not_hold() {
    let _g = lock();
    let dev = Default::default();
    let bf16 = matrix(Storage::Bf16, 2, 32, vec![0; 128], vec![]);
    let int8 = matrix(Storage::Int8, 2, 32, vec![0; 64], vec![0; 8]);
    install(&dev, WeightQuant::W8a8Dynamic);
    let kernel = QuantMatmul::new(&dev);
    assert!(kernel.supports(&int8) && !kernel.supports(&bf16));
    install(&dev, WeightQuant::Dequantize);
    assert!(!kernel.supports(&int8), "the policy is read at every call");
}
