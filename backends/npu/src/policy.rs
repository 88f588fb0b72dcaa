//! CANN's precision knobs, the chip parameter sheet, and the TOML configuration that carries both.

use crate::numerics::{NpuDType, OverflowMode};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// CANN `precision_mode` (ACL_PRECISION_MODE / torch_npu `npu.set_option`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum PrecisionMode {
    /// Keep every operator in its input dtype (torch_npu default on 910B and later): f32 stays f32.
    #[default]
    MustKeepOriginDtype,
    /// 910A behaviour: keep f32 where the operator supports it; the cube (matmul) runs fp16 inputs
    /// with an f32 output.
    AllowFp32ToFp16,
    /// Offline-graph default: every operator computes and stores fp16 (cube: fp16 in, fp16 out;
    /// vector: f32 compute, one rounding to fp16).
    ForceFp16,
    /// Every operator in f32 (the cube may still use HF32 if `cube_math_type`/`allow_hf32` say so).
    ForceFp32,
    /// Mixed precision, fp16 white list: cube ops fp16 in / fp16 out; vector ops stay f32.
    AllowMixPrecisionFp16,
    /// Mixed precision, bf16 white list: cube ops bf16 in / bf16 out; vector ops stay f32.
    AllowMixPrecisionBf16,
}

/// aclnn `cubeMathType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum CubeMathType {
    /// KEEP_DTYPE: compute in the input dtype (f32 stays f32 unless `allow_hf32`).
    #[default]
    KeepDtype,
    /// ALLOW_FP32_DOWN_PRECISION: f32 operands may go to HF32 (910B).
    AllowFp32DownPrecision,
    /// USE_FP16: f32 operands are rounded to fp16.
    UseFp16,
    /// USE_HF32: f32 operands are rounded to HF32.
    UseHf32,
}

/// `op_select_implmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImplMode {
    /// Exact (IEEE f32) transcendentals, reciprocal and division.
    #[default]
    HighPrecision,
    /// Approximate transcendentals/reciprocal: modelled by [`crate::numerics::fast_approx`], a
    /// bounded-error SENSITIVITY PROBE, not Huawei's algorithm.
    HighPerformance,
}

/// The summation order over K inside the emulated cube. Real CANN kernels' order is not public: the
/// emulator defines one and offers alternatives so users can measure sensitivity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum KOrder {
    /// K fractals 0, 1, 2, ... in order, one f32 accumulator per output element.
    #[default]
    Sequential,
    /// K fractals in reverse order (within a fractal, ascending).
    Reversed,
    /// "K shift": core `c` starts at fractal `c mod k_fractals` and wraps around.
    KShift,
    /// Split K into `parts` contiguous ranges (whole fractals), each accumulated separately in f32,
    /// then the partial sums added in part order.
    SplitK { parts: usize },
}

/// How linears whose weights a checkpoint stores quantised run on the cube.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WeightQuant {
    /// Weights are dequantised and take the float path (`cube_input_dtype`), whatever their storage.
    #[default]
    Dequantize,
    /// 910B/910C W8A8_DYNAMIC (`npu_dynamic_quant` + `npu_quant_matmul`): INT8 weights (one scale per
    /// output channel) stay INT8; each token's activations are quantised to INT8 at run time (vector
    /// unit); the cube multiplies INT8 by INT8 into INT32; FixPipe dequantises with both scales and
    /// writes the tile in `cube_output_dtype`. Other stored weights take the float path.
    W8a8Dynamic,
    /// Ascend 950's MX cube: weights stored as MXFP8, MXFP4 or DeepSeek's FP8 with E8M0 128x128 scales
    /// (which vllm-ascend re-expresses per 32, losslessly) stay as stored; each token's activations are
    /// quantised to MXFP8 (E4M3 + E8M0 per 32 along K) at run time; products are exact and accumulate in
    /// f32; the tile is written in `cube_output_dtype`. Other stored weights take the float path.
    MxDynamic,
}

/// The precision policy: the knobs a port must record (see the module docs of the crate).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrecisionPolicy {
    pub precision_mode: PrecisionMode,
    pub cube_math_type: CubeMathType,
    /// torch_npu `allow_hf32` for matmul (default false).
    pub allow_hf32: bool,
    pub impl_mode: ImplMode,
    pub overflow_mode: OverflowMode,
    pub k_order: KOrder,
    /// Lanes of a blocked vector reduction (64 = one 256-byte repeat of f32).
    pub reduce_lanes: usize,
    /// Mantissa bits kept by the `high_performance` transcendental probe (error < 2^-bits).
    pub fast_math_bits: u32,
    /// The quantised-weight path.
    pub weight_quant: WeightQuant,
}

impl Default for PrecisionPolicy {
    fn default() -> Self {
        Self {
            precision_mode: PrecisionMode::MustKeepOriginDtype,
            cube_math_type: CubeMathType::KeepDtype,
            allow_hf32: false,
            impl_mode: ImplMode::HighPrecision,
            overflow_mode: OverflowMode::InfNan,
            k_order: KOrder::Sequential,
            reduce_lanes: 64,
            fast_math_bits: 12,
            weight_quant: WeightQuant::Dequantize,
        }
    }
}

impl PrecisionPolicy {
    /// torch_npu on 910B: `must_keep_origin_dtype`, no HF32, high precision, inf/nan.
    pub fn must_keep_origin_dtype() -> Self {
        Self::default()
    }

    /// `allow_mix_precision_bf16`: matmul in bf16 (inputs and output rounded RNE), vector ops f32.
    pub fn mix_bf16() -> Self {
        Self {
            precision_mode: PrecisionMode::AllowMixPrecisionBf16,
            ..Self::default()
        }
    }

    /// `allow_mix_precision_fp16`.
    pub fn mix_fp16() -> Self {
        Self {
            precision_mode: PrecisionMode::AllowMixPrecisionFp16,
            ..Self::default()
        }
    }

    /// `force_fp16`: everything rounded to fp16.
    pub fn force_fp16() -> Self {
        Self {
            precision_mode: PrecisionMode::ForceFp16,
            ..Self::default()
        }
    }

    /// The format f32 matmul operands are rounded to before entering the cube.
    pub fn cube_input_dtype(&self) -> NpuDType {
        match self.precision_mode {
            PrecisionMode::ForceFp16
            | PrecisionMode::AllowFp32ToFp16
            | PrecisionMode::AllowMixPrecisionFp16 => NpuDType::F16,
            PrecisionMode::AllowMixPrecisionBf16 => NpuDType::Bf16,
            PrecisionMode::MustKeepOriginDtype | PrecisionMode::ForceFp32 => match self.cube_math_type {
                CubeMathType::KeepDtype if self.allow_hf32 => NpuDType::Hf32,
                CubeMathType::KeepDtype => NpuDType::F32,
                CubeMathType::AllowFp32DownPrecision | CubeMathType::UseHf32 => NpuDType::Hf32,
                CubeMathType::UseFp16 => NpuDType::F16,
            },
        }
    }

    /// The format the cube's f32 accumulator is rounded to (once) when FixPipe writes a tile out.
    pub fn cube_output_dtype(&self) -> NpuDType {
        match self.precision_mode {
            PrecisionMode::ForceFp16 | PrecisionMode::AllowMixPrecisionFp16 => NpuDType::F16,
            PrecisionMode::AllowMixPrecisionBf16 => NpuDType::Bf16,
            _ => NpuDType::F32,
        }
    }

    /// The format vector-unit results are rounded to (computed in f32, one rounding).
    pub fn vector_dtype(&self) -> NpuDType {
        match self.precision_mode {
            PrecisionMode::ForceFp16 => NpuDType::F16,
            _ => NpuDType::F32,
        }
    }

    /// True when the policy changes nothing for vector ops on f32 data (pure forwarding).
    pub fn vector_is_exact_f32(&self) -> bool {
        self.vector_dtype() == NpuDType::F32
            && self.impl_mode == ImplMode::HighPrecision
            && self.overflow_mode == OverflowMode::InfNan
    }

    /// One line for reports.
    pub fn describe(&self) -> String {
        format!(
            "precision_mode={:?} cube_math_type={:?} allow_hf32={} impl_mode={:?} overflow_mode={:?} \
             k_order={:?} reduce_lanes={} weight_quant={:?} -> cube {:?}->{:?}, vector {:?}",
            self.precision_mode,
            self.cube_math_type,
            self.allow_hf32,
            self.impl_mode,
            self.overflow_mode,
            self.k_order,
            self.reduce_lanes,
            self.weight_quant,
            self.cube_input_dtype(),
            self.cube_output_dtype(),
            self.vector_dtype()
        )
    }
}

/// The chip parameter sheet used by the cost model and the memory accounting. Every number is a
/// parameter: HBM bandwidth in particular has no first-party figure.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ChipSheet {
    pub name: String,
    pub cube_cores: usize,
    pub vector_cores: usize,
    pub clock_ghz: f64,
    /// HBM capacity in bytes (memory accounting limit).
    pub hbm_bytes: u64,
    /// HBM bandwidth, GB/s (assumption; no first-party figure).
    pub hbm_gbps: f64,
    /// fp16/bf16 MACs per cycle per cube core (16x16x16).
    pub cube_macs_per_cycle: f64,
    /// Throughput divisor of f32 operands on the cube relative to fp16 (assumption).
    pub cube_f32_divisor: f64,
    /// Throughput divisor of HF32 operands relative to fp16 (assumption).
    pub cube_hf32_divisor: f64,
    /// INT8 / MXFP8 MACs per cycle relative to fp16 (910B: 2, its INT8 TOPS being twice its fp16 TFLOPS).
    pub cube_8bit_multiplier: f64,
    /// Fixed cycles per Mmad instruction.
    pub mmad_overhead_cycles: f64,
    /// Vector bytes per cycle for simple ops (add/mul/...).
    pub vector_bytes_per_cycle: f64,
    /// Vector bytes per cycle for exp/log/div and other transcendentals.
    pub vector_complex_bytes_per_cycle: f64,
    /// MTE (GM <-> L1/UB) bytes per cycle per core.
    pub mte_bytes_per_cycle: f64,
    /// Per-kernel launch overhead in microseconds.
    pub launch_us: f64,
    /// Host <-> device bandwidth (PCIe), GB/s, for transfers and host fallbacks.
    pub pcie_gbps: f64,
    /// AI CPU throughput, elements per microsecond, for AI CPU fallbacks.
    pub aicpu_elems_per_us: f64,
    /// Allocation granularity of the device allocator, bytes.
    pub alloc_align: u64,
}

impl Default for ChipSheet {
    fn default() -> Self {
        Self::ascend_910b2()
    }
}

impl ChipSheet {
    /// 910B2: 24 cube + 48 vector cores at 1.8 GHz, 64 GiB HBM (bandwidth is an assumption).
    pub fn ascend_910b2() -> Self {
        Self {
            name: "Ascend910B2 (emulated)".into(),
            cube_cores: 24,
            vector_cores: 48,
            clock_ghz: 1.8,
            hbm_bytes: 64 << 30,
            hbm_gbps: 1600.0,
            cube_macs_per_cycle: 4096.0,
            cube_f32_divisor: 4.0,
            cube_hf32_divisor: 2.0,
            cube_8bit_multiplier: 2.0,
            mmad_overhead_cycles: 25.0,
            vector_bytes_per_cycle: 128.0,
            vector_complex_bytes_per_cycle: 64.0,
            mte_bytes_per_cycle: 128.0,
            launch_us: 5.0,
            pcie_gbps: 25.0,
            aicpu_elems_per_us: 200.0,
            alloc_align: 512,
        }
    }

    /// 910B3/B4: 20 cube + 40 vector cores.
    pub fn ascend_910b3() -> Self {
        Self {
            name: "Ascend910B3 (emulated)".into(),
            cube_cores: 20,
            vector_cores: 40,
            ..Self::ascend_910b2()
        }
    }

    /// Peak fp16 TFLOPS implied by the sheet (2 flops per MAC).
    pub fn peak_fp16_tflops(&self) -> f64 {
        2.0 * self.cube_macs_per_cycle * self.cube_cores as f64 * self.clock_ghz * 1e9 / 1e12
    }

    /// The sheet, printed beside every estimate.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} cube + {} vector cores @ {} GHz ({:.0} TFLOPS fp16 peak by arithmetic), HBM {:.1} GiB @ {} GB/s (assumed), \
             cube {} MAC/cycle (f32 /{}, hf32 /{}, 8-bit x{}), Mmad +{} cycles, vector {}/{} B/cycle, MTE {} B/cycle, launch {} us, \
             PCIe {} GB/s, AI CPU {} elem/us",
            self.name,
            self.cube_cores,
            self.vector_cores,
            self.clock_ghz,
            self.peak_fp16_tflops(),
            self.hbm_bytes as f64 / (1u64 << 30) as f64,
            self.hbm_gbps,
            self.cube_macs_per_cycle,
            self.cube_f32_divisor,
            self.cube_hf32_divisor,
            self.cube_8bit_multiplier,
            self.mmad_overhead_cycles,
            self.vector_bytes_per_cycle,
            self.vector_complex_bytes_per_cycle,
            self.mte_bytes_per_cycle,
            self.launch_us,
            self.pcie_gbps,
            self.aicpu_elems_per_us
        )
    }
}

/// Policy + chip sheet: what `--npu-config file.toml` holds.
///
/// ```toml
/// [policy]
/// precision_mode = "allow_mix_precision_bf16"   # must_keep_origin_dtype | allow_fp32_to_fp16 | force_fp16 | ...
/// cube_math_type = "keep_dtype"
/// allow_hf32 = false
/// impl_mode = "high_precision"                  # or high_performance (sensitivity probe)
/// overflow_mode = "inf_nan"                     # or saturation
/// k_order = { kind = "split_k", parts = 2 }     # sequential | reversed | k_shift | split_k
///
/// [chip]
/// name = "910B2"
/// cube_cores = 24
/// clock_ghz = 1.8
/// hbm_bytes = 68719476736
/// hbm_gbps = 1600.0
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct NpuConfig {
    pub policy: PrecisionPolicy,
    pub chip: ChipSheet,
}

/// An error reading an [`NpuConfig`].
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

impl NpuConfig {
    pub fn new(policy: PrecisionPolicy, chip: ChipSheet) -> Self {
        Self { policy, chip }
    }

    pub fn with_policy(policy: PrecisionPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Parse TOML text (missing keys take the defaults).
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        let cfg: NpuConfig =
            toml::from_str(text).map_err(|e| ConfigError(format!("invalid NPU config: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Read a TOML file (for `--npu-config file.toml`).
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError(format!("{}: {e}", path.display())))?;
        Self::from_toml_str(&text).map_err(|e| ConfigError(format!("{}: {e}", path.display())))
    }

    /// Serialize to TOML.
    pub fn to_toml_string(&self) -> String {
        toml::to_string(self).expect("NpuConfig serializes")
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.chip;
        if c.cube_cores == 0 || c.vector_cores == 0 || c.clock_ghz <= 0.0 || c.hbm_gbps <= 0.0 {
            return Err(ConfigError(
                "chip: cores, clock_ghz and hbm_gbps must be positive".into(),
            ));
        }
        if self.policy.reduce_lanes == 0 {
            return Err(ConfigError("policy.reduce_lanes must be >= 1".into()));
        }
        if let KOrder::SplitK { parts: 0 } = self.policy.k_order {
            return Err(ConfigError("policy.k_order split_k parts must be >= 1".into()));
        }
        Ok(())
    }
}
