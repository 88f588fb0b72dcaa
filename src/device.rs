//! Backend selection for `--device`.

use clap::ValueEnum;

/// The backends a command can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    /// burn-ndarray on the CPU (always available).
    Ndarray,
    /// burn-wgpu (needs a build with `--features wgpu`).
    Wgpu,
    /// burn-cuda (needs a build with `--features cuda` and an NVIDIA GPU).
    Cuda,
}

/// Runs `job` with the backend chosen by `device`, as a generic function over the backend type.
macro_rules! with_backend {
    ($device:expr, |$b:ident, $dev:ident| $body:expr) => {{
        match $device {
            $crate::device::Device::Ndarray => {
                type $b = burn_ndarray::NdArray<f32>;
                let $dev = burn_ndarray::NdArrayDevice::Cpu;
                $body
            }
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
