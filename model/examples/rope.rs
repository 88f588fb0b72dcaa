//! Times one decode step's rotary embedding at DeepSeek-V4-Flash's attention shape (64 heads of 512
//! channels, the last 64 rotated) on the `cpu` backend: the tables for one position, then the query's
//! rotation and the output's inverse rotation.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p v4-model --example rope`

use burn::tensor::{Distribution, Tensor};
use std::time::Instant;
use v4_cpu::Cpu;
use v4_model::rope::Rope;

fn main() {
    // The model's forward runs inside rayon's pool; a call from outside pays a wake-up per product.
    rayon::ThreadPoolBuilder::new().build().unwrap().install(run);
}

fn run() {
    let device = Default::default();
    let rope = Rope::new(64, 160000.0, None);
    for (heads, width) in [(64, 512), (8, 128)] {
        let q = Tensor::<Cpu, 4>::random([1, 1, heads, width], Distribution::Default, &device);
        let step = |t: usize| {
            let tables = rope.tables::<Cpu>(&[t], width, &device);
            let rotated = tables.apply(q.clone(), false);
            tables.apply(rotated, true).into_data()
        };
        std::hint::black_box(step(0));
        let iters = 2000;
        let start = Instant::now();
        for t in 0..iters {
            std::hint::black_box(step(t));
        }
        let us = start.elapsed().as_secs_f64() / iters as f64 * 1e6;
        println!("[1, 1, {heads}, {width}], 64 rotated: tables + rotation + inverse {us:8.1} us");
    }
}
