//! Times decode-shaped products on weights in their stored precision (`CpuPackedMatmul`, one row of
//! `x`) and prints the rate at which the packed bytes are read.
//!
//! `RAYON_NUM_THREADS=2 cargo run --release -p v4-cpu --example packed_gemv`; `V4_CPU_ISA=avx2|scalar`
//! picks a narrower kernel path. The first shapes are v4-small's (its BF16 output head, an FP8
//! projection, six MXFP4 experts as one grouped product); the 4096x4096 ones stream from memory.

use std::time::Instant;
use v4_cpu::CpuPackedMatmul;
use v4_formats::codec::mxfp4::MxRule;
use v4_formats::codec::{f32_to_bf16, fp8, mxfp4, ScaleSearch};
use v4_formats::{Bytes, Fp8ScaleKind, PackedMatmul, PackedMatrix, PackedRows, Storage};

fn main() {
    // The model's forward runs inside rayon's pool; a call from outside pays a wake-up per product.
    rayon::ThreadPoolBuilder::new().build().unwrap().install(run);
}

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn packed(storage: &str, rows: usize, cols: usize) -> PackedMatrix {
    let w = values(rows * cols, (rows * cols) as u64);
    let (storage, data, scales) = match storage {
        "bf16" => {
            let data = w.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect();
            (Storage::Bf16, data, Vec::new())
        }
        "fp8" => {
            let (q, _) = fp8::quantize(&w, rows, cols, 128);
            let storage = Storage::Fp8 {
                block: 128,
                scale: Fp8ScaleKind::E8m0,
            };
            (storage, q.codes, q.scales)
        }
        _ => {
            let (data, scales, _) = mxfp4::quantize(&w, rows, cols, MxRule::Rceil, ScaleSearch::Off);
            (Storage::Mxfp4 { block: 32 }, data, scales)
        }
    };
    let part = PackedRows::new(
        rows,
        cols,
        storage,
        Bytes::from_vec(data),
        Bytes::from_vec(scales),
    );
    PackedMatrix::new(vec![part.unwrap()]).unwrap()
}

fn run() {
    println!(
        "kernel path: {}, threads: {}",
        v4_cpu::isa(),
        rayon::current_num_threads()
    );
    for (storage, rows, cols, groups) in [
        ("bf16", 32000, 512, 1),
        ("fp8", 1024, 256, 1),
        ("mxfp4", 512, 512, 6),
        ("bf16", 4096, 4096, 1),
        ("fp8", 4096, 4096, 1),
        ("mxfp4", 4096, 4096, 1),
    ] {
        let ws: Vec<PackedMatrix> = (0..groups).map(|_| packed(storage, rows, cols)).collect();
        let group_list: Vec<(usize, &PackedMatrix)> = ws.iter().map(|w| (1, w)).collect();
        let x = values(groups * cols, 7);
        let mut y = vec![0f32; groups * rows];
        let bytes: usize = ws.iter().map(PackedMatrix::stored_bytes).sum();
        let iters = (4_000_000_000 / bytes).max(10);
        CpuPackedMatmul.matmul_t_grouped(&x, &group_list, &mut y);
        let start = Instant::now();
        for _ in 0..iters {
            CpuPackedMatmul.matmul_t_grouped(&x, &group_list, std::hint::black_box(&mut y));
        }
        let seconds = start.elapsed().as_secs_f64() / iters as f64;
        println!(
            "{groups} x {storage:5} [{rows}, {cols}]: {:8.1} us, {:6.2} MB read at {:5.1} GB/s",
            seconds * 1e6,
            bytes as f64 / 1e6,
            bytes as f64 / seconds / 1e9
        );
    }
}
