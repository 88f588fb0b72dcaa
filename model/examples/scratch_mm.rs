use burn::tensor::{Distribution, Tensor};
use burn_ndarray::NdArray;
use std::time::Instant;
type B = NdArray<f32>;
fn bench(m: usize, k: usize, n: usize) {
    let dev = Default::default();
    let a = Tensor::<B, 2>::random([m, k], Distribution::Default, &dev);
    let b = Tensor::<B, 2>::random([k, n], Distribution::Default, &dev);
    let _ = a.clone().matmul(b.clone()).into_data();
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps { let _ = a.clone().matmul(b.clone()); }
    let s = t.elapsed().as_secs_f64() / reps as f64;
    println!("{m}x{k}x{n}: {:.2} ms, {:.1} GFLOP/s", s * 1e3, 2.0 * (m * k * n) as f64 / s / 1e9);
}
fn main() {
    for (m, k, n) in [(1024, 1024, 1024), (512, 512, 32000), (512, 512, 1024), (512, 256, 1024), (512, 512, 128), (96, 512, 512), (96, 256, 512), (1, 512, 512)] { bench(m, k, n); }
}
