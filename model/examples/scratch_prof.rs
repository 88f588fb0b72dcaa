use burn::tensor::{Distribution, Tensor};
use burn_ndarray::NdArray;
use std::time::Instant;
use v4_model::*;
type B = NdArray<f32>;
fn ms(t: Instant, n: usize) -> f64 { t.elapsed().as_secs_f64() * 1000.0 / n as f64 }
fn main() {
    let text = std::fs::read_to_string("tests/fixtures/bench/v4-small.hf-config.json").unwrap();
    let config = V4Config::from_json_str(&text).unwrap();
    let dev = Default::default();
    let model = V4Model::<B>::load(&config, &RandomWeights { seed: 0, experts: 32 }, &dev).unwrap();
    let ids: Vec<u32> = (0..512u32).map(|i| (i * 7919) % 32000).collect();
    let x = Tensor::<B, 4>::random([1, 512, 4, 512], Distribution::Default, &dev);
    let x3 = Tensor::<B, 3>::random([1, 512, 512], Distribution::Default, &dev);
    let n = 5;
    let (mut hc, mut at, mut mo) = (0.0, 0.0, 0.0);
    for l in 0..8 {
        let blk = &model.layers[l];
        let t = Instant::now();
        for _ in 0..n { let (i, m) = blk.attn_hc.pre(&x); let _ = m.post(i, x.clone()).into_data(); }
        hc += ms(t, n);
        let t = Instant::now();
        for _ in 0..n { let mut c = cache::LayerCache::default(); let _ = blk.attn.forward(x3.clone(), 0, &mut c, &mut NoProbe, "a").into_data(); }
        let a = ms(t, n); at += a;
        let t = Instant::now();
        for _ in 0..n { let _ = blk.ffn.forward(x3.clone(), &ids, l, &LocalExperts, &mut NoProbe, "f").0.into_data(); }
        let m = ms(t, n); mo += m;
        println!("layer {l} {:?}: attn {a:.1} ms, moe {m:.1} ms", blk.attn.kind);
    }
    println!("total hc(x1 site) {hc:.1}, attn {at:.1}, moe {mo:.1}");
    let t = Instant::now();
    for _ in 0..n { let _ = model.head.forward(x3.clone()).into_data(); }
    println!("head: {:.1} ms", ms(t, n));
    let t = Instant::now();
    for _ in 0..n { let _ = model.layers[0].attn.wq_b.forward(x3.clone().narrow(2, 0, 256)).into_data(); }
    println!("wq_b 512x256x1024: {:.2} ms", ms(t, n));
    let t = Instant::now();
    for _ in 0..n { let _ = norm::rms_normalize(x3.clone(), 1e-6).into_data(); }
    println!("rmsnorm 512x512: {:.2} ms", ms(t, n));
    let t = Instant::now();
    for _ in 0..n { let _ = (x3.clone() * x3.clone()).into_data(); }
    println!("mul 512x512: {:.2} ms", ms(t, n));
}
