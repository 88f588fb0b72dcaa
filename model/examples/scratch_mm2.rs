use burn::tensor::{Distribution, Tensor, TensorData};
use burn_ndarray::NdArray;
use std::time::Instant;
type B = NdArray<f32>;
fn t<F: Fn()>(name: &str, f: F) { f(); let t = Instant::now(); for _ in 0..3 { f(); } println!("{name}: {:.1} ms", t.elapsed().as_secs_f64() * 1e3 / 3.0); }
fn main() {
    let dev = Default::default();
    let x = Tensor::<B, 2>::random([512, 512], Distribution::Default, &dev);
    let w = Tensor::<B, 2>::random([512, 32000], Distribution::Default, &dev);
    let v: Vec<f32> = (0..512 * 32000).map(|i| (i % 97) as f32 * 0.01).collect();
    let wd = Tensor::<B, 2>::from_data(TensorData::new(v, [512, 32000]), &dev);
    t("random w", || { let _ = x.clone().matmul(w.clone()); });
    t("from_data w", || { let _ = x.clone().matmul(wd.clone()); });
    t("from_data w + into_data", || { let _ = x.clone().matmul(wd.clone()).into_data(); });
    let x3 = Tensor::<B, 3>::random([1, 512, 512], Distribution::Default, &dev);
    t("3d reshape path", || { let _ = x3.clone().reshape([512, 512]).matmul(wd.clone()).reshape([1, 512, 32000]); });
}
