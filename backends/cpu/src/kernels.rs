//! v4's own CPU kernels, in place of burn-ndarray's: matmul, reshape and slice (burn-ndarray copies
//! on every reshape and every slice, contiguous or not) and the transcendental maps (burn-ndarray calls scalar libm per element
//! on one thread; sigmoid goes through six passes of burn's default composition).

use crate::isa::Isa;
use crate::sgemm::{Product, View};
use crate::Inner;
use burn_backend::ops::{FloatTensorOps, IntTensorOps};
use burn_backend::{ExecutionError, FloatDType, Scalar, Shape, Slice, TensorData};
use burn_ndarray::{NdArrayDevice, NdArrayTensor};
use ndarray::{ArcArray, ArrayD, ArrayViewD, Axis, IxDyn};
use rayon::prelude::*;
use std::mem::MaybeUninit;

/// `$avx2` and `$avx512`: `$generic` compiled for AVX2 + FMA and for AVX-512, so that its plain loops
/// vectorize to the wider registers; callers pick one by [`Isa::active`] (the CPU must have the features).
macro_rules! isa_clones {
    ($avx2:ident, $avx512:ident = $generic:ident($($arg:ident: $ty:ty),* $(,)?)) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $avx2($($arg: $ty),*) {
            $generic($($arg),*)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn $avx512($($arg: $ty),*) {
            $generic($($arg),*)
        }
    };
}

/// Elements per parallel task of the elementwise kernels (below this, one thread does all).
const CHUNK: usize = 1 << 15;

/// Products smaller than this many multiply-adds run one per thread (over the batch) instead of
/// splitting one product across threads.
const SMALL_PRODUCT: usize = 1 << 21;

/// Products (all batches together) with fewer multiply-adds than this run on the calling thread: a
/// small model's decode is made of such products, and waking a second thread for one costs more than
/// it saves (with two threads, a 3.3M-parameter model decoded slower than with one).
const PARALLEL_PRODUCT: usize = 1 << 16;

/// Products with at most this many rows are split over the threads by columns (see [`matmul_f32`]).
const FEW_ROWS: usize = 16;

/// `lhs @ rhs` over the last two dims, batch dims broadcast (burn's matmul contract).
/// f32 goes to [`matmul_f32`]; other dtypes to burn-ndarray.
pub(crate) fn matmul(lhs: NdArrayTensor, rhs: NdArrayTensor) -> NdArrayTensor {
    match (lhs, rhs) {
        (NdArrayTensor::F32(lhs), NdArrayTensor::F32(rhs)) => {
            NdArrayTensor::from(matmul_f32(lhs.view(), rhs.view()).into_shared())
        }
        (lhs, rhs) => Inner::float_matmul(lhs, rhs),
    }
}

/// A buffer of `len` f32 for a kernel to write in full before [`assume_init`]. `vec![0.0; len]` costs a
/// zeroing pass (mimalloc memsets every zeroed block it hands out again): ~10% of a forward pass.
fn uninit_vec(len: usize) -> Vec<MaybeUninit<f32>> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: MaybeUninit needs no initialisation.
    unsafe { v.set_len(len) };
    v
}

/// The buffer of [`uninit_vec`] as f32.
///
/// # Safety
/// Every element must have been written.
unsafe fn assume_init(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
    let mut v = std::mem::ManuallyDrop::new(v);
    Vec::from_raw_parts(v.as_mut_ptr().cast::<f32>(), v.len(), v.capacity())
}

/// A raw pointer that may cross threads: every task writes a disjoint output matrix.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// `[.., M, K] @ [.., K, N] -> [.., M, N]` straight from the operands' strides (transposed and
/// sliced views are read in place, never copied), into a fresh contiguous array.
pub fn matmul_f32(lhs: ArrayViewD<'_, f32>, rhs: ArrayViewD<'_, f32>) -> ArrayD<f32> {
    let rank = lhs.ndim();
    assert!(
        rank >= 2 && rhs.ndim() == rank,
        "matmul needs two operands of the same rank >= 2"
    );
    let (m, k, n) = (
        lhs.shape()[rank - 2],
        lhs.shape()[rank - 1],
        rhs.shape()[rank - 1],
    );
    assert_eq!(
        rhs.shape()[rank - 2],
        k,
        "matmul: inner dims differ ({:?} @ {:?})",
        lhs.shape(),
        rhs.shape()
    );

    let batch_dims: Vec<usize> = (0..rank - 2)
        .map(|d| lhs.shape()[d].max(rhs.shape()[d]))
        .collect();
    let mut out_shape = batch_dims.clone();
    out_shape.extend([m, n]);
    let batches: usize = batch_dims.iter().product();
    if m == 0 || n == 0 || k == 0 || batches == 0 {
        return ArrayD::<f32>::zeros(IxDyn(&out_shape));
    }
    // Every element is written by one product below (gemm overwrites, it does not accumulate).
    let mut out = uninit_vec(batches * m * n);

    let (ls, rs) = (lhs.strides(), rhs.strides());
    // Element offset of batch `b` in an operand: broadcast dims (size 1) stay at index 0.
    let offset = |b: usize, shape: &[usize], strides: &[isize]| -> isize {
        let mut rest = b;
        let mut off = 0isize;
        for d in (0..rank - 2).rev() {
            let idx = rest % batch_dims[d];
            rest /= batch_dims[d];
            if shape[d] > 1 {
                off += idx as isize * strides[d];
            }
        }
        off
    };
    let (lp, rp) = (lhs.as_ptr() as usize, rhs.as_ptr() as usize);
    let dst = SendPtr(out.as_mut_ptr().cast::<f32>());
    // Columns `cols` of batch `b`'s product.
    let product = |b: usize, cols: std::ops::Range<usize>, parallelism: gemm::Parallelism| {
        // capture the whole Send wrapper, not its raw-pointer field (edition 2021 closures capture fields)
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        let lhs = (lp as *const f32).wrapping_offset(offset(b, lhs.shape(), ls));
        let rhs = (rp as *const f32)
            .wrapping_offset(offset(b, rhs.shape(), rs) + cols.start as isize * rs[rank - 1]);
        // SAFETY: the offsets and strides come from valid ndarray views of these shapes, and
        // each call writes its own columns of its batch's contiguous m x n block of `out`.
        unsafe {
            crate::sgemm::matmul(
                Product {
                    dims: (m, cols.len(), k),
                    dst: dst.0.add(b * m * n + cols.start),
                    dst_row_stride: n as isize,
                    lhs: View {
                        ptr: lhs,
                        row_stride: ls[rank - 2],
                        col_stride: ls[rank - 1],
                    },
                    rhs: View {
                        ptr: rhs,
                        row_stride: rs[rank - 2],
                        col_stride: rs[rank - 1],
                    },
                },
                parallelism,
            )
        }
    };

    let threads = rayon::current_num_threads();
    // Decode's GEMVs: v4's own few-row kernel, which splits itself over the threads.
    let few_rows_kernel = m <= crate::sgemm::FEW_ROWS && rs[rank - 1] == 1;
    if threads == 1 || batches * m * n * k < PARALLEL_PRODUCT {
        (0..batches).for_each(|b| product(b, 0..n, gemm::Parallelism::None));
    } else if batches > 1 && m * n * k < SMALL_PRODUCT {
        (0..batches)
            .into_par_iter()
            .for_each(|b| product(b, 0..n, gemm::Parallelism::None));
    } else if m <= FEW_ROWS && threads > 1 && n >= 64 * threads && !few_rows_kernel {
        // gemm's few-row path runs on one thread; split the columns.
        let block = n.div_ceil(4 * threads).next_multiple_of(16);
        for b in 0..batches {
            (0..n.div_ceil(block))
                .into_par_iter()
                .for_each(|j| product(b, j * block..n.min((j + 1) * block), gemm::Parallelism::None));
        }
    } else {
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        (0..batches).for_each(|b| product(b, 0..n, parallelism));
    }
    // SAFETY: the products wrote all batches x m x n elements.
    let out = unsafe { assume_init(out) };
    ArrayD::from_shape_vec(IxDyn(&out_shape), out).expect("shape matches")
}

/// `tensor` as a standard-layout (row-major, contiguous) array: shared as is when it already is one,
/// else copied row by row (the innermost dim with a plain copy when its stride is 1).
fn standard<E: Copy + Send + Sync + Default + 'static>(array: ArcArray<E, IxDyn>) -> ArcArray<E, IxDyn> {
    if array.is_standard_layout() {
        return array;
    }
    let shape = array.shape().to_vec();
    let rank = shape.len();
    let len: usize = shape.iter().product();
    let mut out = vec![E::default(); len];
    if len > 0 {
        let view = array.view();
        let strides = view.strides().to_vec();
        let base = view.as_ptr() as usize;
        let inner = shape[rank - 1];
        let inner_stride = strides[rank - 1];
        let rows_per_task = (CHUNK / inner.max(1)).max(1);
        out.par_chunks_mut(rows_per_task * inner)
            .enumerate()
            .for_each(|(task, dst)| {
                let first_row = task * rows_per_task;
                // odometer over the outer dims, started at `first_row`
                let mut index = vec![0usize; rank.saturating_sub(1)];
                let mut rest = first_row;
                for d in (0..rank - 1).rev() {
                    index[d] = rest % shape[d];
                    rest /= shape[d];
                }
                for row in dst.chunks_mut(inner) {
                    let offset: isize = index.iter().zip(&strides).map(|(&i, &s)| i as isize * s).sum();
                    let src = (base as *const E).wrapping_offset(offset);
                    // SAFETY: `index` stays within `shape`, so every element read lies inside the view.
                    unsafe {
                        if inner_stride == 1 {
                            row.copy_from_slice(std::slice::from_raw_parts(src, inner));
                        } else {
                            for (j, v) in row.iter_mut().enumerate() {
                                *v = *src.offset(j as isize * inner_stride);
                            }
                        }
                    }
                    for d in (0..rank - 1).rev() {
                        index[d] += 1;
                        if index[d] < shape[d] {
                            break;
                        }
                        index[d] = 0;
                    }
                }
            });
    }
    ArrayD::from_shape_vec(IxDyn(&shape), out)
        .expect("shape matches length")
        .into_shared()
}

/// Reshape without copying a contiguous array (burn-ndarray 0.21 copies every time); a strided
/// view is made contiguous once, in parallel.
fn reshape_array<E: Copy + Send + Sync + Default + 'static>(
    array: ArcArray<E, IxDyn>,
    shape: &Shape,
) -> ArcArray<E, IxDyn> {
    standard(array)
        .into_shape_with_order(IxDyn(shape.as_slice()))
        .expect("burn checked that the reshape keeps the element count")
}

/// Slice by moving the view (burn-ndarray 0.21 copies the selected elements on every slice).
/// Same semantics as burn-ndarray: ndarray's slicing, an empty range when `start == end`.
fn slice_array<E>(mut array: ArcArray<E, IxDyn>, slices: &[Slice]) -> ArcArray<E, IxDyn> {
    for (axis, slice) in slices.iter().enumerate() {
        let s = if slice.end == Some(slice.start) {
            ndarray::Slice::new(0, Some(0), 1)
        } else {
            ndarray::Slice::new(slice.start, slice.end, slice.step)
        };
        array.slice_axis_inplace(Axis(axis), s);
    }
    array
}

pub(crate) fn float_slice(tensor: NdArrayTensor, slices: &[Slice]) -> NdArrayTensor {
    match tensor {
        NdArrayTensor::F32(s) if !s.is_borrowed() => {
            NdArrayTensor::from(slice_array(s.into_shared(), slices))
        }
        other => Inner::float_slice(other, slices),
    }
}

pub(crate) fn int_slice(tensor: NdArrayTensor, slices: &[Slice]) -> NdArrayTensor {
    match tensor {
        NdArrayTensor::I64(s) if !s.is_borrowed() => {
            NdArrayTensor::from(slice_array(s.into_shared(), slices))
        }
        other => Inner::int_slice(other, slices),
    }
}

/// A tensor of zeros. burn's default builds a `TensorData` element by element and converts it: in a
/// training step every `slice`'s backward creates one of its parent's size, and this was half the step.
pub(crate) fn float_zeros(shape: Shape, device: &NdArrayDevice, dtype: FloatDType) -> NdArrayTensor {
    match dtype {
        FloatDType::F32 => NdArrayTensor::from(ArrayD::<f32>::zeros(IxDyn(shape.as_slice())).into_shared()),
        _ => Inner::float_zeros(shape, device, dtype),
    }
}

/// The elements of `tensor`, row-major. burn-ndarray copies a contiguous tensor whose storage is still
/// shared (a narrowed view of a tensor in use, such as one expert's rows of the grouped batch) element
/// by element through a dynamic-rank iterator: that was ~40% of a prefill on packed weights. A
/// row-major f32 view is copied here in one piece.
pub(crate) fn float_into_data(
    tensor: NdArrayTensor,
) -> impl core::future::Future<Output = Result<TensorData, ExecutionError>> + Send {
    let copied = match &tensor {
        NdArrayTensor::F32(s) => {
            let view = s.view();
            view.as_slice()
                .map(|values| TensorData::new(values.to_vec(), view.shape().to_vec()))
        }
        _ => None,
    };
    async move {
        match copied {
            Some(data) => Ok(data),
            None => Inner::float_into_data(tensor).await,
        }
    }
}

/// A tensor filled with `fill_value` (see [`float_zeros`]).
pub(crate) fn float_full(
    shape: Shape,
    fill_value: Scalar,
    device: &NdArrayDevice,
    dtype: FloatDType,
) -> NdArrayTensor {
    match dtype {
        FloatDType::F32 => {
            let value = fill_value.elem::<f32>();
            NdArrayTensor::from(ArrayD::<f32>::from_elem(IxDyn(shape.as_slice()), value).into_shared())
        }
        _ => Inner::float_full(shape, fill_value, device, dtype),
    }
}

pub(crate) fn float_reshape(tensor: NdArrayTensor, shape: Shape) -> NdArrayTensor {
    match tensor {
        NdArrayTensor::F32(s) if !s.is_borrowed() => {
            NdArrayTensor::from(reshape_array(s.into_shared(), &shape))
        }
        other => Inner::float_reshape(other, shape),
    }
}

pub(crate) fn int_reshape(tensor: NdArrayTensor, shape: Shape) -> NdArrayTensor {
    match tensor {
        NdArrayTensor::I64(s) if !s.is_borrowed() => {
            NdArrayTensor::from(reshape_array(s.into_shared(), &shape))
        }
        other => Inner::int_reshape(other, shape),
    }
}

/// Applies `f` to every element of an f32 tensor into a fresh standard-layout tensor, in parallel
/// chunks, compiled for AVX2+FMA when the CPU has them (so `f` vectorizes); other dtypes go to
/// burn-ndarray's `fallback`.
fn map_f32(
    tensor: NdArrayTensor,
    f: impl Fn(f32) -> f32 + Sync + Send + Copy,
    fallback: fn(NdArrayTensor) -> NdArrayTensor,
) -> NdArrayTensor {
    let NdArrayTensor::F32(storage) = tensor else {
        return fallback(tensor);
    };
    let input = standard(storage.into_shared());
    let src = input.as_slice().expect("standard layout");
    let mut out = uninit_vec(src.len());
    out.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(dst, src)| map_slice(src, dst, f));
    // SAFETY: the chunks cover `out`, and map_slice writes every element of its chunk.
    let out = unsafe { assume_init(out) };
    NdArrayTensor::from(
        ArrayD::from_shape_vec(IxDyn(input.shape()), out)
            .expect("same length")
            .into_shared(),
    )
}

#[inline(always)]
fn map_generic(src: &[f32], dst: &mut [MaybeUninit<f32>], f: impl Fn(f32) -> f32) {
    assert_eq!(src.len(), dst.len());
    for (d, &s) in dst.iter_mut().zip(src) {
        d.write(f(s));
    }
}

isa_clones!(map_avx2, map_avx512 = map_generic(src: &[f32], dst: &mut [MaybeUninit<f32>], f: impl Fn(f32) -> f32));

fn map_slice(src: &[f32], dst: &mut [MaybeUninit<f32>], f: impl Fn(f32) -> f32) {
    // SAFETY: `Isa::active()` names only paths whose features the CPU has.
    #[cfg(target_arch = "x86_64")]
    match Isa::active() {
        Isa::Avx512 => return unsafe { map_avx512(src, dst, f) },
        Isa::Avx2 => return unsafe { map_avx2(src, dst, f) },
        Isa::Scalar => {}
    }
    map_generic(src, dst, f)
}

/// `f(lhs, rhs)` elementwise with burn's broadcasting (size-1 dims stretch), for two f32 tensors of any
/// strides, into a fresh standard-layout tensor: parallel over rows of the last dim, with the inner
/// loop specialised on whether each side is contiguous or a broadcast scalar along it (so it
/// vectorizes). burn-ndarray's Zip takes ~3x longer on plain adds and ~10x on broadcasts.
fn binary_f32(
    lhs: NdArrayTensor,
    rhs: NdArrayTensor,
    f: impl Fn(f32, f32) -> f32 + Sync + Send + Copy,
    fallback: fn(NdArrayTensor, NdArrayTensor) -> NdArrayTensor,
) -> NdArrayTensor {
    let (NdArrayTensor::F32(a), NdArrayTensor::F32(b)) = (&lhs, &rhs) else {
        return fallback(lhs, rhs);
    };
    let (a, b) = (a.view(), b.view());
    let rank = a.ndim();
    if rank == 0 || b.ndim() != rank {
        return fallback(lhs, rhs);
    }
    let shape: Vec<usize> = (0..rank).map(|d| a.shape()[d].max(b.shape()[d])).collect();
    // Element strides of each side in the output's index space (0 along broadcast dims).
    let strides_of = |v: &ArrayViewD<f32>| -> Vec<isize> {
        (0..rank)
            .map(|d| if v.shape()[d] == 1 { 0 } else { v.strides()[d] })
            .collect()
    };
    let (sa, sb) = (strides_of(&a), strides_of(&b));
    let len: usize = shape.iter().product();
    let mut out = uninit_vec(len);
    if let (Some(x), Some(y)) = (a.as_slice(), b.as_slice()) {
        if x.len() == len && y.len() == len {
            // same shape, both contiguous: one flat pass
            out.par_chunks_mut(CHUNK).enumerate().for_each(|(task, dst)| {
                let (x, y) = (&x[task * CHUNK..][..dst.len()], &y[task * CHUNK..][..dst.len()]);
                // SAFETY: both slices have dst.len() elements.
                unsafe { binary_row(dst, x.as_ptr(), 1, y.as_ptr(), 1, f) }
            });
            // SAFETY: the chunks cover `out`, and binary_row writes every element of its row.
            let out = unsafe { assume_init(out) };
            return NdArrayTensor::from(
                ArrayD::from_shape_vec(IxDyn(&shape), out)
                    .expect("shape")
                    .into_shared(),
            );
        }
    }
    let inner = shape[rank - 1];
    if len > 0 {
        let (pa, pb) = (a.as_ptr() as usize, b.as_ptr() as usize);
        let rows_per_task = (CHUNK / inner.max(1)).max(1);
        out.par_chunks_mut(rows_per_task * inner)
            .enumerate()
            .for_each(|(task, dst)| {
                let mut index = vec![0usize; rank - 1];
                let mut rest = task * rows_per_task;
                for d in (0..rank - 1).rev() {
                    index[d] = rest % shape[d];
                    rest /= shape[d];
                }
                for row in dst.chunks_mut(inner) {
                    let offset =
                        |s: &[isize]| -> isize { index.iter().zip(s).map(|(&i, &s)| i as isize * s).sum() };
                    let x = (pa as *const f32).wrapping_offset(offset(&sa));
                    let y = (pb as *const f32).wrapping_offset(offset(&sb));
                    // SAFETY: indices stay within the broadcast shape, and each side is read only along
                    // its own dims (stride 0 where it is broadcast).
                    unsafe { binary_row(row, x, sa[rank - 1], y, sb[rank - 1], f) };
                    for d in (0..rank - 1).rev() {
                        index[d] += 1;
                        if index[d] < shape[d] {
                            break;
                        }
                        index[d] = 0;
                    }
                }
            });
    }
    // SAFETY: the rows cover `out` (len = 0 has nothing to write), and binary_row writes each in full.
    let out = unsafe { assume_init(out) };
    NdArrayTensor::from(
        ArrayD::from_shape_vec(IxDyn(&shape), out)
            .expect("shape matches")
            .into_shared(),
    )
}

/// One output row of [`binary_f32`] on the widest vectors [`Isa::active`] allows.
///
/// # Safety
/// `x` and `y` must be readable at every `j * stride` for `j < dst.len()`.
unsafe fn binary_row(
    dst: &mut [MaybeUninit<f32>],
    x: *const f32,
    sx: isize,
    y: *const f32,
    sy: isize,
    f: impl Fn(f32, f32) -> f32,
) {
    #[cfg(target_arch = "x86_64")]
    match Isa::active() {
        Isa::Avx512 => return binary_row_avx512(dst, x, sx, y, sy, f),
        Isa::Avx2 => return binary_row_avx2(dst, x, sx, y, sy, f),
        Isa::Scalar => {}
    }
    binary_row_generic(dst, x, sx, y, sy, f)
}

isa_clones!(binary_row_avx2, binary_row_avx512 = binary_row_generic(
    dst: &mut [MaybeUninit<f32>],
    x: *const f32,
    sx: isize,
    y: *const f32,
    sy: isize,
    f: impl Fn(f32, f32) -> f32
));

/// `dst[j] = f(x[j * sx], y[j * sy])`, with the common stride pairs as plain loops that vectorize.
///
/// # Safety
/// As [`binary_row`].
#[inline(always)]
unsafe fn binary_row_generic(
    dst: &mut [MaybeUninit<f32>],
    x: *const f32,
    sx: isize,
    y: *const f32,
    sy: isize,
    f: impl Fn(f32, f32) -> f32,
) {
    let n = dst.len();
    match (sx, sy) {
        (1, 1) => {
            let (x, y) = (std::slice::from_raw_parts(x, n), std::slice::from_raw_parts(y, n));
            for j in 0..n {
                dst[j].write(f(x[j], y[j]));
            }
        }
        (1, 0) => {
            let (x, y) = (std::slice::from_raw_parts(x, n), *y);
            for j in 0..n {
                dst[j].write(f(x[j], y));
            }
        }
        (0, 1) => {
            let (x, y) = (*x, std::slice::from_raw_parts(y, n));
            for j in 0..n {
                dst[j].write(f(x, y[j]));
            }
        }
        _ => {
            for (j, d) in dst.iter_mut().enumerate() {
                d.write(f(*x.offset(j as isize * sx), *y.offset(j as isize * sy)));
            }
        }
    }
}

pub(crate) fn float_add(lhs: NdArrayTensor, rhs: NdArrayTensor) -> NdArrayTensor {
    binary_f32(lhs, rhs, |a, b| a + b, Inner::float_add)
}

pub(crate) fn float_sub(lhs: NdArrayTensor, rhs: NdArrayTensor) -> NdArrayTensor {
    binary_f32(lhs, rhs, |a, b| a - b, Inner::float_sub)
}

pub(crate) fn float_mul(lhs: NdArrayTensor, rhs: NdArrayTensor) -> NdArrayTensor {
    binary_f32(lhs, rhs, |a, b| a * b, Inner::float_mul)
}

pub(crate) fn float_div(lhs: NdArrayTensor, rhs: NdArrayTensor) -> NdArrayTensor {
    binary_f32(lhs, rhs, |a, b| a / b, Inner::float_div)
}

/// The maximum along `dim`, keeping it with size 1 (NaN wins, as in burn's reference semantics).
/// burn-ndarray's takes ~10x a sum along the same dim, and every softmax starts with one.
pub(crate) fn float_max_dim(tensor: NdArrayTensor, dim: usize) -> NdArrayTensor {
    let NdArrayTensor::F32(storage) = tensor else {
        return Inner::float_max_dim(tensor, dim);
    };
    let input = standard(storage.into_shared());
    let shape = input.shape().to_vec();
    let (n, inner) = (shape[dim], shape[dim + 1..].iter().product::<usize>());
    let outer: usize = shape[..dim].iter().product();
    let src = input.as_slice().expect("standard layout");
    let mut out_shape = shape.clone();
    out_shape[dim] = 1;
    if n == 0 {
        return Inner::float_max_dim(NdArrayTensor::from(input), dim);
    }
    let max = |m: f32, v: f32| if v > m || v.is_nan() { v } else { m };
    let mut out = vec![0f32; outer * inner];
    let per_task = (CHUNK / (n * inner).max(1)).max(1);
    out.par_chunks_mut(per_task * inner)
        .enumerate()
        .for_each(|(task, dst)| {
            for (i, row) in dst.chunks_mut(inner).enumerate() {
                let block = &src[(task * per_task + i) * n * inner..][..n * inner];
                if inner == 1 {
                    // 16 independent lanes so the loop vectorizes
                    let mut lanes = [block[0]; 16];
                    let mut tail = block.chunks_exact(16);
                    for c in &mut tail {
                        for (m, &v) in lanes.iter_mut().zip(c) {
                            *m = max(*m, v);
                        }
                    }
                    row[0] = tail.remainder().iter().chain(&lanes).copied().fold(block[0], max);
                } else {
                    row.copy_from_slice(&block[..inner]);
                    for slab in block.chunks_exact(inner).skip(1) {
                        for (m, &v) in row.iter_mut().zip(slab) {
                            *m = max(*m, v);
                        }
                    }
                }
            }
        });
    NdArrayTensor::from(
        ArrayD::from_shape_vec(IxDyn(&out_shape), out)
            .expect("shape matches")
            .into_shared(),
    )
}

/// Concatenation along `dim` into one fresh standard-layout tensor, each part copied once, in
/// parallel (burn-ndarray concatenates, then copies the result again in its reshape).
pub(crate) fn float_cat(tensors: Vec<NdArrayTensor>, dim: usize) -> NdArrayTensor {
    if !tensors.iter().all(|t| matches!(t, NdArrayTensor::F32(_))) {
        return Inner::float_cat(tensors, dim);
    }
    let parts: Vec<ArcArray<f32, IxDyn>> = tensors
        .into_iter()
        .map(|t| match t {
            NdArrayTensor::F32(s) => standard(s.into_shared()),
            _ => unreachable!("checked above"),
        })
        .collect();
    let mut shape = parts[0].shape().to_vec();
    shape[dim] = parts.iter().map(|p| p.shape()[dim]).sum();
    let outer: usize = shape[..dim].iter().product();
    let inner: usize = shape[dim + 1..].iter().product();
    // Each outer index takes, from every part in turn, a contiguous run of `width * inner` values.
    let runs: Vec<(&[f32], usize)> = parts
        .iter()
        .map(|p| (p.as_slice().expect("standard layout"), p.shape()[dim] * inner))
        .collect();
    let row = shape[dim] * inner;
    let mut out = uninit_vec(outer * row);
    if let Some(rows_per_task) = CHUNK.checked_div(row).map(|r| r.max(1)) {
        out.par_chunks_mut(rows_per_task * row)
            .enumerate()
            .for_each(|(task, dst)| {
                for (i, dst_row) in dst.chunks_mut(row).enumerate() {
                    let o = task * rows_per_task + i;
                    let mut at = 0;
                    for &(src, run) in &runs {
                        let src = &src[o * run..][..run];
                        let dst = &mut dst_row[at..at + run];
                        // SAFETY: two distinct allocations, `run` elements each.
                        unsafe {
                            std::ptr::copy_nonoverlapping(src.as_ptr(), dst.as_mut_ptr().cast::<f32>(), run)
                        };
                        at += run;
                    }
                }
            });
    }
    // SAFETY: the runs of all parts fill each row (row = sum of the runs); row = 0 leaves nothing.
    let out = unsafe { assume_init(out) };
    NdArrayTensor::from(
        ArrayD::from_shape_vec(IxDyn(&shape), out)
            .expect("shape matches")
            .into_shared(),
    )
}

/// `e^x` in f32 without libm, in a form the compiler vectorizes: Cody-Waite reduction by ln 2 and
/// Cephes' degree-6 polynomial (max relative error ~2 ulp over the whole range); 0 below the
/// smallest normal, inf above `f32::MAX`, NaN kept.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const HI: f32 = 88.722_83;
    const LO: f32 = -87.336_55;
    let xc = x.clamp(LO, HI);
    // Round to nearest by the 1.5 * 2^23 trick: the low mantissa bits of `shifted` hold n as an
    // integer, so no float -> int conversion (which does not vectorize) is needed.
    const ROUND: f32 = 12_582_912.0;
    let shifted = xc * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = xc - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let y = (p * r).mul_add(r, r) + 1.0;
    // 2^n as two factors so that n = 128 (just below f32::MAX) does not overflow the exponent
    let n = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let half = n >> 1;
    let pow2 = |k: i32| f32::from_bits(((k + 127) as u32) << 23);
    let v = y * pow2(half) * pow2(n - half);
    let v = if x < LO { 0.0 } else { v };
    let v = if x > HI { f32::INFINITY } else { v };
    if x.is_nan() {
        x
    } else {
        v
    }
}

pub(crate) fn float_exp(tensor: NdArrayTensor) -> NdArrayTensor {
    map_f32(tensor, exp, Inner::float_exp)
}

/// `1 / (1 + e^-x)` in one pass (burn's default composes it from six).
pub(crate) fn sigmoid(tensor: NdArrayTensor) -> NdArrayTensor {
    map_f32(
        tensor,
        sigmoid_scalar,
        <Inner as burn_backend::ops::ActivationOps<Inner>>::sigmoid,
    )
}

#[inline(always)]
fn sigmoid_scalar(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array, Axis};

    /// The textbook triple loop, in f64, as the independent expectation.
    fn naive(lhs: &ArrayD<f32>, rhs: &ArrayD<f32>) -> ArrayD<f64> {
        let rank = lhs.ndim();
        let (m, k, n) = (
            lhs.shape()[rank - 2],
            lhs.shape()[rank - 1],
            rhs.shape()[rank - 1],
        );
        let batch: Vec<usize> = (0..rank - 2)
            .map(|d| lhs.shape()[d].max(rhs.shape()[d]))
            .collect();
        let mut shape = batch.clone();
        shape.extend([m, n]);
        let mut out = ArrayD::<f64>::zeros(IxDyn(&shape));
        for (b, mut o) in out
            .view_mut()
            .into_shape_with_order((batch.iter().product(), m, n))
            .unwrap()
            .outer_iter_mut()
            .enumerate()
        {
            let mut idx = vec![0; rank];
            let mut rest = b;
            for d in (0..rank - 2).rev() {
                idx[d] = rest % batch[d];
                rest /= batch[d];
            }
            let pick = |a: &ArrayD<f32>, i: usize, j: usize| {
                let mut at = idx.clone();
                for (d, i) in at.iter_mut().enumerate().take(rank - 2) {
                    if a.shape()[d] == 1 {
                        *i = 0;
                    }
                }
                at[rank - 2] = i;
                at[rank - 1] = j;
                a[IxDyn(&at)] as f64
            };
            for i in 0..m {
                for j in 0..n {
                    o[[i, j]] = (0..k).map(|p| pick(lhs, i, p) * pick(rhs, p, j)).sum();
                }
            }
        }
        out
    }

    fn filled(shape: &[usize], seed: u32) -> ArrayD<f32> {
        let len: usize = shape.iter().product();
        let data = (0..len as u32)
            .map(|i| ((i.wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect();
        Array::from_shape_vec(IxDyn(shape), data).unwrap()
    }

    fn check(lhs: ArrayViewD<f32>, rhs: ArrayViewD<f32>) {
        let got = matmul_f32(lhs.view(), rhs.view());
        let want = naive(&lhs.to_owned(), &rhs.to_owned());
        assert_eq!(got.shape(), want.shape());
        for (g, w) in got.iter().zip(want.iter()) {
            assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    #[test]
    fn matches_the_triple_loop_for_contiguous_transposed_and_broadcast_operands() {
        // one row (the decode shape), a large product split across threads, a batch of small ones
        check(filled(&[1, 64], 1).view(), filled(&[64, 300], 2).view());
        // a few rows against a transposed weight (decode's shape), split by columns over the threads
        let weight = filled(&[300, 40], 13);
        check(filled(&[4, 40], 14).view(), weight.t().into_dyn());
        check(filled(&[130, 257], 3).view(), filled(&[257, 129], 4).view());
        check(filled(&[3, 2, 5, 7], 5).view(), filled(&[3, 2, 7, 4], 6).view());
        // transposed rhs and a sliced lhs, read in place
        let rhs_t = filled(&[33, 17], 7);
        check(filled(&[9, 17], 8).view(), rhs_t.t().into_dyn());
        let big = filled(&[12, 40], 9);
        check(
            big.slice_axis(Axis(1), (5..25).into()).into_dyn(),
            filled(&[20, 6], 10).view(),
        );
        // broadcast batch dims on either side
        check(filled(&[4, 1, 3, 8], 11).view(), filled(&[1, 5, 8, 2], 12).view());
        // empty inner dim gives zeros
        let z = matmul_f32(filled(&[2, 0], 1).view(), filled(&[0, 3], 1).view());
        assert!(z.shape() == [2, 3] && z.iter().all(|v| *v == 0.0));
    }
}
