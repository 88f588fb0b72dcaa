//! Gradients through `Autodiff<Npu<NdArray>>` against finite differences, and a training loop.

mod common;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, Optimizer, SgdConfig};
use burn::tensor::{activation, backend::Backend, Tensor, TensorData};
use burn_autodiff::Autodiff;
use burn_ndarray::NdArray;
use common::*;
use v4_npu::*;

type AN = Autodiff<Npu<NdArray<f32>>>;
type F64 = NdArray<f64>;

/// A small composite of the model's ops: matmul, silu, softmax, exp, log1p, sqrt, div, mean, sum_dim.
fn composite<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 1> {
    let h = activation::silu(x.clone().matmul(w.clone())); // [4, 5]
    let p = activation::softmax(h.clone() * 1.3, 1);
    let gate = activation::sigmoid(h.clone().sum_dim(1)); // [4, 1]
    let rms = (x.clone().square().mean_dim(1) + 1e-3).sqrt(); // [4, 1]
    let a = (p * gate / rms).sum();
    let b = (w.exp() + 1.0).log().mean(); // softplus through exp / log
    let c = h.square().log1p().sum() * 0.1; // smooth (no |.| kink within the FD step)
    a + b + c
}

fn eval_f64(x: &[f64], w: &[f64]) -> f64 {
    let dev = Default::default();
    let xt = Tensor::<F64, 2>::from_data(TensorData::new(x.to_vec(), [4, 6]), &dev);
    let wt = Tensor::<F64, 2>::from_data(TensorData::new(w.to_vec(), [6, 5]), &dev);
    composite(xt, wt).into_scalar()
}

#[test]
fn gradients_match_finite_differences() {
    let _g = lock();
    let dev = Default::default();
    set_policy(&dev, PrecisionPolicy::must_keep_origin_dtype());
    let x = rand_vec(24, 71, -1.0, 1.0);
    let w = rand_vec(30, 72, -1.0, 1.0);
    let xt = tensor::<AN, 2>(x.clone(), [4, 6], &dev).require_grad();
    let wt = tensor::<AN, 2>(w.clone(), [6, 5], &dev).require_grad();
    let loss = composite(xt.clone(), wt.clone());
    let grads = loss.backward();
    let gx = values(xt.grad(&grads).unwrap());
    let gw = values(wt.grad(&grads).unwrap());
    // Central differences on an independent backend (NdArray<f64>). burn's default sigmoid computes
    // in f32 even there, so the differences use large steps with Richardson extrapolation:
    // (4 D(h/2) - D(h)) / 3 with h = 2e-2 (truncation O(h^4) ~ 1e-7, f32 noise ~ 1e-6 / h ~ 5e-5).
    let h = 2e-2f64;
    let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
    let w64: Vec<f64> = w.iter().map(|v| *v as f64).collect();
    let mut worst = 0f64;
    for (which, base, got) in [("x", &x64, &gx), ("w", &w64, &gw)] {
        for i in 0..base.len() {
            let d = |step: f64| {
                let mut plus = base.clone();
                let mut minus = base.clone();
                plus[i] += step;
                minus[i] -= step;
                let (fp, fm) = if which == "x" {
                    (eval_f64(&plus, &w64), eval_f64(&minus, &w64))
                } else {
                    (eval_f64(&x64, &plus), eval_f64(&x64, &minus))
                };
                (fp - fm) / (2.0 * step)
            };
            let fd = (4.0 * d(h / 2.0) - d(h)) / 3.0;
            let err = (got[i] as f64 - fd).abs();
            worst = worst.max(err / (fd.abs() + 1e-2));
            assert!(
                err <= 1e-3 * fd.abs() + 2e-4,
                "d/d{which}[{i}]: autodiff {} vs fd {fd}",
                got[i]
            );
        }
    }
    println!("gradient vs finite differences: worst relative error {worst:.2e}");
    let r = report(&dev);
    assert!(
        r.calls("float_matmul", Engine::Cube) >= 3,
        "forward + 2 backward matmuls ran on the emulated cube"
    );
}

#[derive(Module, Debug)]
struct Tiny<B: Backend> {
    l1: Linear<B>,
    l2: Linear<B>,
}

impl<B: Backend> Tiny<B> {
    fn forward(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        self.l2.forward(activation::silu(self.l1.forward(x)))
    }
}

#[test]
fn sgd_training_reduces_the_loss() {
    let _g = lock();
    let dev = Default::default();
    set_policy(&dev, PrecisionPolicy::must_keep_origin_dtype());
    AN::seed(&dev, 7);
    let mut model = Tiny::<AN> {
        l1: LinearConfig::new(8, 16).init(&dev),
        l2: LinearConfig::new(16, 1).init(&dev),
    };
    let x = tensor::<AN, 2>(rand_vec(64 * 8, 81, -1.0, 1.0), [64, 8], &dev);
    let target = (x.clone().slice([0..64, 0..1]) * 2.0 - x.clone().slice([0..64, 3..4])).detach();
    let mut opt = SgdConfig::new().init::<AN, Tiny<AN>>();
    let mut losses = Vec::new();
    for _ in 0..30 {
        let loss = (model.forward(x.clone()) - target.clone()).square().mean();
        losses.push(loss.clone().into_scalar());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = opt.step(0.1, model, grads);
    }
    println!("loss: {:.4} -> {:.4}", losses[0], losses[losses.len() - 1]);
    assert!(losses[29] < 0.5 * losses[0], "{losses:?}");
}
