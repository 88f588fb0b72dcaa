//! Bit-level emulation of the NPU's number formats on f32 storage.
//!
//! Every value the emulator produces lives in an f32 (the inner backend's storage); a "reduced" dtype
//! is emulated by rounding that f32 to the nearest value representable in the target format, with
//! round-to-nearest-even (RNE) implemented by integer manipulation of the f32 bits, never by host
//! f16 arithmetic. Products of two fp16/bf16/HF32 values are exact in f32 (11 x 11 = 22 significant
//! bits <= 24), so multiply-then-add in f32 reproduces a cube's fp32 accumulator exactly for a given
//! summation order.

use serde::{Deserialize, Serialize};

/// A floating-point format the NPU computes or stores in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NpuDType {
    /// IEEE binary32.
    F32,
    /// Huawei HF32: 1 sign, 8 exponent, 10 mantissa bits (the cube's down-precision fp32 path on 910B).
    Hf32,
    /// IEEE binary16: 5 exponent, 10 mantissa bits, max 65504.
    F16,
    /// bfloat16: 8 exponent, 7 mantissa bits.
    Bf16,
}

/// What a cast does with values outside the target's finite range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OverflowMode {
    /// IEEE: overflow gives +-inf, NaN stays NaN (910B default, `inf_nan`).
    #[default]
    InfNan,
    /// Saturation: overflow clamps to +-max finite, NaN becomes 0 (910A default).
    Saturation,
}

impl NpuDType {
    /// Explicit mantissa bits (without the implicit leading one).
    pub fn mantissa_bits(self) -> u32 {
        match self {
            NpuDType::F32 => 23,
            NpuDType::Hf32 | NpuDType::F16 => 10,
            NpuDType::Bf16 => 7,
        }
    }

    /// Smallest normal exponent (unbiased).
    pub fn min_exponent(self) -> i32 {
        match self {
            NpuDType::F16 => -14,
            _ => -126,
        }
    }

    /// Largest finite value.
    pub fn max_finite(self) -> f32 {
        match self {
            NpuDType::F32 => f32::MAX,
            NpuDType::Hf32 => f32::from_bits(0x7F7F_E000),
            NpuDType::F16 => 65504.0,
            NpuDType::Bf16 => f32::from_bits(0x7F7F_0000),
        }
    }

    /// Unit roundoff u = 2^-(p) for RNE (half an ulp of 1.0): the relative error bound of one
    /// rounding for values in the normal range.
    pub fn unit_roundoff(self) -> f64 {
        2f64.powi(-(self.mantissa_bits() as i32 + 1))
    }

    /// Storage bytes on the device.
    pub fn size_bytes(self) -> usize {
        match self {
            NpuDType::F32 | NpuDType::Hf32 => 4,
            NpuDType::F16 | NpuDType::Bf16 => 2,
        }
    }

    /// Round an f32 to this format (RNE), applying `overflow` to values beyond the finite range.
    #[inline]
    pub fn round(self, x: f32, overflow: OverflowMode) -> f32 {
        match self {
            NpuDType::F32 => {
                if overflow == OverflowMode::Saturation && x.is_nan() {
                    0.0
                } else {
                    x
                }
            }
            _ => round_to_format(
                x,
                self.mantissa_bits(),
                self.min_exponent(),
                self.max_finite(),
                overflow,
            ),
        }
    }

    /// Round a whole slice in place.
    pub fn round_slice(self, xs: &mut [f32], overflow: OverflowMode) {
        if self == NpuDType::F32 && overflow == OverflowMode::InfNan {
            return;
        }
        for x in xs {
            *x = self.round(*x, overflow);
        }
    }
}

/// Round `x` to a binary format with `m` explicit mantissa bits, smallest normal exponent `emin`
/// and largest finite value `max`, RNE, by integer manipulation of the f32 bits.
#[inline]
pub fn round_to_format(x: f32, m: u32, emin: i32, max: f32, overflow: OverflowMode) -> f32 {
    if x.is_nan() {
        return match overflow {
            OverflowMode::InfNan => f32::NAN,
            OverflowMode::Saturation => 0.0,
        };
    }
    if x.is_infinite() {
        return match overflow {
            OverflowMode::InfNan => x,
            OverflowMode::Saturation => max.copysign(x),
        };
    }
    let shift = 23 - m;
    let bits = x.to_bits();
    let exp = ((bits >> 23) & 0xFF) as i32 - 127;
    let r = if exp >= emin || emin <= -126 {
        // Normal in the target format (or an f32 subnormal for a format with the f32 exponent
        // range, whose quantum is then also 2^shift f32 quanta): RNE on the low `shift` bits. A carry into the exponent is
        // the correct result (the next binade); a carry into 0x7F80_0000 is an overflow to inf.
        let half = (1u32 << (shift - 1)) - 1;
        let lsb = (bits >> shift) & 1;
        let rounded = bits.wrapping_add(half + lsb) & !((1u32 << shift) - 1);
        f32::from_bits(rounded)
    } else {
        // Subnormal in the target format: a fixed quantum 2^(emin - m). Scaling by a power of two
        // is exact in f32 here (the scaled value is < 2^m), so round_ties_even is RNE. (Formats with
        // the f32 exponent range take the branch above: f32 subnormals round correctly by the bits.)
        let q = f32::from_bits(((emin - m as i32 + 127) as u32) << 23);
        (x / q).round_ties_even() * q
    };
    if r.is_infinite() || r.abs() > max {
        match overflow {
            OverflowMode::InfNan => f32::INFINITY.copysign(x),
            OverflowMode::Saturation => max.copysign(x),
        }
    } else {
        r
    }
}

/// bf16 RNE of an f32, IEEE overflow: the format used for bf16 matmul operands and outputs.
#[inline]
pub fn bf16_rne(x: f32) -> f32 {
    NpuDType::Bf16.round(x, OverflowMode::InfNan)
}

/// fp16 RNE of an f32 (with fp16 subnormals), IEEE overflow.
#[inline]
pub fn f16_rne(x: f32) -> f32 {
    NpuDType::F16.round(x, OverflowMode::InfNan)
}

/// The "fast" (`impl_mode = high_performance`) transcendental model: the exact f32 result with its
/// mantissa truncated to `bits` bits (toward zero). This is NOT Huawei's algorithm (which is not
/// public): it is a sensitivity probe with a stated bound, relative error < 2^-bits, always biased
/// toward zero, i.e. a pessimistic stand-in for the approximate vector instructions.
#[inline]
pub fn fast_approx(x: f32, bits: u32) -> f32 {
    if !x.is_finite() || bits >= 23 {
        return x;
    }
    let drop = 23 - bits;
    f32::from_bits(x.to_bits() & !((1u32 << drop) - 1))
}
