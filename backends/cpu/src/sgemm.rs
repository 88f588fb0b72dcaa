//! f32 GEMM through the `gemm` crate, on the instruction set [`Isa::active`] picks.
//!
//! `gemm::gemm` chooses its microkernels itself (AVX-512 whenever the CPU has it, since the crate is
//! built with `x86-v4`) and offers no switch. To run and measure the AVX2 and portable paths on an
//! AVX-512 machine (`V4_CPU_ISA=avx2|scalar`), those are called through the crate's public
//! building blocks: `gemm_common::gemm::gemm_basic_generic` with `gemm-f32`'s FMA or scalar
//! microkernel tables, which is what `gemm::gemm` itself runs on a CPU without AVX-512.
//!
//! Products of 2 to [`FEW_ROWS`] rows over a right side with contiguous rows (`x W^T` with `W^T` stored
//! `[in, out]`: speculative decoding's verification of 2-4 tokens) run in v4's own [`few_rows`] kernel.

use crate::isa::Isa;
use gemm::Parallelism;

/// `gemm_basic_generic` on `gemm-f32`'s `$kernels` microkernels with SIMD type `$simd` of `$lanes`
/// f32 lanes, for the [`Product`] `$p`. Like `gemm::gemm`, it first transposes the problem when `dst`
/// is row-major (the microkernels write column-major tiles): `dst^T = rhs^T · lhs^T`.
macro_rules! explicit {
    ($kernels:ident, $simd:ident, $lanes:expr, $p:expr, $par:expr) => {{
        use gemm_common::simd::MixedSimd;
        use gemm_f32::microkernel::$kernels::f32 as ukr;
        let p: &Product = $p;
        let (m, n, k) = p.dims;
        let (m, n, dst_cs, dst_rs, a, b) = if 1 < p.dst_row_stride.abs() {
            (n, m, p.dst_row_stride, 1, p.rhs.transposed(), p.lhs.transposed())
        } else {
            (m, n, 1, p.dst_row_stride, p.lhs, p.rhs)
        };
        let simd = <gemm_common::simd::$simd as MixedSimd<f32, f32, f32, f32>>::try_new()
            .expect("the caller checked the CPU's features");
        gemm_common::gemm::gemm_basic_generic::<
            _,
            f32,
            $lanes,
            { ukr::MR_DIV_N * $lanes },
            { ukr::NR },
            { ukr::MR_DIV_N },
            { ukr::H_M },
            { ukr::H_N },
        >(
            simd,
            m,
            n,
            k,
            p.dst,
            dst_cs,
            dst_rs,
            false,
            a.ptr,
            a.col_stride,
            a.row_stride,
            b.ptr,
            b.col_stride,
            b.row_stride,
            0.0,
            1.0,
            false,
            false,
            false,
            |x, y, z| x * y + z,
            &ukr::UKR,
            &ukr::H_UKR,
            false,
            $par,
        )
    }};
}

/// A row-major view of a matrix: element `(i, j)` sits at `ptr + i * row_stride + j * col_stride`.
#[derive(Clone, Copy)]
pub(crate) struct View {
    pub ptr: *const f32,
    pub row_stride: isize,
    pub col_stride: isize,
}

impl View {
    /// The same elements read as the transposed matrix.
    fn transposed(self) -> View {
        View {
            ptr: self.ptr,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
}

/// `dst[m, n] = lhs[m, k] · rhs[k, n]` (`dims = (m, n, k)`), overwriting `dst`, whose rows are
/// `dst_row_stride` apart and whose columns are contiguous.
pub(crate) struct Product {
    pub dims: (usize, usize, usize),
    pub dst: *mut f32,
    pub dst_row_stride: isize,
    pub lhs: View,
    pub rhs: View,
}

/// Products of at most this many rows (and at least 2: one row is gemm's GEMV) whose right side has
/// contiguous rows run in [`few_rows`].
const FEW_ROWS: usize = 4;

/// Output columns per block of [`few_rows`]: `FEW_ROWS` accumulator rows of this many f32 stay in L1.
const FEW_ROWS_BLOCK: usize = 256;

/// `dst = lhs · rhs` for `m <= FEW_ROWS` and a right side with contiguous rows: each block of columns
/// reads its rows of `rhs` once, adding `lhs[r, i] * rhs[i, block]` into `m` accumulator rows. gemm packs
/// the right side on every call, which at a few rows costs more than the product itself.
///
/// # Safety
/// As [`matmul`], with `p.dims.0 <= FEW_ROWS` and `p.rhs.col_stride == 1`.
#[inline(always)]
unsafe fn few_rows(p: &Product) {
    let (m, n, k) = p.dims;
    let mut acc = [[0f32; FEW_ROWS_BLOCK]; FEW_ROWS];
    for start in (0..n).step_by(FEW_ROWS_BLOCK) {
        let width = FEW_ROWS_BLOCK.min(n - start);
        for row in acc.iter_mut().take(m) {
            row[..width].fill(0.0);
        }
        for i in 0..k {
            let rhs = p.rhs.ptr.offset(i as isize * p.rhs.row_stride + start as isize);
            let rhs = std::slice::from_raw_parts(rhs, width);
            for (r, row) in acc.iter_mut().enumerate().take(m) {
                let a = *p
                    .lhs
                    .ptr
                    .offset(r as isize * p.lhs.row_stride + i as isize * p.lhs.col_stride);
                for (o, &b) in row[..width].iter_mut().zip(rhs) {
                    *o = a.mul_add(b, *o);
                }
            }
        }
        for (r, row) in acc.iter().enumerate().take(m) {
            let dst = p.dst.offset(r as isize * p.dst_row_stride + start as isize);
            std::ptr::copy_nonoverlapping(row.as_ptr(), dst, width);
        }
    }
}

isa_clones!(few_rows_avx2, few_rows_avx512 = few_rows(p: &Product));

/// Computes `p` on the path [`Isa::active`] picks.
///
/// # Safety
/// Every element the shapes and strides address must lie inside its allocation, and `dst` must not
/// overlap the operands nor be written by anyone else during the call.
pub(crate) unsafe fn matmul(p: Product, parallelism: Parallelism) {
    matmul_on(Isa::active(), &p, parallelism)
}

/// Computes `p` on the path `isa`, which the CPU must have. `gemm::gemm` (its own kernel choice:
/// AVX-512 when present) serves AVX-512, and any negative stride, which only it normalises.
///
/// # Safety
/// As [`matmul`].
unsafe fn matmul_on(isa: Isa, p: &Product, parallelism: Parallelism) {
    let strides = [
        p.lhs.row_stride,
        p.lhs.col_stride,
        p.rhs.row_stride,
        p.rhs.col_stride,
        p.dst_row_stride,
    ];
    let few = (2..=FEW_ROWS).contains(&p.dims.0) && p.rhs.col_stride == 1;
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 if few => few_rows_avx512(p),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if few => few_rows_avx2(p),
        _ if few => few_rows(p),
        Isa::Avx512 => crate_gemm(p, parallelism),
        _ if strides.iter().any(|&s| s < 0) => crate_gemm(p, parallelism),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => explicit!(fma, V3, 8, p, parallelism),
        _ => explicit!(scalar, Scalar, 1, p, parallelism),
    }
}

/// `gemm::gemm` with its own kernel choice.
unsafe fn crate_gemm(p: &Product, parallelism: Parallelism) {
    let (m, n, k) = p.dims;
    gemm::gemm(
        m,
        n,
        k,
        p.dst,
        1,
        p.dst_row_stride,
        false,
        p.lhs.ptr,
        p.lhs.col_stride,
        p.lhs.row_stride,
        p.rhs.ptr,
        p.rhs.col_stride,
        p.rhs.row_stride,
        0.0,
        1.0,
        false,
        false,
        false,
        parallelism,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path this CPU has, on shapes around the microkernels' tile edges, against an f64 triple
    /// loop: all three paths run on an AVX-512 machine whatever `V4_CPU_ISA` says.
    #[test]
    fn every_path_matches_the_triple_loop() {
        for (m, n, k) in [
            (1, 1, 1),
            (1, 33, 17),
            (2, 300, 9),
            (4, 513, 70),
            (7, 5, 300),
            (48, 40, 64),
            (65, 129, 31),
        ] {
            let lhs: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
                .collect();
            // rhs stored as [n, k] (a weight matrix) and read transposed in place as [k, n]
            let rhs: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 19) as f32 / 9.0 - 1.0)
                .collect();
            let want: Vec<f64> = (0..m * n)
                .map(|o| {
                    (0..k)
                        .map(|p| lhs[o / n * k + p] as f64 * rhs[o % n * k + p] as f64)
                        .sum()
                })
                .collect();
            // The same matrix stored [k, n] (a weight kept transposed: the few-row kernel's case).
            let rhs_kn: Vec<f32> = (0..k * n).map(|o| rhs[o % n * k + o / n]).collect();
            let layouts = [(rhs.as_ptr(), 1, k as isize), (rhs_kn.as_ptr(), n as isize, 1)];
            let isas = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
                .into_iter()
                .filter(|&i| i <= Isa::best());
            for (isa, (ptr, row_stride, col_stride)) in isas.flat_map(|i| layouts.map(|l| (i, l))) {
                let mut got = vec![f32::NAN; m * n];
                let product = Product {
                    dims: (m, n, k),
                    dst: got.as_mut_ptr(),
                    dst_row_stride: n as isize,
                    lhs: View {
                        ptr: lhs.as_ptr(),
                        row_stride: k as isize,
                        col_stride: 1,
                    },
                    rhs: View {
                        ptr,
                        row_stride,
                        col_stride,
                    },
                };
                // SAFETY: the views and dst cover exactly their vectors; the CPU has `isa`.
                unsafe { matmul_on(isa, &product, Parallelism::None) };
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{isa:?} {m}x{n}x{k} (rhs col stride {col_stride}): {g} vs {w}"
                    );
                }
            }
        }
    }
}
