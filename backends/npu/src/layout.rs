//! Exact ND <-> fractal layout conversions (FRACTAL_NZ and the ZZ / ZN orders the cube reads).
//!
//! A fractal layout cuts the (zero-padded) matrix into `m0 x n0` blocks. Two orders define it:
//! the order of the blocks (outer) and the order of elements within a block (inner), each either
//! row-major ("Z") or column-major ("N"). CANN's names read outer then inner:
//! - NZ (FRACTAL_NZ, C of Mmad and the format matmul weights are cast to): blocks column-major,
//!   elements row-major; for `m0 = 16` element (i, j) sits at `((j / n0) * M_pad + i) * n0 + j % n0`;
//! - ZZ (A of Mmad): blocks row-major, elements row-major;
//! - ZN (B of Mmad): blocks row-major, elements column-major.

/// Block or element order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Major {
    /// "Z": row-major.
    Row,
    /// "N": column-major.
    Col,
}

/// A fractal format: block size and the two orders.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fractal {
    pub m0: usize,
    pub n0: usize,
    pub outer: Major,
    pub inner: Major,
}

impl Fractal {
    /// FRACTAL_NZ with 16-row fractals and `n0` columns (16 for fp16/bf16, 32 for int8, 8 for f32).
    pub fn nz(n0: usize) -> Self {
        Self {
            m0: 16,
            n0,
            outer: Major::Col,
            inner: Major::Row,
        }
    }

    /// Padded dimensions of an `m x n` matrix.
    pub fn padded(&self, m: usize, n: usize) -> (usize, usize) {
        (m.div_ceil(self.m0) * self.m0, n.div_ceil(self.n0) * self.n0)
    }

    /// Offset of element (i, j) of the padded matrix in the fractal buffer.
    #[inline]
    pub fn offset(&self, m_pad: usize, n_pad: usize, i: usize, j: usize) -> usize {
        let (bi, bj) = (i / self.m0, j / self.n0);
        let (ii, jj) = (i % self.m0, j % self.n0);
        let (mb, nb) = (m_pad / self.m0, n_pad / self.n0);
        let block = match self.outer {
            Major::Row => bi * nb + bj,
            Major::Col => bj * mb + bi,
        };
        let within = match self.inner {
            Major::Row => ii * self.n0 + jj,
            Major::Col => jj * self.m0 + ii,
        };
        block * self.m0 * self.n0 + within
    }

    /// ND (row-major `m x n`) to this fractal format, zero-padded to `padded(m, n)`.
    pub fn from_nd<T: Copy + Default>(&self, nd: &[T], m: usize, n: usize) -> Vec<T> {
        assert_eq!(nd.len(), m * n, "from_nd: {} elements for [{m}, {n}]", nd.len());
        let (mp, np) = self.padded(m, n);
        let mut out = vec![T::default(); mp * np];
        for i in 0..m {
            for j in 0..n {
                out[self.offset(mp, np, i, j)] = nd[i * n + j];
            }
        }
        out
    }

    /// This fractal format back to ND `m x n` (padding dropped).
    pub fn to_nd<T: Copy + Default>(&self, fractal: &[T], m: usize, n: usize) -> Vec<T> {
        let (mp, np) = self.padded(m, n);
        assert_eq!(
            fractal.len(),
            mp * np,
            "to_nd: {} elements for padded [{mp}, {np}]",
            fractal.len()
        );
        let mut out = vec![T::default(); m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = fractal[self.offset(mp, np, i, j)];
            }
        }
        out
    }
}

/// ND `[m, n]` -> FRACTAL_NZ `[ceil(n/n0), ceil(m/16)*16, n0]` (flattened).
pub fn nd_to_nz<T: Copy + Default>(nd: &[T], m: usize, n: usize, n0: usize) -> Vec<T> {
    Fractal::nz(n0).from_nd(nd, m, n)
}

/// FRACTAL_NZ -> ND `[m, n]`.
pub fn nz_to_nd<T: Copy + Default>(nz: &[T], m: usize, n: usize, n0: usize) -> Vec<T> {
    Fractal::nz(n0).to_nd(nz, m, n)
}

/// The `n0` of FRACTAL_NZ for an element size in bytes (32-byte fractal rows).
pub fn nz_n0_for_bytes(elem_bytes: usize) -> usize {
    32 / elem_bytes.max(1)
}
