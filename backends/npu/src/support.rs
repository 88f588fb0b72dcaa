//! The operator support table, CANN style: each call resolves to an engine (cube / vector / AI CPU /
//! host fallback) or is unsupported, from the operator's class, its dtypes and its shape limits.
//!
//! The table is a model of aclnn's coverage on 910B written for this emulator (what runs where, in
//! broad strokes), not a copy of Huawei's op-info files:
//! - cube ops (matmul, conv): f32 / f16 / bf16 (and int8 -> int32, which burn does not expose);
//!   int32/int64 matmul has no cube path and falls back to the host; f64 is unsupported (error);
//! - vector ops (elementwise, compare, select/gather/scatter, mask, fill, random, pooling):
//!   f32 / f16 / bf16 / int8..int64 / uint8 / bool; f64 runs on the AI CPU (counted fallback);
//! - reductions/scans on the vector unit, same dtypes; f64 on the AI CPU;
//! - AI CPU ops (cross, unfold, cummin/cummax, integer division/remainder, flip): AI CPU for all dtypes;
//! - host ops (FFT, deformable conv): host fallback (counted, with the D2H/H2D transfer costed);
//! - views (reshape, permute, swap_dims, slice, expand) and transfers: no kernel;
//! - every op: at most 8 dimensions (aclTensor limit), otherwise unsupported.

use burn_backend::DType;

/// Where an operator call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Engine {
    Cube,
    Vector,
    AiCpu,
    HostFallback,
    /// No kernel: a view or a metadata query.
    View,
    /// Host <-> device copy.
    Transfer,
    Unsupported,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Cube => "cube",
            Engine::Vector => "vector",
            Engine::AiCpu => "ai_cpu",
            Engine::HostFallback => "host_fallback",
            Engine::View => "view",
            Engine::Transfer => "transfer",
            Engine::Unsupported => "unsupported",
        }
    }

    /// A fallback is an op that does not run on the AI cores.
    pub fn is_fallback(self) -> bool {
        matches!(self, Engine::AiCpu | Engine::HostFallback)
    }
}

/// The nominal class of an operator (what it would be on a device that supports it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    Cube,
    /// Simple elementwise / data-movement vector op (128 B/cycle).
    Vector,
    /// Transcendental / division vector op (64 B/cycle; affected by `impl_mode`).
    VectorT,
    /// Reduction or scan on the vector unit.
    Reduce,
    AiCpu,
    Host,
    View,
    Data,
    /// Metadata query (e.g. `float_device`): not recorded.
    Meta,
}

/// The maximum rank of an aclTensor.
pub const MAX_RANK: usize = 8;

fn is_npu_float(d: DType) -> bool {
    matches!(d, DType::F32 | DType::F16 | DType::BF16 | DType::Flex32)
}

fn is_npu_int(d: DType) -> bool {
    matches!(
        d,
        DType::I8 | DType::I16 | DType::I32 | DType::I64 | DType::U8 | DType::U16 | DType::U32 | DType::U64
    ) || matches!(d, DType::Bool(_))
}

/// Resolve one call. `Err` carries the device's error message (unsupported dtype or shape).
pub fn resolve(op: &str, class: OpClass, dtypes: &[DType], ranks: &[usize]) -> Result<Engine, String> {
    if let Some(r) = ranks.iter().copied().find(|&r| r > MAX_RANK) {
        return Err(format!(
            "operator `{op}`: a rank-{r} tensor exceeds the aclTensor limit of {MAX_RANK} dimensions"
        ));
    }
    let has_f64 = dtypes.iter().any(|d| matches!(d, DType::F64));
    let all_native = dtypes.iter().all(|&d| is_npu_float(d) || is_npu_int(d));
    let qfloat = dtypes.iter().any(|d| matches!(d, DType::QFloat(_)));
    Ok(match class {
        OpClass::View | OpClass::Meta => Engine::View,
        OpClass::Data => Engine::Transfer,
        OpClass::Host => Engine::HostFallback,
        OpClass::AiCpu => Engine::AiCpu,
        OpClass::Cube => {
            if has_f64 {
                return Err(format!(
                    "operator `{op}` does not support dtype F64 on the cube (supported: F32, F16, BF16)"
                ));
            }
            if qfloat || dtypes.iter().all(|&d| is_npu_float(d)) {
                Engine::Cube
            } else {
                // int32/int64 matmul: no cube path on 910B (int8 only).
                Engine::HostFallback
            }
        }
        OpClass::Vector | OpClass::VectorT | OpClass::Reduce => {
            if has_f64 {
                Engine::AiCpu
            } else if all_native || qfloat {
                Engine::Vector
            } else {
                Engine::AiCpu
            }
        }
    })
}

/// The table, rendered for reports.
pub fn support_table() -> String {
    let rows = [
        (
            "cube (matmul, conv*)",
            "F32 F16 BF16",
            "int matmul -> host_fallback; F64 -> ERROR",
            "rank <= 8",
        ),
        (
            "quantised cube (npu_quant_matmul, policy weight_quant)",
            "910B w8a8_dynamic: I8 x I8 -> I32; 950 mx_dynamic: MXFP8 x MXFP8/MXFP4/E8M0-FP8",
            "other weight storage -> dequantised to the float cube",
            "weights [out, in]",
        ),
        (
            "activation quantisation (npu_dynamic_quant, npu_dynamic_mx_quant)",
            "F32 F16 BF16 -> I8 per token / MXFP8 per 32",
            "-",
            "rank 2",
        ),
        (
            "vector (elementwise, compare, gather/scatter, mask, fill, random, pool)",
            "F32 F16 BF16 I8..I64 U8..U64 Bool",
            "F64 -> ai_cpu",
            "rank <= 8",
        ),
        (
            "vector transcendental (exp log sqrt pow tanh erf div ...)",
            "F32 F16 BF16",
            "F64 -> ai_cpu",
            "rank <= 8",
        ),
        (
            "reduce (sum mean cumsum argmax topk ...)",
            "F32 F16 BF16 I*",
            "F64 -> ai_cpu",
            "rank <= 8",
        ),
        (
            "ai_cpu (cross unfold cummin cummax int div/rem flip)",
            "all",
            "-",
            "rank <= 8",
        ),
        ("host (rfft irfft deform_conv2d)", "all", "-", "-"),
        (
            "view (reshape permute swap_dims slice expand)",
            "all",
            "-",
            "rank <= 8",
        ),
    ];
    let mut s = String::from("op class | npu dtypes | otherwise | limits\n");
    for (a, b, c, d) in rows {
        s.push_str(&format!("{a} | {b} | {c} | {d}\n"));
    }
    s
}
