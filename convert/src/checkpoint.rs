//! Reading a V4 checkpoint in either layout as dequantised f32 tensors.
//!
//! [`Checkpoint::open`] maps every shard, validates every header, pairs quantised weights with
//! their scales and indexes the result twice: under DeepSeek names (one entry per expert, the
//! converter's unit of work) and under HF names (experts fused), so that a model loader can run a
//! release checkpoint directly with [`Checkpoint::read_hf_f32`].
//!
//! Recognised storage of a weight `W` (DeepSeek stem `S` = `W` without `.weight`):
//! - F8_E4M3 + `S.scale` F8_E8M0 (V4) or `W_scale_inv` F32 (V3 / HF), square tiles of
//!   `quantization_config.weight_block_size` (default 128): `f32(code) * f32(scale)`;
//! - I8/U8 packed E2M1 + `S.scale` or `W_scale` F8_E8M0 `[out, in/B]` (MXFP4, B = 32 in V4):
//!   `value * 2^(e-127)`;
//! - U8/I8 packed E2M1 + `W_scale` F8_E4M3 `[out, in/16]` + `W_scale_2` F32 (NVFP4):
//!   `value * (f32(scale) * scale_2)`;
//! - F32, BF16, F16, F64; I64/I32/... integers. An FP8 or packed FP4 weight without its scale
//!   is an error.
//!
//! In the HF layout a fused expert tensor `[E, R, C]` and each of its scale tensors (`[E, R', C']`,
//! `_scale_2` `[E, parts]`) split evenly per expert and part, w1 before w3.

use crate::codec::{bf16_to_f32, fp8, int4, int8, mxfp4, mxfp8, nvfp4};
use crate::error::ConvertError;
use crate::layout::{self, DeepSeekSource, DtypeClass, ExpertPart, FusedKind, HfLocation, Layout};
use crate::st::{self, Dtype, ShardFile, TensorInfo};
use rayon::prelude::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use v4_formats::{Fp8ScaleKind, PackedMatrix, PackedRows, Storage};

/// A 2-D window `[rows, cols]` (row-major, contiguous) into a stored tensor.
#[derive(Clone, Debug)]
pub(crate) struct View {
    /// Index of the shard in [`Checkpoint::files`].
    pub file: usize,
    /// The stored tensor's name (for errors).
    pub tensor: String,
    pub dtype: Dtype,
    /// Absolute byte offset of the window in the shard.
    pub offset: usize,
    pub rows: usize,
    /// Stored elements per row (bytes for packed FP4).
    pub cols: usize,
    /// Element index of the window's start within the stored tensor.
    pub elem_base: usize,
}

impl View {
    fn whole(file: usize, name: &str, t: &TensorInfo) -> View {
        let cols = t.shape.last().copied().unwrap_or(1);
        let rows = t.numel().checked_div(cols).unwrap_or(0);
        View {
            file,
            tensor: name.to_string(),
            dtype: t.dtype,
            offset: t.start,
            rows,
            cols,
            elem_base: 0,
        }
    }

    /// The `part`-th of `parts` equal row ranges of slot `slot` of `slots`; `None` if the rows
    /// do not divide.
    fn split(&self, slots: usize, slot: usize, parts: usize, part: usize) -> Option<View> {
        if slots == 0 || !self.rows.is_multiple_of(slots * parts) {
            return None;
        }
        let rows = self.rows / (slots * parts);
        let first = slot * parts * rows + part * rows;
        Some(View {
            offset: self.offset + first * self.cols * self.dtype.size(),
            rows,
            elem_base: self.elem_base + first * self.cols,
            ..self.clone()
        })
    }

    /// The window flattened to `[numel, 1]` (for per-tensor scalars such as `_scale_2`).
    fn flat(mut self) -> View {
        self.rows *= self.cols;
        self.cols = 1;
        self
    }

    fn len_bytes(&self) -> usize {
        self.rows * self.cols * self.dtype.size()
    }
}

/// How a logical tensor is stored.
#[derive(Clone, Debug)]
pub(crate) enum Source {
    /// Plain floats or integers.
    Plain(View),
    /// E4M3 codes with E8M0 or F32 scales on square `block` tiles.
    Fp8 { codes: View, scales: View, block: usize },
    /// Packed E2M1 with E8M0 scales per `block` elements.
    Mx { codes: View, scales: View, block: usize },
    /// Packed E2M1 with E4M3 block scales and one F32 tensor scale.
    Nv {
        codes: View,
        scales: View,
        scale2: View,
        block: usize,
    },
    /// Symmetric INT8 codes with one F32 scale per row (Ascend W8A8's `weight_scale` `[out, 1]`).
    Int8 { codes: View, scales: View },
    /// Symmetric INT4 packed two rows per byte along the output dimension (`[out/2, in]`), one F32 scale
    /// per row (Ascend W4A8's `weight_scale` `[out, 1]`; its `scale_bias` is the kernel's, derived).
    Int4 { codes: View, scales: View },
    /// E4M3 codes with one E8M0 (U8) scale per 32 along the row (Ascend's `W8A8_MXFP8`).
    Mx8 { codes: View, scales: View },
}

impl Source {
    fn views(&self) -> Vec<&View> {
        match self {
            Source::Plain(v) => vec![v],
            Source::Fp8 { codes, scales, .. }
            | Source::Mx { codes, scales, .. }
            | Source::Int8 { codes, scales }
            | Source::Int4 { codes, scales }
            | Source::Mx8 { codes, scales } => vec![codes, scales],
            Source::Nv {
                codes,
                scales,
                scale2,
                ..
            } => vec![codes, scales, scale2],
        }
    }

    fn map_views(&self, f: impl Fn(&View) -> Option<View>) -> Option<Source> {
        Some(match self {
            Source::Plain(v) => Source::Plain(f(v)?),
            Source::Fp8 { codes, scales, block } => Source::Fp8 {
                codes: f(codes)?,
                scales: f(scales)?,
                block: *block,
            },
            Source::Mx { codes, scales, block } => Source::Mx {
                codes: f(codes)?,
                scales: f(scales)?,
                block: *block,
            },
            Source::Nv {
                codes,
                scales,
                scale2,
                block,
            } => Source::Nv {
                codes: f(codes)?,
                scales: f(scales)?,
                scale2: f(scale2)?,
                block: *block,
            },
            Source::Int8 { codes, scales } => Source::Int8 {
                codes: f(codes)?,
                scales: f(scales)?,
            },
            Source::Int4 { codes, scales } => Source::Int4 {
                codes: f(codes)?,
                scales: f(scales)?,
            },
            Source::Mx8 { codes, scales } => Source::Mx8 {
                codes: f(codes)?,
                scales: f(scales)?,
            },
        })
    }

    /// The stored weight (codes, or the plain tensor).
    pub(crate) fn main(&self) -> &View {
        match self {
            Source::Plain(v) => v,
            Source::Fp8 { codes, .. }
            | Source::Mx { codes, .. }
            | Source::Nv { codes, .. }
            | Source::Int8 { codes, .. }
            | Source::Int4 { codes, .. }
            | Source::Mx8 { codes, .. } => codes,
        }
    }

    /// Short description for reports, e.g. `F8_E4M3+F8_E8M0/128x128`.
    pub(crate) fn describe(&self) -> String {
        match self {
            Source::Plain(v) => v.dtype.to_string(),
            Source::Fp8 { scales, block, .. } => format!("F8_E4M3+{}/{block}x{block}", scales.dtype),
            Source::Mx { codes, block, .. } => format!("{}(E2M1x2)+F8_E8M0/{block}", codes.dtype),
            Source::Nv { codes, block, .. } => format!("{}(E2M1x2)+F8_E4M3/{block}+F32", codes.dtype),
            Source::Int8 { .. } => "I8+F32/row".into(),
            Source::Int4 { .. } => "I8(INT4 row pairs)+F32/row".into(),
            Source::Mx8 { .. } => format!("F8_E4M3+U8(E8M0)/{}", mxfp8::MX8_BLOCK),
        }
    }

    /// Bytes this tensor occupies in its shards.
    pub(crate) fn stored_bytes(&self) -> u64 {
        self.views().iter().map(|v| v.len_bytes() as u64).sum()
    }
}

/// One logical tensor under its DeepSeek name.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub shape: Vec<usize>,
    /// Logical `[rows, cols]` (leading dimensions flattened).
    pub rows: usize,
    pub cols: usize,
    pub class: DtypeClass,
    pub source: Source,
}

impl Entry {
    pub(crate) fn is_int(&self) -> bool {
        matches!(self.source, Source::Plain(ref v) if is_int_dtype(v.dtype))
    }
}

/// An HF-named logical tensor.
#[derive(Clone, Debug)]
enum HfTensor {
    Single(String),
    Fused {
        prefix: String,
        kind: FusedKind,
        experts: usize,
    },
}

/// A checkpoint directory in the DeepSeek release layout or the HF layout, single-file or sharded
/// (`model.safetensors.index.json`), memory-mapped. Reads give dequantised f32 under either
/// naming scheme.
pub struct Checkpoint {
    dir: PathBuf,
    layout: Layout,
    files: Vec<ShardFile>,
    config: Option<Value>,
    entries: BTreeMap<String, Entry>,
    hf: BTreeMap<String, HfTensor>,
}

/// The name the model crate uses for a release-layout checkpoint reader.
pub type NativeCheckpoint = Checkpoint;

fn is_int_dtype(d: Dtype) -> bool {
    matches!(
        d,
        Dtype::I64 | Dtype::I32 | Dtype::I16 | Dtype::I8 | Dtype::U8 | Dtype::U16 | Dtype::U32
    )
}

fn is_float_dtype(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::BF16 | Dtype::F16 | Dtype::F64)
}

impl Checkpoint {
    /// Opens `dir`: maps and validates every shard, pairs weights with their scales, maps names.
    /// Fails with a [`ConvertError`] naming the file and tensor on any inconsistency.
    pub fn open(dir: &Path) -> Result<Checkpoint, ConvertError> {
        let files = st::open_dir(dir)?;
        let config_path = dir.join("config.json");
        let config = if config_path.is_file() {
            let text = std::fs::read(&config_path).map_err(|e| ConvertError::io(&config_path, e))?;
            Some(
                serde_json::from_slice::<Value>(&text).map_err(|e| ConvertError::Json {
                    file: config_path.clone(),
                    reason: format!("not valid JSON: {e}"),
                })?,
            )
        } else {
            None
        };
        let block = fp8_block_size(config.as_ref(), &config_path)?;
        let stored = pair_scales(&files, block)?;
        let layout = Layout::detect(stored.keys().map(String::as_str));
        let mut ck = Checkpoint {
            dir: dir.to_path_buf(),
            layout,
            files,
            config,
            entries: BTreeMap::new(),
            hf: BTreeMap::new(),
        };
        for (name, (source, shape)) in stored {
            match layout {
                Layout::DeepSeek => ck.add_entry(name.clone(), &name, source, shape)?,
                Layout::Hf => ck.add_hf_stored(&name, source, shape)?,
            }
        }
        ck.index_hf()?;
        Ok(ck)
    }

    /// The directory this checkpoint was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The layout the files use.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// `config.json`, if the directory has one.
    pub fn config(&self) -> Option<&Value> {
        self.config.as_ref()
    }

    /// Logical tensor names in the DeepSeek layout (one per expert weight), in natural order.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.entries.keys().cloned().collect();
        v.sort_by(|a, b| layout::natural_cmp(a, b));
        v
    }

    /// Logical shape of DeepSeek tensor `name` (`[out, in]` for quantised weights).
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.entries.get(name).map(|e| e.shape.clone())
    }

    /// Dequantised values of DeepSeek tensor `name`, row-major.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>, ConvertError> {
        let e = self.entry(name)?;
        let mut out = vec![0f32; e.rows * e.cols];
        self.decode_all(name, e, &mut out)?;
        Ok(out)
    }

    /// Integer values of DeepSeek tensor `name` (e.g. `layers.0.ffn.gate.tid2eid`).
    pub fn read_i64(&self, name: &str) -> Result<Vec<i64>, ConvertError> {
        let e = self.entry(name)?;
        self.read_ints(name, e)
    }

    /// Logical tensor names in the HF layout (experts fused), in natural order.
    pub fn hf_tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.hf.keys().cloned().collect();
        v.sort_by(|a, b| layout::natural_cmp(a, b));
        v
    }

    /// Shape of HF tensor `name` (`[E, 2I, D]` for `gate_up_proj`, `[E, D, I]` for `down_proj`).
    pub fn hf_shape(&self, name: &str) -> Option<Vec<usize>> {
        match self.hf.get(name)? {
            HfTensor::Single(ds) => self.shape(ds),
            HfTensor::Fused {
                prefix,
                kind,
                experts,
            } => {
                let parts = kind.parts();
                let e = self.entries.get(&layout::expert_name(prefix, 0, parts[0]))?;
                Some(vec![*experts, parts.len() * e.rows, e.cols])
            }
        }
    }

    /// Dequantised values of HF tensor `name`, row-major; fused experts are assembled from the
    /// per-expert weights (w1 rows then w3 rows per expert).
    pub fn read_hf_f32(&self, name: &str) -> Result<Vec<f32>, ConvertError> {
        match self.hf.get(name) {
            Some(HfTensor::Single(ds)) => self.read_f32(ds),
            Some(HfTensor::Fused { experts, .. }) => self.read_hf_experts_f32(name, 0..*experts),
            None => Err(ConvertError::NoSuchTensor { name: name.into() }),
        }
    }

    /// Experts `experts` of fused HF tensor `name`, dequantised (`[experts.len(), rows, cols]`
    /// row-major); the other experts' bytes are not read.
    pub fn read_hf_experts_f32(&self, name: &str, experts: Range<usize>) -> Result<Vec<f32>, ConvertError> {
        let members = self.hf_experts(name, experts)?;
        let first = self.entry(&members[0])?;
        let n = first.rows * first.cols;
        let mut out = vec![0f32; n * members.len()];
        out.par_chunks_mut(n)
            .zip(members.par_iter())
            .try_for_each(|(o, m)| self.decode_all(m, self.entry(m)?, o))?;
        Ok(out)
    }

    /// The DeepSeek tensors of experts `experts` of fused HF tensor `name`, in storage order.
    fn hf_experts(&self, name: &str, experts: Range<usize>) -> Result<Vec<String>, ConvertError> {
        let Some(HfTensor::Fused {
            prefix,
            kind,
            experts: total,
        }) = self.hf.get(name)
        else {
            return Err(ConvertError::NoSuchTensor { name: name.into() });
        };
        if experts.is_empty() || experts.end > *total {
            return Err(ConvertError::Unsupported {
                tensor: name.into(),
                reason: format!("experts {experts:?} asked of {total}"),
            });
        }
        Ok(experts
            .flat_map(|e| {
                kind.parts()
                    .iter()
                    .map(move |&p| layout::expert_name(prefix, e, p))
            })
            .collect())
    }

    /// The DeepSeek tensors that make up HF tensor `name`, in storage order (for fused experts:
    /// expert 0 w1, expert 0 w3, expert 1 w1, ...; or expert 0 w2, expert 1 w2, ...).
    pub fn hf_members(&self, name: &str) -> Option<Vec<String>> {
        match self.hf.get(name)? {
            HfTensor::Single(ds) => Some(vec![ds.clone()]),
            HfTensor::Fused { experts, .. } => self.hf_experts(name, 0..*experts).ok(),
        }
    }

    /// HF tensor `name` in its stored precision, sharing the memory map: one matrix for a 2-D
    /// tensor, one per expert (w1 over w3 for `gate_up_proj`) for fused experts. `None` when it is
    /// stored as F32 / F16 / F64 or integers, which gain nothing from staying as stored. Scales (and
    /// FP8 codes) are checked for NaN, as a decoding read would.
    pub fn read_hf_packed(&self, name: &str) -> Result<Option<Vec<PackedMatrix>>, ConvertError> {
        let members = self
            .hf_members(name)
            .ok_or_else(|| ConvertError::NoSuchTensor { name: name.into() })?;
        self.packed_members(name, &members)
    }

    /// Experts `experts` of fused HF tensor `name` in their stored precision, as
    /// [`read_hf_packed`](Self::read_hf_packed) gives them; the other experts' bytes are not touched.
    pub fn read_hf_experts_packed(
        &self,
        name: &str,
        experts: Range<usize>,
    ) -> Result<Option<Vec<PackedMatrix>>, ConvertError> {
        let members = self.hf_experts(name, experts)?;
        self.packed_members(name, &members)
    }

    /// The stored form of the DeepSeek tensors `members` of HF tensor `name`, one matrix per HF
    /// matrix (w1 over w3 for `gate_up_proj`).
    fn packed_members(
        &self,
        name: &str,
        members: &[String],
    ) -> Result<Option<Vec<PackedMatrix>>, ConvertError> {
        let per_matrix = match self.hf.get(name) {
            Some(HfTensor::Fused { kind, .. }) => kind.parts().len(),
            _ => 1,
        };
        let mut rows = Vec::with_capacity(members.len());
        for member in members {
            match self.packed_rows(self.entry(member)?)? {
                Some(r) => rows.push(r),
                None => return Ok(None),
            }
        }
        let mut matrices = Vec::with_capacity(members.len() / per_matrix);
        let mut rows = rows.into_iter();
        for member in members.chunks(per_matrix) {
            let parts: Vec<PackedRows> = rows.by_ref().take(member.len()).collect();
            let matrix = PackedMatrix::new(parts).map_err(|reason| ConvertError::Unsupported {
                tensor: name.into(),
                reason,
            })?;
            matrices.push(matrix);
        }
        Ok(Some(matrices))
    }

    /// The stored form of `e`, or `None` for storage that is not worth keeping (F32 and wider).
    fn packed_rows(&self, e: &Entry) -> Result<Option<PackedRows>, ConvertError> {
        let bytes = |v: &View| self.files[v.file].shared_bytes(v.offset..v.offset + v.len_bytes());
        let (storage, data, scales) = match &e.source {
            Source::Plain(v) if v.dtype == Dtype::BF16 => {
                (Storage::Bf16, bytes(v), v4_formats::Bytes::from_vec(vec![]))
            }
            Source::Plain(_) => return Ok(None),
            Source::Fp8 { codes, scales, block } => {
                let scale = match scales.dtype {
                    Dtype::F8E8M0 => Fp8ScaleKind::E8m0,
                    _ => Fp8ScaleKind::F32,
                };
                if let Some(i) = self.view_bytes(codes).iter().position(|&c| c & 0x7F == 0x7F) {
                    return Err(self.non_finite(codes, codes.elem_base + i));
                }
                (Storage::Fp8 { block: *block, scale }, bytes(codes), bytes(scales))
            }
            Source::Mx { codes, scales, block } => {
                (Storage::Mxfp4 { block: *block }, bytes(codes), bytes(scales))
            }
            Source::Nv {
                codes,
                scales,
                scale2,
                block,
            } => {
                let storage = Storage::Nvfp4 {
                    block: *block,
                    scale2: self.scale2(scale2)?,
                };
                (storage, bytes(codes), bytes(scales))
            }
            Source::Int8 { codes, scales } => (Storage::Int8, bytes(codes), bytes(scales)),
            Source::Int4 { codes, scales } => (Storage::Int4, bytes(codes), bytes(scales)),
            Source::Mx8 { codes, scales } => {
                if let Some(i) = self.view_bytes(codes).iter().position(|&c| c & 0x7F == 0x7F) {
                    return Err(self.non_finite(codes, codes.elem_base + i));
                }
                (Storage::Mxfp8, bytes(codes), bytes(scales))
            }
        };
        let nan_scale = match storage {
            Storage::Fp8 {
                scale: Fp8ScaleKind::E8m0,
                ..
            }
            | Storage::Mxfp4 { .. }
            | Storage::Mxfp8 => scales.as_slice().iter().position(|&s| s == 0xFF),
            Storage::Nvfp4 { .. } => scales.as_slice().iter().position(|&s| s & 0x7F == 0x7F),
            Storage::Int8 | Storage::Int4 => scales
                .as_slice()
                .chunks_exact(4)
                .position(|b| !f32::from_le_bytes([b[0], b[1], b[2], b[3]]).is_finite()),
            _ => None,
        };
        if let (
            Some(i),
            Source::Fp8 { scales: v, .. }
            | Source::Mx { scales: v, .. }
            | Source::Nv { scales: v, .. }
            | Source::Int8 { scales: v, .. }
            | Source::Int4 { scales: v, .. }
            | Source::Mx8 { scales: v, .. },
        ) = (nan_scale, &e.source)
        {
            return Err(self.non_finite(v, v.elem_base + i));
        }
        PackedRows::new(e.rows, e.cols, storage, data, scales)
            .map(Some)
            .map_err(|reason| self.bad_entry(e.source.main(), reason))
    }

    /// Bytes HF tensor `name` occupies in its shards (codes and scales).
    pub fn hf_stored_bytes(&self, name: &str) -> Option<u64> {
        let members = self.hf_members(name)?;
        members
            .iter()
            .map(|m| Some(self.entries.get(m)?.source.stored_bytes()))
            .sum()
    }

    /// How HF tensor `name` is stored (its first member's, e.g. `F8_E4M3+F8_E8M0/128x128` or `BF16`).
    pub fn hf_storage(&self, name: &str) -> Option<String> {
        let first = self.hf_members(name)?.into_iter().next()?;
        Some(self.entries.get(&first)?.source.describe())
    }

    /// Whether HF tensor `name` holds integers (the hash-routing tables), read with
    /// [`read_hf_i64`](Self::read_hf_i64).
    pub fn hf_is_int(&self, name: &str) -> bool {
        matches!(self.hf.get(name), Some(HfTensor::Single(ds)) if self.entries.get(ds).is_some_and(Entry::is_int))
    }

    /// Integer values of HF tensor `name`.
    pub fn read_hf_i64(&self, name: &str) -> Result<Vec<i64>, ConvertError> {
        match self.hf.get(name) {
            Some(HfTensor::Single(ds)) => self.read_i64(ds),
            _ => Err(ConvertError::NoSuchTensor { name: name.into() }),
        }
    }

    pub(crate) fn files(&self) -> &[ShardFile] {
        &self.files
    }

    pub(crate) fn entry(&self, name: &str) -> Result<&Entry, ConvertError> {
        self.entries
            .get(name)
            .ok_or_else(|| ConvertError::NoSuchTensor { name: name.into() })
    }

    /// Bytes of a view.
    pub(crate) fn view_bytes(&self, v: &View) -> &[u8] {
        &self.files[v.file].bytes()[v.offset..v.offset + v.len_bytes()]
    }

    fn non_finite(&self, v: &View, index: usize) -> ConvertError {
        ConvertError::NonFinite {
            file: self.files[v.file].path.clone(),
            tensor: v.tensor.clone(),
            index,
        }
    }

    fn bad_entry(&self, v: &View, reason: impl Into<String>) -> ConvertError {
        ConvertError::Checkpoint {
            file: self.files[v.file].path.clone(),
            tensor: v.tensor.clone(),
            reason: reason.into(),
        }
    }

    /// Decodes logical rows `[r0, r0 + out.len()/cols)` of `e` into `out`, rejecting NaN/Inf.
    pub(crate) fn decode_rows(&self, e: &Entry, r0: usize, out: &mut [f32]) -> Result<(), ConvertError> {
        let n = out.len() / e.cols.max(1);
        let bad = match &e.source {
            Source::Plain(v) => {
                let sz = v.dtype.size();
                let b = self.view_bytes(v);
                let bytes = &b[r0 * v.cols * sz..(r0 + n) * v.cols * sz];
                decode_plain(v.dtype, bytes, out)
                    .ok_or_else(|| self.bad_entry(v, format!("{} is not a float dtype", v.dtype)))?
            }
            Source::Fp8 { codes, scales, block } => {
                let sb = self.view_bytes(scales);
                let sc = match scales.dtype {
                    Dtype::F8E8M0 => fp8::Fp8Scales::E8m0(sb),
                    _ => fp8::Fp8Scales::F32Le(sb),
                };
                fp8::dequantize_rows(self.view_bytes(codes), sc, e.cols, *block, r0, out)
            }
            Source::Mx { codes, scales, block } => {
                let (pc, sc) = (codes.cols, scales.cols);
                let p = &self.view_bytes(codes)[r0 * pc..(r0 + n) * pc];
                let s = &self.view_bytes(scales)[r0 * sc..(r0 + n) * sc];
                mxfp4::dequantize_rows(p, s, *block, out)
            }
            Source::Nv {
                codes,
                scales,
                scale2,
                block,
            } => {
                let (pc, sc) = (codes.cols, scales.cols);
                let p = &self.view_bytes(codes)[r0 * pc..(r0 + n) * pc];
                let s = &self.view_bytes(scales)[r0 * sc..(r0 + n) * sc];
                let s2 = self.scale2(scale2)?;
                nvfp4::dequantize_rows(p, s, s2, *block, out)
            }
            Source::Int8 { codes, scales } => {
                let c = &self.view_bytes(codes)[r0 * e.cols..(r0 + n) * e.cols];
                let s: Vec<f32> = self.view_bytes(scales)[r0 * 4..(r0 + n) * 4]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                int8::dequantize_rows(c, &s, e.cols, out);
                s.iter().position(|v| !v.is_finite()).map(|r| r * e.cols)
            }
            Source::Int4 { codes, scales } => {
                let s: Vec<f32> = self.view_bytes(scales)[r0 * 4..(r0 + n) * 4]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                int4::dequantize_rows(self.view_bytes(codes), &s, e.cols, r0, out);
                s.iter().position(|v| !v.is_finite()).map(|r| r * e.cols)
            }
            Source::Mx8 { codes, scales } => {
                let sc = scales.cols;
                let c = &self.view_bytes(codes)[r0 * e.cols..(r0 + n) * e.cols];
                let s = &self.view_bytes(scales)[r0 * sc..(r0 + n) * sc];
                mxfp8::dequantize_rows(c, s, e.cols, out)
            }
        };
        match bad {
            Some(i) => Err(self.non_finite(e.source.main(), e.source.main().elem_base + r0 * e.cols + i)),
            None => Ok(()),
        }
    }

    /// The F32 tensor scale of an NVFP4 weight; must be finite and positive.
    pub(crate) fn scale2(&self, v: &View) -> Result<f32, ConvertError> {
        let b = self.view_bytes(v);
        let s = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if !s.is_finite() {
            return Err(self.non_finite(v, v.elem_base));
        }
        Ok(s)
    }

    fn decode_all(&self, name: &str, e: &Entry, out: &mut [f32]) -> Result<(), ConvertError> {
        if e.is_int() {
            return Err(ConvertError::Unsupported {
                tensor: name.into(),
                reason: "integer tensor: use read_i64".into(),
            });
        }
        const BAND: usize = 64;
        let cols = e.cols.max(1);
        out.par_chunks_mut(BAND * cols)
            .enumerate()
            .try_for_each(|(i, o)| self.decode_rows(e, i * BAND, o))
    }

    pub(crate) fn read_ints(&self, name: &str, e: &Entry) -> Result<Vec<i64>, ConvertError> {
        let Source::Plain(v) = &e.source else {
            return Err(ConvertError::Unsupported {
                tensor: name.into(),
                reason: "quantised float tensor: use read_f32".into(),
            });
        };
        let b = self.view_bytes(v);
        let out = match v.dtype {
            Dtype::I64 => b
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
                .collect(),
            Dtype::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as i64)
                .collect(),
            Dtype::U32 => b
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap_or_default()) as i64)
                .collect(),
            Dtype::I16 => b
                .chunks_exact(2)
                .map(|c| i16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            Dtype::U16 => b
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as i64)
                .collect(),
            Dtype::I8 => b.iter().map(|&x| x as i8 as i64).collect(),
            Dtype::U8 => b.iter().map(|&x| x as i64).collect(),
            d => {
                return Err(ConvertError::Unsupported {
                    tensor: name.into(),
                    reason: format!("{d} tensor: use read_f32"),
                })
            }
        };
        Ok(out)
    }

    /// Registers logical tensor `name` (DeepSeek) stored as `source` with logical `shape`.
    fn add_entry(
        &mut self,
        name: String,
        stored: &str,
        source: Source,
        shape: Vec<usize>,
    ) -> Result<(), ConvertError> {
        let main = source.main().clone();
        let class = layout::dtype_class(&name)
            .ok_or_else(|| self.bad_entry(&main, format!("`{stored}` is not a DeepSeek-V4 tensor name")))?;
        let int_ok = class == DtypeClass::I64;
        let plain_dtype = matches!(source, Source::Plain(_)).then_some(main.dtype);
        match plain_dtype {
            Some(d) if int_ok && !is_int_dtype(d) => {
                return Err(self.bad_entry(&main, format!("expected an integer tensor, found {d}")))
            }
            Some(d @ (Dtype::F8E4M3 | Dtype::I8 | Dtype::U8)) if !int_ok => {
                return Err(self.bad_entry(&main, format!("{d} weight without a scale tensor")))
            }
            Some(d) if !int_ok && !is_float_dtype(d) => {
                return Err(self.bad_entry(&main, format!("unsupported dtype {d} for a float weight")))
            }
            None if int_ok => {
                return Err(self.bad_entry(&main, "expected an integer tensor, found a quantised one"))
            }
            _ => {}
        }
        if !matches!(source, Source::Plain(_)) && shape.len() != 2 {
            return Err(self.bad_entry(&main, "a quantised weight must be a matrix"));
        }
        let (rows, cols) = match shape.split_last() {
            Some((&c, lead)) => (lead.iter().product(), c),
            None => (1, 1),
        };
        validate_source(&source, rows, cols).map_err(|r| self.bad_entry(&main, r))?;
        let entry = Entry {
            shape,
            rows,
            cols,
            class,
            source,
        };
        if self.entries.insert(name.clone(), entry).is_some() {
            return Err(self.bad_entry(&main, format!("`{name}` is stored twice")));
        }
        Ok(())
    }

    /// Registers an HF-named stored tensor, splitting fused experts.
    fn add_hf_stored(&mut self, name: &str, source: Source, shape: Vec<usize>) -> Result<(), ConvertError> {
        let main = source.main().clone();
        match layout::from_hf(name) {
            Some(DeepSeekSource::Tensor(ds)) => self.add_entry(ds, name, source, shape),
            Some(DeepSeekSource::FusedExperts { prefix, kind }) => {
                let [experts, rows, cols] = shape[..] else {
                    return Err(self.bad_entry(&main, "a fused expert tensor must be [E, rows, cols]"));
                };
                let parts = kind.parts();
                if rows % parts.len() != 0 {
                    return Err(self.bad_entry(&main, "odd row count in gate_up_proj"));
                }
                for e in 0..experts {
                    for (pi, &part) in parts.iter().enumerate() {
                        let split = source
                            .map_views(|v| v.split(experts, e, parts.len(), pi))
                            .ok_or_else(|| {
                                self.bad_entry(&main, "scale tensors do not split evenly per expert")
                            })?;
                        let member = layout::expert_name(&prefix, e, part);
                        self.add_entry(member, name, split, vec![rows / parts.len(), cols])?;
                    }
                }
                Ok(())
            }
            None => Err(self.bad_entry(
                &main,
                format!("`{name}` is not a DeepSeek-V4 tensor name (HF layout)"),
            )),
        }
    }

    /// Builds the HF index; fused tensors need every expert 0..E with all parts and one shape.
    fn index_hf(&mut self) -> Result<(), ConvertError> {
        // HF fused name -> (block prefix, kind, experts and parts present).
        type Parts = (String, FusedKind, BTreeSet<(usize, ExpertPart)>);
        let mut fused: BTreeMap<String, Parts> = BTreeMap::new();
        for name in self.entries.keys() {
            match layout::to_hf(name) {
                Some(HfLocation::Tensor(h)) => {
                    self.hf.insert(h, HfTensor::Single(name.clone()));
                }
                Some(HfLocation::Expert {
                    fused: f,
                    expert,
                    part,
                }) => {
                    let kind = if part == ExpertPart::W2 {
                        FusedKind::Down
                    } else {
                        FusedKind::GateUp
                    };
                    let prefix = name.split(".ffn.experts.").next().unwrap_or_default().to_string();
                    fused
                        .entry(f)
                        .or_insert((prefix, kind, BTreeSet::new()))
                        .2
                        .insert((expert, part));
                }
                None => {}
            }
        }
        for (hf_name, (prefix, kind, have)) in fused {
            let experts = have.iter().map(|(e, _)| e + 1).max().unwrap_or(0);
            let (e0, p0) = have.iter().next().copied().unwrap_or((0, ExpertPart::W1));
            let some = &self.entries[&layout::expert_name(&prefix, e0, p0)];
            let want = some.shape.clone();
            let file = self.files[some.source.main().file].path.clone();
            for e in 0..experts {
                for &p in kind.parts() {
                    let n = layout::expert_name(&prefix, e, p);
                    if self.entries.get(&n).is_none_or(|x| x.shape != want) {
                        return Err(ConvertError::Checkpoint {
                            file,
                            tensor: n,
                            reason: format!(
                                "experts of `{prefix}` are incomplete or differ in shape \
                                 (need experts 0..{experts}, each part {want:?})"
                            ),
                        });
                    }
                }
            }
            self.hf.insert(
                hf_name,
                HfTensor::Fused {
                    prefix,
                    kind,
                    experts,
                },
            );
        }
        Ok(())
    }
}

/// Decodes plain floats; `None` if `dtype` is not a float dtype, `Some(Some(i))` for a NaN/Inf
/// at element `i`.
fn decode_plain(dtype: Dtype, bytes: &[u8], out: &mut [f32]) -> Option<Option<usize>> {
    let mut bad = false;
    match dtype {
        Dtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                let b = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                bad |= b & 0x7F80_0000 == 0x7F80_0000;
                *o = f32::from_bits(b);
            }
        }
        Dtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                let b = u16::from_le_bytes([c[0], c[1]]);
                bad |= b & 0x7F80 == 0x7F80;
                *o = bf16_to_f32(b);
            }
        }
        Dtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                let b = u16::from_le_bytes([c[0], c[1]]);
                bad |= b & 0x7C00 == 0x7C00;
                *o = half::f16::from_bits(b).to_f32();
            }
        }
        Dtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                let v = f64::from_le_bytes(c.try_into().unwrap_or_default()) as f32;
                bad |= !v.is_finite();
                *o = v;
            }
        }
        _ => return None,
    }
    Some(if bad {
        out.iter().position(|v| !v.is_finite())
    } else {
        None
    })
}

/// Checks that a quantised source's scale grid fits its logical `[rows, cols]`.
fn validate_source(source: &Source, rows: usize, cols: usize) -> Result<(), String> {
    let want = |v: &View, r: usize, c: usize, what: &str| {
        if v.rows == r && v.cols == c {
            Ok(())
        } else {
            Err(format!(
                "{what} `{}` is [{}, {}], expected [{r}, {c}] for a [{rows}, {cols}] weight",
                v.tensor, v.rows, v.cols
            ))
        }
    };
    match source {
        Source::Plain(_) => Ok(()),
        Source::Fp8 { scales, block, .. } => {
            want(scales, fp8::grid(rows, *block), fp8::grid(cols, *block), "scale")
        }
        Source::Mx { scales, block, .. } | Source::Nv { scales, block, .. } => {
            want(scales, rows, cols / block, "scale")?;
            if let Source::Nv { scale2, .. } = source {
                want(scale2, 1, 1, "tensor scale")?;
            }
            Ok(())
        }
        Source::Int8 { scales, .. } | Source::Int4 { scales, .. } => want(scales, rows, 1, "scale"),
        Source::Mx8 { scales, .. } => want(scales, rows, mxfp8::scales_per_row(cols), "scale"),
    }
}

/// Square FP8 tile edge from `quantization_config.weight_block_size` (default 128).
fn fp8_block_size(config: Option<&Value>, path: &Path) -> Result<usize, ConvertError> {
    let Some(bs) = config.and_then(|c| c.pointer("/quantization_config/weight_block_size")) else {
        return Ok(fp8::FP8_BLOCK);
    };
    match bs
        .as_array()
        .map(|a| a.iter().map(Value::as_u64).collect::<Vec<_>>())
        .as_deref()
    {
        Some([Some(a), Some(b)]) if a == b && *a > 0 => Ok(*a as usize),
        _ => Err(ConvertError::Json {
            file: path.to_path_buf(),
            reason: format!(
                "quantization_config.weight_block_size must be two equal positive integers, found {bs}"
            ),
        }),
    }
}

/// An INT8 weight's `weight_offset` (AscendV1 writes zeros): absent, or all zeros; an asymmetric
/// weight is refused naming the tensor.
fn check_zero_offset(
    all: &BTreeMap<&str, (usize, &TensorInfo)>,
    files: &[ShardFile],
    offset: &str,
) -> Result<(), ConvertError> {
    let Some(&(fi, t)) = all.get(offset) else {
        return Ok(());
    };
    let bytes = &files[fi].bytes()[t.start..t.start + t.len];
    let zero = match t.dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]) == 0.0),
        _ => false,
    };
    if zero {
        return Ok(());
    }
    Err(ConvertError::Checkpoint {
        file: files[fi].path.clone(),
        tensor: offset.to_string(),
        reason: format!(
            "asymmetric INT8 ({} offsets, not all 0.0) is not supported; v4 reads symmetric W8A8",
            t.dtype
        ),
    })
}

/// Pairs every stored weight with its scale tensors. Returns stored name -> (source, logical
/// shape), scale tensors folded into their weight.
fn pair_scales(
    files: &[ShardFile],
    block: usize,
) -> Result<BTreeMap<String, (Source, Vec<usize>)>, ConvertError> {
    let mut all: BTreeMap<&str, (usize, &TensorInfo)> = BTreeMap::new();
    for (fi, f) in files.iter().enumerate() {
        for (n, t) in &f.tensors {
            all.insert(n, (fi, t));
        }
    }
    let view = |n: &str| all.get(n).map(|&(fi, t)| View::whole(fi, n, t));
    let err = |fi: usize, n: &str, reason: String| ConvertError::Checkpoint {
        file: files[fi].path.clone(),
        tensor: n.to_string(),
        reason,
    };
    let mut consumed: BTreeSet<String> = BTreeSet::new();
    let mut out = BTreeMap::new();
    for (&name, &(fi, t)) in &all {
        if !matches!(t.dtype, Dtype::F8E4M3 | Dtype::I8 | Dtype::U8) {
            continue;
        }
        let stem_scale = name.strip_suffix(".weight").map(|s| format!("{s}.scale"));
        let cands: Vec<String> = stem_scale
            .into_iter()
            .chain([format!("{name}_scale_inv"), format!("{name}_scale")])
            .filter(|c| all.contains_key(c.as_str()))
            .collect();
        let scale2_name = format!("{name}_scale_2");
        let scale2 = view(&scale2_name).map(View::flat);
        let has_scale2 = scale2.is_some();
        let codes = View::whole(fi, name, t);
        let scales = match &cands[..] {
            [] if scale2.is_none() => continue,
            [] => return Err(err(fi, name, format!("`{scale2_name}` without a block scale"))),
            [one] => view(one).unwrap_or_else(|| codes.clone()),
            _ => {
                return Err(err(
                    fi,
                    name,
                    format!("several scale tensors: {}", cands.join(", ")),
                ))
            }
        };
        let packed_shape = || {
            let mut s = t.shape.clone();
            if let Some(last) = s.last_mut() {
                *last *= 2;
            }
            s
        };
        let (source, shape) = match (t.dtype, scales.dtype, &scale2) {
            (Dtype::F8E4M3, Dtype::F8E8M0 | Dtype::F32, None) => {
                (Source::Fp8 { codes, scales, block }, t.shape.clone())
            }
            // Ascend (msModelSlim AscendV1): `weight_scale` beside `weight`.
            (Dtype::F8E4M3, Dtype::U8, None) => (Source::Mx8 { codes, scales }, t.shape.clone()),
            (Dtype::I8, Dtype::F32, None) => {
                let offset = format!("{}_offset", name);
                check_zero_offset(&all, files, &offset)?;
                consumed.insert(offset);
                let bias = name
                    .strip_suffix(".weight")
                    .map(|stem| format!("{stem}.scale_bias"))
                    .filter(|b| all.contains_key(b.as_str()));
                match (bias, &t.shape[..]) {
                    // W4A8_DYNAMIC: two rows per byte; `scale_bias` belongs to the kernel (derived from the codes).
                    (Some(bias), [pairs, cols]) => {
                        consumed.insert(bias);
                        (Source::Int4 { codes, scales }, vec![2 * pairs, *cols])
                    }
                    (Some(_), _) => return Err(err(fi, name, "an INT4 weight must be a matrix".into())),
                    (None, _) => (Source::Int8 { codes, scales }, t.shape.clone()),
                }
            }
            (Dtype::I8 | Dtype::U8, Dtype::F8E8M0 | Dtype::U8, None)
            | (Dtype::I8 | Dtype::U8, Dtype::F8E4M3, Some(_)) => {
                let inner = 2 * codes.cols;
                if scales.cols == 0
                    || !inner.is_multiple_of(scales.cols)
                    || !(inner / scales.cols).is_multiple_of(2)
                {
                    return Err(err(
                        fi,
                        name,
                        format!("{} scales per row do not divide {inner} inputs", scales.cols),
                    ));
                }
                let block = inner / scales.cols;
                let source = match scale2 {
                    Some(scale2) if scale2.dtype == Dtype::F32 => Source::Nv {
                        codes,
                        scales,
                        scale2,
                        block,
                    },
                    Some(s) => {
                        return Err(err(
                            fi,
                            name,
                            format!("tensor scale `{}` must be F32, is {}", s.tensor, s.dtype),
                        ))
                    }
                    None => Source::Mx { codes, scales, block },
                };
                (source, packed_shape())
            }
            (c, s, s2) => {
                return Err(err(
                    fi,
                    name,
                    format!(
                        "unsupported pairing: {c} weight with {s} scale `{}`{}",
                        scales.tensor,
                        if s2.is_some() { " and a tensor scale" } else { "" }
                    ),
                ))
            }
        };
        consumed.extend(cands);
        if has_scale2 {
            consumed.insert(scale2_name);
        }
        out.insert(name.to_string(), (source, shape));
    }
    for (&name, &(fi, t)) in &all {
        if !consumed.contains(name) && !out.contains_key(name) {
            out.insert(
                name.to_string(),
                (Source::Plain(View::whole(fi, name, t)), t.shape.clone()),
            );
        }
    }
    Ok(out)
}
