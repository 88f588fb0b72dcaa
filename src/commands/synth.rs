//! `v4 synth DIR --config CONFIG`: a seeded random checkpoint of any V4 config, in HF layout (f32), to
//! convert (`v4 convert --to fp4-mx`) into the release layout and run at a size no fixture has.

use crate::io::{read_config_file, Result};
use burn_ndarray::{NdArray, NdArrayDevice};
use safetensors::tensor::{Dtype, TensorView};
use std::cell::RefCell;
use std::path::PathBuf;
use v4_model::{HostData, HostTensor, LoadError, RandomWeights, TensorSpec, V4Model, WeightSource};

#[derive(clap::Args)]
pub struct Args {
    /// The checkpoint directory to create (config.json + model.safetensors); it must not exist.
    dir: PathBuf,
    /// Model config (HF config.json or DeepSeek inference config), e.g.
    /// tests/fixtures/bench/v4-small.hf-config.json.
    #[arg(long)]
    config: PathBuf,
    /// Seed of the random weights (the same seed gives the weights `v4 bench` runs).
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Keeps what a model load reads, in load order.
struct Recording {
    inner: RandomWeights,
    seen: RefCell<Vec<(String, HostTensor)>>,
}

impl WeightSource for Recording {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn read(&self, name: &str, spec: &TensorSpec<'_>) -> std::result::Result<HostTensor, LoadError> {
        let tensor = self.inner.read(name, spec)?;
        self.seen.borrow_mut().push((name.to_string(), tensor.clone()));
        Ok(tensor)
    }
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.dir.exists() {
        return Err(format!("{}: already exists (synth never overwrites)", args.dir.display()).into());
    }
    let config = read_config_file(&args.config)?;
    let recording = Recording {
        inner: RandomWeights {
            seed: args.seed,
            experts: config.n_routed_experts,
        },
        seen: RefCell::new(Vec::new()),
    };
    // Loading through the model asks for every tensor with its shape and role, exactly once.
    drop(V4Model::<NdArray<f32>>::load(
        &config,
        &recording,
        &NdArrayDevice::Cpu,
    )?);
    let tensors = recording.seen.into_inner();
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, t)| match t.data {
            HostData::F32(v) => (
                name,
                Dtype::F32,
                t.shape,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
            HostData::I64(v) => (
                name,
                Dtype::I64,
                t.shape,
                v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            ),
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, dtype, shape, data)| Ok((name.clone(), TensorView::new(*dtype, shape.clone(), data)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()?;
    let tmp = args.dir.with_extension("synth-tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::copy(&args.config, tmp.join("config.json"))
        .map_err(|e| format!("{}: {e}", args.config.display()))?;
    safetensors::serialize_to_file(views, None, &tmp.join("model.safetensors"))?;
    std::fs::rename(&tmp, &args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    eprintln!(
        "wrote {} ({} tensors, seed {})",
        args.dir.display(),
        bytes.len(),
        args.seed
    );
    Ok(())
}
