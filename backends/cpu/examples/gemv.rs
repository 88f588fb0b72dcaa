//! Times `x @ W` for decode-shaped products (one to four rows of `x`, `W` stored `[in, out]` as the
//! model keeps its f32 projections) on the `cpu` backend, and prints the rate at which `W` is read.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p v4-cpu --example gemv`; `V4_CPU_ISA=avx2|scalar`
//! picks a narrower kernel path. The first shape is v4-small's output head (65 MB, streamed from
//! memory); the small ones stay in cache and show the per-call overhead. The last lines take each of
//! v4-small's decode shapes over enough distinct matrices (256 MB) that every call reads `W` from
//! memory, as a decode step does.

use burn::tensor::{Distribution, Tensor};
use std::time::Instant;
use v4_cpu::Cpu;

fn main() {
    // The model's forward runs inside rayon's pool; a call from outside pays a wake-up per product.
    rayon::ThreadPoolBuilder::new().build().unwrap().install(run);
}

fn run() {
    let device = Default::default();
    in_cache(&device);
    from_memory(&device);
}

fn in_cache(device: &burn_ndarray::NdArrayDevice) {
    println!(
        "kernel path: {}, threads: {}",
        v4_cpu::isa(),
        rayon::current_num_threads()
    );
    for (m, k, n) in [
        (1, 512, 32000),
        (2, 512, 32000),
        (4, 512, 4096),
        (1, 512, 1024),
        (1, 2048, 512),
        (1, 512, 256),
    ] {
        let x = Tensor::<Cpu, 2>::random([m, k], Distribution::Default, device);
        let w = Tensor::<Cpu, 2>::random([k, n], Distribution::Default, device);
        let iters = (2_000_000_000 / (k * n * 4)).max(10);
        std::hint::black_box(x.clone().matmul(w.clone()));
        let start = Instant::now();
        for _ in 0..iters {
            std::hint::black_box(x.clone().matmul(w.clone()));
        }
        let seconds = start.elapsed().as_secs_f64() / iters as f64;
        let rate = (k * n * 4) as f64 / seconds / 1e9;
        println!(
            "[{m}, {k}] @ [{k}, {n}]: {:8.1} us, W read at {rate:5.1} GB/s",
            seconds * 1e6
        );
    }
}

/// One-row products over 256 MB of distinct `[k, n]` matrices, one after another: the rate `W` is read
/// from memory at each of v4-small's decode shapes.
fn from_memory(device: &burn_ndarray::NdArrayDevice) {
    for (k, n) in [(512, 256), (256, 512), (512, 1024), (256, 1024), (512, 4096)] {
        let count = (256 << 20) / (k * n * 4);
        let x = Tensor::<Cpu, 2>::random([1, k], Distribution::Default, device);
        let ws: Vec<_> = (0..count)
            .map(|_| Tensor::<Cpu, 2>::random([k, n], Distribution::Default, device))
            .collect();
        let pass = || {
            let start = Instant::now();
            for w in &ws {
                std::hint::black_box(x.clone().matmul(w.clone()));
            }
            start.elapsed().as_secs_f64() / count as f64
        };
        pass();
        let seconds = (0..3).map(|_| pass()).fold(f64::INFINITY, f64::min);
        let rate = (k * n * 4) as f64 / seconds / 1e9;
        println!(
            "from memory, {count} x [1, {k}] @ [{k}, {n}]: {:8.1} us, W read at {rate:5.1} GB/s",
            seconds * 1e6
        );
    }
}
