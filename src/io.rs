//! Reading inputs and writing outputs of the CLI: safetensors files written atomically.

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use std::error::Error;
use std::path::Path;
use v4_formats::atomic;
use v4_model::probe::{point, Scope};

pub type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// Reads `input_ids` (i64 or i32, `[B, S]`) from a safetensors file.
pub fn read_input_ids(path: &Path) -> Result<(Vec<i64>, usize, usize)> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = deserialize(path, &bytes)?;
    let t = st
        .tensor("input_ids")
        .map_err(|_| format!("{}: no tensor `input_ids`", path.display()))?;
    let shape = t.shape();
    if shape.len() != 2 {
        return Err(format!(
            "{}: `input_ids` has shape {shape:?}, expected [batch, seq]",
            path.display()
        )
        .into());
    }
    let ids: Vec<i64> = match t.dtype() {
        Dtype::I64 => t
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8")))
            .collect(),
        Dtype::I32 => t
            .data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4")) as i64)
            .collect(),
        other => {
            return Err(format!(
                "{}: `input_ids` has dtype {other:?}, expected I64 or I32",
                path.display()
            )
            .into())
        }
    };
    Ok((ids, shape[0], shape[1]))
}

/// `bytes` (the contents of `path`) as safetensors, naming the file when they are not.
fn deserialize<'a>(path: &Path, bytes: &'a [u8]) -> Result<SafeTensors<'a>> {
    SafeTensors::deserialize(bytes).map_err(|e| {
        format!(
            "{}: not a valid safetensors file (truncated or corrupt?): {e}",
            path.display()
        )
        .into()
    })
}

/// An f32 tensor to write.
pub struct Output {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Writes `tensors` to `path` through a temporary file renamed at the end, so a reader never sees a
/// partial file and an interrupted run leaves the previous output intact. Refuses to write over `input`.
pub fn write_safetensors(path: &Path, tensors: &[Output], input: &Path) -> Result<()> {
    if let (Ok(a), Ok(b)) = (path.canonicalize(), input.canonicalize()) {
        if a == b {
            return Err(format!("{}: refusing to overwrite the input file", path.display()).into());
        }
    }
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|t| t.data.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let views = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| Ok((t.name.clone(), TensorView::new(Dtype::F32, t.shape.clone(), b)?)))
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()?;
    atomic::replace_with(path, |tmp| {
        safetensors::serialize_to_file(views, None, tmp).map_err(std::io::Error::other)
    })?;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file renamed at the end.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    Ok(atomic::write_bytes(path, bytes)?)
}

/// Reads a model configuration file (HF `config.json` or DeepSeek's inference config).
pub fn read_config_file(path: &Path) -> Result<v4_model::V4Config> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(v4_model::V4Config::from_json_str(&text).map_err(|e| format!("{}: {e}", path.display()))?)
}

/// `n` pseudo-random token ids below `vocab` from `seed` (a 64-bit LCG): benchmark inputs.
pub fn random_ids(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    const A: u64 = 6364136223846793005;
    const C: u64 = 1442695040888963407;
    let mut state = seed.wrapping_mul(A).wrapping_add(C);
    (0..n)
        .map(|_| {
            state = state.wrapping_mul(A).wrapping_add(C);
            ((state >> 33) % vocab as u64) as u32
        })
        .collect()
}

/// The ids a benchmark runs on: the first `n` token ids of `path` when given (JSONL, each record
/// `{"ids": [..]}`, concatenated in order: the file `scripts/bench-peers.sh` writes once for v4 and for
/// HF), else `n` seeded random ids ([`random_ids`]).
pub fn bench_ids(path: Option<&Path>, seed: u64, n: usize, vocab: usize) -> Result<Vec<u32>> {
    let Some(path) = path else {
        return Ok(random_ids(seed, n, vocab));
    };
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut ids = Vec::with_capacity(n);
    for (line_no, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{}:{}", path.display(), line_no + 1);
        let record: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{}: {e}", at()))?;
        let list = record["ids"]
            .as_array()
            .ok_or_else(|| format!("{}: expected a record {{\"ids\": [..]}}", at()))?;
        for id in list {
            match id.as_u64() {
                Some(id) if (id as usize) < vocab => ids.push(id as u32),
                _ => {
                    return Err(
                        format!("{}: token id {id} is not in the vocabulary [0, {vocab})", at()).into(),
                    )
                }
            }
        }
        if ids.len() >= n {
            ids.truncate(n);
            return Ok(ids);
        }
    }
    Err(format!(
        "{}: holds {} token ids, the benchmark needs {n}",
        path.display(),
        ids.len()
    )
    .into())
}

/// The first of `names` that the safetensors file `path` holds, as f32 (`[shape]`, values).
pub fn read_f32_tensor(path: &Path, names: &[&str]) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let st = deserialize(path, &bytes)?;
    let (name, t) = names
        .iter()
        .find_map(|n| st.tensor(n).ok().map(|t| (n, t)))
        .ok_or_else(|| format!("{}: holds none of {}", path.display(), names.join(", ")))?;
    if t.dtype() != Dtype::F32 {
        return Err(format!(
            "{}: `{name}` has dtype {:?}, expected F32",
            path.display(),
            t.dtype()
        )
        .into());
    }
    let values = t
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
        .collect();
    Ok((t.shape().to_vec(), values))
}

/// The streams entering layer `layer` (`expected`: `[B, S, c, D]`) from a `v4 forward` output
/// (`hidden.N`) or a full `v4 trace` (`layers.N.input`).
pub fn read_streams(path: &Path, layer: usize, expected: [usize; 4]) -> Result<Vec<f32>> {
    let (shape, values) = read_f32_tensor(
        path,
        &[
            &format!("hidden.{layer}"),
            &Scope::Layer(layer).name(point::INPUT),
        ],
    )?;
    if shape != expected {
        return Err(format!(
            "{}: the streams entering layer {layer} have shape {shape:?}; the input ids and the model need {expected:?}",
            path.display()
        )
        .into());
    }
    Ok(values)
}
