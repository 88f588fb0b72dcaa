//! `v4 bench --config CONFIG`: full-sequence forward throughput on random weights.

use crate::device::{with_backend, Device};
use crate::io::{bench_ids, read_config_file, Result};
use burn::tensor::{backend::Backend, Distribution, Tensor};
use std::path::PathBuf;
use std::time::Instant;
use v4_model::{RandomWeights, Tokens, V4Model};

#[derive(clap::Args)]
pub struct Args {
    /// Model config (HF config.json or DeepSeek inference config), e.g.
    /// tests/fixtures/bench/v4-small.hf-config.json.
    #[arg(long)]
    config: PathBuf,
    /// Sequences per forward.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 512)]
    seq: usize,
    /// Timed forward passes (after one warm-up).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Seed of the random weights and tokens.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Token ids to run on instead of seeded random ones: JSONL records `{"ids": [..]}`, the first
    /// batch x seq taken in order (the file `scripts/bench-peers.sh` writes for both v4 and HF).
    #[arg(long)]
    ids: Option<PathBuf>,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    /// NPU precision policy and chip sheet (TOML), for `--device npu`.
    #[arg(long)]
    npu_config: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    with_backend!(args.device, args.npu_config.as_deref(), |B, device| bench::<B>(
        &args, &device
    ))
}

/// Best-of-3 f32 GFLOP/s of a square matmul of size `n`: the machine's practical matmul peak on this backend.
pub(crate) fn matmul_peak<B: Backend>(n: usize, device: &B::Device) -> f64 {
    let a = Tensor::<B, 2>::random([n, n], Distribution::Default, device);
    let b = Tensor::<B, 2>::random([n, n], Distribution::Default, device);
    let _ = a.clone().matmul(b.clone()).into_data();
    (0..3)
        .map(|_| {
            let started = Instant::now();
            let _ = a.clone().matmul(b.clone()).into_data();
            2.0 * (n as f64).powi(3) / started.elapsed().as_secs_f64() / 1e9
        })
        .fold(0.0, f64::max)
}

fn bench<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let config = read_config_file(&args.config)?;
    let source = RandomWeights {
        seed: args.seed,
        experts: config.n_routed_experts,
    };
    let model = V4Model::<B>::load(&config, &source, device)?;
    let n = args.batch * args.seq;
    let ids: Vec<i64> = bench_ids(args.ids.as_deref(), args.seed, n, config.vocab_size)?
        .into_iter()
        .map(i64::from)
        .collect();
    let tokens = Tokens::new(&ids, args.batch, args.seq, config.vocab_size)?;
    println!(
        "v4 bench: {} ({} params, {} active), batch {} x {} tokens, {:?}, threads: {}, cpu kernels: {}",
        args.config.display(),
        config.param_counts().total,
        config.param_counts().active,
        args.batch,
        args.seq,
        args.device,
        rayon::current_num_threads(),
        v4_cpu::isa()
    );
    // Reading one logit waits for the whole forward on asynchronous backends without timing a 64 MB
    // host copy (HF's forward hands its logits back in place, too).
    let run = || -> Result<()> {
        let logits = model.forward(&tokens)?;
        let _ = logits.slice([0..1, 0..1, 0..1]).into_data();
        Ok(())
    };
    run()?;
    let mut times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters.max(1) {
        let started = Instant::now();
        run()?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let flops = config.forward_flops(args.seq) * args.batch as f64;
    let achieved = flops / median / 1e9;
    let peak = matmul_peak::<B>(1024, device);
    println!(
        "forward: median {:.3}s over {} runs (min {:.3}s) -> {:.1} tokens/s",
        median,
        times.len(),
        times[0],
        n as f64 / median
    );
    println!(
        "compute: {:.2} GFLOP per forward, {:.1} GFLOP/s achieved; f32 matmul peak (1024^3) {:.1} GFLOP/s ({:.0}% of it)",
        flops / 1e9,
        achieved,
        peak,
        100.0 * achieved / peak
    );
    Ok(())
}
