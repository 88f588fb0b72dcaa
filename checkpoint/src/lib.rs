//! Opening a DeepSeek-V4 checkpoint directory as the model's [`WeightSource`](v4_model::WeightSource),
//! in either layout, and telling before a load whether the weights fit in memory.
//!
//! The model knows nothing of files and the converter nothing of the model; this crate joins them:
//! - [`open`]: either layout through the converter's memory-mapped reader, which offers each weight in
//!   its stored form (no copy) or dequantised; [`read_config`]: the directory's model configuration.
//! - [`estimate`]: the resident bytes of a load, from the checkpoint's headers, against the memory
//!   this machine has.

mod config;
mod memory;
mod source;

pub use config::read_config;

pub use memory::{available_memory, estimate, Estimate, MemoryError};
pub use source::open;
