//! Emulated cube matmul speed vs ndarray (run with `cargo test -p v4-npu --test bench -- --ignored --nocapture`).

mod common;

use burn::tensor::Tensor;
use burn_ndarray::NdArray;
use common::*;
use std::time::Instant;
use v4_npu::*;

fn time<B: burn::tensor::backend::Backend>(dev: &B::Device, n: usize, reps: usize) -> f64 {
    let a = tensor::<B, 2>(rand_vec(n * n, 1, -1.0, 1.0), [n, n], dev);
    let b = tensor::<B, 2>(rand_vec(n * n, 2, -1.0, 1.0), [n, n], dev);
    let _ = values(a.clone().matmul(b.clone()));
    let t = Instant::now();
    for _ in 0..reps {
        let c: Tensor<B, 2> = a.clone().matmul(b.clone());
        let _ = values(c);
    }
    t.elapsed().as_secs_f64() / reps as f64
}

#[test]
#[ignore]
fn matmul_512_overhead_vs_ndarray() {
    let _g = lock();
    let dev = Default::default();
    set_policy(&dev, PrecisionPolicy::default());
    let nd = time::<NdArray<f32>>(&dev, 512, 10);
    let npu = time::<Npu<NdArray<f32>>>(&dev, 512, 10);
    println!(
        "512^3 f32 matmul: ndarray {:.2} ms, npu (emulated cube) {:.2} ms, ratio {:.2}x",
        nd * 1e3,
        npu * 1e3,
        npu / nd
    );
    assert!(npu / nd <= 3.0, "ratio {}", npu / nd);
}
