//! Loading a model directory for a command: the memory check, then the weights where the backend wants
//! them (in their stored precision unless `--dequantize`).

use crate::device::Device;
use crate::io::{read_streams, Result};
use burn::tensor::backend::DeviceOps;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use v4_model::{ExpertShard, LoadPlan, Residency, Tokens, V4Config, V4Model};

/// What every command that runs a checkpoint on a backend names: the model, the backend, how the weights
/// load, and the NPU emulator's sheet.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Model directory: config.json + safetensors, in HF layout (f32/bf16) or DeepSeek's release layout
    /// (FP8 + MXFP4); the large matrices stay in their stored precision unless --dequantize.
    #[arg(long)]
    pub model: PathBuf,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Device,
    #[command(flatten)]
    pub load: LoadArgs,
    /// NPU precision policy and chip sheet (TOML), for `--device npu`.
    #[arg(long)]
    pub npu_config: Option<PathBuf>,
}

/// The loading flags every command that runs a checkpoint shares.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct LoadArgs {
    /// Decode every weight to f32 at load (the behaviour before v4 kept weights in their checkpoint
    /// precision; what training does). By default the large matrices of a quantized checkpoint (FP8,
    /// FP4, BF16) stay as stored, memory-mapped, and are computed on as such.
    #[arg(long)]
    pub dequantize: bool,
}

/// Where the large matrices live on `device`: multiplied on their stored bytes by v4-cpu's kernels on the
/// CPU backends; on the NPU emulator, INT8 weights by its W8A8 kernel when its policy asks for it; dequantized
/// one at a time at the point of use elsewhere; all f32 with `dequantize`.
fn residency<D: DeviceOps>(kind: Device, dequantize: bool, device: &D) -> Residency {
    match kind {
        _ if dequantize => Residency::Dequantize,
        Device::Cpu | Device::Ndarray => Residency::Packed(Some(Arc::new(v4_cpu::CpuPackedMatmul))),
        Device::Npu => Residency::Packed(Some(Arc::new(v4_npu::QuantMatmul::new(device)))),
        _ => Residency::Packed(None),
    }
}

/// A checkpoint to load for a backend: the whole model in this process by default, or a part of it
/// ([`layers`](Self::layers), [`experts`](Self::experts)).
pub struct Load<'a> {
    dir: &'a Path,
    config: &'a V4Config,
    kind: Device,
    flags: LoadArgs,
    layers: Option<Range<usize>>,
    experts: ExpertShard,
}

impl<'a> Load<'a> {
    /// The checkpoint in `dir` (its `config`) for backend `kind`, with the command's loading flags.
    pub fn new(dir: &'a Path, config: &'a V4Config, kind: Device, flags: LoadArgs) -> Self {
        Self {
            dir,
            config,
            kind,
            flags,
            layers: None,
            experts: ExpertShard::default(),
        }
    }

    /// Only main layers `layers` (with the embedding and the heads), when given.
    pub fn layers(mut self, layers: Option<Range<usize>>) -> Self {
        self.layers = layers;
        self
    }

    /// Only the routed experts of `experts` (this rank's share under expert parallelism).
    pub fn experts(mut self, experts: ExpertShard) -> Self {
        self.experts = experts;
        self
    }

    /// Loads it on `device` after checking that its weights fit in memory.
    pub fn model<B: Backend>(self, device: &B::Device) -> Result<V4Model<B>> {
        let plan = LoadPlan {
            residency: residency(self.kind, self.flags.dequantize, device),
            layers: self.layers,
            experts: self.experts,
        };
        let estimate = v4_checkpoint::estimate(self.dir, &plan)?;
        if let Some(available) = v4_checkpoint::available_memory() {
            if estimate.total() > available {
                return Err(v4_checkpoint::MemoryError {
                    dir: self.dir.display().to_string(),
                    needed: estimate.total(),
                    available,
                    dequantize: self.flags.dequantize,
                }
                .into());
            }
        }
        let source = v4_checkpoint::open(self.dir)?;
        Ok(V4Model::<B>::load_plan(
            self.config,
            source.as_ref(),
            device,
            plan,
        )?)
    }
}

/// The streams entering the first layer of `range` (None from layer 0): read from `path`, a `v4 forward`
/// output or a full `v4 trace` of the same `tokens`.
pub fn entry_streams<B: Backend>(
    path: Option<&Path>,
    range: &Range<usize>,
    tokens: &Tokens,
    config: &V4Config,
    device: &B::Device,
) -> Result<Option<Tensor<B, 4>>> {
    let first = range.start;
    if first == 0 {
        return Ok(None);
    }
    let path = path.ok_or_else(|| {
        format!(
            "--layers {range:?} starts after layer 0: give the streams entering layer {first} with --streams"
        )
    })?;
    let shape = [tokens.batch, tokens.seq, config.hc_mult, config.hidden_size];
    let values = read_streams(path, first, shape)?;
    Ok(Some(Tensor::from_data(TensorData::new(values, shape), device)))
}
