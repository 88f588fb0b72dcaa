//! DeepSeek-V4 checkpoint conversion.
//!
//! - [`codec`]: bit-exact E4M3FN / E5M2 / E8M0 / E2M1 / BF16 and the block-scale schemes
//!   (DeepSeek FP8 128x128, V4 MXFP4 RCEIL, OCP MXFP4 floor, NVFP4 as ModelOpt 0.47).
//! - [`layout`]: DeepSeek release names <-> HF names (experts split / fused) and the release's
//!   dtype plan.
//! - [`Checkpoint`] (alias [`NativeCheckpoint`]): reads either layout, single-file or sharded,
//!   memory-mapped, as dequantised f32 under DeepSeek or HF names.
//! - [`convert()`]: streaming, parallel, atomic and resumable conversion of a whole checkpoint to
//!   BF16 / FP8 / FP4 (MXFP4 or NVFP4) / F32 in either layout, with an optional weight-only scale
//!   search, or to Ascend's W8A8 (INT8) / MXFP8 in msModelSlim's AscendV1 files ([`ascend`]),
//!   returning a [`ConvertReport`].
//!
//! For a command line: [`Target`] and [`Layout`] parse from `bf16`, `fp8`, `fp4-mx`, `fp4-nv`,
//! `f32`, `w8a8`, `mxfp8` and `deepseek` (or `native`), `hf` with [`str::parse`]; every error is a
//! [`ConvertError`] whose `Display` names the file and tensor.
//!
//! ```no_run
//! use v4_convert::{convert, ConvertOptions, Target};
//! let mut opts = ConvertOptions::new("DeepSeek-V4-Flash", "v4-flash-bf16", Target::Bf16);
//! opts.layout = v4_convert::layout::Layout::Hf;
//! let report = convert(&opts)?;
//! eprintln!("{}", report.summary());
//! # Ok::<(), v4_convert::ConvertError>(())
//! ```

pub use v4_formats::codec;
pub mod ascend;
pub mod layout;
pub mod st;

mod checkpoint;
mod convert;
mod error;
mod report;

pub use checkpoint::{Checkpoint, NativeCheckpoint};
pub use convert::{convert, Calibration, ConvertOptions, Target, BATCH_BYTES, DEFAULT_SHARD_SIZE};
pub use error::ConvertError;
pub use layout::Layout;
pub use report::{ConvertReport, ErrorStats, TensorReport};
