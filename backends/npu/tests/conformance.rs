//! Op-level conformance of `Npu<NdArray>` against independent references: every op in f64
//! (`NdArray<f64>`, under must_keep_origin_dtype), and written-out references under the reduced-precision
//! policies; layouts, rounding, coverage, memory.

mod common;

use burn::tensor::{activation, backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};
use burn_ndarray::NdArray;
use common::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use v4_npu::*;

/// The reference: the same ops computed in f64, then rounded to f32 for the comparison.
type Ref = NdArray<f64>;
type N = Npu<NdArray<f32>>;

const U32: f64 = 5.960_464_477_539_063e-8; // 2^-24

/// How a result is compared.
#[derive(Clone, Copy, Debug)]
enum Tol {
    /// |a - b| <= 1e-6 |b| (+1e-30).
    Rel,
    /// A sum of `n` terms in another order: |a - b| <= 2 (n - 1) u32 * scale, scale = the result
    /// magnitude bound passed by the case (sum of |terms|).
    Sum(usize),
}

/// Every float op the model uses, on fixed inputs, for backend `B`.
fn suite<B: Backend>(dev: &B::Device) -> Vec<(&'static str, Vec<f32>, Tol)> {
    let x = tensor::<B, 3>(rand_vec(4 * 8 * 16, 1, -2.0, 2.0), [4, 8, 16], dev);
    let y = tensor::<B, 3>(rand_vec(4 * 8 * 16, 2, -2.0, 2.0), [4, 8, 16], dev);
    let p = tensor::<B, 3>(rand_vec(4 * 8 * 16, 3, 0.1, 3.0), [4, 8, 16], dev);
    let row = tensor::<B, 3>(rand_vec(8, 4, 0.5, 1.5), [1, 8, 1], dev);
    let mask = x.clone().lower_elem(-0.5);
    let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(vec![3i64, 0, 2, 2], [4]), dev);
    let gidx = Tensor::<B, 3, Int>::from_data(
        TensorData::new(
            (0..4 * 8 * 3).map(|i| ((i * 7) % 16) as i64).collect::<Vec<_>>(),
            [4, 8, 3],
        ),
        dev,
    );
    vec![
        ("add_broadcast", values(x.clone() + row.clone()), Tol::Rel),
        ("sub_broadcast", values(x.clone() - row.clone()), Tol::Rel),
        ("mul_broadcast", values(x.clone() * row.clone()), Tol::Rel),
        ("div_broadcast", values(x.clone() / row.clone()), Tol::Rel),
        ("add", values(x.clone() + y.clone()), Tol::Rel),
        ("mul", values(x.clone() * y.clone()), Tol::Rel),
        ("div", values(x.clone() / p.clone()), Tol::Rel),
        ("add_scalar", values(x.clone() + 0.75), Tol::Rel),
        ("mul_scalar", values(x.clone() * 1.5), Tol::Rel),
        ("div_scalar", values(x.clone() / 3.0), Tol::Rel),
        ("exp", values(x.clone().exp()), Tol::Rel),
        ("log", values(p.clone().log()), Tol::Rel),
        ("log1p", values(p.clone().log1p()), Tol::Rel),
        ("sqrt", values(p.clone().sqrt()), Tol::Rel),
        ("abs", values(x.clone().abs()), Tol::Rel),
        ("neg", values(-x.clone()), Tol::Rel),
        ("sigmoid", values(activation::sigmoid(x.clone())), Tol::Rel),
        ("silu", values(activation::silu(x.clone())), Tol::Rel),
        ("relu", values(activation::relu(x.clone())), Tol::Rel),
        ("tanh", values(x.clone().tanh()), Tol::Rel),
        ("cos", values(x.clone().cos()), Tol::Rel),
        ("sin", values(x.clone().sin()), Tol::Rel),
        ("clamp", values(x.clone().clamp(-0.5, 0.7)), Tol::Rel),
        ("max_dim", values(x.clone().max_dim(2)), Tol::Rel),
        ("powf", values(p.clone().powf(y.clone())), Tol::Rel),
        ("powf_scalar", values(p.clone().powf_scalar(1.7)), Tol::Rel),
        ("square", values(x.clone().square()), Tol::Rel),
        ("recip", values(p.clone().recip()), Tol::Rel),
        ("select", values(x.clone().select(0, idx.clone())), Tol::Rel),
        (
            "select_assign",
            values(x.clone().select_assign(
                0,
                idx.clone(),
                y.clone().select(0, idx.clone()),
                IndexingUpdateOp::Add,
            )),
            Tol::Rel,
        ),
        ("gather", values(x.clone().gather(2, gidx)), Tol::Rel),
        ("narrow", values(x.clone().narrow(1, 2, 5)), Tol::Rel),
        (
            "cat",
            values(Tensor::cat(vec![x.clone(), y.clone()], 1)),
            Tol::Rel,
        ),
        ("reshape", values(x.clone().reshape([32, 16])), Tol::Rel),
        ("swap_dims", values(x.clone().swap_dims(1, 2)), Tol::Rel),
        (
            "mask_fill",
            values(x.clone().mask_fill(mask.clone(), -1e4)),
            Tol::Rel,
        ),
        (
            "mask_where",
            values(x.clone().mask_where(mask, y.clone())),
            Tol::Rel,
        ),
        // Reductions: the emulator sums in its blocked lane order; the reference is the exact sum.
        ("sum_dim_last", values(p.clone().sum_dim(2)), Tol::Sum(16)),
        ("sum_dim_mid", values(p.clone().sum_dim(1)), Tol::Sum(8)),
        ("mean_dim", values(p.clone().mean_dim(2)), Tol::Sum(16)),
        ("sum", values(p.clone().sum()), Tol::Sum(512)),
        (
            "softmax_last",
            values(activation::softmax(x.clone(), 2)),
            Tol::Sum(16),
        ),
        (
            "softmax_mid",
            values(activation::softmax(x.clone(), 1)),
            Tol::Sum(8),
        ),
    ]
}

fn rel_ok(a: f32, b: f32, tol: f64) -> bool {
    (a == b) || ((a as f64 - b as f64).abs() <= tol * (b as f64).abs() + 1e-30)
}

/// Under must_keep_origin_dtype the emulator forwards most ops to burn-ndarray in f32; an f64 run of
/// the same ops is the independent answer (exact up to f32's rounding of inputs).
#[test]
fn f32_policy_matches_an_f64_reference_on_every_model_op() {
    let _g = lock();
    let dev = Default::default();
    set_policy(&dev, PrecisionPolicy::must_keep_origin_dtype());
    let npu = suite::<N>(&dev);
    let reference = suite::<Ref>(&dev);
    assert_eq!(npu.len(), reference.len());
    let mut worst = Vec::new();
    for ((name, a, tol), (ref_name, b, _)) in npu.iter().zip(&reference) {
        assert_eq!(name, ref_name);
        assert_eq!(a.len(), b.len(), "{name}: length");
        // burn-ndarray's recip is a SIMD approximation (~2e-5) in f64 too: the reference is 1/x itself.
        let exact_recip: Vec<f32>;
        let b = if *name == "recip" {
            exact_recip = rand_vec(4 * 8 * 16, 3, 0.1, 3.0)
                .iter()
                .map(|&p| (1.0 / p as f64) as f32)
                .collect();
            &exact_recip
        } else {
            b
        };
        let mut max_rel = 0f64;
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            let ok = match tol {
                Tol::Rel => rel_ok(*x, *y, 1e-6),
                // An f32 sum of n positive terms is within (n-1) u |sum| of the exact one.
                Tol::Sum(n) => rel_ok(*x, *y, 2.0 * (*n as f64 - 1.0) * U32),
            };
            assert!(ok, "{name}[{i}]: npu {x} vs f64 reference {y} ({tol:?})");
            if *y != 0.0 {
                max_rel = max_rel.max(((x - y) / y).abs() as f64);
            }
        }
        worst.push(format!("{name}:{max_rel:.1e}"));
    }
    println!("max relative deviation per op from f64: {}", worst.join(" "));
}

/// Naive f32 matmul, sequential K, no FMA: the emulator's defined order, written independently.
fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize, r: impl Fn(f32) -> f32) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for kk in 0..k {
                let prod = r(a[i * k + kk]) * r(b[kk * n + j]);
                acc += prod;
            }
            c[i * n + j] = acc;
        }
    }
    c
}

fn exact(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut c = vec![0f64; m * n];
    let mut s = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            for kk in 0..k {
                c[i * n + j] += a[i * k + kk] as f64 * b[kk * n + j] as f64;
                s[i * n + j] += (a[i * k + kk] as f64 * b[kk * n + j] as f64).abs();
            }
        }
    }
    (c, s)
}

#[test]
fn matmul_f32_is_the_defined_order_and_within_documented_error() {
    let _g = lock();
    let dev = Default::default();
    let (m, k, n) = (37, 300, 45);
    let a = rand_vec(m * k, 11, -1.0, 1.0);
    let b = rand_vec(k * n, 12, -1.0, 1.0);
    let (ex, sabs) = exact(&a, &b, m, k, n);
    let seq = naive(&a, &b, m, k, n, |x| x);
    for order in [
        KOrder::Sequential,
        KOrder::Reversed,
        KOrder::KShift,
        KOrder::SplitK { parts: 3 },
    ] {
        set_policy(
            &dev,
            PrecisionPolicy {
                k_order: order,
                ..PrecisionPolicy::must_keep_origin_dtype()
            },
        );
        let c =
            values(tensor::<N, 2>(a.clone(), [m, k], &dev).matmul(tensor::<N, 2>(b.clone(), [k, n], &dev)));
        let r = values(tensor::<Ref, 2>(a.clone(), [m, k], &dev).matmul(tensor::<Ref, 2>(
            b.clone(),
            [k, n],
            &dev,
        )));
        let mut max_err = 0f64;
        for i in 0..m * n {
            // Documented bound: |c - exact| <= K u32 sum|a||b| (gamma_K, any summation order).
            let bound = k as f64 * U32 * sabs[i];
            let err = (c[i] as f64 - ex[i]).abs();
            assert!(err <= bound, "{order:?} [{i}]: err {err} > {bound}");
            assert!(
                (c[i] as f64 - r[i] as f64).abs() <= 2.0 * bound,
                "{order:?} vs the f64 reference [{i}]"
            );
            max_err = max_err.max(err / sabs[i]);
        }
        if order == KOrder::Sequential {
            assert_eq!(
                c, seq,
                "sequential order must equal the naive f32 loop bit for bit"
            );
        }
        println!("{order:?}: max |c - exact| / sum|ab| = {max_err:.2e}");
    }
    set_policy(&dev, PrecisionPolicy::default());
}

#[test]
fn batched_matmul_3d_4d_and_broadcast() {
    let _g = lock();
    let dev = Default::default();
    set_policy(&dev, PrecisionPolicy::default());
    let a = rand_vec(2 * 3 * 8 * 20, 21, -1.0, 1.0);
    let b = rand_vec(2 * 3 * 20 * 6, 22, -1.0, 1.0);
    let c = values(
        tensor::<N, 4>(a.clone(), [2, 3, 8, 20], &dev).matmul(tensor::<N, 4>(b.clone(), [2, 3, 20, 6], &dev)),
    );
    let r = values(
        tensor::<Ref, 4>(a.clone(), [2, 3, 8, 20], &dev).matmul(tensor::<Ref, 4>(
            b.clone(),
            [2, 3, 20, 6],
            &dev,
        )),
    );
    assert_eq!(c.len(), r.len());
    for (x, y) in c.iter().zip(&r) {
        assert!((x - y).abs() <= 2.0 * 20.0 * U32 as f32 * 20.0, "4d: {x} vs {y}");
    }
    // Each batch equals the naive loop on its slices.
    for bi in 0..6 {
        let want = naive(
            &a[bi * 160..(bi + 1) * 160],
            &b[bi * 120..(bi + 1) * 120],
            8,
            20,
            6,
            |x| x,
        );
        assert_eq!(&c[bi * 48..(bi + 1) * 48], &want[..], "batch {bi}");
    }
    // 3D with a broadcast batch: [3, 8, 20] @ [1, 20, 6].
    let c3 = values(
        tensor::<N, 3>(a[..480].to_vec(), [3, 8, 20], &dev).matmul(tensor::<N, 3>(
            b[..120].to_vec(),
            [1, 20, 6],
            &dev,
        )),
    );
    for bi in 0..3 {
        let want = naive(&a[bi * 160..(bi + 1) * 160], &b[..120], 8, 20, 6, |x| x);
        assert_eq!(&c3[bi * 48..(bi + 1) * 48], &want[..], "broadcast batch {bi}");
    }
}

#[test]
fn bf16_matmul_matches_independent_model_and_bound() {
    let _g = lock();
    let dev = Default::default();
    set_policy(&dev, PrecisionPolicy::mix_bf16());
    let (m, k, n) = (20, 96, 33);
    let a = rand_vec(m * k, 31, -3.0, 3.0);
    let b = rand_vec(k * n, 32, -3.0, 3.0);
    let c = values(tensor::<N, 2>(a.clone(), [m, k], &dev).matmul(tensor::<N, 2>(b.clone(), [k, n], &dev)));
    set_policy(&dev, PrecisionPolicy::default());
    // Independent: the `half` crate's RNE for operands and output, sequential f32 accumulation.
    let hb = |x: f32| half::bf16::from_f32(x).to_f32();
    let want: Vec<f32> = naive(&a, &b, m, k, n, hb).into_iter().map(hb).collect();
    assert_eq!(c, want, "bf16 cube emulation vs independent model");
    let (ex, sabs) = exact(&a, &b, m, k, n);
    let ub = 2f64.powi(-8);
    let mut max_rel = 0f64;
    for i in 0..m * n {
        // operands: (1+u)^2 - 1 <= 2u + u^2; accumulation: K u32; output rounding: u |c|.
        let bound = (2.0 * ub + ub * ub + k as f64 * U32) * sabs[i] * (1.0 + ub) + ub * ex[i].abs();
        let err = (c[i] as f64 - ex[i]).abs();
        assert!(err <= bound, "[{i}] {err} > {bound}");
        max_rel = max_rel.max(err / sabs[i]);
    }
    println!(
        "bf16 matmul: max |c - exact| / sum|ab| = {max_rel:.3e} (bound ~{:.3e})",
        3.0 * ub
    );
}

#[test]
fn fp16_policy_vector_ops_within_one_rounding() {
    let _g = lock();
    let dev = Default::default();
    set_policy(&dev, PrecisionPolicy::force_fp16());
    let h = |x: f32| half::f16::from_f32(x).to_f32();
    let xs: Vec<f32> = rand_vec(256, 41, -4.0, 4.0).into_iter().map(h).collect();
    let ps: Vec<f32> = rand_vec(256, 42, 0.05, 8.0).into_iter().map(h).collect();
    let x = || tensor::<N, 1>(xs.clone(), [256], &dev);
    let p = || tensor::<N, 1>(ps.clone(), [256], &dev);
    let u16 = 2f64.powi(-11);
    type F = fn(f64, f64) -> f64;
    let cases: Vec<(&str, Vec<f32>, F, usize)> = vec![
        ("exp", values(x().exp()), |a, _| a.exp(), 1),
        ("log", values(p().log()), |_, b| b.ln(), 1),
        ("sqrt", values(p().sqrt()), |_, b| b.sqrt(), 1),
        ("add", values(x() + p()), |a, b| a + b, 1),
        ("mul", values(x() * p()), |a, b| a * b, 1),
        ("div", values(x() / p()), |a, b| a / b, 1),
        ("recip", values(p().recip()), |_, b| 1.0 / b, 1),
        ("tanh", values(x().tanh()), |a, _| a.tanh(), 1),
        // sigmoid = exp(-log(1 + exp(-x))): 4 roundings plus their propagation.
        (
            "sigmoid",
            values(activation::sigmoid(x())),
            |a, _| 1.0 / (1.0 + (-a).exp()),
            8,
        ),
    ];
    set_policy(&dev, PrecisionPolicy::default());
    for (name, got, f, roundings) in cases {
        for i in 0..256 {
            let want = f(xs[i] as f64, ps[i] as f64);
            let g = got[i];
            assert_eq!(h(g), g, "{name}[{i}]: {g} is not an fp16 value");
            let bound = roundings as f64 * (u16 + 2.0 * U32) * want.abs() + 2f64.powi(-25);
            assert!(
                (g as f64 - want).abs() <= bound,
                "{name}[{i}] x={} p={}: {g} vs {want} (bound {bound})",
                xs[i],
                ps[i]
            );
        }
    }
}

#[test]
fn rounding_matches_the_half_crate_bit_for_bit() {
    let mut s = 0x1234_5678u32;
    for i in 0..200_000u32 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        // Cover every exponent, including subnormals and overflow.
        let bits = if i % 4 == 0 {
            s & 0x807F_FFFF | ((i % 255) << 23)
        } else {
            s
        };
        let x = f32::from_bits(bits);
        if x.is_nan() {
            continue;
        }
        let want16 = half::f16::from_f32(x).to_f32();
        let wantb = half::bf16::from_f32(x).to_f32();
        assert_eq!(f16_rne(x).to_bits(), want16.to_bits(), "f16 of {x:e} ({bits:#x})");
        assert_eq!(
            bf16_rne(x).to_bits(),
            wantb.to_bits(),
            "bf16 of {x:e} ({bits:#x})"
        );
    }
    assert_eq!(NpuDType::F16.round(1e6, OverflowMode::Saturation), 65504.0);
    assert_eq!(NpuDType::F16.round(-1e6, OverflowMode::Saturation), -65504.0);
    assert_eq!(NpuDType::F16.round(f32::NAN, OverflowMode::Saturation), 0.0);
    assert!(NpuDType::F16.round(65520.0, OverflowMode::InfNan).is_infinite());
    assert_eq!(NpuDType::F16.round(65519.0, OverflowMode::InfNan), 65504.0);
    assert_eq!(
        NpuDType::Bf16.round(f32::MAX, OverflowMode::Saturation).to_bits(),
        0x7F7F_0000
    );
    // HF32 keeps 10 mantissa bits: 1 + 2^-11 ties to even (1.0), 1 + 3*2^-11 rounds up.
    assert_eq!(
        NpuDType::Hf32.round(1.0 + 2f32.powi(-11), OverflowMode::InfNan),
        1.0
    );
    assert_eq!(
        NpuDType::Hf32.round(1.0 + 3.0 * 2f32.powi(-11), OverflowMode::InfNan),
        1.0 + 2.0 * 2f32.powi(-10)
    );
}

#[test]
fn casts_saturate_or_overflow_per_policy() {
    let _g = lock();
    let dev = Default::default();
    let v = vec![1e6f32, -1e6, 1.0 + 2f32.powi(-12), f32::NAN];
    for (mode, big) in [
        (OverflowMode::InfNan, f32::INFINITY),
        (OverflowMode::Saturation, 65504.0),
    ] {
        set_policy(
            &dev,
            PrecisionPolicy {
                overflow_mode: mode,
                ..PrecisionPolicy::default()
            },
        );
        let out = values(tensor::<N, 1>(v.clone(), [4], &dev).cast(burn::tensor::DType::F16));
        assert_eq!(out[0], big, "{mode:?}");
        assert_eq!(out[1], -big, "{mode:?}");
        assert_eq!(out[2], 1.0, "{mode:?}: RNE to fp16");
        match mode {
            OverflowMode::InfNan => assert!(out[3].is_nan()),
            OverflowMode::Saturation => assert_eq!(out[3], 0.0),
        }
    }
    set_policy(&dev, PrecisionPolicy::default());
}

#[test]
fn fast_transcendental_probe_is_bounded() {
    let _g = lock();
    let dev = Default::default();
    let bits = 12;
    set_policy(
        &dev,
        PrecisionPolicy {
            impl_mode: ImplMode::HighPerformance,
            fast_math_bits: bits,
            ..PrecisionPolicy::default()
        },
    );
    let xs = rand_vec(1000, 51, -5.0, 5.0);
    let got = values(tensor::<N, 1>(xs.clone(), [1000], &dev).exp());
    let add = values(tensor::<N, 1>(xs.clone(), [1000], &dev) + 1.0);
    set_policy(&dev, PrecisionPolicy::default());
    let mut differs = 0;
    for (i, x) in xs.iter().enumerate() {
        let e = x.exp();
        let rel = ((got[i] - e) / e).abs() as f64;
        assert!(rel < 2f64.powi(-(bits as i32)), "exp({x}) {} vs {e}", got[i]);
        differs += (got[i] != e) as usize;
        assert_eq!(add[i], x + 1.0, "non-transcendental ops stay exact");
    }
    assert!(differs > 500, "the probe must perturb results ({differs})");
}

#[test]
fn nz_layout_documented_orders() {
    let m: Vec<u32> = (0..16).collect();
    let f = |outer, inner| Fractal {
        m0: 2,
        n0: 2,
        outer,
        inner,
    };
    assert_eq!(
        f(Major::Row, Major::Row).from_nd(&m, 4, 4),
        vec![0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15],
        "ZZ"
    );
    assert_eq!(
        f(Major::Row, Major::Col).from_nd(&m, 4, 4),
        vec![0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15],
        "ZN"
    );
    assert_eq!(
        f(Major::Col, Major::Row).from_nd(&m, 4, 4),
        vec![0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15],
        "NZ"
    );
    // FRACTAL_NZ [m, n] -> [ceil(n/n0), ceil(m/16)*16, n0]: element (i, j) at
    // ((j / n0) * M_pad + i) * n0 + j % n0, padding zero.
    let (rows, cols, n0) = (21, 37, 16);
    let nd: Vec<f32> = (0..rows * cols).map(|v| v as f32 + 1.0).collect();
    let nz = nd_to_nz(&nd, rows, cols, n0);
    let m_pad = 32;
    assert_eq!(nz.len(), cols.div_ceil(n0) * m_pad * n0);
    for i in 0..rows {
        for j in 0..cols {
            assert_eq!(nz[((j / n0) * m_pad + i) * n0 + j % n0], nd[i * cols + j]);
        }
    }
    assert_eq!(nz.iter().filter(|v| **v == 0.0).count(), nz.len() - rows * cols);
    assert_eq!(nz_to_nd(&nz, rows, cols, n0), nd);
}

#[test]
fn blocked_reduction_order() {
    let xs = rand_vec(1000, 61, -1.0, 1.0);
    let seq = xs.iter().fold(0f32, |a, x| a + x);
    assert_eq!(
        v4_npu::reduce::lane_sum(&xs, 1),
        seq,
        "one lane is the sequential sum"
    );
    // 4 lanes written out by hand: lanes, then the halving tree (0+2, 1+3), then (0+1).
    let mut l = [0f32; 4];
    for (i, x) in xs.iter().enumerate() {
        l[i % 4] += x;
    }
    assert_eq!(v4_npu::reduce::lane_sum(&xs, 4), (l[0] + l[2]) + (l[1] + l[3]));
    let exact: f64 = xs.iter().map(|x| *x as f64).sum();
    let sabs: f64 = xs.iter().map(|x| x.abs() as f64).sum();
    let s64 = v4_npu::reduce::lane_sum(&xs, 64) as f64;
    assert!((s64 - exact).abs() <= 1000.0 * U32 * sabs);
}

#[test]
fn fallbacks_are_counted_and_unsupported_dtypes_error() {
    let _g = lock();
    let dev = Default::default();
    set_policy(&dev, PrecisionPolicy::default());
    reset_stats(&dev);
    let d64 = TensorData::new(vec![1.0f64, 2.0, 3.0, 4.0], [2, 2]);
    let t = Tensor::<N, 2>::from_data(d64, &dev).cast(burn::tensor::DType::F64);
    assert_eq!(t.dtype(), burn::tensor::DType::F64);
    let e = t.clone().exp();
    let _ = e.clone().exp();
    let i = Tensor::<N, 2, Int>::from_data(TensorData::new(vec![1i64, 2, 3, 4], [2, 2]), &dev);
    let _ = i.clone().matmul(i);
    let r = report(&dev);
    assert_eq!(r.calls("float_exp", Engine::AiCpu), 2, "{}", r.summary());
    assert_eq!(r.calls("int_matmul", Engine::HostFallback), 1);
    assert_eq!(r.fallback_calls(), 3);
    let site = r.fallbacks.iter().find(|(k, _)| k.op == "float_exp").unwrap();
    assert_eq!(site.1, 2);
    assert!(site.0.shapes.contains("[2, 2]:F64"), "{}", site.0.shapes);
    let summary = r.summary();
    assert!(summary.contains("fallbacks: 3 calls at 2 sites"), "{summary}");
    println!("{summary}");

    // F64 matmul: no cube path -> an error naming the op and the dtype.
    let err = catch_unwind(AssertUnwindSafe(|| t.clone().matmul(t.clone()))).unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.contains("float_matmul") && msg.contains("F64"), "{msg}");
    assert!(report(&dev).errors.iter().any(|e| e.contains("float_matmul")));
    reset_stats(&dev);
}

#[test]
fn hbm_out_of_memory_names_the_allocation() {
    let _g = lock();
    let dev = Default::default();
    let mut cfg = NpuConfig::default();
    cfg.chip.hbm_bytes = 1 << 20;
    install_config(&dev, cfg);
    let small = Tensor::<N, 1>::zeros([1000], &dev);
    let used = report(&dev).mem_used;
    assert!(used >= 4000, "a 4000-byte tensor is accounted ({used})");
    let err = catch_unwind(AssertUnwindSafe(|| {
        Tensor::<N, 2>::from_data(TensorData::new(vec![0f32; 512 * 1024], [512, 1024]), &dev)
    }))
    .unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(
        msg.contains("out of memory") && msg.contains("float_from_data") && msg.contains("[512, 1024]"),
        "{msg}"
    );
    drop(small);
    assert!(report(&dev).mem_used < used, "freed on drop");
    install_config(&dev, NpuConfig::default());
    reset_stats(&dev);
}

#[test]
fn toml_config_and_report() {
    let _g = lock();
    let text = r#"
        [policy]
        precision_mode = "allow_mix_precision_bf16"
        overflow_mode = "saturation"
        k_order = { kind = "split_k", parts = 2 }

        [chip]
        name = "910B3"
        cube_cores = 20
        vector_cores = 40
        hbm_bytes = 68719476736
        hbm_gbps = 1200.0
    "#;
    let cfg = NpuConfig::from_toml_str(text).unwrap();
    assert_eq!(cfg.policy.precision_mode, PrecisionMode::AllowMixPrecisionBf16);
    assert_eq!(cfg.policy.cube_input_dtype(), NpuDType::Bf16);
    assert_eq!(cfg.policy.k_order, KOrder::SplitK { parts: 2 });
    assert_eq!(cfg.chip.cube_cores, 20);
    assert_eq!(cfg.chip.clock_ghz, 1.8, "unset keys keep the 910B defaults");
    assert_eq!(NpuConfig::from_toml_str(&cfg.to_toml_string()).unwrap(), cfg);
    assert!(NpuConfig::from_toml_str("[policy]\nprecision_mode = \"fp8\"").is_err());

    let dev = Default::default();
    install_config(&dev, cfg);
    reset_stats(&dev);
    let a = Tensor::<N, 2>::ones([2048, 2048], &dev);
    let _ = a.clone().matmul(a.clone());
    let _ = a.clone() + a;
    let r = report(&dev);
    let mm = r.ops.iter().find(|o| o.op == "float_matmul").unwrap();
    assert_eq!(mm.engine, Engine::Cube);
    assert_eq!(mm.main_bound(), Bound::Cube, "2048^3 bf16 matmul is cube-bound");
    let add = r.ops.iter().find(|o| o.op == "float_add").unwrap();
    assert_eq!(add.main_bound(), Bound::Memory, "an add is memory-bound");
    let s = r.summary();
    assert!(
        s.contains("910B3") && s.contains("ESTIMATE") && s.contains("float_matmul"),
        "{s}"
    );
    println!("{s}");
    install_config(&dev, NpuConfig::default());
    reset_stats(&dev);
}
