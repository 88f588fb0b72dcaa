//! The emulated cube matmul.
//!
//! Semantics (the DEFINED order; real CANN kernels' intra-fractal order and tiling are not public):
//! 1. operands are rounded (RNE, bit manipulation) to the cube input format of the policy
//!    (f32 = unchanged, HF32, fp16 or bf16); for f32 operands a product is rounded to f32 then added;
//!    for the reduced formats every product is exact in f32, so only the additions round;
//! 2. each output element has ONE f32 accumulator (L0C); K is consumed in 16-wide fractal steps in
//!    the order given by [`KOrder`]: sequential (k = 0, 1, ..., K-1), reversed fractals, K-shift (the
//!    AI core owning the output tile starts at fractal `core mod k_fractals` and wraps), or split K
//!    (independent f32 partial sums over contiguous fractal ranges, added in range order);
//!    within a fractal k ascends; no FMA is used (multiply, round, add, round);
//! 3. the accumulator is rounded once to the output format when the tile is written out (FixPipe).
//!
//! Output tiles of `BASE_M x BASE_N` are assigned to AI cores round-robin (row-major tile index);
//! the host runs them in parallel with rayon. The inner loop is a 4x16 register micro-kernel over
//! zero-padded packed panels, compiled for AVX2 when the host has it (results do not depend on it:
//! the same operations in the same order, no FMA contraction).

use crate::cost::{BASE_M, BASE_N};
use crate::numerics::{NpuDType, OverflowMode};
use crate::policy::KOrder;
use rayon::prelude::*;

/// Fractal K step of the cube (fp16/bf16).
pub const K0: usize = 16;
const MR: usize = 4;
const NR: usize = 16;

/// What the emulated cube does.
#[derive(Clone, Copy, Debug)]
pub struct CubeSpec {
    pub input: NpuDType,
    pub output: NpuDType,
    pub overflow: OverflowMode,
    pub k_order: KOrder,
    /// AI (cube) cores, for the K-shift order.
    pub cores: usize,
}

impl CubeSpec {
    /// f32 in, f32 out, sequential K.
    pub fn f32() -> Self {
        Self {
            input: NpuDType::F32,
            output: NpuDType::F32,
            overflow: OverflowMode::InfNan,
            k_order: KOrder::Sequential,
            cores: 24,
        }
    }
}

/// The K ranges of each partial sum, in order, for a tile owned by `core`.
pub fn k_schedule(k: usize, order: KOrder, core: usize) -> Vec<Vec<(usize, usize)>> {
    let kb = k.div_ceil(K0).max(1);
    let block = |b: usize| (b * K0, ((b + 1) * K0).min(k));
    match order {
        KOrder::Sequential => vec![vec![(0, k)]],
        KOrder::Reversed => vec![(0..kb).rev().map(block).collect()],
        KOrder::KShift => {
            let s = core % kb;
            if s == 0 {
                vec![vec![(0, k)]]
            } else {
                vec![vec![(s * K0, k), (0, s * K0)]]
            }
        }
        KOrder::SplitK { parts } => {
            let parts = parts.clamp(1, kb);
            (0..parts)
                .map(|p| {
                    let b0 = p * kb / parts;
                    let b1 = (p + 1) * kb / parts;
                    vec![(b0 * K0, (b1 * K0).min(k))]
                })
                .collect()
        }
    }
}

/// Broadcast batch dims of two operands: (out batch dims, a batch strides, b batch strides).
fn broadcast_batch(a: &[usize], b: &[usize]) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let nb = a.len().max(b.len());
    let pad = |s: &[usize]| {
        let mut v = vec![1; nb - s.len()];
        v.extend_from_slice(s);
        v
    };
    let (a, b) = (pad(a), pad(b));
    let dims: Vec<usize> = (0..nb)
        .map(|i| {
            assert!(
                a[i] == b[i] || a[i] == 1 || b[i] == 1,
                "matmul: batch dims {:?} and {:?} do not broadcast",
                &a[..nb],
                &b[..nb]
            );
            a[i].max(b[i])
        })
        .collect();
    let strides = |s: &[usize]| {
        let mut st = vec![0; nb];
        let mut acc = 1;
        for i in (0..nb).rev() {
            st[i] = if s[i] == 1 { 0 } else { acc };
            acc *= s[i];
        }
        st
    };
    (dims, strides(&a), strides(&b))
}

/// `a [.., m, k] @ b [.., k, n]` on the emulated cube. Returns the output and its shape.
pub fn cube_matmul(
    a: &[f32],
    a_shape: &[usize],
    b: &[f32],
    b_shape: &[usize],
    spec: &CubeSpec,
) -> (Vec<f32>, Vec<usize>) {
    assert!(a_shape.len() >= 2 && b_shape.len() >= 2, "matmul needs rank >= 2");
    let (m, k) = (a_shape[a_shape.len() - 2], a_shape[a_shape.len() - 1]);
    let (kb, n) = (b_shape[b_shape.len() - 2], b_shape[b_shape.len() - 1]);
    assert_eq!(k, kb, "matmul: inner dims {a_shape:?} @ {b_shape:?}");
    let (bdims, sa, sb) = broadcast_batch(&a_shape[..a_shape.len() - 2], &b_shape[..b_shape.len() - 2]);
    let batches: usize = bdims.iter().product();
    let mut out_shape = bdims.clone();
    out_shape.extend([m, n]);
    let mut out = vec![0f32; batches * m * n];
    if m == 0 || n == 0 {
        return (out, out_shape);
    }
    let (mat_a, mat_b) = (m * k, k * n);
    let offsets = |bi: usize| {
        let (mut oa, mut ob, mut rem) = (0, 0, bi);
        for d in (0..bdims.len()).rev() {
            let idx = rem % bdims[d];
            rem /= bdims[d];
            oa += idx * sa[d];
            ob += idx * sb[d];
        }
        (oa * mat_a, ob * mat_b)
    };
    let (input, ov) = (spec.input, spec.overflow);
    let round_in = move |x: f32| input.round(x, ov);
    let big = batches * m * n * k > 1 << 16;
    let run_batch = |bi: usize, c: &mut [f32]| {
        let (oa, ob) = offsets(bi);
        let bp = pack_b(&b[ob..ob + mat_b], k, n, round_in);
        let tiles_n = n.div_ceil(BASE_N);
        let row_block = |(rb, cchunk): (usize, &mut [f32])| {
            let i0 = rb * BASE_M;
            let rows = cchunk.len() / n;
            let ap = pack_a(&a[oa + i0 * k..oa + (i0 + rows) * k], rows, k, round_in);
            for tn in 0..tiles_n {
                let core = (rb * tiles_n + tn) % spec.cores.max(1);
                let sched = k_schedule(k, spec.k_order, core);
                let j0 = tn * BASE_N;
                let j1 = (j0 + BASE_N).min(n);
                compute_tile(&ap, &bp, rows, k, n, j0, j1, &sched, cchunk, spec);
            }
        };
        if big {
            c.par_chunks_mut(BASE_M * n).enumerate().for_each(row_block);
        } else {
            c.chunks_mut(BASE_M * n).enumerate().for_each(row_block);
        }
    };
    if big && batches > 1 {
        out.par_chunks_mut(m * n)
            .enumerate()
            .for_each(|(bi, c)| run_batch(bi, c));
    } else {
        out.chunks_mut(m * n)
            .enumerate()
            .for_each(|(bi, c)| run_batch(bi, c));
    }
    (out, out_shape)
}

/// Pack B [k, n] into column panels of NR: panel p holds B[kk, p*NR..p*NR+NR] for all kk, zero-padded.
fn pack_b(b: &[f32], k: usize, n: usize, round: impl Fn(f32) -> f32) -> Vec<f32> {
    let panels = n.div_ceil(NR);
    let mut bp = vec![0f32; panels * k * NR];
    for p in 0..panels {
        let j0 = p * NR;
        let w = NR.min(n - j0);
        let dst = &mut bp[p * k * NR..(p + 1) * k * NR];
        for kk in 0..k {
            let src = &b[kk * n + j0..kk * n + j0 + w];
            for (d, s) in dst[kk * NR..kk * NR + w].iter_mut().zip(src) {
                *d = round(*s);
            }
        }
    }
    bp
}

/// Pack A [rows, k] into row panels of MR: panel p holds A[p*MR..p*MR+MR, kk] for all kk, zero-padded.
fn pack_a(a: &[f32], rows: usize, k: usize, round: impl Fn(f32) -> f32) -> Vec<f32> {
    let panels = rows.div_ceil(MR);
    let mut ap = vec![0f32; panels * k * MR];
    for p in 0..panels {
        let i0 = p * MR;
        let h = MR.min(rows - i0);
        let dst = &mut ap[p * k * MR..(p + 1) * k * MR];
        for r in 0..h {
            let src = &a[(i0 + r) * k..(i0 + r + 1) * k];
            for (kk, s) in src.iter().enumerate() {
                dst[kk * MR + r] = round(*s);
            }
        }
    }
    ap
}

#[allow(clippy::too_many_arguments)]
fn compute_tile(
    ap: &[f32],
    bp: &[f32],
    rows: usize,
    k: usize,
    n: usize,
    j0: usize,
    j1: usize,
    sched: &[Vec<(usize, usize)>],
    c: &mut [f32],
    spec: &CubeSpec,
) {
    let mut acc = [[0f32; NR]; MR];
    for pi in 0..rows.div_ceil(MR) {
        let a_panel = &ap[pi * k * MR..(pi + 1) * k * MR];
        let mut j = j0;
        while j < j1 {
            let pj = j / NR;
            let b_panel = &bp[pj * k * NR..(pj + 1) * k * NR];
            for (g, ranges) in sched.iter().enumerate() {
                let mut part = [[0f32; NR]; MR];
                micro(a_panel, b_panel, ranges, &mut part);
                if g == 0 {
                    acc = part;
                } else {
                    for r in 0..MR {
                        for q in 0..NR {
                            acc[r][q] += part[r][q];
                        }
                    }
                }
            }
            let h = MR.min(rows - pi * MR);
            let w = NR.min(j1 - j);
            for r in 0..h {
                let row = &mut c[(pi * MR + r) * n + j..(pi * MR + r) * n + j + w];
                for (q, o) in row.iter_mut().enumerate() {
                    *o = spec.output.round(acc[r][q], spec.overflow);
                }
            }
            j += NR;
        }
    }
}

#[inline(always)]
fn micro_generic(a: &[f32], b: &[f32], ranges: &[(usize, usize)], acc: &mut [[f32; NR]; MR]) {
    let mut t = *acc;
    for &(k0, k1) in ranges {
        let a = &a[k0 * MR..k1 * MR];
        let b = &b[k0 * NR..k1 * NR];
        for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
            let av: &[f32; MR] = av.try_into().unwrap();
            let bv: &[f32; NR] = bv.try_into().unwrap();
            for r in 0..MR {
                for q in 0..NR {
                    t[r][q] += av[r] * bv[q];
                }
            }
        }
    }
    *acc = t;
}

/// AVX2 intrinsics (explicit, so the speed does not depend on the crate's opt-level): the same
/// multiply-then-add per element, in the same K order, as `micro_generic` (no FMA).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn micro_avx2(a: &[f32], b: &[f32], ranges: &[(usize, usize)], acc: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    let mut c = [[_mm256_setzero_ps(); 2]; MR];
    for r in 0..MR {
        c[r][0] = _mm256_loadu_ps(acc[r].as_ptr());
        c[r][1] = _mm256_loadu_ps(acc[r].as_ptr().add(8));
    }
    for &(k0, k1) in ranges {
        assert!(k1 * MR <= a.len() && k1 * NR <= b.len());
        let mut pa = a.as_ptr().add(k0 * MR);
        let mut pb = b.as_ptr().add(k0 * NR);
        for _ in k0..k1 {
            let b0 = _mm256_loadu_ps(pb);
            let b1 = _mm256_loadu_ps(pb.add(8));
            let a0 = _mm256_set1_ps(*pa);
            let a1 = _mm256_set1_ps(*pa.add(1));
            let a2 = _mm256_set1_ps(*pa.add(2));
            let a3 = _mm256_set1_ps(*pa.add(3));
            c[0][0] = _mm256_add_ps(c[0][0], _mm256_mul_ps(a0, b0));
            c[0][1] = _mm256_add_ps(c[0][1], _mm256_mul_ps(a0, b1));
            c[1][0] = _mm256_add_ps(c[1][0], _mm256_mul_ps(a1, b0));
            c[1][1] = _mm256_add_ps(c[1][1], _mm256_mul_ps(a1, b1));
            c[2][0] = _mm256_add_ps(c[2][0], _mm256_mul_ps(a2, b0));
            c[2][1] = _mm256_add_ps(c[2][1], _mm256_mul_ps(a2, b1));
            c[3][0] = _mm256_add_ps(c[3][0], _mm256_mul_ps(a3, b0));
            c[3][1] = _mm256_add_ps(c[3][1], _mm256_mul_ps(a3, b1));
            pa = pa.add(MR);
            pb = pb.add(NR);
        }
    }
    for r in 0..MR {
        _mm256_storeu_ps(acc[r].as_mut_ptr(), c[r][0]);
        _mm256_storeu_ps(acc[r].as_mut_ptr().add(8), c[r][1]);
    }
}

#[inline]
fn micro(a: &[f32], b: &[f32], ranges: &[(usize, usize)], acc: &mut [[f32; NR]; MR]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the feature was detected at run time.
            return unsafe { micro_avx2(a, b, ranges, acc) };
        }
    }
    micro_generic(a, b, ranges, acc)
}
