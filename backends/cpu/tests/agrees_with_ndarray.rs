//! Every op `Cpu` implements itself gives burn-ndarray's result (the independent expectation), on
//! contiguous, transposed, sliced and broadcast operands.

use burn::tensor::{activation, Distribution, Int, Tensor, TensorData};
use burn_ndarray::NdArray;
use v4_cpu::Cpu;

type Nd = NdArray<f32>;

fn pair<const D: usize>(shape: [usize; D], seed: u64) -> (Tensor<Cpu, D>, Tensor<Nd, D>) {
    let device = Default::default();
    <Nd as burn::tensor::backend::Backend>::seed(&device, seed);
    let nd = Tensor::<Nd, D>::random(shape, Distribution::Uniform(-4.0, 4.0), &device);
    (Tensor::from_data(nd.to_data(), &device), nd)
}

/// Elementwise `|got - want| <= rel * |want| + abs` (NaN matches NaN).
fn assert_close<const D: usize>(got: Tensor<Cpu, D>, want: Tensor<Nd, D>, rel: f32, abs: f32, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (g, w) = (
        got.into_data().to_vec::<f32>().unwrap(),
        want.into_data().to_vec::<f32>().unwrap(),
    );
    for (i, (g, w)) in g.iter().zip(&w).enumerate() {
        let ok = (g - w).abs() <= rel * w.abs() + abs || (g.is_nan() && w.is_nan()) || g == w;
        assert!(ok, "{what}: element {i}: {g} vs {w}");
    }
}

#[test]
fn matmul_on_plain_transposed_sliced_and_broadcast_operands() {
    let (a, an) = pair([2, 3, 40, 33], 1);
    let (b, bn) = pair([2, 1, 33, 17], 2);
    assert_close(
        a.clone().matmul(b.clone()),
        an.clone().matmul(bn.clone()),
        1e-5,
        1e-4,
        "broadcast",
    );
    let (c, cn) = pair([2, 3, 33, 40], 3);
    assert_close(
        c.clone()
            .swap_dims(2, 3)
            .matmul(b.clone().narrow(3, 0, 9).swap_dims(2, 3).swap_dims(2, 3)),
        cn.clone().swap_dims(2, 3).matmul(bn.clone().narrow(3, 0, 9)),
        1e-5,
        1e-4,
        "transposed and sliced",
    );
    let (x, xn) = pair([1, 512], 4);
    let (w, wn) = pair([512, 300], 5);
    assert_close(x.matmul(w), xn.matmul(wn), 1e-5, 1e-4, "one row");
}

#[test]
fn elementwise_ops_and_their_broadcasts() {
    let (a, an) = pair([4, 70, 33], 6);
    let (b, bn) = pair([4, 70, 33], 7);
    let (r, rn) = pair([4, 70, 1], 8);
    let (c, cn) = pair([1, 70, 33], 9);
    assert_close(a.clone() + b.clone(), an.clone() + bn.clone(), 0.0, 0.0, "add");
    assert_close(
        a.clone() - r.clone(),
        an.clone() - rn.clone(),
        0.0,
        0.0,
        "sub, broadcast last dim",
    );
    assert_close(
        r.clone() * c.clone(),
        rn.clone() * cn.clone(),
        0.0,
        0.0,
        "mul, both sides broadcast",
    );
    assert_close(
        a.clone() / c.clone(),
        an.clone() / cn.clone(),
        0.0,
        0.0,
        "div, broadcast batch",
    );
    assert_close(
        a.clone().swap_dims(1, 2) * b.clone().swap_dims(1, 2),
        an.clone().swap_dims(1, 2) * bn.clone().swap_dims(1, 2),
        0.0,
        0.0,
        "mul of transposed views",
    );
    // exp: within 3 f32 ulps of libm over the range, inf / NaN at the edges; results below the smallest
    // normal f32 are flushed to 0 (libm returns subnormals there)
    let (e, en) = pair([3, 5000], 10);
    assert_close(
        e.clone().mul_scalar(22.0).exp(),
        en.clone().mul_scalar(22.0).exp(),
        4e-7,
        f32::MIN_POSITIVE,
        "exp",
    );
    let device = Default::default();
    let edges = [
        -1e4f32,
        -103.0,
        -87.5,
        -87.0,
        0.0,
        88.0,
        88.7,
        88.8,
        1e4,
        f32::NAN,
        f32::NEG_INFINITY,
    ];
    let edge_cpu = Tensor::<Cpu, 1>::from_data(TensorData::new(edges.to_vec(), [edges.len()]), &device);
    let edge_nd = Tensor::<Nd, 1>::from_data(TensorData::new(edges.to_vec(), [edges.len()]), &device);
    assert_close(
        edge_cpu.exp(),
        edge_nd.exp(),
        4e-7,
        f32::MIN_POSITIVE,
        "exp edges",
    );
    assert_close(
        activation::sigmoid(e.clone()),
        activation::sigmoid(en.clone()),
        1e-6,
        0.0,
        "sigmoid",
    );
    assert_close(
        activation::softmax(a.clone(), 1),
        activation::softmax(an.clone(), 1),
        1e-6,
        0.0,
        "softmax",
    );
}

#[test]
fn cat_along_every_axis() {
    let (a, an) = pair([3, 4, 5], 13);
    let (b, bn) = pair([3, 4, 5], 14);
    for dim in 0..3 {
        let (x, xn) = (a.clone().narrow(dim, 1, 2), an.clone().narrow(dim, 1, 2));
        let (y, yn) = (b.clone().swap_dims(0, 1).swap_dims(0, 1), bn.clone());
        assert_close(
            Tensor::cat(vec![x, y, a.clone()], dim),
            Tensor::cat(vec![xn, yn, an.clone()], dim),
            0.0,
            0.0,
            &format!("cat({dim})"),
        );
    }
}

#[test]
fn max_dim_on_every_axis() {
    let (a, an) = pair([5, 37, 19], 11);
    for dim in 0..3 {
        assert_close(
            a.clone().max_dim(dim),
            an.clone().max_dim(dim),
            0.0,
            0.0,
            &format!("max_dim({dim})"),
        );
        let (t, tn) = (a.clone().swap_dims(0, 2), an.clone().swap_dims(0, 2));
        assert_close(
            t.max_dim(dim),
            tn.max_dim(dim),
            0.0,
            0.0,
            &format!("max_dim({dim}) of a transposed view"),
        );
    }
}

#[test]
fn views_slice_and_reshape_like_ndarray() {
    let (a, an) = pair([6, 10, 8], 12);
    assert_close(
        a.clone().slice([1..5, 2..9, 0..8]).reshape([4 * 7, 8]),
        an.clone().slice([1..5, 2..9, 0..8]).reshape([4 * 7, 8]),
        0.0,
        0.0,
        "slice then reshape",
    );
    assert_close(
        a.clone().permute([2, 0, 1]).reshape([8, 60]),
        an.clone().permute([2, 0, 1]).reshape([8, 60]),
        0.0,
        0.0,
        "permute then reshape",
    );
    // slices share the parent's storage, so writing into the parent must not change the slice
    let device = Default::default();
    let parent = Tensor::<Cpu, 1, Int>::arange(0..10, &device);
    let window = parent.clone().narrow(0, 2, 4);
    let _ = parent.slice_assign([2..4usize; 1], Tensor::zeros([2], &device));
    assert_eq!(window.into_data().to_vec::<i64>().unwrap(), vec![2, 3, 4, 5]);
}

#[test]
fn zeros_and_full_and_the_slice_backward_that_uses_them() {
    let device = Default::default();
    assert_close(
        Tensor::<Cpu, 3>::zeros([3, 4, 5], &device),
        Tensor::<Nd, 3>::zeros([3, 4, 5], &device),
        0.0,
        0.0,
        "zeros",
    );
    assert_close(
        Tensor::<Cpu, 2>::full([7, 3], -2.5, &device),
        Tensor::<Nd, 2>::full([7, 3], -2.5, &device),
        0.0,
        0.0,
        "full",
    );
    // The gradient of a slice is zeros of the parent's shape with the upstream gradient in the slice.
    type Ad<B> = burn_autodiff::Autodiff<B>;
    let (x, xn) = pair([4, 6], 9);
    let x = Tensor::<Ad<Cpu>, 2>::from_data(x.into_data(), &device).require_grad();
    let xn = Tensor::<Ad<Nd>, 2>::from_data(xn.into_data(), &device).require_grad();
    let g = x.clone().slice([1..3, 2..5]).exp().sum().backward();
    let gn = xn.clone().slice([1..3, 2..5]).exp().sum().backward();
    assert_close(
        x.grad(&g).unwrap(),
        xn.grad(&gn).unwrap(),
        1e-6,
        0.0,
        "slice backward",
    );
}

#[test]
fn reading_back_views_of_a_tensor_still_in_use() {
    let (a, an) = pair([6, 5, 7], 21);
    // A row range of a shared tensor (copied in one piece), a transposed view and a strided slice (both
    // left to burn-ndarray): the same elements, in row-major order.
    let views: [(Tensor<Cpu, 3>, Tensor<Nd, 3>, &str); 3] = [
        (a.clone().narrow(0, 2, 3), an.clone().narrow(0, 2, 3), "rows"),
        (
            a.clone().swap_dims(0, 2),
            an.clone().swap_dims(0, 2),
            "transposed",
        ),
        (a.clone().narrow(2, 1, 4), an.clone().narrow(2, 1, 4), "columns"),
    ];
    for (got, want, what) in views {
        assert_eq!(got.dims(), want.dims(), "{what}");
        let (g, w) = (got.into_data(), want.into_data());
        assert_eq!(g.shape, w.shape, "{what}");
        assert_eq!(g.to_vec::<f32>().unwrap(), w.to_vec::<f32>().unwrap(), "{what}");
    }
    drop(a);
}
