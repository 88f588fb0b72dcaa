//! Training checkpoints: a directory `step-NNNNNNNN/` holding
//! - `config.json` + `model.safetensors`: the model in HF layout (loads with `v4 forward --model`);
//! - `training/optimizer.safetensors`: AdamW moments per parameter (HF names, the model's storage layout), step
//!   counts in the header metadata;
//! - `training/trainer_state.json`: step, data-loader position, tokens seen;
//! - `manifest.json`, written last: every file's size and FNV-1a 64 checksum.
//!
//! A checkpoint is written to a temporary directory and renamed into place, so a crash never leaves a
//! half-written `step-*`; on load the manifest is verified and a mismatch refuses the checkpoint.

use crate::data::LoaderState;
use crate::params::HostF32;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The trainer's progress, saved beside the weights.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps completed.
    pub step: usize,
    pub loader: LoaderState,
    pub tokens_seen: u64,
}

/// AdamW state of one parameter, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct MomentState {
    pub time: usize,
    pub m: HostF32,
    pub v: HostF32,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    bytes: u64,
    fnv64: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: String,
    step: usize,
    files: BTreeMap<String, FileEntry>,
}

const FORMAT: &str = "v4-train-checkpoint-1";
/// Kept out of the top level, whose `*.safetensors` are the model's shards.
const OPTIMIZER: &str = "training/optimizer.safetensors";
const STATE: &str = "training/trainer_state.json";

fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{}: {e}", path.display())
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes tensors (f32 and i64) as one safetensors file.
fn write_safetensors(
    path: &Path,
    f32s: &[(String, HostF32)],
    i64s: &[(String, Vec<usize>, Vec<i64>)],
    metadata: Option<HashMap<String, String>>,
) -> Result<(), String> {
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, t) in f32s {
        buffers.push((name.clone(), Dtype::F32, t.shape.clone(), f32_bytes(&t.data)));
    }
    for (name, shape, data) in i64s {
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        buffers.push((name.clone(), Dtype::I64, shape.clone(), bytes));
    }
    let views: Vec<(String, TensorView<'_>)> = buffers
        .iter()
        .map(|(n, d, s, b)| {
            Ok((
                n.clone(),
                TensorView::new(*d, s.clone(), b).map_err(|e| format!("{n}: {e}"))?,
            ))
        })
        .collect::<Result<_, String>>()?;
    let bytes =
        safetensors::tensor::serialize(views, metadata).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(path, bytes).map_err(io(path))
}

/// Writes one step's gradients (flattened, by parameter name) to `path`, atomically: for comparing a
/// parallel setup with a single process.
pub fn write_gradients(path: &Path, grads: &[(String, HostF32)]) -> Result<(), String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".tmp-{name}"));
    write_safetensors(&tmp, grads, &[], None)?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// What [`save`] writes.
pub struct CheckpointData<'a> {
    pub config_json: &'a str,
    /// Trainable parameters in checkpoint layout.
    pub params: Vec<(String, HostF32)>,
    /// Routing biases (f32) and hash tables (i64).
    pub biases: Vec<(String, HostF32)>,
    pub tables: Vec<(String, Vec<usize>, Vec<i64>)>,
    /// Optimizer moments by parameter name.
    pub optimizer: Vec<(String, MomentState)>,
    pub state: TrainerState,
}

/// The directory name of the checkpoint after `step` optimizer steps.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Writes a checkpoint atomically into `root/step-NNNNNNNN` and deletes all but the newest `keep_last`.
pub fn save(root: &Path, data: &CheckpointData<'_>, keep_last: usize) -> Result<PathBuf, String> {
    std::fs::create_dir_all(root).map_err(io(root))?;
    let name = step_dir_name(data.state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(tmp.join("training")).map_err(io(&tmp))?;

    std::fs::write(tmp.join("config.json"), data.config_json).map_err(io(&tmp))?;
    let mut weights = data.params.clone();
    weights.extend(data.biases.iter().cloned());
    write_safetensors(&tmp.join("model.safetensors"), &weights, &data.tables, None)?;

    let mut moments = Vec::new();
    let mut meta = HashMap::new();
    meta.insert("format".to_string(), FORMAT.to_string());
    for (name, s) in &data.optimizer {
        moments.push((format!("exp_avg.{name}"), s.m.clone()));
        moments.push((format!("exp_avg_sq.{name}"), s.v.clone()));
        meta.insert(format!("time.{name}"), s.time.to_string());
    }
    write_safetensors(&tmp.join(OPTIMIZER), &moments, &[], Some(meta))?;
    let state = serde_json::to_string_pretty(&data.state).expect("state serialises");
    std::fs::write(tmp.join(STATE), state).map_err(io(&tmp))?;

    let mut files = BTreeMap::new();
    for f in ["config.json", "model.safetensors", OPTIMIZER, STATE] {
        let bytes = std::fs::read(tmp.join(f)).map_err(io(&tmp.join(f)))?;
        files.insert(
            f.to_string(),
            FileEntry {
                bytes: bytes.len() as u64,
                fnv64: format!("{:016x}", fnv64(&bytes)),
            },
        );
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        step: data.state.step,
        files,
    };
    std::fs::write(
        tmp.join("manifest.json"),
        serde_json::to_string_pretty(&manifest).expect("manifest serialises"),
    )
    .map_err(io(&tmp))?;

    let target = root.join(&name);
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(io(&target))?;
    }
    std::fs::rename(&tmp, &target).map_err(io(&target))?;

    if keep_last > 0 {
        let mut all = list(root)?;
        while all.len() > keep_last {
            let (_, old) = all.remove(0);
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
    }
    Ok(target)
}

/// The completed checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>, String> {
    let mut out = Vec::new();
    if !root.is_dir() {
        return Ok(out);
    }
    for entry in std::fs::read_dir(root).map_err(io(root))? {
        let path = entry.map_err(io(root))?.path();
        let step = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|s| s.parse::<usize>().ok());
        if let (Some(step), true) = (step, path.is_dir()) {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>, String> {
    Ok(list(root)?.pop().map(|(_, p)| p))
}

/// Checks that `dir` is a complete checkpoint whose files match the manifest.
pub fn verify(dir: &Path) -> Result<(), String> {
    let corrupt = |why: String| format!("checkpoint {} is corrupt or incomplete: {why}", dir.display());
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|e| corrupt(format!("cannot read manifest.json ({e})")))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("manifest.json is not valid ({e})")))?;
    if manifest.format != FORMAT {
        return Err(corrupt(format!("unknown format `{}`", manifest.format)));
    }
    for (name, entry) in &manifest.files {
        let bytes =
            std::fs::read(dir.join(name)).map_err(|e| corrupt(format!("cannot read {name} ({e})")))?;
        let sum = format!("{:016x}", fnv64(&bytes));
        if bytes.len() as u64 != entry.bytes || sum != entry.fnv64 {
            return Err(corrupt(format!(
                "{name} has {} bytes, checksum {sum}; the manifest records {} bytes, checksum {}",
                bytes.len(),
                entry.bytes,
                entry.fnv64
            )));
        }
    }
    Ok(())
}

/// Reads the trainer state and optimizer moments of a verified checkpoint.
pub fn read_training_state(dir: &Path) -> Result<(TrainerState, HashMap<String, MomentState>), String> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let path = dir.join(OPTIMIZER);
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let bad = |e: String| format!("{}: {e}", path.display());
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let times = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let read = |name: &str| -> Result<HostF32, String> {
        let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!("{name} is not f32")));
        }
        let data = t
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(HostF32 {
            shape: t.shape().to_vec(),
            data,
        })
    };
    let mut moments = HashMap::new();
    for (key, value) in &times {
        if let Some(name) = key.strip_prefix("time.") {
            let time = value
                .parse()
                .map_err(|_| bad(format!("{key} = {value} is not a count")))?;
            moments.insert(
                name.to_string(),
                MomentState {
                    time,
                    m: read(&format!("exp_avg.{name}"))?,
                    v: read(&format!("exp_avg_sq.{name}"))?,
                },
            );
        }
    }
    Ok((state, moments))
}
