//! safetensors files: a validating, memory-mapped reader and the header half of a streaming writer.
//!
//! The header is parsed here rather than by the `safetensors` crate so that each inconsistency
//! (truncation, sizes that do not match dtype x shape, overlapping offsets, unknown dtypes) gets its
//! own error naming the file and the tensor.

use crate::error::ConvertError;
use memmap2::Mmap;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Name of the shard index file.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The index msModelSlim's AscendV1 checkpoints use instead (`quant_model_weights-0000i-of-0000N.safetensors`).
pub const ASCEND_INDEX_FILE: &str = "quant_model_weights.safetensors.index.json";
/// Largest header accepted (the safetensors library's own limit).
const MAX_HEADER: u64 = 100_000_000;

/// safetensors dtypes, declared in the order of the `safetensors` crate so that sorting tensors by
/// (dtype descending, name) reproduces its file layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dtype {
    Bool,
    F4,
    F6E2M3,
    F6E3M2,
    U8,
    I8,
    F8E5M2,
    F8E4M3,
    F8E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

const DTYPES: [(Dtype, &str, usize); 19] = [
    (Dtype::Bool, "BOOL", 8),
    (Dtype::F4, "F4", 4),
    (Dtype::F6E2M3, "F6_E2M3", 6),
    (Dtype::F6E3M2, "F6_E3M2", 6),
    (Dtype::U8, "U8", 8),
    (Dtype::I8, "I8", 8),
    (Dtype::F8E5M2, "F8_E5M2", 8),
    (Dtype::F8E4M3, "F8_E4M3", 8),
    (Dtype::F8E8M0, "F8_E8M0", 8),
    (Dtype::I16, "I16", 16),
    (Dtype::U16, "U16", 16),
    (Dtype::F16, "F16", 16),
    (Dtype::BF16, "BF16", 16),
    (Dtype::I32, "I32", 32),
    (Dtype::U32, "U32", 32),
    (Dtype::F32, "F32", 32),
    (Dtype::F64, "F64", 64),
    (Dtype::I64, "I64", 64),
    (Dtype::U64, "U64", 64),
];

impl Dtype {
    /// Parses a safetensors dtype string (`"F8_E4M3"`, ...).
    pub fn parse(s: &str) -> Option<Dtype> {
        DTYPES.iter().find(|d| d.1 == s).map(|d| d.0)
    }

    /// The safetensors spelling.
    pub fn name(self) -> &'static str {
        DTYPES[self as usize].1
    }

    /// Bits per element.
    pub fn bits(self) -> usize {
        DTYPES[self as usize].2
    }

    /// Bytes per element (whole-byte dtypes only).
    pub fn size(self) -> usize {
        self.bits() / 8
    }
}

impl std::fmt::Display for Dtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One header entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub start: usize,
    /// Byte length of the data.
    pub len: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A validated, memory-mapped safetensors file.
pub struct ShardFile {
    pub path: PathBuf,
    map: Arc<Mmap>,
    /// Header entries by name.
    pub tensors: BTreeMap<String, TensorInfo>,
}

impl ShardFile {
    /// Maps `path` and validates its header against the file size.
    pub fn open(path: &Path) -> Result<ShardFile, ConvertError> {
        let file = File::open(path).map_err(|e| ConvertError::io(path, e))?;
        // SAFETY: the map is read-only; the converter never writes to its inputs. A file truncated
        // by another process while mapped would fault, as with any mmap-based loader.
        let map = Arc::new(unsafe { Mmap::map(&file) }.map_err(|e| ConvertError::io(path, e))?);
        let tensors = parse_header(path, &map)?;
        Ok(ShardFile {
            path: path.to_path_buf(),
            map,
            tensors,
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// `range` of the file, shared with the map (no copy): weights that stay in their stored form.
    pub fn shared_bytes(&self, range: std::ops::Range<usize>) -> v4_formats::Bytes {
        v4_formats::Bytes::new(self.map.clone(), range)
    }

    /// The header bytes (length prefix included), for fingerprinting inputs.
    pub fn header_bytes(&self) -> &[u8] {
        let n = u64::from_le_bytes(self.map[..8].try_into().unwrap_or_default()) as usize;
        &self.map[..8 + n]
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> ConvertError {
    ConvertError::BadHeader {
        file: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Parses and validates a safetensors header against the bytes of the whole file.
pub fn parse_header(path: &Path, bytes: &[u8]) -> Result<BTreeMap<String, TensorInfo>, ConvertError> {
    let actual = bytes.len() as u64;
    let truncated = |tensor: Option<&str>, needed: u64| ConvertError::Truncated {
        file: path.to_path_buf(),
        tensor: tensor.map(str::to_string),
        needed,
        actual,
    };
    let prefix: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| truncated(None, 8))?;
    let n = u64::from_le_bytes(prefix);
    if n > MAX_HEADER {
        return Err(bad(path, format!("header length {n} exceeds {MAX_HEADER} bytes")));
    }
    let data_start = 8 + n;
    if data_start > actual {
        return Err(truncated(None, data_start));
    }
    let json: Map<String, Value> = serde_json::from_slice(&bytes[8..data_start as usize])
        .map_err(|e| bad(path, format!("header is not a JSON object: {e}")))?;
    let mut out = BTreeMap::new();
    for (name, v) in json {
        if name == "__metadata__" {
            continue;
        }
        let info = parse_entry(path, &name, &v, data_start)?;
        out.insert(name, info);
    }
    // Offsets: within the file, not overlapping.
    let mut by_start: Vec<(&String, &TensorInfo)> = out.iter().collect();
    by_start.sort_by_key(|(_, t)| (t.start, t.len));
    let mut prev: Option<(&String, usize)> = None;
    for (name, t) in by_start {
        let end = (t.start + t.len) as u64;
        if end > actual {
            return Err(truncated(Some(name), end));
        }
        if let Some((pname, pend)) = prev {
            if t.start < pend && t.len > 0 {
                return Err(ConvertError::BadOffsets {
                    file: path.to_path_buf(),
                    tensor: name.clone(),
                    reason: format!("its bytes overlap those of `{pname}`"),
                });
            }
        }
        if t.len > 0 {
            prev = Some((name, t.start + t.len));
        }
    }
    Ok(out)
}

fn parse_entry(path: &Path, name: &str, v: &Value, data_start: u64) -> Result<TensorInfo, ConvertError> {
    let field = |k: &str| {
        v.get(k)
            .ok_or_else(|| bad(path, format!("tensor `{name}` has no `{k}`")))
    };
    let dtype_s = field("dtype")?
        .as_str()
        .ok_or_else(|| bad(path, format!("tensor `{name}`: dtype is not a string")))?;
    let dtype = Dtype::parse(dtype_s).ok_or_else(|| ConvertError::UnknownDtype {
        file: path.to_path_buf(),
        tensor: name.to_string(),
        dtype: dtype_s.to_string(),
    })?;
    let ints = |k: &str| -> Result<Vec<u64>, ConvertError> {
        field(k)?
            .as_array()
            .and_then(|a| a.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| {
                bad(
                    path,
                    format!("tensor `{name}`: `{k}` is not a list of non-negative integers"),
                )
            })
    };
    let shape = ints("shape")?;
    let offs = ints("data_offsets")?;
    let [a, b] = offs[..] else {
        return Err(bad(
            path,
            format!("tensor `{name}`: data_offsets must have two entries"),
        ));
    };
    if b < a {
        return Err(ConvertError::BadOffsets {
            file: path.to_path_buf(),
            tensor: name.to_string(),
            reason: format!("end {b} is before start {a}"),
        });
    }
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(path, format!("tensor `{name}`: shape overflows")))?;
    let bits = numel
        .checked_mul(dtype.bits() as u64)
        .ok_or_else(|| bad(path, format!("tensor `{name}`: shape overflows")))?;
    let expected = bits.div_ceil(8);
    if expected != b - a || bits % 8 != 0 {
        return Err(ConvertError::SizeMismatch {
            file: path.to_path_buf(),
            tensor: name.to_string(),
            expected,
            declared: b - a,
        });
    }
    let start = data_start
        .checked_add(a)
        .filter(|s| s.checked_add(b - a).is_some())
        .ok_or_else(|| bad(path, format!("tensor `{name}`: offsets overflow")))?;
    Ok(TensorInfo {
        dtype,
        shape: shape.into_iter().map(|d| d as usize).collect(),
        start: start as usize,
        len: (b - a) as usize,
    })
}

/// Opens the shards of a checkpoint directory: those named by `model.safetensors.index.json` if it
/// exists (every named file must exist and hold the tensors mapped to it), otherwise every
/// `*.safetensors` file in the directory. Tensor names must be unique across shards.
pub fn open_dir(dir: &Path) -> Result<Vec<ShardFile>, ConvertError> {
    let index_path = [INDEX_FILE, ASCEND_INDEX_FILE]
        .map(|f| dir.join(f))
        .into_iter()
        .find(|p| p.exists());
    let (names, weight_map) = if let Some(index_path) = index_path {
        let text = std::fs::read(&index_path).map_err(|e| ConvertError::io(&index_path, e))?;
        let json: Value = serde_json::from_slice(&text).map_err(|e| ConvertError::Json {
            file: index_path.clone(),
            reason: format!("not valid JSON: {e}"),
        })?;
        let map = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ConvertError::Json {
                file: index_path.clone(),
                reason: "no `weight_map` object".into(),
            })?;
        let mut wm = BTreeMap::new();
        for (t, f) in map {
            let f = f.as_str().ok_or_else(|| ConvertError::Json {
                file: index_path.clone(),
                reason: format!("weight_map entry `{t}` is not a file name"),
            })?;
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(ConvertError::Json {
                    file: index_path.clone(),
                    reason: format!("weight_map entry `{t}` points outside the directory: `{f}`"),
                });
            }
            wm.insert(t.clone(), f.to_string());
        }
        let mut files: Vec<String> = wm.values().cloned().collect();
        files.sort();
        files.dedup();
        for f in &files {
            if !dir.join(f).is_file() {
                return Err(ConvertError::MissingShard {
                    index: index_path.clone(),
                    shard: f.clone(),
                });
            }
        }
        (files, Some(wm))
    } else {
        let rd = std::fs::read_dir(dir).map_err(|e| ConvertError::io(dir, e))?;
        let mut files = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| ConvertError::io(dir, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".safetensors") && entry.path().is_file() {
                files.push(name);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(ConvertError::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no *.safetensors file in this directory",
                ),
            ));
        }
        (files, None)
    };
    let shards = names
        .iter()
        .map(|f| ShardFile::open(&dir.join(f)))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(wm) = weight_map {
        for (t, f) in &wm {
            let shard = shards.iter().find(|s| s.path == dir.join(f));
            if let Some(s) = shard.filter(|s| !s.tensors.contains_key(t)) {
                return Err(ConvertError::MissingTensor {
                    file: s.path.clone(),
                    tensor: t.clone(),
                });
            }
        }
    }
    let mut seen: BTreeMap<&str, &Path> = BTreeMap::new();
    for s in &shards {
        for t in s.tensors.keys() {
            if let Some(first) = seen.insert(t, &s.path) {
                return Err(ConvertError::DuplicateTensor {
                    tensor: t.clone(),
                    first: first.to_path_buf(),
                    second: s.path.clone(),
                });
            }
        }
    }
    Ok(shards)
}

/// A tensor to be written: name, dtype, shape, byte length.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub len: u64,
}

/// Lays out a shard: orders tensors as the safetensors library does (dtype descending, then
/// name), and returns the complete header (length prefix, JSON padded with spaces to 8 bytes) and
/// each tensor's absolute file offset, in the order of `tensors` after sorting.
pub fn layout_shard(tensors: &mut [PlannedTensor]) -> (Vec<u8>, Vec<u64>) {
    let format = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    layout_shard_with(tensors, &format)
}

/// [`layout_shard`] with the header's `__metadata__` given. The header depends only on the tensors and
/// the metadata: processes that plan the same file get the same bytes and offsets.
pub fn layout_shard_with(
    tensors: &mut [PlannedTensor],
    metadata: &BTreeMap<String, String>,
) -> (Vec<u8>, Vec<u64>) {
    let rank = |t: &PlannedTensor| Dtype::parse(&t.dtype);
    tensors.sort_by(|a, b| rank(b).cmp(&rank(a)).then_with(|| a.name.cmp(&b.name)));
    let mut json = Map::new();
    let meta: Map<String, Value> = metadata
        .iter()
        .map(|(k, v)| (k.clone(), Value::from(v.clone())))
        .collect();
    json.insert("__metadata__".into(), Value::Object(meta));
    let mut rel = Vec::with_capacity(tensors.len());
    let mut off = 0u64;
    for t in tensors.iter() {
        let mut e = Map::new();
        e.insert("dtype".into(), Value::from(t.dtype.clone()));
        e.insert("shape".into(), Value::from(t.shape.clone()));
        e.insert("data_offsets".into(), Value::from(vec![off, off + t.len]));
        json.insert(t.name.clone(), Value::Object(e));
        rel.push(off);
        off += t.len;
    }
    let mut text = Value::Object(json).to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut header = (text.len() as u64).to_le_bytes().to_vec();
    header.extend_from_slice(&text);
    let base = header.len() as u64;
    (header, rel.into_iter().map(|r| r + base).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_header_parses_back() {
        let mut ts = vec![
            PlannedTensor {
                name: "b".into(),
                dtype: "I8".into(),
                shape: vec![2, 3],
                len: 6,
            },
            PlannedTensor {
                name: "a".into(),
                dtype: "F32".into(),
                shape: vec![2],
                len: 8,
            },
        ];
        let (mut bytes, offs) = layout_shard(&mut ts);
        assert_eq!(ts[0].name, "a", "F32 sorts before I8");
        assert_eq!((bytes.len() - 8) % 8, 0);
        bytes.resize(bytes.len() + 14, 0);
        let h = parse_header(Path::new("x"), &bytes).expect("valid header");
        assert_eq!(h["a"].start as u64, offs[0]);
        assert_eq!(h["b"].start as u64, offs[1]);
        assert_eq!(h["b"].shape, [2, 3]);
        // One byte short: the last tensor is reported as truncated.
        bytes.pop();
        match parse_header(Path::new("x"), &bytes) {
            Err(ConvertError::Truncated { tensor, .. }) => assert_eq!(tensor.as_deref(), Some("b")),
            other => panic!("expected truncation, got {other:?}"),
        }
    }
}
