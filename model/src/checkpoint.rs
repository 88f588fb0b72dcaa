//! Reading an HF-layout checkpoint directory: `config.json` and one or more memory-mapped safetensors
//! files (sharded through `model.safetensors.index.json`), decoded to f32 / i64 on request.

use crate::config::V4Config;
use crate::weights::{check_rows, HostData, HostTensor, LoadError, TensorSpec, WeightSource};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata, SafeTensors};
use std::collections::BTreeMap;
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One memory-mapped safetensors file with its parsed header.
struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    metadata: Metadata,
}

/// An HF-layout checkpoint directory.
pub struct SafetensorsDir {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    index: BTreeMap<String, usize>,
}

fn file_error(path: &Path, message: impl Into<String>) -> LoadError {
    LoadError::File {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// Reads and parses the model configuration of a checkpoint directory (`config.json`, else DeepSeek's
/// `inference_config.json`).
pub fn read_config(dir: &Path) -> Result<V4Config, LoadError> {
    let candidates = [dir.join("config.json"), dir.join("inference_config.json")];
    let path = candidates
        .iter()
        .find(|p| p.is_file())
        .ok_or_else(|| file_error(dir, "no config.json (or inference_config.json) in this directory"))?;
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e.to_string()))?;
    V4Config::from_json_str(&text).map_err(|error| LoadError::Config {
        path: path.display().to_string(),
        error,
    })
}

impl SafetensorsDir {
    /// Opens every shard of the checkpoint in `dir` and validates their headers (a truncated file or a
    /// header that lies about its offsets is an error here, before any tensor is read).
    pub fn open(dir: &Path) -> Result<Self, LoadError> {
        let index_path = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index_path.is_file() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| file_error(&index_path, e.to_string()))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| file_error(&index_path, format!("not valid JSON: {e}")))?;
            let map = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| file_error(&index_path, "no `weight_map` object"))?;
            let mut files: Vec<PathBuf> = Vec::new();
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    file_error(&index_path, format!("`{name}` maps to {file}, not a file name"))
                })?;
                let path = dir.join(file);
                if !files.contains(&path) {
                    files.push(path);
                }
            }
            files.sort();
            files
        } else {
            let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
                .map_err(|e| file_error(dir, e.to_string()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                .collect();
            files.sort();
            files
        };
        if files.is_empty() {
            return Err(file_error(dir, "no .safetensors files in this directory"));
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut index = BTreeMap::new();
        for path in files {
            let file = File::open(&path).map_err(|e| file_error(&path, e.to_string()))?;
            // SAFETY: the map is read-only; a checkpoint modified while loaded is the caller's problem,
            // as with every memory-mapped reader (PyTorch's included).
            let map = unsafe { Mmap::map(&file) }.map_err(|e| file_error(&path, e.to_string()))?;
            let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
                file_error(
                    &path,
                    format!("not a valid safetensors file (truncated or corrupt?): {e}"),
                )
            })?;
            for name in metadata.tensors().keys() {
                if let Some(previous) = index.insert(name.clone(), shards.len()) {
                    let other: &Shard = &shards[previous];
                    return Err(file_error(
                        &path,
                        format!("tensor `{name}` also appears in {}", other.path.display()),
                    ));
                }
            }
            shards.push(Shard {
                path,
                map,
                header_len,
                metadata,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            index,
        })
    }

    /// The dtype and shape of tensor `name`, if present.
    pub fn info(&self, name: &str) -> Option<(Dtype, Vec<usize>)> {
        let shard = &self.shards[*self.index.get(name)?];
        let info = shard.metadata.info(name)?;
        Some((info.dtype, info.shape.clone()))
    }

    /// The raw little-endian bytes of tensor `name`.
    fn bytes(&self, name: &str) -> Option<(&Shard, Dtype, &[usize], &[u8])> {
        let shard = &self.shards[*self.index.get(name)?];
        let info = shard.metadata.info(name)?;
        let start = 8 + shard.header_len;
        let (a, b) = info.data_offsets;
        Some((shard, info.dtype, &info.shape, &shard.map[start + a..start + b]))
    }
}

impl WeightSource for SafetensorsDir {
    fn describe(&self) -> String {
        self.dir.display().to_string()
    }

    fn read(&self, name: &str, spec: &TensorSpec<'_>) -> Result<HostTensor, LoadError> {
        let rows = self
            .info(name)
            .map_or(0, |(_, shape)| shape.first().copied().unwrap_or(1));
        self.read_rows(name, spec, 0..rows)
    }

    fn read_rows(
        &self,
        name: &str,
        _spec: &TensorSpec<'_>,
        rows: Range<usize>,
    ) -> Result<HostTensor, LoadError> {
        let (shard, dtype, shape, bytes) = self.bytes(name).ok_or_else(|| LoadError::Missing {
            source: self.describe(),
            name: name.to_string(),
        })?;
        let mut shape = shape.to_vec();
        if let Some(first) = shape.first_mut() {
            check_rows(self, name, &[*first], &rows)?;
            let per_row = bytes.len() / (*first).max(1);
            *first = rows.len();
            return Ok(HostTensor {
                data: decode(
                    shard,
                    name,
                    dtype,
                    &bytes[rows.start * per_row..rows.end * per_row],
                )?,
                shape,
            });
        }
        Ok(HostTensor {
            data: decode(shard, name, dtype, bytes)?,
            shape,
        })
    }

    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }
}

/// Little-endian `bytes` of tensor `name` (in `shard`) as f32 or i64 values.
fn decode(shard: &Shard, name: &str, dtype: Dtype, bytes: &[u8]) -> Result<HostData, LoadError> {
    Ok(match dtype {
        Dtype::F32 => HostData::F32(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        ),
        Dtype::BF16 => HostData::F32(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        Dtype::F16 => HostData::F32(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        ),
        Dtype::I64 => HostData::I64(
            bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .collect(),
        ),
        Dtype::I32 => HostData::I64(
            bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")) as i64)
                .collect(),
        ),
        other => {
            return Err(LoadError::Dtype {
                source: shard.path.display().to_string(),
                name: name.to_string(),
                dtype: format!("{other:?}"),
                hint: "the HF-layout reader decodes F32, BF16, F16, I64 and I32; FP8/FP4 weights are \
                       DeepSeek's release layout (convert them with `v4 convert`)"
                    .to_string(),
            })
        }
    })
}
