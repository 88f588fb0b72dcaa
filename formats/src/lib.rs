//! DeepSeek-V4's number formats, shared by the converter (which writes them) and the model (which
//! computes on them).
//!
//! - [`codec`]: bit-exact E4M3FN / E5M2 / E8M0 / E2M1 / BF16 and the block-scale schemes
//!   (DeepSeek FP8 128x128, V4 MXFP4 RCEIL, OCP MXFP4 floor, NVFP4 as ModelOpt 0.47).
//! - [`packed`]: weight matrices kept in their stored precision, and `y = x W^T` on their bytes.
//! - [`atomic`]: files written whole or not at all (temporary sibling, then rename), for every writer.

pub mod atomic;
pub mod codec;
pub mod packed;

pub use packed::{
    grouped_shape, Bytes, Fp8ScaleKind, PackedMatmul, PackedMatrix, PackedRows, ReferenceMatmul, Storage,
};
