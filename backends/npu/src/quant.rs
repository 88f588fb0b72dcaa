//! Linears on quantised checkpoint weights, as Ascend's quantised matmuls compute them, emulated bit for
//! bit on the host. Which path runs is the policy's [`WeightQuant`]:
//!
//! - **910B/910C W8A8_DYNAMIC** (`npu_dynamic_quant` + `npu_quant_matmul`), for INT8 weights `W: [out, k]`
//!   with one scale `s_w` per output channel, and W4A8_DYNAMIC's INT4 experts the same way (their codes
//!   are integers in [-8, 7]; the kernel's nibble split of `q_x` and its `scale_bias` add up to the same
//!   INT32 sum, [`v4_formats::codec::int4::scale_bias`]):
//!   1. vector unit: each token (row of `x: [n, k]`) gets `s_x = amax / 127` and codes
//!      `q_x = RNE(x / s_x)` (the weights' rule, [`v4_formats::codec::int8`]);
//!   2. cube: `acc = q_x · q_w` summed exactly in INT32 (the order cannot matter);
//!   3. FixPipe: `y = (f32(acc) * s_w) * s_x`, rounded once to the policy's cube output dtype.
//! - **950 MX cube**, for MXFP8, MXFP4 and E8M0-scaled FP8 weights:
//!   1. vector unit: each token's activations become MXFP8 (OCP rule, [`v4_formats::codec::mxfp8`]);
//!   2. cube: products of two MX elements are exact in f32 (at most 4 x 4 significant bits times powers
//!      of two); they accumulate in f32 in K order;
//!   3. the tile is rounded once to the cube output dtype.
//!
//! Each call is recorded as a vector quantisation op and `npu_quant_matmul` (cube, 8-bit rate) in the
//! device's report, so the cost model sees the 8-bit throughput and bytes.

use crate::cost;
use crate::policy::{PrecisionPolicy, WeightQuant};
use crate::stats::{self, DeviceKey};
use crate::support::{Engine, OpClass};
use burn_backend::{DType, Shape};
use rayon::prelude::*;
use std::fmt;
use v4_formats::codec::{int4, int8, mxfp8};
use v4_formats::{Fp8ScaleKind, PackedMatmul, PackedMatrix, Storage};

/// The packed-weight kernel of one emulated device: the weights its policy's [`WeightQuant`] path holds
/// as stored; every other weight is declined (and dequantised to the float path).
pub struct QuantMatmul {
    key: DeviceKey,
}

impl fmt::Debug for QuantMatmul {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "npu quantised matmul (device {:?})", self.key)
    }
}

impl QuantMatmul {
    /// The kernel for `device`, whose configuration is read at every call.
    pub fn new<D: burn_backend::backend::DeviceOps>(device: &D) -> Self {
        Self {
            key: stats::device_key(device),
        }
    }

    fn policy(&self) -> PrecisionPolicy {
        stats::state(self.key).config().policy
    }
}

/// Whether `path` holds weights stored as `storage`.
fn holds(path: WeightQuant, storage: Storage) -> bool {
    match path {
        WeightQuant::Dequantize => false,
        WeightQuant::W8a8Dynamic => matches!(storage, Storage::Int8 | Storage::Int4),
        WeightQuant::MxDynamic => matches!(
            storage,
            Storage::Mxfp8
                | Storage::Mxfp4 { block: 32 }
                | Storage::Fp8 {
                    scale: Fp8ScaleKind::E8m0,
                    ..
                }
        ),
    }
}

/// `W`'s integer codes and per-row scales (every block is INT8 or INT4).
fn integer_rows(w: &PackedMatrix) -> (Vec<i8>, Vec<f32>) {
    let mut codes = Vec::with_capacity(w.rows * w.cols);
    let mut scales = Vec::with_capacity(w.rows);
    for part in w.parts() {
        let data = part.data.as_slice();
        match part.storage {
            Storage::Int4 => codes.extend(
                (0..part.rows * part.cols)
                    .map(|i| int4::code_at(data, part.cols, i / part.cols, i % part.cols)),
            ),
            _ => codes.extend(data.iter().map(|&b| b as i8)),
        }
        scales.extend(
            part.scales
                .as_slice()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    (codes, scales)
}

/// W8A8_DYNAMIC: `y[t, r] = out((f32(q_x[t] · q_w[r]) * s_w[r]) * s_x[t])`.
fn w8a8(x: &[f32], k: usize, w: &PackedMatrix, policy: &PrecisionPolicy, y: &mut [f32]) {
    let (qw, sw) = integer_rows(w);
    let out = policy.cube_output_dtype();
    let mut qx = vec![0i8; x.len()];
    let sx: Vec<f32> = x
        .chunks_exact(k)
        .zip(qx.chunks_exact_mut(k))
        .map(|(xr, qr)| int8::quantize_row(xr, qr))
        .collect();
    y.par_chunks_mut(w.rows.max(1)).enumerate().for_each(|(t, yr)| {
        let xq = &qx[t * k..(t + 1) * k];
        for ((o, wq), &s) in yr.iter_mut().zip(qw.chunks_exact(k)).zip(&sw) {
            let acc: i32 = xq.iter().zip(wq).map(|(&a, &b)| a as i32 * b as i32).sum();
            *o = out.round((acc as f32 * s) * sx[t], policy.overflow_mode);
        }
    });
}

/// The MX cube: MXFP8 activations against the stored MX weights, exact products, f32 sums in K order.
fn mx(x: &[f32], k: usize, w: &PackedMatrix, policy: &PrecisionPolicy, y: &mut [f32]) {
    let out = policy.cube_output_dtype();
    let per_row = mxfp8::scales_per_row(k);
    let (mut codes, mut scales) = (vec![0u8; x.len()], vec![0u8; x.len() / k * per_row]);
    mxfp8::quantize_rows(x, k, &mut codes, &mut scales);
    let mut xq = vec![0f32; x.len()];
    mxfp8::dequantize_rows(&codes, &scales, k, &mut xq);
    let wf = w.to_f32();
    y.par_chunks_mut(w.rows.max(1)).enumerate().for_each(|(t, yr)| {
        let xr = &xq[t * k..(t + 1) * k];
        for (o, wr) in yr.iter_mut().zip(wf.chunks_exact(k)) {
            let acc = xr.iter().zip(wr).fold(0f32, |acc, (a, b)| acc + a * b);
            *o = out.round(acc, policy.overflow_mode);
        }
    });
}

impl PackedMatmul for QuantMatmul {
    fn supports(&self, w: &PackedMatrix) -> bool {
        let path = self.policy().weight_quant;
        w.parts().iter().all(|p| holds(path, p.storage))
    }

    fn matmul_t(&self, x: &[f32], n: usize, w: &PackedMatrix, y: &mut [f32]) {
        let (rows, k) = (w.rows, w.cols);
        assert_eq!(x.len(), n * k, "x is not [n, cols]");
        assert_eq!(y.len(), n * rows, "y is not [n, rows]");
        let state = stats::state(self.key);
        let (policy, chip) = {
            let c = state.config();
            (c.policy, c.chip.clone())
        };
        let quant_op = match policy.weight_quant {
            WeightQuant::W8a8Dynamic => {
                w8a8(x, k, w, &policy, y);
                "npu_dynamic_quant"
            }
            WeightQuant::MxDynamic => {
                mx(x, k, w, &policy, y);
                "npu_dynamic_mx_quant"
            }
            WeightQuant::Dequantize => {
                panic!("QuantMatmul::supports declines every weight under `dequantize`")
            }
        };
        let xs = Shape::new([n, k]);
        let ins = [(xs.clone(), DType::F32)];
        let quant = cost::estimate(
            &chip,
            &policy,
            quant_op,
            Engine::Vector,
            OpClass::Vector,
            &ins,
            Some(&(xs.clone(), DType::I8)),
        );
        stats::record(&state, quant_op, Engine::Vector, OpClass::Vector, &ins, &quant);
        let weight_bytes = w.stored_bytes() as f64 / (rows * k).max(1) as f64;
        let mm = cost::cube_matmul_8bit(&chip, [n, k, rows], weight_bytes, policy.cube_output_dtype());
        let ins = [(xs, DType::I8), (Shape::new([rows, k]), DType::I8)];
        stats::record(&state, "npu_quant_matmul", Engine::Cube, OpClass::Cube, &ins, &mm);
    }
}
