//! Training checkpoints: a directory `step-NNNNNNNN/` holding
//! - `config.json` + `model.safetensors`: the model in HF layout (loads with `v4 forward --model`);
//! - `training/optimizer.safetensors`: AdamW moments per parameter (HF names, the model's storage layout), step
//!   counts in the header metadata;
//! - `training/trainer_state.json`: step, data-loader position, tokens seen;
//! - `manifest.json`, written last: every file's size and FNV-1a 64 checksum.
//!
//! A checkpoint is written to a temporary directory and renamed into place, so a crash never leaves a
//! half-written `step-*`; on load the manifest is verified and a mismatch refuses the checkpoint. Under
//! expert parallelism every rank writes its own experts (weights and moments) into the same files, at
//! their offsets, and reads back only its own: a checkpoint resumes on any rank count dividing the experts.

use crate::collective::Collective;
use crate::data::LoaderState;
use crate::error::TrainError;
use crate::params::HostF32;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use v4_convert::st::{layout_shard_with, PlannedTensor};
use v4_formats::atomic;

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

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a 64 of `bytes`, continuing from `hash` (start with [`FNV_OFFSET`]).
fn fnv64(hash: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(hash, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> TrainError + '_ {
    TrainError::io(path)
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes one step's gradients (flattened, by parameter name) to `path`, atomically: for comparing a
/// parallel setup with a single process.
pub fn write_gradients(path: &Path, grads: &[(String, HostF32)]) -> Result<(), TrainError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = grads
        .iter()
        .map(|(n, t)| (n.clone(), t.shape.clone(), f32_bytes(&t.data)))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, shape, b)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), b)
                .map_err(|e| TrainError::checkpoint(path, format!("gradient {n}: {e}")))?;
            Ok((n.clone(), view))
        })
        .collect::<Result<Vec<_>, TrainError>>()?;
    let bytes = safetensors::tensor::serialize(views, None)
        .map_err(|e| TrainError::checkpoint(path, e.to_string()))?;
    atomic::write_bytes(path, &bytes).map_err(|e| TrainError::io(&e.path)(e.source))
}

/// A tensor of a checkpoint file as every rank plans it (name, dtype, whole shape), with the bytes this
/// rank writes of it: `(byte offset within the tensor, bytes)`, or nothing.
#[derive(Debug, Clone)]
pub struct SharedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub mine: Option<(u64, Vec<u8>)>,
}

impl SharedTensor {
    /// An f32 tensor of whole shape `shape` of which this rank writes `values` at element `offset`
    /// (`None`: another rank writes it).
    pub fn f32(name: String, shape: Vec<usize>, mine: Option<(usize, &[f32])>) -> Self {
        Self {
            name,
            dtype: Dtype::F32,
            shape,
            mine: mine.map(|(offset, values)| (4 * offset as u64, f32_bytes(values))),
        }
    }

    /// An i64 tensor that this rank writes whole (`Some`), or another rank does.
    pub fn i64(name: String, shape: Vec<usize>, mine: Option<&[i64]>) -> Self {
        let bytes = |v: &[i64]| v.iter().flat_map(|x| x.to_le_bytes()).collect();
        Self {
            name,
            dtype: Dtype::I64,
            shape,
            mine: mine.map(|values| (0, bytes(values))),
        }
    }

    fn planned(&self) -> PlannedTensor {
        let size = match self.dtype {
            Dtype::I64 => 8,
            _ => 4,
        };
        PlannedTensor {
            name: self.name.clone(),
            dtype: format!("{:?}", self.dtype),
            shape: self.shape.clone(),
            len: (size * self.shape.iter().product::<usize>()) as u64,
        }
    }
}

/// What [`save`] writes, as this rank sees it: every rank plans the same files and writes its part.
pub struct CheckpointData<'a> {
    pub config_json: &'a str,
    /// `model.safetensors`: parameters in checkpoint layout, routing biases (f32) and hash tables (i64).
    pub model: Vec<SharedTensor>,
    /// `training/optimizer.safetensors`: `exp_avg.NAME` and `exp_avg_sq.NAME`, flat, model storage order.
    pub moments: Vec<SharedTensor>,
    /// AdamW's step count per parameter name.
    pub times: BTreeMap<String, usize>,
    pub state: TrainerState,
}

/// The directory name of the checkpoint after `step` optimizer steps.
pub fn step_dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

/// Fails on every rank when any rank failed (its own error where it failed): a collective step's outcome.
fn agree(collective: &dyn Collective, mine: Result<(), TrainError>) -> Result<(), TrainError> {
    let mut failed = [mine.is_err() as u64];
    collective.all_reduce_sum_u64(&mut failed);
    match (mine, failed[0]) {
        (Err(e), _) => Err(e),
        (Ok(()), 0) => Ok(()),
        (Ok(()), n) => Err(TrainError::Parallel(format!(
            "{n} other rank(s) failed to write the checkpoint"
        ))),
    }
}

/// The header and each tensor's absolute offset of a planned file.
fn layout(tensors: &[SharedTensor], metadata: &BTreeMap<String, String>) -> (Vec<u8>, HashMap<String, u64>) {
    let mut planned: Vec<PlannedTensor> = tensors.iter().map(SharedTensor::planned).collect();
    let (header, offsets) = layout_shard_with(&mut planned, metadata);
    let at = planned.into_iter().map(|t| t.name).zip(offsets).collect();
    (header, at)
}

/// Creates `path` at its full length with its header (the lead rank, before anyone writes).
fn create(path: &Path, header: &[u8], tensors: &[SharedTensor]) -> Result<(), TrainError> {
    let data: u64 = tensors.iter().map(|t| t.planned().len).sum();
    let file = std::fs::File::create(path).map_err(io(path))?;
    file.set_len(header.len() as u64 + data).map_err(io(path))?;
    file.write_all_at(header, 0).map_err(io(path))
}

/// Writes this rank's parts of `tensors` into `path` (created by [`create`]).
fn write_mine(path: &Path, tensors: &[SharedTensor], at: &HashMap<String, u64>) -> Result<(), TrainError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io(path))?;
    for t in tensors {
        if let Some((offset, bytes)) = &t.mine {
            file.write_all_at(bytes, at[&t.name] + offset).map_err(io(path))?;
        }
    }
    file.sync_data().map_err(io(path))
}

/// Writes a checkpoint into `root/step-NNNNNNNN` with every rank of `collective` writing its part of
/// each file in parallel, and deletes all but the newest `keep_last`.
///
/// The lead rank creates `.tmp-step-N/` and every file at its full length with its header; after a
/// barrier each rank writes its bytes at their offsets (the lead the dense tensors and its experts, the
/// others their experts); after a second barrier the lead writes the manifest and renames the directory
/// into place, so a `step-*` directory is always complete. Needs a file system every rank sees.
pub fn save(
    root: &Path,
    data: &CheckpointData<'_>,
    keep_last: usize,
    collective: &dyn Collective,
) -> Result<PathBuf, TrainError> {
    let lead = collective.rank() == 0;
    let name = step_dir_name(data.state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    let mut meta: BTreeMap<String, String> = data
        .times
        .iter()
        .map(|(name, time)| (format!("time.{name}"), time.to_string()))
        .collect();
    meta.insert("format".to_string(), FORMAT.to_string());
    let files = [
        (
            "model.safetensors",
            &data.model,
            BTreeMap::from([("format".to_string(), "pt".to_string())]),
        ),
        (OPTIMIZER, &data.moments, meta),
    ];
    let layouts: Vec<_> = files.iter().map(|(_, t, m)| layout(t, m)).collect();
    // Every rank writes at offsets it planned itself: the plans must agree.
    let lengths: Vec<u64> = layouts.iter().map(|(header, _)| header.len() as u64).collect();
    let mut sums = lengths.clone();
    collective.all_reduce_sum_u64(&mut sums);
    let ranks = collective.size() as u64;
    let planned = match sums.iter().zip(&lengths).all(|(&sum, &len)| sum == len * ranks) {
        true => Ok(()),
        false => Err(TrainError::Parallel(format!(
            "{}: the ranks planned different checkpoint files (header lengths {lengths:?} here); nothing written",
            root.display()
        ))),
    };
    agree(collective, planned)?;
    let prepare = || -> Result<(), TrainError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
        }
        std::fs::create_dir_all(tmp.join("training")).map_err(io(&tmp))?;
        std::fs::write(tmp.join("config.json"), data.config_json).map_err(io(&tmp))?;
        let state = serde_json::to_string_pretty(&data.state).expect("state serialises");
        std::fs::write(tmp.join(STATE), state).map_err(io(&tmp))?;
        for ((file, tensors, _), (header, _)) in files.iter().zip(&layouts) {
            create(&tmp.join(file), header, tensors)?;
        }
        Ok(())
    };
    agree(collective, if lead { prepare() } else { Ok(()) })?;
    let write = || -> Result<(), TrainError> {
        for ((file, tensors, _), (_, at)) in files.iter().zip(&layouts) {
            write_mine(&tmp.join(file), tensors, at)?;
        }
        Ok(())
    };
    agree(collective, write())?;
    let target = root.join(&name);
    let finish = || -> Result<(), TrainError> {
        write_manifest(&tmp, data.state.step)?;
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
        Ok(())
    };
    agree(collective, if lead { finish() } else { Ok(()) })?;
    Ok(target)
}

/// Size and FNV-1a 64 checksum of `path`, read in pieces (a checkpoint can exceed memory).
fn checksum(path: &Path) -> Result<(u64, u64), TrainError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut buffer = vec![0u8; 1 << 22];
    let (mut len, mut hash) = (0u64, FNV_OFFSET);
    loop {
        let n = file.read(&mut buffer).map_err(io(path))?;
        if n == 0 {
            return Ok((len, hash));
        }
        hash = fnv64(hash, &buffer[..n]);
        len += n as u64;
    }
}

/// Writes `dir/manifest.json` over the checkpoint's files.
fn write_manifest(dir: &Path, step: usize) -> Result<(), TrainError> {
    let mut files = BTreeMap::new();
    for f in ["config.json", "model.safetensors", OPTIMIZER, STATE] {
        let (bytes, sum) = checksum(&dir.join(f))?;
        let fnv64 = format!("{sum:016x}");
        files.insert(f.to_string(), FileEntry { bytes, fnv64 });
    }
    let manifest = Manifest {
        format: FORMAT.into(),
        step,
        files,
    };
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    std::fs::write(dir.join("manifest.json"), text).map_err(io(dir))
}

/// The completed checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<(usize, PathBuf)>, TrainError> {
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
pub fn latest(root: &Path) -> Result<Option<PathBuf>, TrainError> {
    Ok(list(root)?.pop().map(|(_, p)| p))
}

/// Checks that `dir` is a complete checkpoint whose files match the manifest.
pub fn verify(dir: &Path) -> Result<(), TrainError> {
    let corrupt = |why: String| TrainError::checkpoint(dir, format!("corrupt or incomplete: {why}"));
    let manifest_path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest_path)
        .map_err(|e| corrupt(format!("cannot read manifest.json ({e})")))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("manifest.json is not valid ({e})")))?;
    if manifest.format != FORMAT {
        return Err(corrupt(format!("unknown format `{}`", manifest.format)));
    }
    for (name, entry) in &manifest.files {
        let (bytes, sum) =
            checksum(&dir.join(name)).map_err(|e| corrupt(format!("cannot read {name} ({e})")))?;
        let sum = format!("{sum:016x}");
        if bytes != entry.bytes || sum != entry.fnv64 {
            return Err(corrupt(format!(
                "{name} has {bytes} bytes, checksum {sum}; the manifest records {} bytes, checksum {}",
                entry.bytes, entry.fnv64
            )));
        }
    }
    Ok(())
}

/// Reads the trainer state and optimizer moments of a verified checkpoint: of a parameter named in
/// `parts`, only elements `parts[name]` of its flat moments (a rank's experts), read from the memory-mapped
/// file without the rest.
pub fn read_training_state(
    dir: &Path,
    parts: &HashMap<String, Range<usize>>,
) -> Result<(TrainerState, HashMap<String, MomentState>), TrainError> {
    let path = dir.join(STATE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let state: TrainerState =
        serde_json::from_str(&text).map_err(|e| TrainError::checkpoint(&path, e.to_string()))?;
    let path = dir.join(OPTIMIZER);
    let file = std::fs::File::open(&path).map_err(io(&path))?;
    // SAFETY: read-only; the checkpoint was verified and is not written while training reads it.
    let bytes = unsafe { memmap2::Mmap::map(&file) }.map_err(io(&path))?;
    let bad = |e: String| TrainError::checkpoint(&path, e);
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let times = meta.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let read = |name: &str, part: Option<&Range<usize>>| -> Result<HostF32, TrainError> {
        let t = st.tensor(name).map_err(|e| bad(format!("{name}: {e}")))?;
        if t.dtype() != Dtype::F32 {
            return Err(bad(format!("{name} is not f32")));
        }
        let all = t.data().len() / 4;
        let part = part.cloned().unwrap_or(0..all);
        if part.end > all {
            return Err(bad(format!(
                "{name} has {all} values, the model holds {part:?} of it"
            )));
        }
        let data: Vec<f32> = t.data()[4 * part.start..4 * part.end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        Ok(HostF32 {
            shape: vec![data.len()],
            data,
        })
    };
    let mut moments = HashMap::new();
    for (key, value) in &times {
        if let Some(name) = key.strip_prefix("time.") {
            let time = value
                .parse()
                .map_err(|_| bad(format!("{key} = {value} is not a count")))?;
            let part = parts.get(name);
            moments.insert(
                name.to_string(),
                MomentState {
                    time,
                    m: read(&format!("exp_avg.{name}"), part)?,
                    v: read(&format!("exp_avg_sq.{name}"), part)?,
                },
            );
        }
    }
    Ok((state, moments))
}
