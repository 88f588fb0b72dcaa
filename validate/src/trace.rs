//! The trace file: one safetensors file holding the probe tensors (full mode) and, in the safetensors
//! `__metadata__` under the key `v4.trace`, a JSON document describing the run (format version, v4 version,
//! backend, dtype, precision policy, model config hash, input ids, mode, filters) and every probe's shape,
//! dtype, statistics and checksum. Stats and checksum modes store no probe tensors, only that JSON.
//!
//! A plain forward-output file (HF's fixture `io.safetensors`: `input_ids`, `hidden.N`, `logits`, no
//! metadata) is accepted too: `hidden.N` of rank 4 becomes `layers.N.input`, the rank-3 `hidden.L`
//! becomes `final.hidden`, `logits` stays.

use crate::{Error, Result};
use burn::tensor::TensorData;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use v4_formats::atomic;
use v4_model::probe::{point, Scope};

/// The format tag written in every trace.
pub const FORMAT: &str = "v4-trace/1";
/// The metadata key holding the trace's JSON.
pub const META_KEY: &str = "v4.trace";

/// What a trace keeps of each probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TraceMode {
    /// min / max / mean / L2 / NaN / Inf counts only (a cheap first pass).
    Stats,
    /// The tensors themselves (needed for element-wise metrics and isolated mode).
    Full,
    /// Statistics plus a bitwise checksum (FNV-1a 64 of the little-endian values).
    Checksum,
}

impl std::str::FromStr for TraceMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "stats" => Ok(Self::Stats),
            "full" => Ok(Self::Full),
            "checksum" => Ok(Self::Checksum),
            _ => Err(Error::Options(format!(
                "unknown trace mode `{s}` (stats, full, checksum)"
            ))),
        }
    }
}

/// Summary statistics of a tensor (over its finite elements for min/max/mean/l2).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Stats {
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    pub l2: f64,
    pub nan: u64,
    pub inf: u64,
    pub count: u64,
}

impl Stats {
    pub fn of(values: &Values) -> Self {
        let mut s = Stats {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            ..Default::default()
        };
        let mut sum = 0.0;
        let mut sq = 0.0;
        let mut finite = 0u64;
        let mut add = |x: f64| {
            s.count += 1;
            if x.is_nan() {
                s.nan += 1;
            } else if x.is_infinite() {
                s.inf += 1;
            } else {
                finite += 1;
                s.min = s.min.min(x);
                s.max = s.max.max(x);
                sum += x;
                sq += x * x;
            }
        };
        match values {
            Values::F32(v) => v.iter().for_each(|&x| add(x as f64)),
            Values::I64(v) => v.iter().for_each(|&x| add(x as f64)),
        }
        s.mean = if finite > 0 { sum / finite as f64 } else { 0.0 };
        s.l2 = sq.sqrt();
        if finite == 0 {
            s.min = 0.0;
            s.max = 0.0;
        }
        s
    }
}

/// A probe's values on the host.
#[derive(Debug, Clone, PartialEq)]
pub enum Values {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl Values {
    /// The values of `data` (probe `name`, for errors).
    pub fn from_data(name: &str, data: TensorData) -> Result<Self> {
        let bad = |e| Error::Reference(format!("{name}: {e:?}"));
        if data.dtype.is_float() {
            Ok(Values::F32(data.convert::<f32>().into_vec::<f32>().map_err(bad)?))
        } else {
            Ok(Values::I64(data.convert::<i64>().into_vec::<i64>().map_err(bad)?))
        }
    }

    pub fn dtype(&self) -> &'static str {
        match self {
            Values::F32(_) => "f32",
            Values::I64(_) => "i64",
        }
    }

    fn bytes(&self) -> Vec<u8> {
        match self {
            Values::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Values::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub fn checksum(&self) -> String {
        format!("{:016x}", fnv1a(&self.bytes()))
    }
}

/// FNV-1a 64.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// One probe of a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub name: String,
    pub shape: Vec<usize>,
    pub stats: Stats,
    pub checksum: Option<String>,
    /// Present in full mode.
    pub values: Option<Values>,
    pub dtype: String,
}

/// What a probe's metadata records (the JSON form of an [`Entry`] without its values).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeMeta {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub stats: Stats,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// Who produced the trace, with what numerics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TraceInfo {
    /// `ndarray`, `npu`, `hf-fixture`, ...
    pub backend: String,
    /// The compute dtype that decides the default tolerances: `f32`, `f16`, `bf16`, `hf32`.
    pub dtype: String,
    /// The precision policy as flat JSON (`{"precision_mode": ..., ...}`), diffed before comparing.
    pub precision_policy: serde_json::Value,
}

/// The trace's JSON metadata.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TraceMeta {
    pub format: String,
    pub v4_version: String,
    pub info: TraceInfo,
    pub config_hash: String,
    pub mode: TraceMode,
    /// `[batch, seq]`
    pub input_shape: [usize; 2],
    pub input_ids: Vec<i64>,
    #[serde(default)]
    pub layers: Option<String>,
    #[serde(default)]
    pub filter: Option<String>,
    pub probes: Vec<ProbeMeta>,
}

/// A trace in memory: metadata and probes in the order the forward pass reached them.
#[derive(Debug, Clone)]
pub struct Trace {
    pub meta: TraceMeta,
    pub entries: Vec<Entry>,
    /// Where it was read from (empty for an in-memory trace).
    pub path: PathBuf,
}

/// A stable hash of a model config (its Debug form): traces of different models refuse to compare.
pub fn config_hash(config: &v4_model::V4Config) -> String {
    format!("{:016x}", fnv1a(format!("{config:?}").as_bytes()))
}

impl Trace {
    /// Builds a trace from a probe recording.
    #[allow(clippy::too_many_arguments)]
    pub fn from_records(
        records: Vec<(String, TensorData)>,
        mode: TraceMode,
        info: TraceInfo,
        config_hash: String,
        input_ids: Vec<i64>,
        input_shape: [usize; 2],
        layers: Option<String>,
        filter: Option<String>,
    ) -> Result<Self> {
        let mut entries = Vec::with_capacity(records.len());
        for (name, data) in records {
            let shape = data.shape.to_vec();
            let values = Values::from_data(&name, data)?;
            entries.push(Entry {
                stats: Stats::of(&values),
                checksum: (mode == TraceMode::Checksum).then(|| values.checksum()),
                dtype: values.dtype().to_string(),
                values: (mode == TraceMode::Full).then_some(values),
                name,
                shape,
            });
        }
        let probes = entries.iter().map(Entry::meta).collect();
        Ok(Self {
            meta: TraceMeta {
                format: FORMAT.into(),
                v4_version: env!("CARGO_PKG_VERSION").into(),
                info,
                config_hash,
                mode,
                input_shape,
                input_ids,
                layers,
                filter,
                probes,
            },
            entries,
            path: PathBuf::new(),
        })
    }

    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The full f32 values of `name`, if the trace holds them.
    pub fn f32(&self, name: &str) -> Option<(&[usize], &[f32])> {
        let e = self.get(name)?;
        match &e.values {
            Some(Values::F32(v)) => Some((&e.shape, v)),
            _ => None,
        }
    }

    /// Writes the trace atomically (temporary file + rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut blobs: Vec<(String, StDtype, Vec<usize>, Vec<u8>)> = vec![(
            "input_ids".into(),
            StDtype::I64,
            self.meta.input_shape.to_vec(),
            self.meta.input_ids.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )];
        for e in &self.entries {
            if let Some(v) = &e.values {
                let dtype = match v {
                    Values::F32(_) => StDtype::F32,
                    Values::I64(_) => StDtype::I64,
                };
                blobs.push((e.name.clone(), dtype, e.shape.clone(), v.bytes()));
            }
        }
        let views = blobs
            .iter()
            .map(|(n, d, s, b)| Ok((n.clone(), TensorView::new(*d, s.clone(), b)?)))
            .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
            .map_err(|e| Error::trace(path, e))?;
        let json = serde_json::to_string(&self.meta).map_err(|e| Error::trace(path, e))?;
        let meta = HashMap::from([(META_KEY.to_string(), json)]);
        atomic::replace_with(path, |tmp| {
            safetensors::serialize_to_file(views, Some(meta), tmp).map_err(std::io::Error::other)
        })
        .map_err(|e| Error::io(&e.path)(e.source))
    }

    /// Reads a trace, or a plain forward-output file through the HF name mapping.
    pub fn read(path: &Path) -> Result<Self> {
        let at = |e: &dyn std::fmt::Display| Error::trace(path, e);
        let bytes = std::fs::read(path).map_err(|e| at(&e))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| at(&e))?;
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| at(&e))?;
        let json = header.metadata().as_ref().and_then(|m| m.get(META_KEY)).cloned();
        let read_values = |name: &str| -> Result<(Vec<usize>, Values)> {
            let t = st.tensor(name).map_err(|e| at(&e))?;
            let v = match t.dtype() {
                StDtype::F32 => Values::F32(
                    t.data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().expect("4")))
                        .collect(),
                ),
                StDtype::I64 => Values::I64(
                    t.data()
                        .chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().expect("8")))
                        .collect(),
                ),
                StDtype::I32 => Values::I64(
                    t.data()
                        .chunks_exact(4)
                        .map(|b| i32::from_le_bytes(b.try_into().expect("4")) as i64)
                        .collect(),
                ),
                other => return Err(at(&format!("`{name}` has unsupported dtype {other:?}"))),
            };
            Ok((t.shape().to_vec(), v))
        };
        if let Some(json) = json {
            let meta: TraceMeta = serde_json::from_str(&json).map_err(|e| at(&e))?;
            if meta.format != FORMAT {
                return Err(at(&format!(
                    "trace format {} (this v4 reads {FORMAT})",
                    meta.format
                )));
            }
            let mut entries = Vec::with_capacity(meta.probes.len());
            for p in &meta.probes {
                let values = if meta.mode == TraceMode::Full {
                    Some(read_values(&p.name)?.1)
                } else {
                    None
                };
                entries.push(Entry {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    stats: p.stats,
                    checksum: p.checksum.clone(),
                    dtype: p.dtype.clone(),
                    values,
                });
            }
            return Ok(Self {
                meta,
                entries,
                path: path.to_path_buf(),
            });
        }
        // A forward-output file (HF fixture layout).
        let (shape, ids) = read_values("input_ids")
            .map_err(|_| at(&"neither a v4 trace (no `v4.trace` metadata) nor a file with `input_ids`"))?;
        let Values::I64(ids) = ids else {
            return Err(at(&"`input_ids` is not an integer tensor"));
        };
        if shape.len() != 2 {
            return Err(at(&format!(
                "`input_ids` has shape {shape:?}, expected [batch, seq]"
            )));
        }
        let mut hidden: Vec<(usize, String)> = st
            .names()
            .into_iter()
            .filter_map(|n| Some((n.strip_prefix("hidden.")?.parse().ok()?, n.to_string())))
            .collect();
        hidden.sort();
        let mut entries = Vec::new();
        for (index, name) in hidden {
            let (shape, values) = read_values(&name)?;
            let mapped = if shape.len() == 4 {
                Scope::Layer(index).name(point::INPUT)
            } else {
                point::FINAL_HIDDEN.to_string()
            };
            entries.push(Entry::new(mapped, shape, values, TraceMode::Full));
        }
        if st.tensor(point::LOGITS).is_ok() {
            let (shape, values) = read_values(point::LOGITS)?;
            entries.push(Entry::new(point::LOGITS.into(), shape, values, TraceMode::Full));
        }
        if entries.is_empty() {
            return Err(at(&"no `hidden.N` or `logits` tensors to compare against"));
        }
        let probes = entries.iter().map(Entry::meta).collect();
        Ok(Self {
            meta: TraceMeta {
                format: FORMAT.into(),
                v4_version: "unknown (forward-output file)".into(),
                info: TraceInfo {
                    backend: "external (hidden.N / logits file)".into(),
                    dtype: "f32".into(),
                    precision_policy: serde_json::json!({"source": "unrecorded"}),
                },
                config_hash: String::new(),
                mode: TraceMode::Full,
                input_shape: [shape[0], shape[1]],
                input_ids: ids,
                layers: None,
                filter: None,
                probes,
            },
            entries,
            path: path.to_path_buf(),
        })
    }
}

impl Entry {
    pub fn new(name: String, shape: Vec<usize>, values: Values, mode: TraceMode) -> Self {
        Self {
            stats: Stats::of(&values),
            checksum: (mode == TraceMode::Checksum).then(|| values.checksum()),
            dtype: values.dtype().to_string(),
            values: (mode == TraceMode::Full).then_some(values),
            name,
            shape,
        }
    }

    fn meta(&self) -> ProbeMeta {
        ProbeMeta {
            name: self.name.clone(),
            shape: self.shape.clone(),
            dtype: self.dtype.clone(),
            stats: self.stats,
            checksum: self.checksum.clone(),
        }
    }
}
