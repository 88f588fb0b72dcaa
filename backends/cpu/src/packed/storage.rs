//! The stored rows the fused GEMV kernels read: FP8 E4M3 with 128x128 E8M0 tiles ([`Fp8`]), MXFP4
//! ([`Mxfp4`]) and BF16 ([`Bf16`]). Each is made once per product with its byte lengths checked, so
//! the kernels' unchecked reads stay inside it; each instruction-set module decodes them its own way.

use std::sync::OnceLock;
use v4_formats::codec::{e8m0_to_f32, E2M1_VALUES};
use v4_formats::PackedRows;

/// Checks the byte lengths the decoders' unchecked reads rely on (`PackedRows::new` checks them,
/// but the fields are public).
fn check_lengths(part: &PackedRows, data: usize, scales: usize) {
    assert_eq!(
        part.data.len(),
        data,
        "{} codes of a wrong length",
        part.storage.name()
    );
    assert_eq!(
        part.scales.len(),
        scales,
        "{} scales of a wrong length",
        part.storage.name()
    );
}

/// The columns of a stored row block, which every decoder walks in chunks.
pub(super) trait Columns {
    /// Columns of a row.
    fn cols(&self) -> usize;
}

macro_rules! columns {
    ($($storage:ident),*) => {
        $(impl Columns for $storage<'_> {
            fn cols(&self) -> usize {
                self.cols
            }
        })*
    };
}
columns!(Fp8, Mxfp4, Bf16);

/// FP8 E4M3FN codes `[rows, cols]` with one E8M0 scale per 128x128 tile.
pub(super) struct Fp8<'a> {
    pub codes: &'a [u8],
    pub cols: usize,
    /// Tiles per row of the scale grid.
    pub grid_cols: usize,
    /// Per tile, `2^(e - 7)` for scale byte `e`: the factor that turns a code's bits placed at
    /// f32 bit 20 (the code's value times 2^-120) into the code's value times the scale.
    pub factors: Vec<f32>,
}

impl<'a> Fp8<'a> {
    /// `None` if a scale exceeds 2^7 (its factor would overflow; no checkpoint has one).
    pub fn new(part: &'a PackedRows) -> Option<Self> {
        let tiles = part.rows.div_ceil(128) * part.cols.div_ceil(128);
        check_lengths(part, part.rows * part.cols, tiles);
        let factor = |e: u8| (e <= 134).then(|| f32::from_bits((e as u32 + 120) << 23));
        Some(Self {
            codes: part.data.as_slice(),
            cols: part.cols,
            grid_cols: part.cols.div_ceil(128),
            factors: part
                .scales
                .as_slice()
                .iter()
                .map(|&e| factor(e))
                .collect::<Option<_>>()?,
        })
    }

    /// The factor of the tile holding row `r` and column `col`.
    ///
    /// # Safety
    /// `r < rows` and `col < cols`.
    #[inline(always)]
    pub unsafe fn factor(&self, r: usize, col: usize) -> f32 {
        // SAFETY: the tile of an element inside the part is inside the grid `new` checked.
        unsafe { *self.factors.get_unchecked((r / 128) * self.grid_cols + col / 128) }
    }

    /// The code at row `r`, column `col`.
    ///
    /// # Safety
    /// `r < rows` and `col < cols`.
    #[inline(always)]
    pub unsafe fn at(&self, r: usize, col: usize) -> *const u8 {
        // SAFETY: inside the `[rows, cols]` codes `new` checked.
        unsafe { self.codes.as_ptr().add(r * self.cols + col) }
    }
}

/// MXFP4: E2M1 codes packed two per byte (low nibble first) `[rows, cols/2]`, one E8M0 scale per
/// 32 columns `[rows, cols/32]`, and the tables both decoders look values up in.
pub(super) struct Mxfp4<'a> {
    pub packed: &'a [u8],
    pub scales: &'a [u8],
    pub cols: usize,
    /// Per E8M0 byte `e`, the bytes 3 (first 16) and 2 (last 16) of the f32 `E2M1_VALUES[k] *
    /// 2^(e - 127)` for the 16 codes `k`. These products are exact and have at most two significant
    /// bits, so their low 16 bits are zero and the two bytes are the whole value.
    pub byte_tables: &'static [[u8; 32]; 256],
    /// Per E8M0 byte `e`, the 16 f32 `E2M1_VALUES[k] * 2^(e - 127)`.
    pub value_tables: &'static [[f32; 16]; 256],
}

impl<'a> Mxfp4<'a> {
    pub fn new(part: &'a PackedRows) -> Self {
        check_lengths(part, part.rows * part.cols / 2, part.rows * part.cols / 32);
        Self {
            packed: part.data.as_slice(),
            scales: part.scales.as_slice(),
            cols: part.cols,
            byte_tables: byte_tables(),
            value_tables: value_tables(),
        }
    }

    /// The scale byte of row `r`'s block `b` (columns `32b .. 32b + 32`).
    ///
    /// # Safety
    /// `r < rows` and `b < cols / 32`.
    #[inline(always)]
    pub unsafe fn scale(&self, r: usize, b: usize) -> u8 {
        // SAFETY: inside the `[rows, cols / 32]` scales `new` checked.
        unsafe { *self.scales.get_unchecked(r * (self.cols / 32) + b) }
    }

    /// The 16 bytes of row `r`'s block `b`.
    ///
    /// # Safety
    /// `r < rows` and `b < cols / 32`.
    #[inline(always)]
    pub unsafe fn block(&self, r: usize, b: usize) -> *const u8 {
        // SAFETY: inside the `[rows, cols / 2]` codes `new` checked.
        unsafe { self.packed.as_ptr().add(r * (self.cols / 2) + 16 * b) }
    }
}

fn value_tables() -> &'static [[f32; 16]; 256] {
    static TABLES: OnceLock<Box<[[f32; 16]; 256]>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = Box::new([[0f32; 16]; 256]);
        for (e, row) in t.iter_mut().enumerate() {
            for (v, &k) in row.iter_mut().zip(&E2M1_VALUES) {
                *v = k * e8m0_to_f32(e as u8);
            }
        }
        t
    })
}

fn byte_tables() -> &'static [[u8; 32]; 256] {
    static TABLES: OnceLock<Box<[[u8; 32]; 256]>> = OnceLock::new();
    TABLES.get_or_init(|| {
        let mut t = Box::new([[0u8; 32]; 256]);
        for (e, (row, values)) in t.iter_mut().zip(value_tables().iter()).enumerate() {
            for (k, v) in values.iter().enumerate() {
                let bits = v.to_bits();
                debug_assert!(bits & 0xFFFF == 0 || e == 0xFF, "E2M1 {k} * E8M0 {e}");
                row[k] = (bits >> 24) as u8;
                row[16 + k] = (bits >> 16) as u8;
            }
        }
        t
    })
}

/// BF16 `[rows, cols]`.
pub(super) struct Bf16<'a> {
    pub data: &'a [u8],
    pub cols: usize,
}

impl<'a> Bf16<'a> {
    pub fn new(part: &'a PackedRows) -> Self {
        check_lengths(part, 2 * part.rows * part.cols, 0);
        Self {
            data: part.data.as_slice(),
            cols: part.cols,
        }
    }

    /// The value at row `r`, column `col`.
    ///
    /// # Safety
    /// `r < rows` and `col < cols`.
    #[inline(always)]
    pub unsafe fn at(&self, r: usize, col: usize) -> *const u8 {
        // SAFETY: inside the `[rows, cols]` values `new` checked.
        unsafe { self.data.as_ptr().add(2 * (r * self.cols + col)) }
    }
}
