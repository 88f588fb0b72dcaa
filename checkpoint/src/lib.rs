//! Opening a DeepSeek-V4 checkpoint directory as the model's [`WeightSource`](v4_model::WeightSource),
//! in either layout, and telling before a load whether the weights fit in memory.
//!
//! The model knows nothing of files and the converter nothing of the model; this crate joins them:
//! - [`open`]: HF-layout directories through the model's memory-mapped reader; DeepSeek's release layout
//!   (FP8 + E8M0, FP4 experts, BF16) through the converter's reader, which offers each weight in its
//!   stored form (memory-mapped, no copy) or dequantised.
//! - [`estimate`]: the resident bytes of a load, from the checkpoint's headers, against the memory
//!   this machine has.

mod memory;
mod source;

pub use memory::{available_memory, estimate, Estimate, MemoryError};
pub use source::open;
