//! Weight matrices kept in their stored precision.
//!
//! A [`PackedMatrix`] is a `[rows, cols]` matrix (a checkpoint's `[out, in]` weight) made of one or
//! more row blocks ([`PackedRows`]), each in the storage its checkpoint used: BF16, F32, DeepSeek's FP8
//! (E4M3 with 128x128 E8M0 tiles), MXFP4 (E2M1 with an E8M0 scale per 32), NVFP4, or Ascend's INT8 (one
//! scale per row), INT4 (one scale per row, two rows per byte) and MXFP8 (E4M3 with an E8M0 scale per 32). A block borrows
//! its bytes from their owner (a memory-mapped shard, or a vector), so a model can hold the release
//! checkpoint as it is on disk. HF's fused expert tensors are such stacks: `gate_up_proj[e]` is
//! expert `e`'s `w1` rows over its `w3` rows.
//!
//! Computing on one is `y = x W^T` ([`PackedMatmul`]): [`ReferenceMatmul`] decodes one panel of rows
//! at a time into f32 (exactly the converter's dequantisation) and multiplies; a backend can supply
//! a faster kernel that reads the same bytes.

use crate::codec::{bf16_to_f32, fp8, int4, int8, mxfp4, mxfp8, nvfp4};
use rayon::prelude::*;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

/// A byte range of a shared owner (a memory map, a vector): cloning never copies the bytes.
#[derive(Clone)]
pub struct Bytes {
    owner: Arc<dyn AsRef<[u8]> + Send + Sync>,
    range: Range<usize>,
}

impl Bytes {
    /// `range` of `owner`'s bytes.
    ///
    /// # Panics
    /// If the range lies outside the owner.
    pub fn new(owner: Arc<dyn AsRef<[u8]> + Send + Sync>, range: Range<usize>) -> Self {
        assert!(
            range.start <= range.end && range.end <= owner.as_ref().as_ref().len(),
            "byte range {range:?} outside its owner"
        );
        Self { owner, range }
    }

    /// Owns `bytes`.
    pub fn from_vec(bytes: Vec<u8>) -> Self {
        let len = bytes.len();
        Self::new(Arc::new(bytes), 0..len)
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.owner.as_ref().as_ref()[self.range.clone()]
    }

    /// Bytes `range` of these bytes, sharing the owner.
    ///
    /// # Panics
    /// If the range lies outside these bytes.
    pub fn slice(&self, range: Range<usize>) -> Bytes {
        assert!(
            range.end <= self.len(),
            "byte range {range:?} outside {} bytes",
            self.len()
        );
        Bytes::new(
            self.owner.clone(),
            self.range.start + range.start..self.range.start + range.end,
        )
    }

    pub fn len(&self) -> usize {
        self.range.len()
    }

    pub fn is_empty(&self) -> bool {
        self.range.is_empty()
    }
}

impl fmt::Debug for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Bytes({})", self.len())
    }
}

/// How the scales of an FP8 block matrix are stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fp8ScaleKind {
    /// One E8M0 byte per tile (V4's `.scale`).
    E8m0,
    /// One little-endian f32 per tile (V3's `weight_scale_inv`).
    F32,
}

/// How a block of rows is stored.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Storage {
    /// Little-endian f32, `[rows, cols]`.
    F32,
    /// BF16, `[rows, cols]`.
    Bf16,
    /// E4M3FN codes `[rows, cols]`, scales on a `block x block` grid `[ceil(rows/b), ceil(cols/b)]`.
    /// The grid is the stored tensor's: a block that starts inside a tile row keeps its offset in
    /// `first_row`.
    Fp8 { block: usize, scale: Fp8ScaleKind },
    /// E2M1 packed two per byte (low nibble first) `[rows, cols/2]`, E8M0 per `block` `[rows, cols/block]`.
    Mxfp4 { block: usize },
    /// E2M1 packed `[rows, cols/2]`, E4M3 per `block` `[rows, cols/block]`, one f32 tensor scale.
    Nvfp4 { block: usize, scale2: f32 },
    /// Symmetric INT8 `[rows, cols]`, one little-endian f32 scale per row `[rows]` (Ascend W8A8).
    Int8,
    /// Symmetric INT4 packed two rows per byte along the output dimension `[rows / 2, cols]` (row `2j`
    /// in the low nibble), one little-endian f32 scale per row `[rows]` (Ascend W4A8's experts).
    Int4,
    /// E4M3FN `[rows, cols]`, E8M0 per 32 along the row `[rows, ceil(cols/32)]` (OCP MXFP8).
    Mxfp8,
}

impl Storage {
    /// A short name for reports: `bf16`, `fp8-e4m3/128`, `mxfp4/32`, ...
    pub fn name(&self) -> String {
        match self {
            Storage::F32 => "f32".into(),
            Storage::Bf16 => "bf16".into(),
            Storage::Fp8 { block, .. } => format!("fp8-e4m3/{block}x{block}"),
            Storage::Mxfp4 { block } => format!("mxfp4/{block}"),
            Storage::Nvfp4 { block, .. } => format!("nvfp4/{block}"),
            Storage::Int8 => "int8/row".into(),
            Storage::Int4 => "int4/row".into(),
            Storage::Mxfp8 => format!("mxfp8/{}", mxfp8::MX8_BLOCK),
        }
    }

    /// Bytes of the codes of a `[rows, cols]` block.
    fn code_bytes(&self, rows: usize, cols: usize) -> usize {
        match self {
            Storage::F32 => rows * cols * 4,
            Storage::Bf16 => rows * cols * 2,
            Storage::Fp8 { .. } | Storage::Int8 | Storage::Mxfp8 => rows * cols,
            Storage::Mxfp4 { .. } | Storage::Nvfp4 { .. } => rows * cols / 2,
            Storage::Int4 => rows.div_ceil(2) * cols,
        }
    }
}

/// One block of rows in one storage: the unit a checkpoint stores (a tensor, or one expert's part).
#[derive(Clone, Debug)]
pub struct PackedRows {
    pub rows: usize,
    pub cols: usize,
    pub storage: Storage,
    /// The codes (or plain values).
    pub data: Bytes,
    /// The scales; empty for plain storage.
    pub scales: Bytes,
}

impl PackedRows {
    /// Checks that the byte lengths match `storage` and the shape.
    pub fn new(
        rows: usize,
        cols: usize,
        storage: Storage,
        data: Bytes,
        scales: Bytes,
    ) -> Result<Self, String> {
        let want = storage.code_bytes(rows, cols);
        if data.len() != want {
            return Err(format!(
                "{} [{rows}, {cols}] needs {want} bytes of codes, found {}",
                storage.name(),
                data.len()
            ));
        }
        let scales_want = match storage {
            Storage::F32 | Storage::Bf16 => 0,
            Storage::Fp8 { block, scale } => {
                let per = if scale == Fp8ScaleKind::F32 { 4 } else { 1 };
                fp8::grid(rows, block) * fp8::grid(cols, block) * per
            }
            Storage::Mxfp4 { block } | Storage::Nvfp4 { block, .. } => {
                if block == 0 || !cols.is_multiple_of(block) || !block.is_multiple_of(2) {
                    return Err(format!("{} needs cols ({cols}) in whole blocks", storage.name()));
                }
                rows * cols / block
            }
            Storage::Int8 | Storage::Int4 => rows * 4,
            Storage::Mxfp8 => rows * mxfp8::scales_per_row(cols),
        };
        if storage == Storage::Int4 && !rows.is_multiple_of(2) {
            return Err(format!(
                "int4 row pairs need an even number of rows, found {rows}"
            ));
        }
        if scales.len() != scales_want {
            return Err(format!(
                "{} [{rows}, {cols}] needs {scales_want} bytes of scales, found {}",
                storage.name(),
                scales.len()
            ));
        }
        Ok(Self {
            rows,
            cols,
            storage,
            data,
            scales,
        })
    }

    /// Bytes held (codes and scales).
    pub fn stored_bytes(&self) -> usize {
        self.data.len() + self.scales.len()
    }

    /// Rows `[r0, r0 + rows)` as a block of their own, sharing the bytes. FP8 blocks split only on
    /// whole scale tiles (`r0` and `rows` multiples of the tile), INT4 only on whole row pairs; `None`
    /// otherwise.
    pub fn rows_range(&self, r0: usize, rows: usize) -> Option<PackedRows> {
        assert!(
            r0 + rows <= self.rows,
            "rows {r0}..{} outside {}",
            r0 + rows,
            self.rows
        );
        let cols = self.cols;
        let scales = match self.storage {
            Storage::F32 | Storage::Bf16 => self.scales.clone(),
            Storage::Fp8 { block, scale } => {
                if !r0.is_multiple_of(block) || !(rows.is_multiple_of(block) || r0 + rows == self.rows) {
                    return None;
                }
                let per_tile_row = fp8::grid(cols, block) * if scale == Fp8ScaleKind::F32 { 4 } else { 1 };
                let first = r0 / block * per_tile_row;
                self.scales
                    .slice(first..first + fp8::grid(rows, block) * per_tile_row)
            }
            Storage::Mxfp4 { block } | Storage::Nvfp4 { block, .. } => {
                self.scales.slice(r0 * cols / block..(r0 + rows) * cols / block)
            }
            Storage::Int8 => self.scales.slice(r0 * 4..(r0 + rows) * 4),
            Storage::Int4 => {
                if !r0.is_multiple_of(2) || !rows.is_multiple_of(2) {
                    return None;
                }
                self.scales.slice(r0 * 4..(r0 + rows) * 4)
            }
            Storage::Mxfp8 => {
                let per_row = mxfp8::scales_per_row(cols);
                self.scales.slice(r0 * per_row..(r0 + rows) * per_row)
            }
        };
        let start = self.storage.code_bytes(r0, cols);
        let data = self
            .data
            .slice(start..start + self.storage.code_bytes(rows, cols));
        Some(PackedRows {
            rows,
            cols,
            storage: self.storage,
            data,
            scales,
        })
    }

    /// Decodes rows `[r0, r0 + out.len() / cols)` into `out` (row-major), exactly as the converter
    /// dequantises: one f32 rounding of `value * scale`.
    pub fn decode_rows(&self, r0: usize, out: &mut [f32]) {
        let cols = self.cols;
        let n = out.len() / cols;
        debug_assert!(out.len() == n * cols && r0 + n <= self.rows);
        let data = self.data.as_slice();
        let scales = self.scales.as_slice();
        match self.storage {
            Storage::F32 => {
                for (o, b) in out.iter_mut().zip(data[r0 * cols * 4..].chunks_exact(4)) {
                    *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            }
            Storage::Bf16 => {
                for (o, b) in out.iter_mut().zip(data[r0 * cols * 2..].chunks_exact(2)) {
                    *o = bf16_to_f32(u16::from_le_bytes([b[0], b[1]]));
                }
            }
            Storage::Fp8 { block, scale } => {
                let scales = match scale {
                    Fp8ScaleKind::E8m0 => fp8::Fp8Scales::E8m0(scales),
                    Fp8ScaleKind::F32 => fp8::Fp8Scales::F32Le(scales),
                };
                fp8::dequantize_rows(data, scales, cols, block, r0, out);
            }
            Storage::Mxfp4 { block } => {
                let packed = &data[r0 * cols / 2..][..n * cols / 2];
                let scales = &scales[r0 * cols / block..][..n * cols / block];
                mxfp4::dequantize_rows(packed, scales, block, out);
            }
            Storage::Nvfp4 { block, scale2 } => {
                let packed = &data[r0 * cols / 2..][..n * cols / 2];
                let scales = &scales[r0 * cols / block..][..n * cols / block];
                nvfp4::dequantize_rows(packed, scales, scale2, block, out);
            }
            Storage::Int8 => {
                let scales: Vec<f32> = scales[r0 * 4..][..n * 4]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                int8::dequantize_rows(&data[r0 * cols..][..n * cols], &scales, cols, out);
            }
            Storage::Int4 => {
                let scales: Vec<f32> = scales[r0 * 4..][..n * 4]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                int4::dequantize_rows(data, &scales, cols, r0, out);
            }
            Storage::Mxfp8 => {
                let per_row = mxfp8::scales_per_row(cols);
                let scales = &scales[r0 * per_row..][..n * per_row];
                mxfp8::dequantize_rows(&data[r0 * cols..][..n * cols], scales, cols, out);
            }
        }
    }
}

/// A `[rows, cols]` weight matrix in its stored precision: row blocks stacked in order.
#[derive(Clone, Debug)]
pub struct PackedMatrix {
    pub rows: usize,
    pub cols: usize,
    parts: Vec<PackedRows>,
}

impl PackedMatrix {
    /// Stacks `parts` (all with the same number of columns).
    pub fn new(parts: Vec<PackedRows>) -> Result<Self, String> {
        let cols = parts
            .first()
            .map(|p| p.cols)
            .ok_or("a matrix needs at least one row block")?;
        if let Some(p) = parts.iter().find(|p| p.cols != cols) {
            return Err(format!(
                "row blocks of {} and {cols} columns cannot stack",
                p.cols
            ));
        }
        Ok(Self {
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            parts,
        })
    }

    /// The row blocks, in order.
    pub fn parts(&self) -> &[PackedRows] {
        &self.parts
    }

    /// Bytes held (codes and scales of every block).
    pub fn stored_bytes(&self) -> usize {
        self.parts.iter().map(PackedRows::stored_bytes).sum()
    }

    /// The storage of every block, e.g. `mxfp4/32`, or `mixed`.
    pub fn storage_name(&self) -> String {
        let first = self.parts[0].storage.name();
        if self.parts.iter().all(|p| p.storage.name() == first) {
            first
        } else {
            "mixed".into()
        }
    }

    /// The matrix cut into `pieces` equal row bands (a grouped projection's groups), sharing the bytes;
    /// `None` when a cut would split an FP8 scale tile.
    pub fn split_rows(&self, pieces: usize) -> Option<Vec<PackedMatrix>> {
        if pieces == 0 || !self.rows.is_multiple_of(pieces) {
            return None;
        }
        let band = self.rows / pieces;
        (0..pieces)
            .map(|i| {
                let mut parts = Vec::new();
                let mut start = 0;
                for part in &self.parts {
                    let lo = (i * band).max(start);
                    let hi = ((i + 1) * band).min(start + part.rows);
                    if lo < hi {
                        parts.push(part.rows_range(lo - start, hi - lo)?);
                    }
                    start += part.rows;
                }
                PackedMatrix::new(parts).ok()
            })
            .collect()
    }

    /// Decodes rows `rows` into `out` (`[rows.len(), cols]`), across block boundaries.
    pub fn decode_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        assert_eq!(out.len(), rows.len() * self.cols, "output is not [rows, cols]");
        let mut start = 0;
        let mut out = out;
        for part in &self.parts {
            let end = start + part.rows;
            let lo = rows.start.max(start);
            let hi = rows.end.min(end);
            if lo < hi {
                let (head, rest) = out.split_at_mut((hi - lo) * self.cols);
                part.decode_rows(lo - start, head);
                out = rest;
            }
            start = end;
        }
    }

    /// The whole matrix as f32, `[rows, cols]` row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let band = 16;
        out.par_chunks_mut(band * self.cols)
            .enumerate()
            .for_each(|(i, o)| {
                let r0 = i * band;
                self.decode_rows(r0..r0 + o.len() / self.cols, o);
            });
        out
    }
}

/// `y = x W^T` on the host, reading `W`'s stored bytes: `x: [n, cols]` -> `y: [n, rows]`.
pub trait PackedMatmul: Send + Sync + fmt::Debug {
    fn matmul_t(&self, x: &[f32], n: usize, w: &PackedMatrix, y: &mut [f32]);

    /// `y_g = x_g W_g^T` for consecutive groups of rows: group `g` is the next `n_g` rows of `x`
    /// (`[sum n_g, cols]`) and of `y` (`[sum n_g, rows]`), times its own `W_g` (every `W_g` of the same
    /// shape). A mixture of experts' routed rows, grouped by expert. This default runs the groups one
    /// after another; a kernel may run them all in one parallel section.
    fn matmul_t_grouped(&self, x: &[f32], groups: &[(usize, &PackedMatrix)], y: &mut [f32]) {
        let Some((rows, cols)) = grouped_shape(x, groups, y) else {
            return;
        };
        let mut start = 0;
        for &(n, w) in groups {
            self.matmul_t(
                &x[start * cols..(start + n) * cols],
                n,
                w,
                &mut y[start * rows..(start + n) * rows],
            );
            start += n;
        }
    }

    /// Whether this kernel multiplies by `w`; a declined matrix is dequantised at the point of use.
    fn supports(&self, _w: &PackedMatrix) -> bool {
        true
    }
}

/// `(rows, cols)` of every matrix of a [`PackedMatmul::matmul_t_grouped`] call (`None` without
/// groups), after checking that they agree and that `x` and `y` have the groups' rows.
pub fn grouped_shape(x: &[f32], groups: &[(usize, &PackedMatrix)], y: &[f32]) -> Option<(usize, usize)> {
    let &(_, first) = groups.first()?;
    let (rows, cols) = (first.rows, first.cols);
    for (_, w) in groups {
        assert_eq!(
            (w.rows, w.cols),
            (rows, cols),
            "the groups' matrices differ in shape"
        );
    }
    let total: usize = groups.iter().map(|(n, _)| n).sum();
    assert_eq!(x.len(), total * cols, "x is not [rows of all groups, cols]");
    assert_eq!(y.len(), total * rows, "y is not [rows of all groups, rows]");
    Some((rows, cols))
}

/// The portable kernel: decodes panels of `PANEL` rows of `W` into f32 and takes dot products, in
/// parallel over panels. Its sums run in input order, so its results do not depend on the thread
/// count.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReferenceMatmul;

impl ReferenceMatmul {
    const PANEL: usize = 16;
}

impl PackedMatmul for ReferenceMatmul {
    fn matmul_t(&self, x: &[f32], n: usize, w: &PackedMatrix, y: &mut [f32]) {
        let (rows, cols) = (w.rows, w.cols);
        assert_eq!(x.len(), n * cols, "x is not [n, cols]");
        assert_eq!(y.len(), n * rows, "y is not [n, rows]");
        let panels: Vec<Vec<f32>> = (0..rows.div_ceil(Self::PANEL))
            .into_par_iter()
            .map(|p| {
                let r = p * Self::PANEL..((p + 1) * Self::PANEL).min(rows);
                let mut panel = vec![0f32; r.len() * cols];
                w.decode_rows(r.clone(), &mut panel);
                let mut out = vec![0f32; n * r.len()];
                for (i, xr) in x.chunks_exact(cols).enumerate() {
                    for (j, wr) in panel.chunks_exact(cols).enumerate() {
                        out[i * r.len() + j] = xr.iter().zip(wr).map(|(a, b)| a * b).sum();
                    }
                }
                out
            })
            .collect();
        for (p, out) in panels.iter().enumerate() {
            let r0 = p * Self::PANEL;
            let width = out.len() / n.max(1);
            for i in 0..n {
                y[i * rows + r0..][..width].copy_from_slice(&out[i * width..][..width]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{fp8::FP8_BLOCK, mxfp4::MxRule, ScaleSearch};

    fn data(n: usize, seed: u64) -> Vec<f32> {
        crate::codec::test_data(n, seed)
    }

    fn fp8_rows(x: &[f32], rows: usize, cols: usize) -> PackedRows {
        let (q, _) = fp8::quantize(x, rows, cols, FP8_BLOCK);
        let storage = Storage::Fp8 {
            block: FP8_BLOCK,
            scale: Fp8ScaleKind::E8m0,
        };
        PackedRows::new(
            rows,
            cols,
            storage,
            Bytes::from_vec(q.codes),
            Bytes::from_vec(q.scales),
        )
        .unwrap()
    }

    fn mx_rows(x: &[f32], rows: usize, cols: usize) -> PackedRows {
        let (packed, scales, _) = mxfp4::quantize(x, rows, cols, MxRule::Rceil, ScaleSearch::Off);
        let storage = Storage::Mxfp4 { block: 32 };
        PackedRows::new(
            rows,
            cols,
            storage,
            Bytes::from_vec(packed),
            Bytes::from_vec(scales),
        )
        .unwrap()
    }

    #[test]
    fn decoding_equals_the_converters_dequantisation() {
        let (rows, cols) = (200, 320);
        let x = data(rows * cols, 1);
        let (q, _) = fp8::quantize(&x, rows, cols, FP8_BLOCK);
        let expected = fp8::dequantize(&q.codes, fp8::Fp8Scales::E8m0(&q.scales), rows, cols, FP8_BLOCK);
        let m = PackedMatrix::new(vec![fp8_rows(&x, rows, cols)]).unwrap();
        assert_eq!(m.to_f32(), expected);
        // A window that starts inside a tile row.
        let mut window = vec![0f32; 50 * cols];
        m.decode_rows(100..150, &mut window);
        assert_eq!(window, expected[100 * cols..150 * cols]);
    }

    #[test]
    fn stacked_blocks_decode_in_order() {
        let (rows, cols) = (24, 64);
        let a = data(rows * cols, 2);
        let b = data(rows * cols, 3);
        let m = PackedMatrix::new(vec![mx_rows(&a, rows, cols), mx_rows(&b, rows, cols)]).unwrap();
        assert_eq!(m.rows, 2 * rows);
        let whole = m.to_f32();
        assert_eq!(whole.len(), 2 * rows * cols);
        let (pa, sa, _) = mxfp4::quantize(&a, rows, cols, MxRule::Rceil, ScaleSearch::Off);
        let (pb, sb, _) = mxfp4::quantize(&b, rows, cols, MxRule::Rceil, ScaleSearch::Off);
        assert_eq!(whole[..rows * cols], mxfp4::dequantize(&pa, &sa, rows, cols, 32));
        assert_eq!(whole[rows * cols..], mxfp4::dequantize(&pb, &sb, rows, cols, 32));
        // A window across the boundary.
        let mut window = vec![0f32; 4 * cols];
        m.decode_rows(22..26, &mut window);
        assert_eq!(window, whole[22 * cols..26 * cols]);
    }

    #[test]
    fn the_reference_matmul_equals_decode_then_multiply() {
        let (rows, cols, n) = (40, 256, 3);
        let w = data(rows * cols, 4);
        let x = data(n * cols, 5);
        let m = PackedMatrix::new(vec![fp8_rows(&w, rows, cols)]).unwrap();
        let dense = m.to_f32();
        let mut y = vec![0f32; n * rows];
        ReferenceMatmul.matmul_t(&x, n, &m, &mut y);
        for i in 0..n {
            for j in 0..rows {
                let expected: f32 = x[i * cols..][..cols]
                    .iter()
                    .zip(&dense[j * cols..][..cols])
                    .map(|(a, b)| a * b)
                    .sum();
                assert_eq!(y[i * rows + j], expected, "y[{i}, {j}]");
            }
        }
    }

    #[test]
    fn row_bands_decode_as_the_rows_of_the_whole() {
        let cols = 256;
        let fp8_whole = PackedMatrix::new(vec![fp8_rows(&data(256 * cols, 6), 256, cols)]).unwrap();
        let mx_whole = PackedMatrix::new(vec![
            mx_rows(&data(24 * cols, 7), 24, cols),
            mx_rows(&data(24 * cols, 8), 24, cols),
        ])
        .unwrap();
        // FP8 on whole 128-row tiles; MXFP4 in bands that cross the stacked blocks' boundary.
        for (m, pieces) in [(&fp8_whole, 2), (&mx_whole, 3)] {
            let whole = m.to_f32();
            let bands = m.split_rows(pieces).expect("bands on tile boundaries");
            assert_eq!(bands.len(), pieces);
            let band = m.rows / pieces;
            for (i, b) in bands.iter().enumerate() {
                assert_eq!((b.rows, b.cols), (band, cols));
                assert_eq!(
                    b.to_f32(),
                    whole[i * band * cols..(i + 1) * band * cols],
                    "band {i}"
                );
            }
            let bytes: usize = bands.iter().map(PackedMatrix::stored_bytes).sum();
            assert_eq!(bytes, m.stored_bytes(), "the bands share the bytes");
        }
        // 64-row bands would cut FP8's 128x128 scale tiles.
        assert!(fp8_whole.split_rows(4).is_none());
        assert!(mx_whole.split_rows(5).is_none(), "48 rows do not split in 5");
    }

    #[test]
    fn int4_row_pairs_split_only_on_whole_pairs() {
        let (rows, cols) = (8, 32);
        let w = data(rows * cols, 9);
        let (mut codes, mut scales) = (vec![0i8; rows * cols], vec![0f32; rows]);
        int4::quantize_rows(&w, cols, cols, &mut codes, &mut scales);
        let scale_bytes = scales.iter().flat_map(|s| s.to_le_bytes()).collect();
        let part = PackedRows::new(
            rows,
            cols,
            Storage::Int4,
            Bytes::from_vec(int4::pack_row_pairs(&codes, cols)),
            Bytes::from_vec(scale_bytes),
        )
        .unwrap();
        let whole = PackedMatrix::new(vec![part.clone()]).unwrap().to_f32();
        let expected: Vec<f32> = codes
            .iter()
            .enumerate()
            .map(|(i, &q)| q as f32 * scales[i / cols])
            .collect();
        assert_eq!(whole, expected);
        let band = part.rows_range(2, 4).expect("whole pairs");
        let mut out = vec![0f32; 4 * cols];
        band.decode_rows(0, &mut out);
        assert_eq!(out, whole[2 * cols..6 * cols]);
        assert!(part.rows_range(1, 2).is_none() && part.rows_range(2, 3).is_none());
        let odd = PackedRows::new(
            3,
            cols,
            Storage::Int4,
            Bytes::from_vec(vec![0; 64]),
            Bytes::from_vec(vec![0; 12]),
        );
        assert!(odd.unwrap_err().contains("even number of rows"));
    }

    #[test]
    fn byte_lengths_are_checked() {
        let storage = Storage::Mxfp4 { block: 32 };
        let err = PackedRows::new(
            2,
            64,
            storage,
            Bytes::from_vec(vec![0; 63]),
            Bytes::from_vec(vec![0; 4]),
        );
        assert!(err.unwrap_err().contains("needs 64 bytes of codes, found 63"));
        let err = PackedRows::new(
            2,
            64,
            storage,
            Bytes::from_vec(vec![0; 64]),
            Bytes::from_vec(vec![0; 3]),
        );
        assert!(err.unwrap_err().contains("needs 4 bytes of scales, found 3"));
    }
}
