//! An Ascend-style (Da Vinci, 910B class) NPU backend for burn, emulated on the CPU.
//!
//! [`Npu<B>`] decorates an inner burn backend `B` (burn-ndarray by default): storage and most kernels
//! are `B`'s; the decorator adds what a port to Ascend must see before hardware exists:
//! - numerics ([`PrecisionPolicy`], CANN's knobs): the cube matmul with operands rounded to
//!   fp16/bf16/HF32, K consumed in 16-wide fractals with f32 accumulation in a defined order
//!   ([`KOrder`]), one rounding of the output; vector results computed in f32 with one rounding to
//!   the policy's dtype; blocked reductions; saturating or IEEE casts; an optional bounded-error
//!   "fast" transcendental mode (a sensitivity probe, not Huawei's algorithms). Reduced dtypes are
//!   emulated on f32 storage (tensors report `F32`);
//! - layouts: exact ND <-> FRACTAL_NZ (and ZZ / ZN) conversions ([`layout`]);
//! - coverage: every call resolves to cube / vector / AI CPU / host fallback / unsupported
//!   ([`support`]); fallbacks are counted with their shapes and scope; an unsupported dtype or shape
//!   PANICS with a message naming the op and dtype (as aclnn returns an error), after recording it
//!   in the report;
//! - memory: float tensors hold an HBM allocation (views share it) accounted against the chip's HBM;
//!   exceeding it panics with a message naming the op, shape and sizes. Int/bool index tensors are
//!   not accounted;
//! - quantised weights: with [`WeightQuant::W8a8Dynamic`], INT8 checkpoint weights run the 910B's
//!   W8A8_DYNAMIC path (per-token INT8 activations, INT32 accumulation) through [`QuantMatmul`];
//! - cost: a per-op estimate (cube / vector / MTE cycles, HBM roofline, launch) with the bound, read
//!   by [`report`] and printed beside the chip sheet. Estimates, never measurements.
//!
//! CLI use:
//! ```ignore
//! type B = v4_npu::Npu;                       // Npu<NdArray<f32>>
//! let device = Default::default();            // NdArrayDevice::Cpu
//! let cfg = v4_npu::NpuConfig::from_toml_file(path)?;   // --npu-config file.toml
//! v4_npu::install_config(&device, cfg);
//! /* run V4Model::<B>::load / forward */
//! println!("{}", v4_npu::report(&device).summary());
//! ```

pub mod backend;
pub mod cost;
pub mod layout;
pub mod matmul;
pub mod numerics;
pub mod policy;
pub mod quant;
pub mod reduce;
pub mod stats;
pub mod support;

pub use backend::{Npu, NpuTensor};
pub use cost::{Bound, Cost};
pub use layout::{nd_to_nz, nz_to_nd, Fractal, Major};
pub use numerics::{bf16_rne, f16_rne, fast_approx, NpuDType, OverflowMode};
pub use policy::{
    ChipSheet, ConfigError, CubeMathType, ImplMode, KOrder, NpuConfig, PrecisionMode, PrecisionPolicy,
    WeightQuant,
};
pub use quant::QuantMatmul;
pub use stats::{with_scope, DeviceKey, FallbackKey, NpuReport, OpRow, OpStat};
pub use support::{Engine, OpClass};

use burn_backend::backend::DeviceOps;

/// Install `config` (policy + chip sheet) for `device`; later ops on that device use it.
pub fn install_config<D: DeviceOps>(device: &D, config: NpuConfig) {
    let st = stats::state(stats::device_key(device));
    *st.config.write().unwrap_or_else(|e| e.into_inner()) = config;
}

/// Read a TOML config file and install it for `device` (what `--npu-config file.toml` does).
pub fn install_config_file<D: DeviceOps>(
    device: &D,
    path: &std::path::Path,
) -> Result<NpuConfig, ConfigError> {
    let cfg = NpuConfig::from_toml_file(path)?;
    install_config(device, cfg.clone());
    Ok(cfg)
}

/// Install only a precision policy (keeping the chip sheet).
pub fn set_policy<D: DeviceOps>(device: &D, policy: PrecisionPolicy) {
    let st = stats::state(stats::device_key(device));
    st.config.write().unwrap_or_else(|e| e.into_inner()).policy = policy;
}

/// The configuration installed for `device` (the default if none was).
pub fn config<D: DeviceOps>(device: &D) -> NpuConfig {
    stats::state(stats::device_key(device)).config().clone()
}

/// A snapshot of `device`'s op statistics, fallbacks, errors and memory.
pub fn report<D: DeviceOps>(device: &D) -> NpuReport {
    stats::snapshot(stats::device_key(device))
}

/// Clear `device`'s op statistics and errors (memory in use is kept; the peak restarts from it).
pub fn reset_stats<D: DeviceOps>(device: &D) {
    stats::reset(stats::device_key(device))
}
