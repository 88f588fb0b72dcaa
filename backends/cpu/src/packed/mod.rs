//! `y = x W^T` on weights kept in their stored precision ([`PackedMatrix`]), fast on x86-64.
//!
//! Two regimes, chosen by the number `n` of rows of `x`:
//! - decode (`n <= GEMV_MAX_N`): a fused GEMV. Each task streams the packed bytes of its rows of `W`
//!   once, decodes a chunk of columns at a time in registers (32 with AVX2, 64 with AVX-512) and
//!   multiplies them into every row of `x`; no f32 copy of `W` is made. A task reads its rows from
//!   up to four places at once: one core draws more bandwidth from several long streams than from
//!   one (a 4096x4096 FP8 GEMV from memory: 23 -> 33 GB/s on two Zen 4 cores). FP8 reads a quarter
//!   and MXFP4 about an eighth of the bytes of an f32 GEMV; BF16 and FP8 are bound by memory
//!   bandwidth, MXFP4's table lookups by the vector pipes (on Zen 4, ~11 GB/s a thread).
//! - prefill (larger `n`): each task decodes a panel of up to `PANEL_ROWS` rows with
//!   [`PackedRows::decode_rows`] into f32, transposed (`W^T`, as a trainable weight is kept), and
//!   multiplies it with the `gemm` crate; decoding costs one pass over the panel against `n`
//!   multiply-adds per weight.
//!
//! The fused kernels exist for three storages, FP8 E4M3 with 128x128 E8M0 tiles, MXFP4 (E8M0 per 32)
//! and BF16, on AVX-512 (`avx512`, whole chunks of 64 columns) and AVX2 + FMA (`avx2`, 32 columns).
//! Other storages, and every storage on the portable path (no AVX2, or `V4_CPU_ISA=scalar`), decode
//! each row with [`PackedRows::decode_rows`] into a buffer and take dot products.
//!
//! Both regimes split the work over rayon's pool; call from inside it (as a model's forward pass
//! does), since a call from another thread pays a thread wake-up per parallel section. GEMVs that read
//! little (below `GEMV_PARALLEL_BYTES`) stay on the calling thread, and a grouped product (a decode
//! step's routed experts) runs all its GEMVs in one parallel section.
//!
//! Every weight is decoded to exactly the f32 that [`PackedMatrix::to_f32`] gives (one rounding of
//! `value * scale`); results differ from "decode, then multiply in f32" only in the order of the sums.

use crate::isa::Isa;
use crate::sgemm::{Product, View};
use gemm::Parallelism;
use rayon::prelude::*;
use v4_formats::{grouped_shape, PackedMatmul, PackedMatrix, PackedRows};

/// Rows of `x` up to which the fused GEMV runs; above, decoded panels go through `gemm`. The GEMV
/// takes `x` four rows at a time (decoding `W` again for each four), `gemm` packs `x` again for each
/// panel: on two Zen 3 cores the GEMV is ahead up to about 32 rows and even at 48.
const GEMV_MAX_N: usize = 32;
/// Fewest rows of `W` per parallel task of the GEMV: enough bytes per task to amortise scheduling.
const GEMV_ROWS: usize = 64;
/// Tasks per thread of a large GEMV: few, so that each task's streams are long.
const TASKS_PER_THREAD: usize = 4;
/// GEMVs that read fewer bytes of `W` than this (all of a [`grouped`] call's together) run on the
/// calling thread: waking another costs more than it saves.
const GEMV_PARALLEL_BYTES: usize = 1 << 18;
/// Most rows of `W` per decoded panel (and parallel task) of the prefill product. Every panel's
/// product packs all of `x` again, so panels should be large; their f32 copy takes
/// `PANEL_ROWS * cols * 4` bytes per thread.
const PANEL_ROWS: usize = 256;

/// `y = x W^T` on packed weights with the fastest kernels this CPU runs (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuPackedMatmul;

impl PackedMatmul for CpuPackedMatmul {
    fn matmul_t(&self, x: &[f32], n: usize, w: &PackedMatrix, y: &mut [f32]) {
        grouped(Isa::active(), x, &[(n, w)], y);
    }

    /// Every group's GEMV in one parallel section: a decode step's routed experts (a few rows each)
    /// share one round of thread wake-ups instead of paying one per expert and projection.
    fn matmul_t_grouped(&self, x: &[f32], groups: &[(usize, &PackedMatrix)], y: &mut [f32]) {
        grouped(Isa::active(), x, groups, y);
    }
}

/// `y_g = x_g W_g^T` for consecutive groups of rows of `x` (`[sum n_g, cols]`) and `y`
/// (`[sum n_g, rows]`) on the `isa` path: the few-row groups' GEMVs together, the others' row blocks
/// one after another through `gemm`.
fn grouped(isa: Isa, x: &[f32], groups: &[(usize, &PackedMatrix)], y: &mut [f32]) {
    let Some((rows, cols)) = grouped_shape(x, groups, y) else {
        return;
    };
    if y.is_empty() {
        return;
    }
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    let mut gemvs = Vec::new();
    let mut start = 0;
    for &(n, w) in groups {
        let (x, y) = (
            &x[start * cols..(start + n) * cols],
            &mut y[start * rows..(start + n) * rows],
        );
        let mut row0 = 0;
        for part in w.parts() {
            if n > GEMV_MAX_N {
                gemm_part(part, x, n, row0, y);
            } else if n > 0 {
                gemvs.push(Gemv {
                    task: row_task(isa, part, x, n),
                    bytes: part.stored_bytes(),
                    n,
                    out: (start, row0, part.rows),
                });
            }
            row0 += part.rows;
        }
        start += n;
    }
    run_gemvs(&gemvs, rows, y);
}

/// Rows of one GEMV computed by one task: `rows(r0, out)` fills `out` (`[j, n]`) with `x_i · W_{r0 + j}`
/// for every row `i` of the GEMV's `x` (`[n, cols]`).
trait RowTask: Sync {
    fn rows(&self, r0: usize, out: &mut [f32]);
}

/// The fused kernel for `part`'s storage on the `isa` path, or the portable one.
fn row_task<'a>(isa: Isa, part: &'a PackedRows, x: &'a [f32], n: usize) -> Box<dyn RowTask + 'a> {
    // SAFETY: `Isa::Avx512` is chosen only when the CPU has AVX-512F, AVX2 and FMA (BW is checked
    // here), `Isa::Avx2` only when it has AVX2 and FMA. Storages or widths a path does not take
    // fall to the next one down.
    #[cfg(target_arch = "x86_64")]
    {
        if isa >= Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512bw") {
            if let Some(task) = unsafe { avx512::task(part, x, n) } {
                return task;
            }
        }
        if isa >= Isa::Avx2 {
            if let Some(task) = unsafe { avx2::task(part, x, n) } {
                return task;
            }
        }
    }
    let _ = isa;
    Box::new(Decoded { part, x, n })
}

/// One GEMV of a [`grouped`] product: its task, the bytes of `W` it reads, and where its output goes
/// (`(first row of y, first column, columns)`).
struct Gemv<'a> {
    task: Box<dyn RowTask + 'a>,
    bytes: usize,
    n: usize,
    out: (usize, usize, usize),
}

/// Runs `gemvs` as tasks of `GEMV_ROWS` rows of `W`, in parallel when they read enough bytes together.
/// A one-row GEMV writes straight into its contiguous run of `y` (`[.., total_rows]`); the others write
/// `[rows, n]` buffers, scattered into `y` afterwards.
fn run_gemvs(gemvs: &[Gemv<'_>], total_rows: usize, y: &mut [f32]) {
    let mut buffers: Vec<Vec<f32>> = gemvs
        .iter()
        .map(|g| {
            if g.n == 1 {
                Vec::new()
            } else {
                vec![0f32; g.out.2 * g.n]
            }
        })
        .collect();
    let mut tasks: Vec<(&dyn RowTask, usize, &mut [f32])> = Vec::new();
    // `grouped` pushes the GEMVs in increasing order of their place in `y`.
    let (mut rest, mut taken) = (&mut *y, 0);
    for (g, buffer) in gemvs.iter().zip(buffers.iter_mut()) {
        let out: &mut [f32] = if g.n == 1 {
            let at = g.out.0 * total_rows + g.out.1;
            let (_, tail) = std::mem::take(&mut rest).split_at_mut(at - taken);
            let (mine, tail) = tail.split_at_mut(g.out.2);
            (rest, taken) = (tail, at + g.out.2);
            mine
        } else {
            buffer
        };
        let per = GEMV_ROWS.max(g.out.2.div_ceil(TASKS_PER_THREAD * rayon::current_num_threads()));
        let chunks = out.chunks_mut(per * g.n).enumerate();
        tasks.extend(chunks.map(|(t, out)| (&*g.task, t * per, out)));
    }
    if gemvs.iter().map(|g| g.bytes).sum::<usize>() < GEMV_PARALLEL_BYTES {
        tasks.into_iter().for_each(|(task, r0, out)| task.rows(r0, out));
    } else {
        tasks
            .into_par_iter()
            .for_each(|(task, r0, out)| task.rows(r0, out));
    }
    for (g, buffer) in gemvs.iter().zip(&buffers).filter(|(g, _)| g.n > 1) {
        let (first, col0, _) = g.out;
        for (j, column) in buffer.chunks_exact(g.n).enumerate() {
            for (i, &v) in column.iter().enumerate() {
                y[(first + i) * total_rows + col0 + j] = v;
            }
        }
    }
}

/// The portable GEMV: each row decoded by the formats crate into a buffer, then `n` dot products.
struct Decoded<'a> {
    part: &'a PackedRows,
    x: &'a [f32],
    n: usize,
}

impl RowTask for Decoded<'_> {
    fn rows(&self, r0: usize, out: &mut [f32]) {
        let cols = self.part.cols;
        let mut w = vec![0f32; cols];
        for (j, o) in out.chunks_exact_mut(self.n).enumerate() {
            self.part.decode_rows(r0 + j, &mut w);
            for (o, xi) in o.iter_mut().zip(self.x.chunks_exact(cols)) {
                *o = dot(xi, &w);
            }
        }
    }
}

/// `a · b` with eight running sums (so that the loop vectorises).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 8;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(p, q)| p * q)
        .sum();
    for (p, q) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += p[l] * q[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// A pointer to `y` shared by tasks that write disjoint columns of it.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: only used by tasks that write disjoint elements while the owner is borrowed.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

impl SharedOut {
    /// The pointer `offset` elements in (a method, so that closures capture the whole wrapper).
    fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

/// Rows per panel of a `rows`-row block: `PANEL_ROWS`, or fewer so that each thread gets two panels.
fn panel_rows(rows: usize) -> usize {
    rows.div_ceil(2 * rayon::current_num_threads())
        .next_multiple_of(16)
        .clamp(16, PANEL_ROWS)
}

/// Columns `row0 .. row0 + part.rows` of `y` (`[n, total rows]`) for a large `n`: in parallel over
/// panels of rows, each decoded into f32 and multiplied by one single-threaded `gemm`.
fn gemm_part(part: &PackedRows, x: &[f32], n: usize, row0: usize, y: &mut [f32]) {
    let (cols, total) = (part.cols, y.len() / n);
    assert!(
        x.len() == n * cols && row0 + part.rows <= total,
        "the row block does not fit x and y"
    );
    let out = SharedOut(y.as_mut_ptr());
    let panel_rows = panel_rows(part.rows);
    (0..part.rows.div_ceil(panel_rows)).into_par_iter().for_each_init(
        || (Vec::new(), Vec::new()),
        |(panel, rows_buffer), p| {
            let r0 = p * panel_rows;
            let rows = panel_rows.min(part.rows - r0);
            decode_transposed(part, r0, rows, panel, rows_buffer);
            // SAFETY: dst is the `[n, rows]` window of `y` at column `row0 + r0` (row stride
            // `total`), inside `y`, and no other task writes its columns; lhs is `x` `[n, cols]`
            // and rhs the panel `[cols, rows]`, both fully inside their slices.
            unsafe {
                crate::sgemm::matmul(
                    Product {
                        dims: (n, rows, cols),
                        dst: out.at(row0 + r0),
                        dst_row_stride: total as isize,
                        lhs: View {
                            ptr: x.as_ptr(),
                            row_stride: cols as isize,
                            col_stride: 1,
                        },
                        rhs: View {
                            ptr: panel.as_ptr(),
                            row_stride: rows as isize,
                            col_stride: 1,
                        },
                    },
                    Parallelism::None,
                )
            }
        },
    );
}

/// Rows of `W` decoded at a time by [`decode_transposed`]: each column's 16 values are one 64-byte
/// line of the panel.
const TRANSPOSE_ROWS: usize = 16;

/// Rows `r0 .. r0 + rows` of `part` decoded into `panel` as `W^T` (`[cols, rows]`), the layout of a
/// weight kept transposed, which `gemm` multiplies without packing it again for every block of `x`
/// (it repacks a `[rows, cols]` panel: a fifth of a stored prefill's time).
fn decode_transposed(part: &PackedRows, r0: usize, rows: usize, panel: &mut Vec<f32>, buffer: &mut Vec<f32>) {
    let cols = part.cols;
    panel.resize(rows * cols, 0f32);
    for b in (0..rows).step_by(TRANSPOSE_ROWS) {
        let k = TRANSPOSE_ROWS.min(rows - b);
        buffer.resize(k * cols, 0f32);
        part.decode_rows(r0 + b, buffer);
        transpose_into(buffer, cols, panel, rows, b);
    }
}

/// `panel[c * rows + b + j] = buffer[j * cols + c]` for every row `j` of `buffer` (`[k, cols]`): its
/// rows become places `b .. b + k` of the panel's lines (`[cols, rows]`). On x86-64, 4x4 blocks go
/// through SSE registers (part of the baseline); the edges are copied one value at a time.
fn transpose_into(buffer: &[f32], cols: usize, panel: &mut [f32], rows: usize, b: usize) {
    let k = buffer.len() / cols;
    assert!(
        buffer.len() == k * cols && panel.len() == rows * cols && b + k <= rows,
        "transpose out of bounds"
    );
    let (k4, c4) = if cfg!(target_arch = "x86_64") {
        (k / 4 * 4, cols / 4 * 4)
    } else {
        (0, 0)
    };
    #[cfg(target_arch = "x86_64")]
    for j in (0..k4).step_by(4) {
        for c in (0..c4).step_by(4) {
            use std::arch::x86_64::*;
            // SAFETY: rows j..j + 4 < k and columns c..c + 4 <= cols of buffer, and lines
            // c..c + 4 at places b + j..b + j + 4 <= rows of the panel, lie inside (asserted above).
            unsafe {
                let load = |i: usize| _mm_loadu_ps(buffer.as_ptr().add((j + i) * cols + c));
                let (t0, t1) = (
                    _mm_unpacklo_ps(load(0), load(1)),
                    _mm_unpacklo_ps(load(2), load(3)),
                );
                let (t2, t3) = (
                    _mm_unpackhi_ps(load(0), load(1)),
                    _mm_unpackhi_ps(load(2), load(3)),
                );
                let lines = [
                    _mm_movelh_ps(t0, t1),
                    _mm_movehl_ps(t1, t0),
                    _mm_movelh_ps(t2, t3),
                    _mm_movehl_ps(t3, t2),
                ];
                for (i, line) in lines.into_iter().enumerate() {
                    _mm_storeu_ps(panel.as_mut_ptr().add((c + i) * rows + b + j), line);
                }
            }
        }
    }
    for (j, row) in buffer.chunks_exact(cols).enumerate() {
        let first = if j < k4 { c4 } else { 0 };
        for (c, &v) in row.iter().enumerate().skip(first) {
            panel[c * rows + b + j] = v;
        }
    }
}

/// The generic half of a fused GEMV module, for one instruction set: the `Decoder` trait its
/// storages implement (a row's columns `4 * lanes` at a time into four vectors), `task` (the
/// [`RowTask`] of a product on a storage it decodes) and the kernel that multiplies decoded chunks
/// into up to four rows of `x` at once. Each module (`avx2`, `avx512`) invokes it with its vector
/// type and operations, so the kernel is compiled with that module's target features, and with
/// `streams`: how many rows of `W` the kernel reads at once for one, two, three and four rows of `x`
/// (as many as its running sums leave registers for).
macro_rules! fused_gemv {
    (
        features: $features:literal,
        vector: $vector:ty,
        lanes: $lanes:literal,
        ops: ($zero:path, $load:path, $fma:path, $add:path, $hsum:path $(,)?),
        streams: $streams:expr $(,)?
    ) => {
        /// Columns per chunk of [`Decoder::chunk`].
        const CHUNK: usize = 4 * $lanes;

        /// A row block whose rows decode `CHUNK` columns at a time into registers.
        trait Decoder: Columns + Sync {
            /// The column (within the chunk) of each lane of the four vectors of [`Decoder::chunk`].
            const ORDER: [usize; CHUNK];

            /// Columns `CHUNK c .. CHUNK (c + 1)` of row `r`, each exactly the f32 of
            /// `PackedRows::decode_rows`, lane `l` of vector `v` holding column
            /// `CHUNK c + ORDER[lanes v + l]`.
            ///
            /// # Safety
            /// The CPU must have the module's features, `r < rows` and `c < cols / CHUNK`.
            unsafe fn chunk(&self, r: usize, c: usize) -> [$vector; 4];
        }

        /// The fused kernel for `part`'s storage, if it has one, on `x` (`[n, cols]`): FP8 with
        /// E8M0 128x128 tiles, MXFP4 and BF16, with whole chunks of columns.
        ///
        /// # Safety
        #[doc = concat!("The CPU must have ", $features, ".")]
        pub(super) unsafe fn task<'a>(
            part: &'a v4_formats::PackedRows,
            x: &[f32],
            n: usize,
        ) -> Option<Box<dyn RowTask + 'a>> {
            use v4_formats::{Fp8ScaleKind, Storage};
            if !part.cols.is_multiple_of(CHUNK) {
                return None;
            }
            assert_eq!(x.len(), n * part.cols, "x is not [n, cols]");
            match part.storage {
                Storage::Fp8 {
                    block: 128,
                    scale: Fp8ScaleKind::E8m0,
                } => Fp8::new(part).map(|d| prepared(d, x, n)),
                Storage::Mxfp4 { block: 32 } => Some(prepared(Mxfp4::new(part), x, n)),
                Storage::Bf16 => Some(prepared(Bf16::new(part), x, n)),
                _ => None,
            }
        }

        /// A decoder and `x` permuted to its order: the [`RowTask`] of a fused GEMV. Made only by
        /// [`task`], whose caller has the module's features.
        struct Prepared<D> {
            decoder: D,
            x: Vec<f32>,
            n: usize,
        }

        fn prepared<'a, D: Decoder + 'a>(decoder: D, x: &[f32], n: usize) -> Box<dyn RowTask + 'a> {
            let x = x
                .chunks_exact(CHUNK)
                .flat_map(|g| D::ORDER.map(|k| g[k]))
                .collect();
            Box::new(Prepared { decoder, x, n })
        }

        impl<D: Decoder> RowTask for Prepared<D> {
            /// Takes the rows of `x` in groups of up to four (one pass over the task's rows per group).
            fn rows(&self, r0: usize, out: &mut [f32]) {
                let (d, cols, n) = (&self.decoder, self.decoder.cols(), self.n);
                for (g, xs) in self.x.chunks(4 * cols).enumerate() {
                    // SAFETY: a `Prepared` exists only where the CPU has the features (see [`task`]).
                    unsafe {
                        match xs.len() / cols {
                            1 => group::<D, 1, 4, { $streams[0] }>(d, r0, xs, 4 * g, n, out),
                            2 => group::<D, 2, 4, { $streams[1] }>(d, r0, xs, 4 * g, n, out),
                            3 => group::<D, 3, 2, { $streams[2] }>(d, r0, xs, 4 * g, n, out),
                            _ => group::<D, 4, 2, { $streams[3] }>(d, r0, xs, 4 * g, n, out),
                        }
                    }
                }
            }
        }

        /// `out[j, i0 + i] = xs_i · W_{r0 + j}` for the `N` rows of `xs` and every row `j` of `out`
        /// (`[rows, n]`), with `S` running sums per row of `xs`. The task's rows are read `R` at a
        /// time from `R` evenly spaced places (`j, j + m/R, ..`): one core reads memory faster from
        /// several streams than from one, and each dot product sums in the same order either way.
        #[target_feature(enable = $features)]
        unsafe fn group<D: Decoder, const N: usize, const S: usize, const R: usize>(
            d: &D,
            r0: usize,
            xs: &[f32],
            i0: usize,
            n: usize,
            out: &mut [f32],
        ) {
            assert_eq!(xs.len(), N * d.cols(), "x is not [N, cols]");
            let m = out.len() / n;
            let stride = m / R;
            let mut put = |j: usize, sums: &[f32; N]| out[j * n + i0..j * n + i0 + N].copy_from_slice(sums);
            for j in 0..stride {
                let rows = std::array::from_fn(|q| r0 + j + q * stride);
                // SAFETY: the caller has the features, every row is below `r0 + m <= rows` and
                // `xs` is `[N, cols]`.
                let sums = unsafe { dots::<D, N, S, R>(d, rows, xs) };
                for (q, sums) in sums.iter().enumerate() {
                    put(j + q * stride, sums);
                }
            }
            for j in R * stride..m {
                // SAFETY: as above.
                put(j, &unsafe { dots::<D, N, S, 1>(d, [r0 + j], xs) }[0]);
            }
        }

        /// `[[xs_i · W_r]]` for each of the `R` rows `r` and the `N` rows of `xs` (`[N, cols]`). Each
        /// chunk's four vectors feed `S` running sums per (row of `W`, row of `xs`) in turn, so that `R * N * S`
        /// independent chains hide the FMA latency; a dot product's sums do not depend on `R`.
        ///
        /// # Safety
        /// The CPU must have the features, every `r < rows` and `xs.len() == N * cols`.
        #[target_feature(enable = $features)]
        #[inline]
        unsafe fn dots<D: Decoder, const N: usize, const S: usize, const R: usize>(
            d: &D,
            rows: [usize; R],
            xs: &[f32],
        ) -> [[f32; N]; R] {
            let cols = d.cols();
            let x = xs.as_ptr();
            let mut acc = [[[$zero(); S]; N]; R];
            for c in 0..cols / CHUNK {
                for (acc, &r) in acc.iter_mut().zip(&rows) {
                    // SAFETY: `r < rows`, `c < cols / CHUNK`, and CHUNK floats of `xs` at
                    // `i * cols + CHUNK c`.
                    let w = unsafe { d.chunk(r, c) };
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let xc = unsafe { x.add(i * cols + CHUNK * c) };
                        for (v, &wv) in w.iter().enumerate() {
                            let xv = unsafe { $load(xc.add($lanes * v)) };
                            acc[v % S] = $fma(wv, xv, acc[v % S]);
                        }
                    }
                }
            }
            acc.map(|acc| acc.map(|acc| $hsum(acc[1..].iter().fold(acc[0], |t, &a| $add(t, a)))))
        }
    };
}
use fused_gemv;

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
mod storage;

#[cfg(test)]
mod tests {
    use super::*;
    use v4_formats::codec::mxfp4::MxRule;
    use v4_formats::codec::{f32_to_bf16, fp8, mxfp4, nvfp4, ScaleSearch};
    use v4_formats::{Bytes, Fp8ScaleKind, Storage};

    /// The paths to test: every one this CPU runs.
    fn isas() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|&isa| isa <= Isa::best())
            .collect()
    }

    /// Deterministic values in [-1, 1) times a power of two in 2^-10..2^10 that changes every 16
    /// values (so block scales differ), with some zeros.
    fn data(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut scale = 1f32;
        (0..len)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                if i % 16 == 0 {
                    scale = 2f32.powi((s % 21) as i32 - 10);
                }
                let u = (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
                if s.is_multiple_of(19) {
                    0.0
                } else {
                    u * scale
                }
            })
            .collect()
    }

    fn rows(rows: usize, cols: usize, storage: Storage, data: Vec<u8>, scales: Vec<u8>) -> PackedRows {
        PackedRows::new(
            rows,
            cols,
            storage,
            Bytes::from_vec(data),
            Bytes::from_vec(scales),
        )
        .unwrap()
    }

    const FP8: Storage = Storage::Fp8 {
        block: 128,
        scale: Fp8ScaleKind::E8m0,
    };

    fn fp8_rows(w: &[f32], r: usize, c: usize) -> PackedRows {
        let (q, _) = fp8::quantize(w, r, c, 128);
        rows(r, c, FP8, q.codes, q.scales)
    }

    fn mx_rows(w: &[f32], r: usize, c: usize) -> PackedRows {
        let (packed, scales, _) = mxfp4::quantize(w, r, c, MxRule::Rceil, ScaleSearch::Off);
        rows(r, c, Storage::Mxfp4 { block: 32 }, packed, scales)
    }

    fn bf16_rows(w: &[f32], r: usize, c: usize) -> PackedRows {
        let bytes = w.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect();
        rows(r, c, Storage::Bf16, bytes, vec![])
    }

    fn nvfp4_rows(w: &[f32], r: usize, c: usize) -> PackedRows {
        let (q, _) = nvfp4::quantize(w, r, c, ScaleSearch::Off);
        let storage = Storage::Nvfp4 {
            block: 16,
            scale2: q.scale2,
        };
        rows(r, c, storage, q.packed, q.scales)
    }

    fn matrix(parts: Vec<PackedRows>) -> PackedMatrix {
        PackedMatrix::new(parts).unwrap()
    }

    /// On every path and for each `n`, each output is within 1e-5 of `sum |x_i w_i|` of the exact
    /// product of `x` with the decoded matrix.
    fn check(w: &PackedMatrix, ns: &[usize]) {
        let (r, c) = (w.rows, w.cols);
        let dense = w.to_f32();
        for &n in ns {
            let x = data(n * c, n as u64);
            for isa in isas() {
                let mut y = vec![f32::NAN; n * r];
                grouped(isa, &x, &[(n, w)], &mut y);
                for (i, xi) in x.chunks_exact(c).enumerate() {
                    for (j, wj) in dense.chunks_exact(c).enumerate() {
                        let terms = xi.iter().zip(wj).map(|(&a, &b)| a as f64 * b as f64);
                        let exact: f64 = terms.clone().sum();
                        let size: f64 = terms.map(f64::abs).sum();
                        let got = y[i * r + j] as f64;
                        assert!(
                            (got - exact).abs() <= 1e-5 * size,
                            "{isa:?} n={n} y[{i}, {j}] = {got}, exact {exact} (sum |x w| {size})"
                        );
                    }
                }
            }
        }
    }

    /// One-hot rows of `x` (`n` at a time) give back the decoded matrix bit for bit.
    fn check_exact(w: &PackedMatrix, n: usize) {
        let (r, c) = (w.rows, w.cols);
        let dense = w.to_f32();
        for isa in isas() {
            for c0 in (0..c).step_by(n) {
                let k = n.min(c - c0);
                let mut x = vec![0f32; k * c];
                for i in 0..k {
                    x[i * c + c0 + i] = 1.0;
                }
                let mut y = vec![f32::NAN; k * r];
                grouped(isa, &x, &[(k, w)], &mut y);
                for i in 0..k {
                    for j in 0..r {
                        assert_eq!(y[i * r + j], dense[j * c + c0 + i], "{isa:?} W[{j}, {}]", c0 + i);
                    }
                }
            }
        }
    }

    #[test]
    fn fp8_matches_decode_then_multiply() {
        // 352 columns are not whole chunks of 64: the AVX-512 path hands them to the AVX2 kernel.
        for (r, c) in [(200, 320), (130, 384), (40, 352)] {
            let w = matrix(vec![fp8_rows(&data(r * c, 1), r, c)]);
            check(&w, &[1, 2, 3, 5, 8, 32, 70]);
        }
    }

    #[test]
    fn fp8_decodes_every_code_and_scale_exactly() {
        let (r, c) = (130, 256);
        let codes = (0..r * c)
            .map(|i| ((i + i / c) % 256) as u8)
            .map(|b| if b & 0x7F == 0x7F { 0 } else { b });
        let w = matrix(vec![rows(r, c, FP8, codes.collect(), vec![0, 60, 127, 134])]);
        check_exact(&w, 1);
        check_exact(&w, 8);
    }

    #[test]
    fn fp8_with_scales_above_2_pow_7_is_still_right() {
        let (r, c) = (40, 256);
        let w = fp8_rows(&data(r * c, 2), r, c);
        let w = matrix(vec![rows(r, c, FP8, w.data.as_slice().to_vec(), vec![140, 127])]);
        check_exact(&w, 1);
    }

    #[test]
    fn mxfp4_matches_decode_then_multiply() {
        let (r, c) = (96, 256);
        check(&matrix(vec![mx_rows(&data(r * c, 3), r, c)]), &[1, 5, 300]);
    }

    #[test]
    fn mxfp4_decodes_every_code_and_scale_exactly() {
        let (r, c) = (128, 64);
        let packed = (0..r * c / 2).map(|i| (i * 37 % 256) as u8).collect();
        let scales = (0..r * c / 32).map(|i| (i % 253) as u8).collect(); // 6 * 2^(252-127) is finite
        let w = matrix(vec![rows(r, c, Storage::Mxfp4 { block: 32 }, packed, scales)]);
        check_exact(&w, 1);
        check_exact(&w, 4);
    }

    #[test]
    fn stacked_mxfp4_parts_fill_their_own_columns() {
        let c = 128;
        let w = matrix(vec![
            mx_rows(&data(24 * c, 4), 24, c),
            mx_rows(&data(40 * c, 5), 40, c),
        ]);
        check(&w, &[1, 3, 40]);
    }

    #[test]
    fn bf16_matches_decode_then_multiply() {
        for (r, c) in [(70, 160), (33, 192)] {
            let w = matrix(vec![bf16_rows(&data(r * c, 6), r, c)]);
            check(&w, &[1, 4, 20]);
            check_exact(&w, 8);
        }
    }

    #[test]
    fn generic_storages_match_decode_then_multiply() {
        let c = 64;
        let f32_bytes = data(8 * c, 7).iter().flat_map(|v| v.to_le_bytes()).collect();
        let fp8_f32_scales = Storage::Fp8 {
            block: 128,
            scale: Fp8ScaleKind::F32,
        };
        let w = matrix(vec![
            nvfp4_rows(&data(48 * c, 8), 48, c),
            rows(8, c, Storage::F32, f32_bytes, vec![]),
            rows(
                3,
                c,
                fp8_f32_scales,
                vec![0x38; 3 * c],
                0.25f32.to_le_bytes().to_vec(),
            ),
            fp8_rows(&data(20 * c, 9), 20, c),
        ]);
        check(&w, &[1, 2, 20]);
    }

    #[test]
    fn columns_not_in_whole_chunks_use_the_portable_kernels() {
        let (r, c) = (20, 100);
        check(
            &matrix(vec![
                fp8_rows(&data(r * c, 10), r, c),
                bf16_rows(&data(r * c, 11), r, c),
            ]),
            &[1, 3, 12],
        );
    }

    /// A GEMV reads several rows of `W` at once (`streams`); each row's dot products must still sum
    /// exactly as a one-row matrix's do, bit for bit.
    #[test]
    fn rows_read_together_sum_as_rows_read_alone() {
        let (r, c) = (300, 256);
        let w = data(r * c, 16);
        let whole = matrix(vec![fp8_rows(&w, r, c)]);
        let bf16 = matrix(vec![bf16_rows(&w, r, c)]);
        for isa in isas() {
            for n in [1, 2, 3, 4] {
                let x = data(n * c, 17 + n as u64);
                for w in [&whole, &bf16] {
                    let decoded = w.to_f32();
                    let mut y = vec![0f32; n * r];
                    grouped(isa, &x, &[(n, w)], &mut y);
                    for j in 0..r {
                        let dense = &decoded[j * c..(j + 1) * c];
                        let part = &w.parts()[0];
                        let one = matrix(vec![match part.storage {
                            Storage::Bf16 => bf16_rows(dense, 1, c),
                            _ => rows(
                                1,
                                c,
                                FP8,
                                part.data.as_slice()[j * c..(j + 1) * c].to_vec(),
                                vec![
                                    part.scales.as_slice()[(j / 128) * (c / 128)],
                                    part.scales.as_slice()[(j / 128) * (c / 128) + 1],
                                ],
                            ),
                        }]);
                        let mut alone = vec![0f32; n];
                        grouped(isa, &x, &[(n, &one)], &mut alone);
                        for i in 0..n {
                            assert_eq!(
                                y[i * r + j].to_bits(),
                                alone[i].to_bits(),
                                "{isa:?} n={n} {} row {j}",
                                part.storage.name()
                            );
                        }
                    }
                }
            }
        }
    }

    /// Prefill panels whose rows and columns are not multiples of the transpose's 4x4 blocks.
    #[test]
    fn prefill_panels_with_ragged_edges() {
        let (r, c) = (37, 130);
        check(&matrix(vec![bf16_rows(&data(r * c, 15), r, c)]), &[33, 40]);
    }

    #[test]
    fn empty_products_are_empty() {
        let w = matrix(vec![fp8_rows(&data(8 * 128, 12), 8, 128)]);
        for isa in isas() {
            grouped(isa, &[], &[(0, &w)], &mut []);
        }
    }

    /// The fused kernels take FP8 (E8M0), MXFP4 and BF16 with whole chunks of columns: 32 for AVX2,
    /// 64 for AVX-512.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_fused_kernels_cover_their_storages() {
        let parts = |c: usize| {
            let r = 16;
            let w = data(r * c, 13);
            [
                fp8_rows(&w, r, c),
                mx_rows(&w, r, c),
                bf16_rows(&w, r, c),
                nvfp4_rows(&w, r, c),
            ]
        };
        let (x32, x64) = (data(32, 14), data(64, 14));
        if Isa::best() >= Isa::Avx2 {
            // SAFETY: the CPU has AVX2 and FMA.
            let fused = parts(32)
                .each_ref()
                .map(|p| unsafe { avx2::task(p, &x32, 1) }.is_some());
            assert_eq!(fused, [true, true, true, false]);
        }
        if Isa::best() >= Isa::Avx512 && std::arch::is_x86_feature_detected!("avx512bw") {
            // SAFETY: the CPU has AVX-512F and BW, AVX2 and FMA.
            let fused = parts(64)
                .each_ref()
                .map(|p| unsafe { avx512::task(p, &x64, 1) }.is_some());
            assert_eq!(fused, [true, true, true, false]);
            let fused = parts(32)
                .each_ref()
                .map(|p| unsafe { avx512::task(p, &x32, 1) }.is_some());
            assert_eq!(fused, [false; 4]);
        }
    }

    /// Groups of rows, each times its own matrix, equal each group's own product: few-row groups
    /// (one parallel section, enough bytes to go parallel), an empty group, and a group above
    /// `GEMV_MAX_N` (through `gemm`), with a two-part matrix among them.
    #[test]
    fn grouped_products_equal_one_product_per_group() {
        let (r, c) = (512, 512);
        let matrices = [
            matrix(vec![mx_rows(&data(r * c, 21), r, c)]),
            matrix(vec![mx_rows(&data(r * c, 22), r, c)]),
            matrix(vec![
                mx_rows(&data(r * c / 2, 23), r / 2, c),
                mx_rows(&data(r * c / 2, 24), r / 2, c),
            ]),
            matrix(vec![fp8_rows(&data(r * c, 25), r, c)]),
            matrix(vec![nvfp4_rows(&data(r * c, 26), r, c)]),
        ];
        let counts = [1, 3, 0, GEMV_MAX_N + 1, 2];
        assert!(matrices.iter().map(PackedMatrix::stored_bytes).sum::<usize>() >= GEMV_PARALLEL_BYTES);
        let total: usize = counts.iter().sum();
        let x = data(total * c, 27);
        let groups: Vec<(usize, &PackedMatrix)> = counts.iter().copied().zip(&matrices).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for isa in isas() {
            let mut y = vec![f32::NAN; total * r];
            pool.install(|| grouped(isa, &x, &groups, &mut y));
            let mut start = 0;
            for &(n, w) in &groups {
                let mut want = vec![f32::NAN; n * r];
                grouped(isa, &x[start * c..(start + n) * c], &[(n, w)], &mut want);
                assert_eq!(
                    &y[start * r..(start + n) * r],
                    &want[..],
                    "{isa:?}, group of {n} rows"
                );
                start += n;
            }
        }
    }
}
