//! Backend selection for `--device`.

use clap::ValueEnum;

/// The backends a command can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// The CPU (the default): burn-ndarray with v4's own kernels (v4-cpu: strided GEMM for every
    /// matmul, no operand copies, a fast path for the few-row products of decode).
    Cpu,
    /// Plain burn-ndarray on the CPU, as burn ships it (the baseline `cpu` is measured against).
    Ndarray,
    /// Plain burn-ndarray in f64: every op in double precision. Slow; it is the golden for
    /// `v4 validate --golden` (`v4 trace --device ndarray-f64`), the traces store it rounded once to f32.
    #[value(name = "ndarray-f64")]
    NdarrayF64,
    /// The Ascend-style NPU emulator (v4-npu) over burn-ndarray: 910B numerics, op coverage and cost.
    /// Its precision policy and chip sheet come from `--npu-config FILE.toml`.
    Npu,
    /// burn-wgpu (needs a build with `--features wgpu`).
    Wgpu,
    /// burn-cuda (needs a build with `--features cuda` and an NVIDIA GPU).
    Cuda,
}

/// Runs `$body` with the backend chosen by `$device` bound to the type `$b` and its device value to
/// `$dev`. On the NPU emulator, `$npu_config` (an `Option<&Path>`) is installed first and the
/// fallback / cost report is printed after the run.
macro_rules! with_backend {
    ($device:expr, |$b:ident, $dev:ident| $body:expr) => {
        $crate::device::with_backend!($device, None::<&std::path::Path>, |$b, $dev| $body)
    };
    ($device:expr, $npu_config:expr, |$b:ident, $dev:ident| $body:expr) => {{
        match $device {
            $crate::device::Device::Cpu => {
                type $b = v4_cpu::Cpu;
                let $dev = burn_ndarray::NdArrayDevice::Cpu;
                $body
            }
            $crate::device::Device::Ndarray => {
                type $b = burn_ndarray::NdArray<f32>;
                let $dev = burn_ndarray::NdArrayDevice::Cpu;
                $body
            }
            $crate::device::Device::NdarrayF64 => {
                type $b = burn_ndarray::NdArray<f64>;
                let $dev = burn_ndarray::NdArrayDevice::Cpu;
                $body
            }
            $crate::device::Device::Npu => {
                type $b = v4_npu::Npu;
                let $dev = Default::default();
                if let Some(path) = $npu_config {
                    // The error names the file itself.
                    v4_npu::install_config_file(&$dev, path).map_err(|e| e.to_string())?;
                }
                let result = $body;
                eprintln!("{}", v4_npu::report(&$dev).summary());
                result
            }
            #[cfg(feature = "wgpu")]
            $crate::device::Device::Wgpu => {
                type $b = burn_wgpu::Wgpu<f32, i32>;
                let $dev = burn_wgpu::WgpuDevice::default();
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::device::Device::Cuda => {
                type $b = burn_cuda::Cuda<f32, i32>;
                let $dev = burn_cuda::CudaDevice::default();
                $body
            }
            #[allow(unreachable_patterns)]
            other => Err(format!(
                "--device {other:?} is not compiled into this build of v4 (rebuild with \
                 `cargo build --release --features {}`)",
                format!("{other:?}").to_lowercase()
            )
            .into()),
        }
    }};
}
pub(crate) use with_backend;
