//! `v4 bench-infer --config CONFIG`: prefill and decode throughput of the inference runner on random
//! weights, the memory-bandwidth bound of decode, and (`--contexts`) how prefill, decode and the cache scale
//! with the context length.

use crate::commands::generate::{describe_acceptance, SpeculativeArgs};
use crate::device::{with_backend, Device};
use crate::io::{bench_ids, random_ids, read_config_file, Result};
use crate::load::{Load, LoadArgs};
use crate::parallel::Ranks;
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};
use std::time::Instant;
use v4_checkpoint::read_config;
use v4_infer::sampling::argmax;
use v4_infer::scaling::{slopes, svg, ScalingRow};
use v4_infer::{
    cache_footprint, human_bytes, scalars_per_token, Flow, GenerateParams, Generator, SamplingParams,
    SpeculativeParams,
};
use v4_model::{LoadPlan, RandomWeights, V4Config, V4Model};

#[derive(clap::Args)]
pub struct Args {
    /// Model config (HF config.json or DeepSeek inference config), e.g.
    /// tests/fixtures/bench/v4-small.hf-config.json: random weights.
    #[arg(long, required_unless_present = "model", conflicts_with = "model")]
    config: Option<PathBuf>,
    /// Or a checkpoint directory (either layout; quantized weights stay as stored unless --dequantize).
    #[arg(long)]
    model: Option<PathBuf>,
    #[command(flatten)]
    load: LoadArgs,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Tokens generated per sequence (greedy, EOS ignored).
    #[arg(long, default_value_t = 128)]
    generate: usize,
    /// Scaling table instead: total context lengths, e.g. 1024,4096,16384,65536 (prompt = context -
    /// --generate, then --generate decode steps).
    #[arg(long, value_delimiter = ',')]
    contexts: Vec<usize>,
    /// With --contexts: also draw the table as an SVG plot (log-log, with slope-1 and slope-2 guides).
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Prefill in calls of at most N tokens (0: one call; --contexts defaults to 2048).
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Only print the decoding state's size per context length (analytic, from the config; no weights are
    /// built), e.g. for tests/fixtures/deepseek-v4-flash/config.json.
    #[arg(long)]
    cache_only: bool,
    /// Prefill repetitions (the median is reported; the last one's cache is decoded).
    #[arg(long, default_value_t = 3)]
    iters: usize,
    /// Seed of the random weights and prompt.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Prompt token ids instead of seeded random ones: JSONL records `{"ids": [..]}`, the first
    /// batch x prompt taken in order (the file `scripts/bench-peers.sh` writes for both v4 and HF).
    #[arg(long)]
    ids: Option<PathBuf>,
    /// With --speculative: plain greedy decoding and speculative decoding of the same prompts, alternated
    /// --iters times in one sitting; reports both decode rates, the speedup, the acceptance rate per draft
    /// position and whether the outputs are identical. Needs a checkpoint with an MTP layer.
    #[command(flatten)]
    speculative: SpeculativeArgs,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
}

impl Args {
    /// The config file or checkpoint directory benchmarked.
    fn source(&self) -> &Path {
        self.model
            .as_deref()
            .or(self.config.as_deref())
            .expect("clap requires --config or --model")
    }
}

pub fn run(args: Args) -> Result<()> {
    with_backend!(args.device, None::<&std::path::Path>, |B, device| bench::<B>(
        &args, &device
    ))
}

/// Best-of-5 read bandwidth (bytes/s) of summing 256 MiB of f32 with `threads` threads.
fn memory_bandwidth(threads: usize) -> f64 {
    let data = vec![1.0f32; 64 << 20];
    let chunk = data.len().div_ceil(threads);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let started = Instant::now();
        let total: f32 = std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(chunk)
                .map(|part| {
                    s.spawn(move || {
                        let mut acc = [0.0f32; 16];
                        let mut blocks = part.chunks_exact(16);
                        for block in &mut blocks {
                            for (a, x) in acc.iter_mut().zip(block) {
                                *a += x;
                            }
                        }
                        acc.iter().sum::<f32>() + blocks.remainder().iter().sum::<f32>()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0.0)).sum()
        });
        let s = started.elapsed().as_secs_f64();
        std::hint::black_box(total);
        best = best.max((data.len() * 4) as f64 / s);
    }
    best
}

/// Weight bytes one decode step of `batch` tokens reads, as the model holds them (f32, or the stored
/// precision): everything but the routed experts and the embedding table, the embedding rows, and the
/// share of the experts the batch is expected to touch per layer.
fn weight_bytes_per_step<B: Backend>(model: &V4Model<B>, batch: usize) -> f64 {
    let config = &model.config;
    let (e, k) = (config.n_routed_experts as f64, config.experts_per_token as f64);
    let experts: usize = model.layers.iter().map(|l| l.ffn.experts.held_bytes()).sum();
    let embedding = model.embed.held_bytes();
    let total = model.resident.packed + model.resident.dense;
    let rest = (total - experts - embedding) as f64;
    let rows = batch as f64 * embedding as f64 / config.vocab_size as f64;
    let touched = 1.0 - (1.0 - k / e).powi(batch as i32);
    rest + rows + touched * experts as f64
}

/// Greedy decode of `steps` tokens for every sequence of `batch`; returns the seconds taken.
fn decode<B: Backend>(
    generator: &Generator<'_, B>,
    batch: &mut v4_infer::Batch<B>,
    mut logits: Vec<Vec<f32>>,
    steps: usize,
) -> Result<f64> {
    let started = Instant::now();
    for _ in 0..steps {
        let next: Vec<Vec<u32>> = logits.iter().map(|l| vec![argmax(l)]).collect();
        let refs: Vec<&[u32]> = next.iter().map(Vec::as_slice).collect();
        logits = generator.feed_batch(batch, &refs, None, false)?;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn bench<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let config = match (&args.config, &args.model) {
        (Some(path), _) => read_config_file(path)?,
        (None, Some(dir)) => read_config(dir)?,
        (None, None) => unreachable!("clap requires --config or --model"),
    };
    if args.batch == 0 || args.prompt == 0 {
        return Err("--batch and --prompt must be at least 1".into());
    }
    if args.cache_only {
        cache_table(args, &config);
        return Ok(());
    }
    let ranks = Ranks::launched()?;
    let model = match &args.model {
        Some(dir) => Load::new(dir, &config, args.device, args.load)
            .experts(ranks.shard())
            .model::<B>(device)?,
        None => {
            let source = RandomWeights {
                seed: args.seed,
                experts: config.n_routed_experts,
            };
            let plan = LoadPlan {
                experts: ranks.shard(),
                ..LoadPlan::default()
            };
            V4Model::<B>::load_plan(&config, &source, device, plan)?
        }
    };
    let generator = Generator::with_runner(&model, ranks.runner());
    let threads = rayon::current_num_threads();
    let what = args.source();
    println!(
        "v4 bench-infer: {} ({} params, {} active; weights held: {} stored, {} f32), {:?}, threads: {threads}, cpu kernels: {}",
        what.display(),
        config.param_counts().total,
        config.param_counts().active,
        human_bytes(model.resident.packed as f64),
        human_bytes(model.resident.dense as f64),
        args.device,
        v4_cpu::isa()
    );
    // Warm-up: allocations and thread pools.
    let warm = random_ids(args.seed ^ 1, 16, config.vocab_size);
    let (mut batch, logits) = generator.prefill_batch(&[&warm], None)?;
    decode(&generator, &mut batch, logits, 2)?;

    if !args.contexts.is_empty() {
        return contexts(args, &config, &generator);
    }

    let ids = bench_ids(
        args.ids.as_deref(),
        args.seed,
        args.batch * args.prompt,
        config.vocab_size,
    )?;
    let prompts: Vec<&[u32]> = ids.chunks_exact(args.prompt).collect();
    if let Some(spec) = args.speculative.params() {
        return speculative(args, &generator, &prompts, spec);
    }
    let chunk = args.prefill_chunk.filter(|&c| c > 0);
    let mut prefill_runs = Vec::new();
    let mut prefilled = None;
    for _ in 0..args.iters.max(1) {
        let started = Instant::now();
        prefilled = Some(generator.prefill_batch(&prompts, chunk)?);
        prefill_runs.push(started.elapsed().as_secs_f64());
    }
    let (mut batch, logits) = prefilled.expect("at least one prefill");
    prefill_runs.sort_by(f64::total_cmp);
    let prefill_s = prefill_runs[prefill_runs.len() / 2];
    let steps = args.generate.saturating_sub(1);
    let decode_s = decode(&generator, &mut batch, logits, steps)?;
    let context = args.prompt + steps;
    let prefill_tps = (args.batch * args.prompt) as f64 / prefill_s;
    let decode_tps = (args.batch * steps) as f64 / decode_s.max(1e-12);
    println!(
        "prefill: batch {} x {} tokens in {:.3}s (median of {}, min {:.3}s) -> {:.1} tok/s",
        args.batch,
        args.prompt,
        prefill_s,
        prefill_runs.len(),
        prefill_runs[0],
        prefill_tps
    );
    println!(
        "decode: {} steps x batch {} in {:.3}s -> {:.2} tok/s ({:.1} ms/step), greedy, {} generated per sequence",
        steps,
        args.batch,
        decode_s,
        decode_tps,
        1e3 * decode_s / steps.max(1) as f64,
        args.generate
    );
    let bandwidth = memory_bandwidth(threads);
    let weights = weight_bytes_per_step(&model, args.batch);
    let mid = args.prompt + steps / 2;
    let cache = (args.batch * cache_footprint(&config, mid).total() * 4) as f64;
    let bound = args.batch as f64 * bandwidth / (weights + cache);
    println!(
        "memory bound: read bandwidth {:.1} GB/s ({threads} threads); a decode step reads {} of weights + {} of cache \
         -> at most {:.1} tok/s; measured decode is {:.1}% of it",
        bandwidth / 1e9,
        human_bytes(weights),
        human_bytes(cache),
        bound,
        100.0 * decode_tps / bound
    );
    let held = batch.cache_elements();
    println!(
        "cache: {} (f32) for {} x {} tokens = {:.0} bytes/token; long-context growth {:.0} bytes/token f32, {:.0} bf16",
        human_bytes(held as f64 * 4.0),
        args.batch,
        context,
        4.0 * batch.cache_elements_per_token(),
        4.0 * scalars_per_token(&config),
        2.0 * scalars_per_token(&config)
    );
    Ok(())
}

/// `--speculative`: plain greedy and speculative decoding of `prompts`, alternated `--iters` times.
fn speculative<B: Backend>(
    args: &Args,
    generator: &Generator<'_, B>,
    prompts: &[&[u32]],
    spec: SpeculativeParams,
) -> Result<()> {
    let params = GenerateParams {
        max_tokens: args.generate,
        sampling: SamplingParams::greedy(),
        stop_ids: Vec::new(),
        prefill_chunk: None,
    };
    let (mut plain, mut fast) = (Vec::new(), Vec::new());
    let mut identical = true;
    let mut acceptance = None;
    for _ in 0..args.iters.max(1) {
        let (expected, t) = generator.generate_batch(prompts, &params, |_, _| Flow::Continue)?;
        plain.push(t.decode_tokens_per_s());
        let (got, t, a) = generator.generate_speculative(prompts, &params, spec, |_, _| Flow::Continue)?;
        fast.push(t.decode_tokens_per_s());
        identical &= got == expected;
        acceptance = Some(a);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (plain, fast) = (median(&mut plain), median(&mut fast));
    let a = acceptance.expect("at least one round");
    println!(
        "decode (batch {} x {} generated, median of {} alternated rounds): plain greedy {plain:.2} tok/s, \
         speculative (MTP, {} draft{}) {fast:.2} tok/s -> {:.2}x; outputs identical: {}",
        args.batch,
        args.generate,
        args.iters.max(1),
        spec.draft_tokens,
        if spec.draft_tokens > 1 { "s" } else { "" },
        fast / plain,
        if identical { "yes" } else { "NO" }
    );
    let counts: Vec<String> = (0..a.proposed.len())
        .map(|j| format!("{}/{}", a.accepted[j], a.proposed[j]))
        .collect();
    println!(
        "acceptance (last round): {} ({})",
        describe_acceptance(&a),
        counts.join(", ")
    );
    if !identical {
        return Err("speculative greedy output differs from plain greedy output".into());
    }
    Ok(())
}

fn contexts<B: Backend>(args: &Args, config: &V4Config, generator: &Generator<'_, B>) -> Result<()> {
    let chunk = match args.prefill_chunk {
        Some(0) => None,
        Some(c) => Some(c),
        None => Some(2048),
    };
    println!(
        "scaling: batch 1, prefill in chunks of {}, then {} greedy decode steps; cache measured in f32",
        chunk.map_or("all".to_string(), |c| c.to_string()),
        args.generate
    );
    println!(
        "{:>8} {:>8} {:>11} {:>11} {:>14} {:>12} {:>12} {:>12}",
        "context",
        "prompt",
        "prefill s",
        "prefill t/s",
        "decode ms/tok",
        "cache f32",
        "bytes/token",
        "cache bf16"
    );
    // Warm up (allocator pools, thread pool, page faults of the weights) so the first row is not slower.
    let warmup = random_ids(
        args.seed,
        512.min(config.max_position_embeddings),
        config.vocab_size,
    );
    generator.prefill_batch(&[&warmup], chunk)?;
    let mut rows = Vec::new();
    for &context in &args.contexts {
        if context > config.max_position_embeddings {
            println!(
                "{context:>8} skipped: beyond max_position_embeddings ({})",
                config.max_position_embeddings
            );
            continue;
        }
        let prompt_len = context.saturating_sub(args.generate).max(1);
        let steps = context - prompt_len;
        let ids = random_ids(
            args.seed.wrapping_add(context as u64),
            prompt_len,
            config.vocab_size,
        );
        let started = Instant::now();
        let (mut batch, logits) = generator.prefill_batch(&[&ids], chunk)?;
        let prefill_s = started.elapsed().as_secs_f64();
        let decode_s = decode(generator, &mut batch, logits, steps)?;
        let held = batch.cache_elements();
        println!(
            "{:>8} {:>8} {:>11.2} {:>11.1} {:>14.1} {:>12} {:>12.0} {:>12}",
            context,
            prompt_len,
            prefill_s,
            prompt_len as f64 / prefill_s,
            1e3 * decode_s / steps.max(1) as f64,
            human_bytes(held as f64 * 4.0),
            4.0 * held as f64 / batch.position(0) as f64,
            human_bytes(held as f64 * 2.0)
        );
        rows.push(ScalingRow {
            context,
            prompt: prompt_len,
            prefill_s,
            decode_ms: 1e3 * decode_s / steps.max(1) as f64,
            cache_bytes: held as f64 * 4.0,
        });
    }
    let (prefill, decode, cache) = slopes(&rows);
    let show = |p: Option<f64>| p.map_or("n/a".to_string(), |p| format!("{p:.2}"));
    println!(
        "log-log slopes (1 = linear, 2 = quadratic): prefill time {}, decode time per token {}, cache {}",
        show(prefill),
        show(decode),
        show(cache)
    );
    if let Some(path) = &args.plot {
        let title = format!(
            "{}: batch 1, {} threads",
            args.source()
                .file_name()
                .map_or(String::new(), |n| n.to_string_lossy().into_owned()),
            rayon::current_num_threads()
        );
        crate::io::write_atomically(path, svg(&rows, &title).as_bytes())?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

/// The analytic size of the decoding state (batch 1) per context length.
fn cache_table(args: &Args, config: &V4Config) {
    let per_token = scalars_per_token(config);
    println!(
        "decoding state of {} (batch 1): grows by {:.0} scalars/token = {} f32, {} bf16 per token",
        args.source().display(),
        per_token,
        human_bytes(4.0 * per_token),
        human_bytes(2.0 * per_token)
    );
    println!(
        "{:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>14}",
        "context", "window", "entries", "index keys", "pending", "total bf16", "bf16 bytes/tok"
    );
    let contexts = if args.contexts.is_empty() {
        vec![args.prompt + args.generate]
    } else {
        args.contexts.clone()
    };
    for n in contexts {
        let f = cache_footprint(config, n);
        let b = |x: usize| human_bytes(2.0 * x as f64);
        println!(
            "{:>9} {:>12} {:>12} {:>12} {:>12} {:>12} {:>14.0}",
            n,
            b(f.window),
            b(f.entries),
            b(f.index_keys),
            b(f.pending),
            b(f.total()),
            2.0 * f.total() as f64 / n.max(1) as f64
        );
    }
}
