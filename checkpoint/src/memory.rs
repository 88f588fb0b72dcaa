//! Will the weights fit? The resident bytes of a load, computed from the checkpoint's headers before
//! anything is read, against the memory this machine has available.

use std::fmt;
use std::path::Path;
use v4_convert::codec::fp8::FP8_BLOCK;
use v4_convert::Checkpoint;
use v4_model::{LoadPlan, Residency};

/// The bytes a load would keep resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    /// Weights kept in their stored precision (memory-mapped).
    pub packed: u64,
    /// Weights decoded to f32.
    pub dense: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.packed + self.dense
    }
}

/// A load that would not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryError {
    pub dir: String,
    pub needed: u64,
    pub available: u64,
    pub dequantize: bool,
}

impl fmt::Display for MemoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let gb = |b: u64| b as f64 / 1e9;
        write!(
            f,
            "{}: the weights need {:.1} GB resident, this machine has {:.1} GB available; ",
            self.dir,
            gb(self.needed),
            gb(self.available)
        )?;
        if self.dequantize {
            write!(
                f,
                "drop --dequantize to keep the weights in their stored precision"
            )
        } else {
            write!(
                f,
                "use a quantized checkpoint (v4 convert --to fp8 or fp4-mx) or a machine with more memory"
            )
        }
    }
}

impl std::error::Error for MemoryError {}

/// The resident bytes of loading the checkpoint in `dir` as `plan` says: every weight as f32
/// ([`Residency::Dequantize`]) or the large matrices in their stored precision; only the tensors of its
/// main layers ([`v4_model::tensor_in_layers`]) and its share of the routed experts. Integer tensors
/// (hash tables) count 4 bytes an id, as the model holds them.
pub fn estimate(dir: &Path, plan: &LoadPlan) -> Result<Estimate, String> {
    let checkpoint = Checkpoint::open(dir).map_err(|e| e.to_string())?;
    let config = crate::read_config(dir).ok();
    let groups = config.as_ref().map_or(1, |c| c.o_groups);
    let num_layers = config.as_ref().map_or(0, |c| c.num_layers());
    let layers = plan.layers.clone().unwrap_or(0..num_layers);
    let dequantize = matches!(plan.residency, Residency::Dequantize);
    let mut estimate = Estimate { packed: 0, dense: 0 };
    for name in checkpoint.hf_tensor_names() {
        if config.is_some() && !v4_model::tensor_in_layers(&name, &layers, num_layers) {
            continue;
        }
        let shape = checkpoint.hf_shape(&name).unwrap_or_default();
        let numel: u64 = shape.iter().map(|&d| d as u64).product();
        let stored = checkpoint.hf_stored_bytes(&name).unwrap_or(4 * numel);
        // Matrices stored narrower than f32 stay as stored. The grouped output projection is kept as
        // one row band per group, which a block-scaled (FP8) matrix allows only on whole 128-row
        // tiles: toy shapes whose groups cut a tile are decoded to f32.
        let block_scaled = stored < 2 * numel;
        let bands_fit = !name.ends_with("o_a_proj.weight")
            || !block_scaled
            || (shape[0] / groups).is_multiple_of(FP8_BLOCK);
        let packable = stored < 4 * numel && shape.len() >= 2 && bands_fit;
        // Of stacked routed experts (equal in size), a rank holds its share.
        let (kept, of) = match shape.len() == 3 && name.contains(".experts.") {
            true => (plan.experts.range(shape[0]).len() as u64, shape[0] as u64),
            false => (1, 1),
        };
        let held = |bytes: u64| bytes * kept / of;
        if !dequantize && packable {
            estimate.packed += held(stored);
        } else {
            estimate.dense += held(4 * numel);
        }
    }
    Ok(estimate)
}

/// `MemAvailable` of `/proc/meminfo`, in bytes; None where it cannot be read.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
