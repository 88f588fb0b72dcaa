//! The 910B/910C W8A8_DYNAMIC linear: what `npu_dynamic_quant` + `npu_quant_matmul` compute, emulated
//! bit for bit on the host for weights a checkpoint stores as INT8 (one scale per output channel).
//!
//! For `x: [n, k]` and an INT8 weight `W: [out, k]` with scales `s_w: [out]`:
//! 1. vector unit: each token (row of `x`) gets `s_x = amax / 127` and codes `q_x = RNE(x / s_x)`
//!    (the same rule as the weights, [`v4_formats::codec::int8`]);
//! 2. cube: `acc = q_x · q_w` summed exactly in INT32 (the order cannot matter);
//! 3. FixPipe: `y = (f32(acc) * s_w) * s_x`, rounded once to the policy's cube output dtype.
//!
//! The call is recorded as `npu_dynamic_quant` (vector) and `npu_quant_matmul` (cube, INT8 rate) in the
//! device's report, so the cost model sees INT8 throughput and bytes.

use crate::cost::{self, Cost};
use crate::policy::WeightQuant;
use crate::stats::{self, DeviceKey};
use crate::support::{Engine, OpClass};
use burn_backend::{DType, Shape};
use rayon::prelude::*;
use std::fmt;
use v4_formats::codec::int8;
use v4_formats::{PackedMatmul, PackedMatrix, Storage};

/// The packed-weight kernel of one emulated device: INT8 weights on the W8A8 path when the device's
/// policy asks for [`WeightQuant::W8a8Dynamic`]; any other weight is declined (and dequantised).
pub struct QuantMatmul {
    key: DeviceKey,
}

impl fmt::Debug for QuantMatmul {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "npu W8A8 (device {:?})", self.key)
    }
}

impl QuantMatmul {
    /// The kernel for `device`, whose configuration is read at every call.
    pub fn new<D: burn_backend::backend::DeviceOps>(device: &D) -> Self {
        Self {
            key: stats::device_key(device),
        }
    }
}

/// `W`'s INT8 codes and per-row scales, when every block of it is INT8.
fn int8_rows(w: &PackedMatrix) -> Option<(Vec<i8>, Vec<f32>)> {
    let mut codes = Vec::with_capacity(w.rows * w.cols);
    let mut scales = Vec::with_capacity(w.rows);
    for part in w.parts() {
        if part.storage != Storage::Int8 {
            return None;
        }
        codes.extend(part.data.as_slice().iter().map(|&b| b as i8));
        scales.extend(
            part.scales
                .as_slice()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
    }
    Some((codes, scales))
}

impl PackedMatmul for QuantMatmul {
    fn supports(&self, w: &PackedMatrix) -> bool {
        let policy = stats::state(self.key).config().policy;
        policy.weight_quant == WeightQuant::W8a8Dynamic
            && w.parts().iter().all(|p| p.storage == Storage::Int8)
    }

    fn matmul_t(&self, x: &[f32], n: usize, w: &PackedMatrix, y: &mut [f32]) {
        let (rows, k) = (w.rows, w.cols);
        assert_eq!(x.len(), n * k, "x is not [n, cols]");
        assert_eq!(y.len(), n * rows, "y is not [n, rows]");
        let (qw, sw) = int8_rows(w).expect("QuantMatmul::supports is checked first");
        let state = stats::state(self.key);
        let (policy, chip) = {
            let c = state.config();
            (c.policy, c.chip.clone())
        };
        let out = policy.cube_output_dtype();
        let mut qx = vec![0i8; n * k];
        let sx: Vec<f32> = x
            .chunks_exact(k)
            .zip(qx.chunks_exact_mut(k))
            .map(|(xr, qr)| int8::quantize_row(xr, qr))
            .collect();
        y.par_chunks_mut(rows).enumerate().for_each(|(t, yr)| {
            let xq = &qx[t * k..(t + 1) * k];
            for ((o, wq), &s) in yr.iter_mut().zip(qw.chunks_exact(k)).zip(&sw) {
                let acc: i32 = xq.iter().zip(wq).map(|(&a, &b)| a as i32 * b as i32).sum();
                *o = out.round((acc as f32 * s) * sx[t], policy.overflow_mode);
            }
        });
        let (xs, ws) = (Shape::new([n, k]), Shape::new([rows, k]));
        let quant = cost::estimate(
            &chip,
            &policy,
            "npu_dynamic_quant",
            Engine::Vector,
            OpClass::Vector,
            &[(xs.clone(), DType::F32)],
            Some(&(xs.clone(), DType::I8)),
        );
        stats::record(
            &state,
            "npu_dynamic_quant",
            Engine::Vector,
            OpClass::Vector,
            &[(xs.clone(), DType::F32)],
            &quant,
        );
        let mm: Cost = cost::cube_matmul_int8(&chip, n, k, rows, out);
        stats::record(
            &state,
            "npu_quant_matmul",
            Engine::Cube,
            OpClass::Cube,
            &[(xs, DType::I8), (ws, DType::I8)],
            &mm,
        );
    }
}
