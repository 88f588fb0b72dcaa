//! f32 GEMM through the `gemm` crate, on the instruction set [`Isa::active`] picks.
//!
//! `gemm::gemm` chooses its microkernels itself (AVX-512 whenever the CPU has it, since the crate is
//! built with `x86-v4`) and offers no switch. To run and measure the AVX2 and portable paths on an
//! AVX-512 machine (`V4_CPU_ISA=avx2|scalar`), those are called through the crate's public
//! building blocks: `gemm_common::gemm::gemm_basic_generic` with `gemm-f32`'s FMA or scalar
//! microkernel tables, which is what `gemm::gemm` itself runs on a CPU without AVX-512.
//!
//! Products of 1 to [`FEW_ROWS`] rows over a right side with contiguous rows (`x W^T` with `W^T` stored
//! `[in, out]`: decode's GEMVs, speculative decoding's verification of 2-4 tokens) run in v4's own
//! [`few_rows`] kernel, which streams the weights at memory speed.

use crate::isa::Isa;
use gemm::Parallelism;
use rayon::prelude::*;
use std::ops::Range;

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

/// Products of at most this many rows whose right side has contiguous rows run in [`few_rows`]
/// (one thread) or [`few_rows_parallel`]: decode's GEMVs (one row) and speculative decoding's
/// verification of 2-4 tokens.
pub(crate) const FEW_ROWS: usize = 4;

/// Accumulators of [`few_rows`] (32 KB, L1's size): one row of output columns for each row of the
/// product, so a one-row product's blocks are 8192 columns wide and the right side is read in runs of
/// 32 KB (in runs of 4 KB, a GEMV streams ~35% slower on Zen 4; with 16 KB, two rows ~10% slower).
const FEW_ROWS_ACC: usize = 8192;

/// Whether `p` is a product for [`few_rows`]: 1 to `FEW_ROWS` rows, a right side with contiguous rows.
pub(crate) fn is_few_rows(p: &Product) -> bool {
    (1..=FEW_ROWS).contains(&p.dims.0) && p.rhs.col_stride == 1
}

/// `dst = lhs · rhs` for a [`is_few_rows`] product. Each block of columns streams its part of the
/// right side's rows once, four rows at a time, adding `lhs[r, i..i + 4] · rhs[i..i + 4, block]` into
/// `m` accumulator rows in L1. gemm packs the right side on every call (at a few rows that costs more
/// than the product) and its GEMV walks a row-major right side in short strided runs that the
/// prefetchers follow badly: ~10 GB/s on one Zen 4 core, where this kernel streams at memory speed.
///
/// # Safety
/// As [`matmul`], with `is_few_rows(p)`.
#[inline(always)]
unsafe fn few_rows(p: &Product) {
    let (m, n, k) = p.dims;
    let lhs = |r: usize, i: usize| {
        *p.lhs
            .ptr
            .offset(r as isize * p.lhs.row_stride + i as isize * p.lhs.col_stride)
    };
    let rhs = |i: usize, start: usize, width: usize| {
        std::slice::from_raw_parts(
            p.rhs.ptr.offset(i as isize * p.rhs.row_stride + start as isize),
            width,
        )
    };
    let mut acc_rows = [0f32; FEW_ROWS_ACC];
    let block = FEW_ROWS_ACC / m;
    for start in (0..n).step_by(block) {
        let width = block.min(n - start);
        for row in acc_rows.chunks_exact_mut(block).take(m) {
            row[..width].fill(0.0);
        }
        let quads = k / 4 * 4;
        for i in (0..quads).step_by(4) {
            let w = [0, 1, 2, 3].map(|d| rhs(i + d, start, width));
            for (r, row) in acc_rows.chunks_exact_mut(block).take(m).enumerate() {
                let a = [0, 1, 2, 3].map(|d| lhs(r, i + d));
                let quad = w[0].iter().zip(w[1]).zip(w[2]).zip(w[3]);
                for (o, (((&w0, &w1), &w2), &w3)) in row[..width].iter_mut().zip(quad) {
                    let s = a[0].mul_add(w0, *o);
                    let s = a[1].mul_add(w1, s);
                    let s = a[2].mul_add(w2, s);
                    *o = a[3].mul_add(w3, s);
                }
            }
        }
        for i in quads..k {
            let w = rhs(i, start, width);
            for (r, row) in acc_rows.chunks_exact_mut(block).take(m).enumerate() {
                let a = lhs(r, i);
                for (o, &b) in row[..width].iter_mut().zip(w) {
                    *o = a.mul_add(b, *o);
                }
            }
        }
        for (r, row) in acc_rows.chunks_exact(block).take(m).enumerate() {
            let dst = p.dst.offset(r as isize * p.dst_row_stride + start as isize);
            std::ptr::copy_nonoverlapping(row.as_ptr(), dst, width);
        }
    }
}

isa_clones!(few_rows_avx2, few_rows_avx512 = few_rows(p: &Product));

/// [`few_rows`] on the path `isa`, which the CPU must have.
///
/// # Safety
/// As [`few_rows`].
unsafe fn few_rows_on(isa: Isa, p: &Product) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => few_rows_avx512(p),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => few_rows_avx2(p),
        _ => few_rows(p),
    }
}

/// `p` as the sub-product of columns `cols` and right-side rows `ks`, written to `dst` (row stride
/// `dst_row_stride`) instead of `p.dst`.
fn sub_product(
    p: &Product,
    cols: Range<usize>,
    ks: Range<usize>,
    dst: *mut f32,
    dst_row_stride: isize,
) -> Product {
    Product {
        dims: (p.dims.0, cols.len(), ks.len()),
        dst,
        dst_row_stride,
        lhs: View {
            ptr: p.lhs.ptr.wrapping_offset(ks.start as isize * p.lhs.col_stride),
            ..p.lhs
        },
        rhs: View {
            ptr: p
                .rhs
                .ptr
                .wrapping_offset(ks.start as isize * p.rhs.row_stride + cols.start as isize),
            ..p.rhs
        },
    }
}

/// Pointers (a product's operands, an output) that tasks writing disjoint elements share.
#[derive(Clone, Copy)]
struct Shared<T>(T);
// SAFETY: only handed to tasks that write disjoint elements while the owner waits for them.
unsafe impl<T> Send for Shared<T> {}
unsafe impl<T> Sync for Shared<T> {}

impl<T: Copy> Shared<T> {
    /// The value (a method, so that closures capture the whole wrapper, not its field).
    fn get(self) -> T {
        self.0
    }
}

/// [`few_rows`] over rayon's threads: the columns are cut into up to four parts per thread, and when
/// that leaves threads idle (narrow outputs), the right side's rows too, each part of rows summing
/// into its own partial product that a last pass adds up. Every task streams whole rows of its
/// columns, so each reads contiguous runs of at least a few KB. Whether a product is large enough to
/// split is the caller's decision (`kernels::matmul_f32`).
///
/// # Safety
/// As [`few_rows`].
pub(crate) unsafe fn few_rows_parallel(p: &Product) {
    let (m, n, k) = p.dims;
    let isa = Isa::active();
    let threads = rayon::current_num_threads();
    if threads == 1 {
        return few_rows_on(isa, p);
    }
    let tasks = 4 * threads;
    let width = n.div_ceil(tasks).next_multiple_of(16).max(256);
    let col_parts = n.div_ceil(width);
    let k_parts = (tasks / col_parts).clamp(1, k.div_ceil(64));
    let k_len = k.div_ceil(k_parts);
    let k_parts = k.div_ceil(k_len);
    let mut partial = if k_parts > 1 {
        vec![0f32; k_parts * m * n]
    } else {
        Vec::new()
    };
    let (shared, partial_ptr) = (Shared(p), Shared(partial.as_mut_ptr()));
    (0..col_parts * k_parts).into_par_iter().for_each(|t| {
        let p = shared.get();
        let (c, s) = (t % col_parts, t / col_parts);
        let cols = c * width..n.min((c + 1) * width);
        let ks = s * k_len..k.min((s + 1) * k_len);
        let part = if k_parts == 1 {
            sub_product(
                p,
                cols.clone(),
                ks,
                p.dst.wrapping_add(cols.start),
                p.dst_row_stride,
            )
        } else {
            let out = partial_ptr.get().wrapping_add(s * m * n + cols.start);
            sub_product(p, cols.clone(), ks, out, n as isize)
        };
        // SAFETY: `part` addresses a sub-block of `p`'s operands, and its own columns of `dst` or of
        // its row part's partial product, which no other task writes.
        unsafe { few_rows_on(isa, &part) };
    });
    if k_parts > 1 {
        for r in 0..m {
            let out = std::slice::from_raw_parts_mut(p.dst.offset(r as isize * p.dst_row_stride), n);
            out.copy_from_slice(&partial[r * n..(r + 1) * n]);
            for s in 1..k_parts {
                let part = &partial[(s * m + r) * n..(s * m + r + 1) * n];
                for (o, &v) in out.iter_mut().zip(part) {
                    *o += v;
                }
            }
        }
    }
}

/// Computes `p` on the path [`Isa::active`] picks.
///
/// # Safety
/// Every element the shapes and strides address must lie inside its allocation, and `dst` must not
/// overlap the operands nor be written by anyone else during the call.
pub(crate) unsafe fn matmul(p: Product, parallelism: Parallelism) {
    match parallelism {
        Parallelism::Rayon(_) if is_few_rows(&p) => few_rows_parallel(&p),
        _ => matmul_on(Isa::active(), &p, parallelism),
    }
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
    match isa {
        _ if is_few_rows(p) => few_rows_on(isa, p),
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

    /// `lhs [m, k]`, the right side stored `[n, k]` (a weight matrix, read transposed in place as
    /// `[k, n]`) and the same right side stored `[k, n]` (a weight kept transposed: the few-row
    /// kernel's case), and the product computed in f64.
    struct Case {
        dims: (usize, usize, usize),
        lhs: Vec<f32>,
        rhs_nk: Vec<f32>,
        rhs_kn: Vec<f32>,
        want: Vec<f64>,
    }

    impl Case {
        fn new(m: usize, n: usize, k: usize) -> Case {
            let lhs: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7919) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let rhs_nk: Vec<f32> = (0..n * k)
                .map(|i| ((i * 104729) % 19) as f32 / 9.0 - 1.0)
                .collect();
            let want = (0..m * n)
                .map(|o| {
                    (0..k)
                        .map(|p| lhs[o / n * k + p] as f64 * rhs_nk[o % n * k + p] as f64)
                        .sum()
                })
                .collect();
            let rhs_kn = (0..k * n).map(|o| rhs_nk[o % n * k + o / n]).collect();
            Case {
                dims: (m, n, k),
                lhs,
                rhs_nk,
                rhs_kn,
                want,
            }
        }

        /// The product into `dst`, the right side read from `rhs` with the given strides.
        fn product(&self, rhs: View, dst: &mut [f32]) -> Product {
            assert_eq!(dst.len(), self.want.len());
            Product {
                dims: self.dims,
                dst: dst.as_mut_ptr(),
                dst_row_stride: self.dims.1 as isize,
                lhs: View {
                    ptr: self.lhs.as_ptr(),
                    row_stride: self.dims.2 as isize,
                    col_stride: 1,
                },
                rhs,
            }
        }

        /// The right side in both layouts.
        fn layouts(&self) -> [View; 2] {
            let (_, n, k) = self.dims;
            [
                View {
                    ptr: self.rhs_nk.as_ptr(),
                    row_stride: 1,
                    col_stride: k as isize,
                },
                View {
                    ptr: self.rhs_kn.as_ptr(),
                    row_stride: n as isize,
                    col_stride: 1,
                },
            ]
        }

        fn check(&self, got: &[f32], what: &str) {
            assert_eq!(got.len(), self.want.len());
            for (g, w) in got.iter().zip(&self.want) {
                assert!(
                    (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                    "{what} {:?}: {g} vs {w}",
                    self.dims
                );
            }
        }
    }

    /// Every path this CPU has, on shapes around the microkernels' tile edges and the few-row
    /// kernel's column blocks, against an f64 triple loop: all three paths run on an AVX-512 machine
    /// whatever `V4_CPU_ISA` says.
    #[test]
    fn every_path_matches_the_triple_loop() {
        for (m, n, k) in [
            (1, 1, 1),
            (1, 33, 17),
            (2, 300, 9),
            (4, 513, 70),
            (3, 2100, 7),
            (7, 5, 300),
            (48, 40, 64),
            (65, 129, 31),
        ] {
            let case = Case::new(m, n, k);
            let isas = [Isa::Scalar, Isa::Avx2, Isa::Avx512]
                .into_iter()
                .filter(|&i| i <= Isa::best());
            for (isa, rhs) in isas.flat_map(|i| case.layouts().map(|l| (i, l))) {
                let mut got = vec![f32::NAN; m * n];
                // SAFETY: the views and dst cover exactly their vectors; the CPU has `isa`.
                unsafe { matmul_on(isa, &case.product(rhs, &mut got), Parallelism::None) };
                case.check(&got, &format!("{isa:?}, rhs col stride {}", rhs.col_stride));
            }
        }
    }

    /// The few-row kernel split over two threads: by columns (a wide output) and by the right side's
    /// rows, with partial products added up (a narrow one).
    #[test]
    fn the_few_row_kernel_splits_over_threads() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for (m, n, k) in [(1, 3000, 100), (4, 1100, 65), (2, 40, 2000), (1, 16, 4099)] {
            let case = Case::new(m, n, k);
            let mut got = vec![f32::NAN; m * n];
            pool.install(|| {
                let product = case.product(case.layouts()[1], &mut got);
                // SAFETY: the views and dst cover exactly their vectors.
                unsafe { matmul(product, Parallelism::Rayon(2)) }
            });
            case.check(&got, "two threads");
        }
    }
}
