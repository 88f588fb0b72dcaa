//! f32 GEMM through the `gemm` crate, on the instruction set [`Isa::active`] picks.
//!
//! `gemm::gemm` chooses its microkernels itself (AVX-512 whenever the CPU has it, since the crate is
//! built with `x86-v4`) and offers no switch. To run and measure the AVX2 and portable paths on an
//! AVX-512 machine (`V4_CPU_ISA=avx2|scalar`), those are called through the crate's public
//! building blocks: `gemm_common::gemm::gemm_basic_generic` with `gemm-f32`'s FMA or scalar
//! microkernel tables, which is what `gemm::gemm` itself runs on a CPU without AVX-512.

use crate::isa::Isa;
use gemm::Parallelism;

/// `gemm_basic_generic` on `gemm-f32`'s `$kernels` microkernels with SIMD type `$simd` of `$lanes`
/// f32 lanes. Like `gemm::gemm`, it first transposes the problem when `dst` is row-major (the
/// microkernels write column-major tiles): `dst^T = rhs^T · lhs^T`.
macro_rules! explicit {
    ($kernels:ident, $simd:ident, $lanes:expr, $dims:expr, $dst:expr, $dst_rs:expr, $lhs:expr, $rhs:expr, $par:expr) => {{
        use gemm_common::simd::MixedSimd;
        use gemm_f32::microkernel::$kernels::f32 as ukr;
        let (m, n, k) = $dims;
        let (dst_rs, lhs, rhs): (isize, View, View) = ($dst_rs, $lhs, $rhs);
        let transpose = 1 < dst_rs.abs();
        let (m, n, dst_cs, dst_rs, a, b) = if transpose {
            let t = |v: View| View {
                ptr: v.ptr,
                row_stride: v.col_stride,
                col_stride: v.row_stride,
            };
            (n, m, dst_rs, 1, t(rhs), t(lhs))
        } else {
            (m, n, 1, dst_rs, lhs, rhs)
        };
        let simd = <gemm_common::simd::$simd as MixedSimd<f32, f32, f32, f32>>::try_new()
            .expect("Isa::active() checked the CPU's features");
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
            $dst,
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

/// `dst[m, n] = lhs[m, k] · rhs[k, n]`, overwriting `dst` (rows `dst_row_stride` apart, columns
/// contiguous).
///
/// # Safety
/// Every element the shapes and strides address must lie inside its allocation, and `dst` must not
/// overlap the operands nor be written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: isize,
    lhs: View,
    rhs: View,
    parallelism: Parallelism,
) {
    let negative = [
        lhs.row_stride,
        lhs.col_stride,
        rhs.row_stride,
        rhs.col_stride,
        dst_row_stride,
    ]
    .iter()
    .any(|&s| s < 0);
    match Isa::active() {
        // `gemm::gemm` also normalises negative strides, which the explicit paths below do not.
        Isa::Avx512 => crate_gemm((m, n, k), dst, dst_row_stride, lhs, rhs, parallelism),
        _ if negative => crate_gemm((m, n, k), dst, dst_row_stride, lhs, rhs, parallelism),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => explicit!(fma, V3, 8, (m, n, k), dst, dst_row_stride, lhs, rhs, parallelism),
        _ => explicit!(
            scalar,
            Scalar,
            1,
            (m, n, k),
            dst,
            dst_row_stride,
            lhs,
            rhs,
            parallelism
        ),
    }
}

/// `gemm::gemm` with its own kernel choice.
unsafe fn crate_gemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_row_stride: isize,
    lhs: View,
    rhs: View,
    parallelism: Parallelism,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row_stride,
        false,
        lhs.ptr,
        lhs.col_stride,
        lhs.row_stride,
        rhs.ptr,
        rhs.col_stride,
        rhs.row_stride,
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
        for (m, n, k) in [(1, 1, 1), (1, 33, 17), (7, 5, 300), (48, 40, 64), (65, 129, 31)] {
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
            let views = (
                View {
                    ptr: lhs.as_ptr(),
                    row_stride: k as isize,
                    col_stride: 1,
                },
                View {
                    ptr: rhs.as_ptr(),
                    row_stride: 1,
                    col_stride: k as isize,
                },
            );
            let mut got = vec![f32::NAN; m * n];
            let dims = (m, n, k);
            let run = |isa: Isa, got: &mut Vec<f32>| unsafe {
                match isa {
                    Isa::Avx512 => crate_gemm(
                        dims,
                        got.as_mut_ptr(),
                        n as isize,
                        views.0,
                        views.1,
                        Parallelism::None,
                    ),
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => explicit!(
                        fma,
                        V3,
                        8,
                        dims,
                        got.as_mut_ptr(),
                        n as isize,
                        views.0,
                        views.1,
                        Parallelism::None
                    ),
                    _ => explicit!(
                        scalar,
                        Scalar,
                        1,
                        dims,
                        got.as_mut_ptr(),
                        n as isize,
                        views.0,
                        views.1,
                        Parallelism::None
                    ),
                }
            };
            for isa in [Isa::Scalar, Isa::Avx2, Isa::Avx512]
                .into_iter()
                .filter(|&i| i <= Isa::best())
            {
                got.fill(f32::NAN);
                run(isa, &mut got);
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "{isa:?} {m}x{n}x{k}: {g} vs {w}"
                    );
                }
            }
        }
    }
}
