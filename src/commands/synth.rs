//! `v4 synth DIR --config CONFIG [--layers 0,2,3] [--dtype bf16]`: a seeded random checkpoint of any V4
//! config, in HF layout, to convert (`v4 convert --to fp4-mx`) into the release layout and run at a size
//! no fixture has, up to V4-Flash's real dimensions.
//!
//! The tensors are streamed into shards chunk by chunk, never whole: a slice of V4-Flash (3 layers of
//! 256 experts, ~40 GB as bf16) is written with a few hundred MB of memory.

use crate::io::{read_config_file, Result};
use burn_ndarray::{NdArray, NdArrayDevice};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use serde_json::{json, Map, Value};
use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use v4_convert::codec::f32_to_bf16;
use v4_convert::layout::natural_cmp;
use v4_convert::st::{layout_shard, PlannedTensor, INDEX_FILE};
use v4_formats::{Bytes, PackedMatrix, PackedRows, Storage};
use v4_model::{
    HostTensor, Init, LoadError, RandomWeights, Residency, RoutingKind, TensorSpec, V4Config, V4Model,
    WeightSource,
};

#[derive(clap::Args)]
pub struct Args {
    /// The checkpoint directory to create (config.json + safetensors shards); it must not exist.
    dir: PathBuf,
    /// Model config (HF config.json or DeepSeek inference config), e.g.
    /// tests/fixtures/bench/v4-small.hf-config.json or ../shared/fixtures/deepseek-v4-flash/config.json.
    #[arg(long)]
    config: PathBuf,
    /// Seed of the random weights (the same seed gives the weights `v4 bench` runs).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep only these layers of the config (comma-separated indices, in order), each with its own
    /// attention and routing kind; the MTP layer is dropped. `0,2,3` of V4-Flash is SWA/hash,
    /// CSA/hash and HCA/top-k: every kind of layer the model has.
    #[arg(long, value_delimiter = ',')]
    layers: Option<Vec<usize>>,
    /// Element type of the floating-point weights (bf16 halves the bytes to write and convert).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: SynthDtype,
    /// Largest shard in GB; more tensors go to the next shard (with `model.safetensors.index.json`).
    #[arg(long, default_value_t = 4.0)]
    shard_size: f64,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SynthDtype {
    F32,
    Bf16,
}

/// One tensor to write: its HF name and what the model asked for.
struct Planned {
    name: String,
    shape: Vec<usize>,
    init: Init,
}

impl Planned {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    fn dtype(&self, float: SynthDtype) -> &'static str {
        match (self.init, float) {
            (Init::ExpertIds, _) => "I64",
            (_, SynthDtype::F32) => "F32",
            (_, SynthDtype::Bf16) => "BF16",
        }
    }

    fn bytes(&self, float: SynthDtype) -> u64 {
        let width = match self.dtype(float) {
            "BF16" => 2,
            "F32" => 4,
            _ => 8,
        };
        (self.numel() * width) as u64
    }
}

pub fn run(args: Args) -> Result<()> {
    if args.dir.exists() {
        return Err(format!("{}: already exists (synth never overwrites)", args.dir.display()).into());
    }
    if args.shard_size.is_nan() || args.shard_size <= 0.0 {
        return Err(format!("--shard-size {}: must be positive", args.shard_size).into());
    }
    let tmp = args.dir.with_extension("synth-tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let config_path = tmp.join("config.json");
    write_config(&args, &config_path)?;
    let config = read_config_file(&config_path)?;
    let random = RandomWeights {
        seed: args.seed,
        experts: config.n_routed_experts,
    };
    let tensors = plan(&config, &random)?;
    let shards = shards(&tensors, args.dtype, (args.shard_size * 1e9) as u64);
    let total: u64 = tensors.iter().map(|t| t.bytes(args.dtype)).sum();
    let bar = progress_bar(total);
    let mut weight_map = Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = shard_name(i, shards.len());
        let members: Vec<&Planned> = shard.iter().map(|&t| &tensors[t]).collect();
        write_shard(&tmp.join(&file), &members, &random, args.dtype, &bar)?;
        for t in members {
            weight_map.insert(t.name.clone(), Value::from(file.clone()));
        }
    }
    bar.finish_and_clear();
    if shards.len() > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(tmp.join(INDEX_FILE), index.to_string())
            .map_err(|e| format!("{}: {e}", tmp.join(INDEX_FILE).display()))?;
    }
    std::fs::rename(&tmp, &args.dir).map_err(|e| format!("{}: {e}", args.dir.display()))?;
    eprintln!(
        "wrote {} ({} tensors, {:.2} GB in {} shard(s), seed {})",
        args.dir.display(),
        tensors.len(),
        total as f64 / 1e9,
        shards.len(),
        args.seed
    );
    Ok(())
}

/// Writes the config, keeping only `--layers` when given.
fn write_config(args: &Args, path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(&args.config).map_err(|e| format!("{}: {e}", args.config.display()))?;
    let mut json: Value =
        serde_json::from_str(&text).map_err(|e| format!("{}: not valid JSON: {e}", args.config.display()))?;
    if let Some(layers) = &args.layers {
        let config = read_config_file(&args.config)?;
        select_layers(&mut json, &config, layers).map_err(|e| format!("{}: {e}", args.config.display()))?;
    }
    let text = serde_json::to_string_pretty(&json)?;
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(())
}

/// Rewrites a config (HF or DeepSeek form) to hold only `layers` of `config`, without an MTP layer.
fn select_layers(json: &mut Value, config: &V4Config, layers: &[usize]) -> std::result::Result<(), String> {
    let n = config.num_layers();
    if layers.is_empty() {
        return Err("--layers: name at least one layer".into());
    }
    if let Some(&bad) = layers.iter().find(|&&l| l >= n) {
        return Err(format!(
            "--layers: layer {bad} does not exist (the config has {n})"
        ));
    }
    let hash: Vec<bool> = layers
        .iter()
        .map(|&l| config.routing[l] == RoutingKind::Hash)
        .collect();
    let n_hash = hash.iter().take_while(|&&h| h).count();
    let map = json.as_object_mut().ok_or("expected a JSON object")?;
    let pick = |list: &Value| -> Value { Value::Array(layers.iter().map(|&l| list[l].clone()).collect()) };
    for key in ["layer_types", "mlp_layer_types", "compress_ratios"] {
        if let Some(list) = map.get(key) {
            let picked = pick(list);
            map.insert(key.into(), picked);
        }
    }
    if !map.contains_key("mlp_layer_types") {
        if hash[n_hash..].iter().any(|&h| h) {
            return Err(format!(
                "--layers: hash-routed layers must come first (routing by position: {})",
                hash.iter()
                    .map(|&h| if h { "hash" } else { "top-k" })
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        let key = if map.contains_key("n_layers") {
            "n_hash_layers"
        } else {
            "num_hash_layers"
        };
        map.insert(key.into(), Value::from(n_hash));
    }
    let (layers_key, mtp_key) = if map.contains_key("n_layers") {
        ("n_layers", "n_mtp_layers")
    } else {
        ("num_hidden_layers", "num_nextn_predict_layers")
    };
    map.insert(layers_key.into(), Value::from(layers.len()));
    map.insert(mtp_key.into(), Value::from(0));
    Ok(())
}

/// Remembers what a model load asks for, handing out f32 values for small tensors and placeholders
/// (zero bytes, never touched) for the large matrices, which the model then keeps as they are.
struct Recording<'a> {
    random: &'a RandomWeights,
    seen: RefCell<Vec<Planned>>,
    zeros: RefCell<Arc<Vec<u8>>>,
}

impl WeightSource for Recording<'_> {
    fn describe(&self) -> String {
        self.random.describe()
    }

    fn read(&self, name: &str, spec: &TensorSpec<'_>) -> std::result::Result<HostTensor, LoadError> {
        self.seen.borrow_mut().push(Planned {
            name: name.to_string(),
            shape: spec.shape.to_vec(),
            init: spec.init,
        });
        self.random.read(name, spec)
    }

    fn read_packed(
        &self,
        name: &str,
        shape: &[usize],
    ) -> std::result::Result<Option<Vec<PackedMatrix>>, LoadError> {
        self.seen.borrow_mut().push(Planned {
            name: name.to_string(),
            shape: shape.to_vec(),
            init: Init::FanIn,
        });
        let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
        let count = if shape.len() == 3 { shape[0] } else { 1 };
        let len = rows * cols * 2;
        if self.zeros.borrow().len() < len {
            *self.zeros.borrow_mut() = Arc::new(vec![0; len]);
        }
        let owner: Arc<dyn AsRef<[u8]> + Send + Sync> = self.zeros.borrow().clone();
        let placeholder = || {
            let rows = PackedRows::new(
                rows,
                cols,
                Storage::Bf16,
                Bytes::new(owner.clone(), 0..len),
                Bytes::from_vec(vec![]),
            )?;
            PackedMatrix::new(vec![rows])
        };
        let matrices = (0..count)
            .map(|_| placeholder())
            .collect::<std::result::Result<Vec<_>, String>>()
            .map_err(|message| LoadError::File {
                path: self.describe(),
                message,
            })?;
        Ok(Some(matrices))
    }

    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// Every tensor of `config`, with its shape and role, in natural name order: a model load asks for
/// each exactly once (the large matrices as placeholders, so nothing large is generated here).
fn plan(config: &V4Config, random: &RandomWeights) -> Result<Vec<Planned>> {
    let recording = Recording {
        random,
        seen: RefCell::new(Vec::new()),
        zeros: RefCell::new(Arc::new(Vec::new())),
    };
    let model =
        V4Model::<NdArray<f32>>::load_with(config, &recording, &NdArrayDevice::Cpu, Residency::Packed(None))?;
    drop(model);
    let mut tensors = recording.seen.into_inner();
    tensors.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    Ok(tensors)
}

/// Groups tensors (indices, in order) into shards of at most `limit` bytes (a larger tensor gets a
/// shard of its own).
fn shards(tensors: &[Planned], dtype: SynthDtype, limit: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = t.bytes(dtype);
        if size > 0 && size + bytes > limit {
            shards.push(vec![]);
            size = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        size += bytes;
    }
    shards
}

fn shard_name(i: usize, n: usize) -> String {
    if n == 1 {
        "model.safetensors".into()
    } else {
        format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
    }
}

/// Elements generated per step of a large tensor (64 MiB of f32), in parallel pieces.
const CHUNK: usize = 1 << 24;
const PIECE: usize = 1 << 16;

/// Writes one safetensors shard, generating each tensor chunk by chunk.
fn write_shard(
    path: &Path,
    members: &[&Planned],
    random: &RandomWeights,
    dtype: SynthDtype,
    bar: &ProgressBar,
) -> Result<()> {
    let mut planned: Vec<PlannedTensor> = members
        .iter()
        .map(|t| PlannedTensor {
            name: t.name.clone(),
            dtype: t.dtype(dtype).into(),
            shape: t.shape.clone(),
            len: t.bytes(dtype),
        })
        .collect();
    let (header, _) = layout_shard(&mut planned);
    let failed = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut out = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path).map_err(failed)?);
    out.write_all(&header).map_err(failed)?;
    let mut values = vec![0f32; CHUNK];
    for p in &planned {
        let t = members
            .iter()
            .find(|t| t.name == p.name)
            .expect("planned from members");
        let spec = TensorSpec {
            shape: &t.shape,
            init: t.init,
        };
        if t.init == Init::ExpertIds {
            let bytes = match random.read(&t.name, &spec)?.data {
                v4_model::HostData::I64(ids) => ids.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
                v4_model::HostData::F32(_) => unreachable!("hash tables are integers"),
            };
            out.write_all(&bytes).map_err(failed)?;
            bar.inc(bytes.len() as u64);
            continue;
        }
        let numel = t.numel();
        for start in (0..numel).step_by(CHUNK) {
            let chunk = &mut values[..CHUNK.min(numel - start)];
            chunk.par_chunks_mut(PIECE).enumerate().for_each(|(i, piece)| {
                random.fill(&t.name, &spec, start + i * PIECE, piece);
            });
            let bytes: Vec<u8> = match dtype {
                SynthDtype::F32 => chunk.par_iter().flat_map_iter(|x| x.to_le_bytes()).collect(),
                SynthDtype::Bf16 => chunk
                    .par_iter()
                    .flat_map_iter(|&x| f32_to_bf16(x).to_le_bytes())
                    .collect(),
            };
            out.write_all(&bytes).map_err(failed)?;
            bar.inc(bytes.len() as u64);
        }
    }
    out.flush().map_err(failed)?;
    Ok(())
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("synth {bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}")
    {
        bar.set_style(style);
    }
    bar
}
