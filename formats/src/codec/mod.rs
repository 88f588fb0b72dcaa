//! Bit-exact number formats and the block-scale schemes built on them.
//!
//! Scalar formats live here; the block schemes are in [`fp8`] (DeepSeek 128x128 E8M0 / F32 scales),
//! [`mxfp4`] (E2M1 + E8M0 per 32, RCEIL or OCP floor) and [`nvfp4`] (E2M1 + E4M3 per 16 + F32
//! tensor scale, ModelOpt 0.47 rules), and Ascend's: [`int8`] (symmetric, one f32 scale per row: W8A8),
//! [`int4`] (symmetric, one f32 scale per group: W4A8's experts) and [`mxfp8`] (E4M3 + E8M0 per 32:
//! the 950's MX cube). Every rounding is computed from the f32 bit pattern, never
//! through a float cast whose rounding the platform would choose.
//!
//! Overflow policy: the converter *saturates* E4M3FN to ±448 ([`E4m3Overflow::Saturate`], as
//! torch 2.13 and later); [`E4m3Overflow::Nan`] reproduces ml_dtypes. NaN/Inf inputs are rejected by the
//! converter before they reach a codec.

/// Defines `$name`, which runs `$imp` compiled for AVX2 + FMA when the CPU has them and as
/// baseline code otherwise. Results are identical either way (Rust never contracts `a * b + c`
/// into an FMA); only the vector width changes. `$imp` must be `#[inline(always)]`.
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident = $imp:ident ($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) -> $ret {
                    $imp($($arg),*)
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $imp($($arg),*)
        }
    };
}

pub mod fp8;
pub mod int4;
pub mod int8;
pub mod mxfp4;
pub mod mxfp8;
pub mod nvfp4;

/// Largest finite E4M3FN magnitude.
pub const E4M3_MAX: f32 = 448.0;
/// Largest E2M1 magnitude.
pub const E2M1_MAX: f32 = 6.0;
/// E2M1 code -> value, codes 8..15 are the negatives of 0..7 (code 8 is -0.0).
pub const E2M1_VALUES: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// 2^120: scales an f32 built from E4M3 bits (exponent field 0..15) back to E4M3's bias 7.
const TWO_POW_120: f32 = f32::from_bits((127 + 120) << 23);

/// What E4M3FN does with magnitudes that round above 448.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E4m3Overflow {
    /// Clamp to ±448 (0x7E / 0xFE), as torch >= 2.13. Infinity saturates too.
    Saturate,
    /// Produce NaN (0x7F / 0xFF), as ml_dtypes.
    Nan,
}

/// f32 -> bf16 bits, round to nearest even (overflow rounds to infinity, NaN stays NaN).
#[inline(always)]
pub fn f32_to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        return ((b >> 16) as u16) | 0x0040;
    }
    ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16
}

/// bf16 bits -> f32 (exact).
#[inline(always)]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// E4M3FN code -> f32 (exact). 0x7F / 0xFF decode to NaN.
#[inline(always)]
pub fn e4m3_to_f32(code: u8) -> f32 {
    if code & 0x7F == 0x7F {
        return if code & 0x80 != 0 { -f32::NAN } else { f32::NAN };
    }
    e4m3_finite_to_f32(code)
}

/// E4M3FN code -> f32 for codes known not to be NaN. Branch-free so that loops vectorise: the
/// code's 7 magnitude bits placed at f32 bit 20 form a float with exponent field 0..15 (a
/// subnormal f32 for E4M3 subnormals), which 2^120 rebiases exactly.
#[inline(always)]
pub(crate) fn e4m3_finite_to_f32(code: u8) -> f32 {
    let c = code as u32;
    let mag = f32::from_bits((c & 0x7F) << 20) * TWO_POW_120;
    f32::from_bits(mag.to_bits() | ((c & 0x80) << 24))
}

/// f32 -> E4M3FN, round to nearest even, with the given overflow policy. NaN -> 0x7F (with sign).
#[inline(always)]
pub fn f32_to_e4m3(x: f32, overflow: E4m3Overflow) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & 0x7FFF_FFFF;
    if abs > 0x7F80_0000 {
        return sign | 0x7F;
    }
    let mag = e4m3_magnitude(abs);
    if mag > 0x7E {
        sign | match overflow {
            E4m3Overflow::Saturate => 0x7E,
            E4m3Overflow::Nan => 0x7F,
        }
    } else {
        sign | mag as u8
    }
}

/// Saturating E4M3FN encode of a finite value (the converter's hot path).
#[inline(always)]
pub(crate) fn f32_to_e4m3_sat(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    sign | e4m3_magnitude(bits & 0x7FFF_FFFF).min(0x7E) as u8
}

/// Rounded E4M3 magnitude code (may exceed 0x7E on overflow) of a non-NaN |x| given as bits.
#[inline(always)]
fn e4m3_magnitude(abs: u32) -> u32 {
    // Normal E4M3 (|x| >= 2^-6): round the f32 mantissa to 3 bits (RNE) and rebias 127 -> 7.
    let normal = ((abs + 0x7_FFFF + ((abs >> 20) & 1)) >> 20).wrapping_sub(120 << 3);
    // Subnormal E4M3: m * 2^-9 with m = RNE(|x| * 2^9) in 0..=8 (8 is the first normal, 0x08).
    let sub = rne_small_int(f32::from_bits(abs.min(0x3C80_0000)) * 512.0).1;
    if abs >= 0x3C80_0000 {
        normal
    } else {
        sub
    }
}

/// E5M2 code -> f32 (exact; 0x7C is +inf, 0x7D..0x7F NaN).
#[inline]
pub fn e5m2_to_f32(code: u8) -> f32 {
    half::f16::from_bits((code as u16) << 8).to_f32()
}

/// f32 -> E5M2, round to nearest even; overflow gives infinity (ml_dtypes and torch agree), NaN
/// gives 0x7E (with sign).
pub fn f32_to_e5m2(x: f32) -> u8 {
    let bits = x.to_bits();
    let sign = ((bits >> 24) & 0x80) as u8;
    let abs = bits & 0x7FFF_FFFF;
    if abs > 0x7F80_0000 {
        return sign | 0x7E;
    }
    let mag = if abs >= 0x3880_0000 {
        // Normal E5M2 (|x| >= 2^-14): 2 mantissa bits, rebias 127 -> 15.
        ((abs + 0xF_FFFF + ((abs >> 21) & 1)) >> 21) - (112 << 2)
    } else {
        // Subnormal: m * 2^-16, m = RNE(|x| * 2^16) in 0..=4.
        rne_small_int(f32::from_bits(abs) * 65536.0).1
    };
    sign | mag.min(0x7C) as u8
}

/// E8M0 byte -> 2^(b-127). 0xFF is NaN; 0x00 is 2^-127 (an f32 subnormal, exact).
#[inline(always)]
pub fn e8m0_to_f32(b: u8) -> f32 {
    let normal = f32::from_bits((b as u32) << 23);
    let v = if b == 0 {
        f32::from_bits(0x0040_0000)
    } else {
        normal
    };
    if b == 0xFF {
        f32::NAN
    } else {
        v
    }
}

/// 2^(127-b): the exact reciprocal of an E8M0 scale (b in 0..=254), representable in f32.
#[inline(always)]
pub(crate) fn e8m0_reciprocal(b: u8) -> f32 {
    let e = 254u32.wrapping_sub(b as u32); // biased exponent of 2^(127-b)
    if e == 0 {
        f32::from_bits(0x0040_0000)
    } else {
        f32::from_bits(e << 23)
    }
}

/// E8M0 of `floor(log2 |x|)`, clamped to [2^-127, 2^127]. Zero and subnormals give 0x00;
/// NaN/Inf give 0xFF. Computed from the f32 exponent field.
#[inline(always)]
pub fn e8m0_floor(x: f32) -> u8 {
    let e = (x.to_bits() >> 23) & 0xFF;
    e as u8 // exponent field 0 (zero/subnormal: log2 < -126) clamps to 0; 255 is NaN
}

/// E8M0 of `ceil(log2 |x|)`, clamped to [2^-127, 2^127]: exponent field plus one when any
/// mantissa bit is set. Zero gives 0x00; NaN/Inf give 0xFF.
#[inline(always)]
pub fn e8m0_ceil(x: f32) -> u8 {
    let abs = x.to_bits() & 0x7FFF_FFFF;
    let e = abs >> 23;
    let m = abs & 0x7F_FFFF;
    let normal = (e + (m != 0) as u32).min(254);
    // Subnormal m * 2^-149: ceil(log2) >= -126 only when m > 2^22.
    let sub = (m > 0x40_0000) as u32;
    let v = if e == 0 { sub } else { normal };
    (if e == 0xFF { 0xFF } else { v }) as u8
}

/// E2M1 code (low nibble) -> f32.
#[inline(always)]
pub fn e2m1_to_f32(code: u8) -> f32 {
    E2M1_VALUES[(code & 0xF) as usize]
}

/// f32 -> E2M1, RNE, clamp ±6; the sign bit is copied (so -0.0 and small negatives give 0x8), as
/// ml_dtypes and torchao do.
#[inline(always)]
pub fn f32_to_e2m1(x: f32) -> u8 {
    ((x.to_bits() >> 28) & 0x8 | round_e2m1(x.abs()).0) as u8
}

/// f32 -> E2M1 with ModelOpt's sign rule: the sign bit is set only for `x < 0`, so -0.0 gives 0x0
/// (small negatives that round to zero still give 0x8).
#[inline(always)]
pub fn f32_to_e2m1_modelopt(x: f32) -> u8 {
    (((x < 0.0) as u32) << 3 | round_e2m1(x.abs()).0) as u8
}

/// Packs E2M1 codes two per byte, element `2k` in the low nibble (every safetensors producer).
/// `codes.len()` must be even; `out.len() == codes.len() / 2`.
pub fn pack_e2m1(codes: &[u8], out: &mut [u8]) {
    for (o, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
        *o = (pair[0] & 0xF) | (pair[1] << 4);
    }
}

/// Inverse of [`pack_e2m1`]: `out.len() == 2 * packed.len()`.
pub fn unpack_e2m1(packed: &[u8], out: &mut [u8]) {
    for (pair, &b) in out.chunks_exact_mut(2).zip(packed) {
        pair[0] = b & 0xF;
        pair[1] = b >> 4;
    }
}

/// Lanes of the explicit accumulators below: a float reduction only vectorises when each lane
/// keeps its own partial result.
pub(crate) const LANES: usize = 8;

/// Largest |x| (any length): per-lane maxima, then across lanes.
#[inline(always)]
pub(crate) fn amax(x: &[f32]) -> f32 {
    let mut m = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let a = c[i].abs();
            m[i] = if a > m[i] { a } else { m[i] };
        }
    }
    for (i, v) in rest.iter().enumerate() {
        let a = v.abs();
        m[i] = if a > m[i] { a } else { m[i] };
    }
    m.into_iter().fold(0.0, |r, v| if v > r { v } else { r })
}

/// E8M0 of `ceil(log2(amax / k))` for `k = 1.k_frac * 2^k_exp` (6 = 1.5 * 2^2, 448 = 1.75 * 2^8),
/// for a normal `amax`, without a division: with `amax = 2^E (1 + f)`, the smallest power of two
/// `2^j` with `k 2^j >= amax` is `j = E - k_exp + (1 + f > 1.k_frac)`. Equal to
/// `e8m0_ceil(amax / k)` (f32 division never rounds across a power of two here).
#[inline(always)]
pub(crate) fn e8m0_ceil_div(amax: f32, k_exp: u32, k_mantissa_bits: u32) -> u8 {
    let bits = amax.to_bits() & 0x7FFF_FFFF;
    let e = bits >> 23;
    ((e + ((bits & 0x7F_FFFF) > k_mantissa_bits) as u32).saturating_sub(k_exp)).min(254) as u8
}

/// Per-lane Σx², Σ(x-q)², max|x-q|.
#[derive(Clone, Copy)]
pub(crate) struct Acc {
    ss: [f32; LANES],
    se: [f32; LANES],
    mx: [f32; LANES],
}

impl Acc {
    #[inline(always)]
    pub(crate) fn new() -> Acc {
        Acc {
            ss: [0.0; LANES],
            se: [0.0; LANES],
            mx: [0.0; LANES],
        }
    }

    /// Adds input `x` with error `d` in lane `i`.
    #[inline(always)]
    pub(crate) fn add(&mut self, i: usize, x: f32, d: f32) {
        self.ss[i] += x * x;
        self.se[i] += d * d;
        let a = d.abs();
        self.mx[i] = if a > self.mx[i] { a } else { self.mx[i] };
    }

    /// Lane-wise sum of two accumulators.
    #[inline(always)]
    pub(crate) fn merge(&mut self, o: &Acc) {
        for i in 0..LANES {
            self.ss[i] += o.ss[i];
            self.se[i] += o.se[i];
            self.mx[i] = self.mx[i].max(o.mx[i]);
        }
    }

    /// Σ(x-q)² so far.
    #[inline(always)]
    pub(crate) fn sse(&self) -> f32 {
        self.se.into_iter().sum()
    }

    /// The totals as statistics, `extra_rtn` being how much more squared error plain rounding
    /// to nearest would have had.
    #[inline(always)]
    pub(crate) fn stats(&self, extra_rtn: f64) -> ErrStats {
        let (ss, se, mx) = self.finish();
        ErrStats {
            sum_sq: ss as f64,
            sse: se as f64,
            sse_rtn: se as f64 + extra_rtn,
            max_abs: mx,
        }
    }

    /// (Σx², Σ(x-q)², max|x-q|).
    #[inline(always)]
    pub(crate) fn finish(&self) -> (f32, f32, f32) {
        let sum = |a: [f32; LANES]| a.into_iter().sum::<f32>();
        (
            sum(self.ss),
            sum(self.se),
            self.mx.into_iter().fold(0.0, f32::max),
        )
    }
}

/// Rounds `0 <= y < 2^22` to the nearest integer, ties to even, returning it as f32 and u32.
/// Adding 2^23 leaves the integer in the low mantissa bits (no float -> int conversion, which
/// does not vectorise for u32).
#[inline(always)]
fn rne_small_int(y: f32) -> (f32, u32) {
    const MAGIC: f32 = 8_388_608.0; // 2^23
    let t = y + MAGIC;
    (t - MAGIC, t.to_bits() - MAGIC.to_bits())
}

/// E2M1 magnitude code (0..=7) of `a = |y|` rounded to nearest even, clamped to 6, and its
/// value. Branch-free so that loops vectorise: at and above 1 (E2M1 normals, one mantissa bit)
/// the f32 mantissa is rounded to one bit in place, which yields both the value and, from the
/// exponent, the code; below 1 the step is 0.5, so `RNE(2a)` is the code.
#[inline(always)]
pub(crate) fn round_e2m1(a: f32) -> (u32, f32) {
    let bits = a.to_bits();
    let r = bits + 0x1F_FFFF + ((bits >> 22) & 1);
    let normal = (r >> 22).wrapping_sub(126 << 1);
    let (sub, sub_code) = rne_small_int(a.min(1.0) * 2.0);
    let (code, q) = if a >= 1.0 {
        (normal, f32::from_bits(r & 0xFFC0_0000))
    } else {
        (sub_code, sub * 0.5)
    };
    (code.min(7), q.min(E2M1_MAX))
}

/// Packs 2 codes (each < 16) per byte, low nibble first, through u16 lanes (vectorises).
#[inline(always)]
pub(crate) fn pack_pairs(codes: &[u8], out: &mut [u8]) {
    for (o, pair) in out.iter_mut().zip(codes.chunks_exact(2)) {
        let w = u16::from_le_bytes([pair[0], pair[1]]);
        *o = (w | (w >> 4)) as u8;
    }
}

/// Weight-only calibration of FP4 block scales.
#[derive(Clone, Copy, Debug, Default)]
pub enum ScaleSearch<'a> {
    /// Round to nearest with the scheme's exact scale rule.
    #[default]
    Off,
    /// Per block, try a few neighbouring scales and keep the one with the least squared error,
    /// each input channel `j` weighted by `importance[j]` (e.g. `E[x_j^2]` from calibration text;
    /// `None` weights all channels equally).
    MinSquaredError { importance: Option<&'a [f32]> },
}

/// Error statistics of one quantisation, accumulated over blocks and merged across threads.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ErrStats {
    /// Σ x² of the input.
    pub sum_sq: f64,
    /// Σ (x - q)² of the chosen quantisation.
    pub sse: f64,
    /// Σ (x - q)² of plain round-to-nearest (equal to `sse` without calibration).
    pub sse_rtn: f64,
    /// max |x - q|.
    pub max_abs: f32,
}

impl ErrStats {
    /// Combines two disjoint parts of a tensor.
    pub fn merge(self, o: ErrStats) -> ErrStats {
        ErrStats {
            sum_sq: self.sum_sq + o.sum_sq,
            sse: self.sse + o.sse,
            sse_rtn: self.sse_rtn + o.sse_rtn,
            max_abs: self.max_abs.max(o.max_abs),
        }
    }

    /// sqrt(Σ(x-q)² / Σx²), 0 for an all-zero tensor.
    pub fn rel_l2(&self) -> f64 {
        rel(self.sse, self.sum_sq)
    }

    /// The same for round-to-nearest.
    pub fn rel_l2_rtn(&self) -> f64 {
        rel(self.sse_rtn, self.sum_sq)
    }

    /// Statistics of the element-wise conversion `x -> f(x)` (no calibration alternative):
    /// lane accumulators flushed to f64 every 4096 elements.
    #[inline(always)]
    pub fn of_map(x: &[f32], f: impl Fn(f32) -> f32) -> ErrStats {
        let mut st = ErrStats::default();
        for part in x.chunks(4096) {
            let mut acc = Acc::new();
            let chunks = part.chunks_exact(LANES);
            let rest = chunks.remainder();
            for c in chunks {
                for (i, &v) in c.iter().enumerate() {
                    acc.add(i, v, v - f(v));
                }
            }
            for &v in rest {
                acc.add(0, v, v - f(v));
            }
            st = st.merge(acc.stats(0.0));
        }
        st
    }
}

fn rel(sse: f64, ss: f64) -> f64 {
    if ss > 0.0 {
        (sse / ss).sqrt()
    } else if sse > 0.0 {
        f64::INFINITY
    } else {
        0.0
    }
}

/// Deterministic test data: varied magnitudes per 16 values (so block scales differ), exact
/// E2M1 midpoints, zeros of both signs.
#[cfg(test)]
pub(crate) fn test_data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed | 1;
    let mut next = move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    };
    let mut scale = 1f32;
    (0..n)
        .map(|i| {
            let r = next();
            if i % 16 == 0 {
                scale = 2f32.powi((r % 40) as i32 - 30);
            }
            let u = (r >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            match r % 23 {
                0 => 0.0,
                1 => -0.0,
                2 => [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0][(r >> 8) as usize % 7] * scale,
                _ => u * 6.0 * scale,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Nearest point of the E2M1 grid, ties to the even code, clamped to 6: by search.
    fn e2m1_reference(a: f32) -> u32 {
        let grid = [0.0f32, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let mut best = 0;
        for (c, &g) in grid.iter().enumerate() {
            let (d, db) = ((a - g).abs(), (a - grid[best]).abs());
            if d < db || (d == db && c % 2 == 0) {
                best = c;
            }
        }
        best as u32
    }

    #[test]
    fn e2m1_rounding_matches_nearest_grid_point() {
        let mut vals = test_data(100_000, 7);
        for m in [0.25f32, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 7.0, 8.0] {
            vals.extend([
                m,
                f32::from_bits(m.to_bits() - 1),
                f32::from_bits(m.to_bits() + 1),
            ]);
        }
        for v in vals {
            let a = v.abs().min(1e30);
            let (code, q) = round_e2m1(a);
            assert_eq!(code, e2m1_reference(a), "{a}");
            assert_eq!(q, E2M1_VALUES[code as usize], "{a}");
        }
    }

    #[test]
    fn ceil_div_matches_division() {
        for v in test_data(100_000, 11).into_iter().chain([6.0, 448.0, 1.0, 0.75]) {
            let a = v.abs().max(f32::MIN_POSITIVE * 448.0);
            assert_eq!(e8m0_ceil_div(a, 2, 0x40_0000), e8m0_ceil(a / 6.0), "{a} / 6");
            assert_eq!(e8m0_ceil_div(a, 8, 0x60_0000), e8m0_ceil(a / 448.0), "{a} / 448");
        }
    }

    #[test]
    fn e4m3_decode_matches_formula_for_every_code() {
        // Independent definition: (-1)^s * 2^(e-7) * (1 + m/8), subnormal 2^-6 * m/8.
        for c in 0u8..=255 {
            let s = if c & 0x80 != 0 { -1.0f64 } else { 1.0 };
            let e = ((c >> 3) & 0xF) as i32;
            let m = (c & 7) as f64;
            let got = e4m3_to_f32(c);
            if c & 0x7F == 0x7F {
                assert!(got.is_nan());
                continue;
            }
            let want = if e == 0 {
                s * m / 8.0 * 2f64.powi(-6)
            } else {
                s * (1.0 + m / 8.0) * 2f64.powi(e - 7)
            };
            assert_eq!(got as f64, want, "code {c:#04x}");
            assert_eq!(got.to_bits() >> 31, (c >> 7) as u32, "sign of {c:#04x}");
        }
    }

    #[test]
    fn e4m3_encode_inverts_decode_on_every_finite_code() {
        for c in 0u8..=255 {
            if c & 0x7F == 0x7F {
                continue;
            }
            let v = e4m3_to_f32(c);
            assert_eq!(f32_to_e4m3(v, E4m3Overflow::Nan), c);
            assert_eq!(f32_to_e4m3_sat(v), c);
        }
    }

    #[test]
    fn e5m2_encode_inverts_decode_on_every_finite_code() {
        for c in 0u8..=255 {
            if c & 0x7F > 0x7C {
                continue;
            }
            assert_eq!(f32_to_e5m2(e5m2_to_f32(c)), c, "code {c:#04x}");
        }
    }

    #[test]
    fn bf16_matches_half_crate() {
        // half's conversion is an independent RNE implementation.
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let f = f32::from_bits(x);
            if f.is_nan() {
                continue;
            }
            assert_eq!(f32_to_bf16(f), half::bf16::from_f32(f).to_bits(), "{x:#x}");
        }
    }

    #[test]
    fn e8m0_reciprocal_is_exact_inverse() {
        for b in 0u8..=254 {
            assert_eq!(e8m0_to_f32(b) * e8m0_reciprocal(b), 1.0, "byte {b}");
        }
    }

    #[test]
    fn e2m1_pack_roundtrip() {
        let codes: Vec<u8> = (0..32).map(|i| (i * 7 % 16) as u8).collect();
        let mut packed = vec![0u8; 16];
        pack_e2m1(&codes, &mut packed);
        assert_eq!(packed[0], codes[0] | (codes[1] << 4));
        let mut back = vec![0u8; 32];
        unpack_e2m1(&packed, &mut back);
        assert_eq!(back, codes);
    }
}
