//! `Cpu`: burn-ndarray with v4's own CPU kernels.
//!
//! burn-ndarray 0.21 multiplies matrices through `matrixmultiply`, which packs the whole right-hand
//! side on every call and copies any non-contiguous operand first: a 1x512 by 512x512 product takes
//! ~130 us where 20 us suffice, and large products reach about half of what the cores can do. Decode
//! is made of hundreds of such small products per token and prefill of large ones, so `Cpu` replaces
//! the matmul with the `gemm` crate's strided, cache-blocked kernels (no operand copies, a fast path
//! for few rows, both cores on one product) and forwards every other op to burn-ndarray unchanged.
//!
//! The tensor primitives are burn-ndarray's own types, so tensors move between the two backends
//! for free and forwarding is a plain call (`forward.rs`, generated from burn's op traits by
//! `scripts/gen-cpu-forwarding.py`).

mod forward;
pub mod isa;
#[macro_use]
mod kernels;
pub mod packed;
mod sgemm;

use burn_backend::backend::{Backend, BackendTypes, DTypeUsageSet, ExecutionError};
use burn_backend::DType;
use burn_ndarray::{NdArray, NdArrayDevice, NdArrayQTensor, NdArrayTensor};
pub use isa::{isa, Isa};
pub use packed::CpuPackedMatmul;

/// The backend every op not written here is forwarded to.
type Inner = NdArray<f32>;

/// burn-ndarray (f32 floats, i64 ints) with v4's CPU matmul.
#[derive(Clone, Copy, Default, Debug)]
pub struct Cpu;

impl BackendTypes for Cpu {
    type Device = NdArrayDevice;

    type FloatTensorPrimitive = NdArrayTensor;
    type FloatElem = f32;

    type IntTensorPrimitive = NdArrayTensor;
    type IntElem = i64;

    type BoolTensorPrimitive = NdArrayTensor;
    type BoolElem = bool;

    type QuantizedTensorPrimitive = NdArrayQTensor;
}

impl Backend for Cpu {
    fn name(_device: &Self::Device) -> String {
        String::from("cpu (ndarray + v4 kernels)")
    }

    fn seed(device: &Self::Device, seed: u64) {
        Inner::seed(device, seed)
    }

    fn sync(device: &Self::Device) -> Result<(), ExecutionError> {
        Inner::sync(device)
    }

    fn dtype_usage(device: &Self::Device, dtype: DType) -> DTypeUsageSet {
        Inner::dtype_usage(device, dtype)
    }

    fn device_count(type_id: u16) -> usize {
        Inner::device_count(type_id)
    }
}
