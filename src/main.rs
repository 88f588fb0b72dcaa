//! `v4`: port, train and serve DeepSeek-V4 across accelerators.
//!
//! The binary is thin: each subcommand parses its flags and calls into the library crates.

mod calibration;
mod commands;
mod device;
mod io;
mod load;
mod parallel;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// The model allocates a fresh tensor per op. With the system allocator every large one was a new
/// mapping whose pages fault in (and are zeroed by the kernel) on first write: 15% of a prefill.
/// mimalloc reuses freed memory instead, once told never to hand it back to the OS
/// ([`keep_freed_memory`]); like PyTorch's caching allocator, the process keeps its peak footprint.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc.h (not named by libmimalloc-sys): -1 = never purge.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

fn keep_freed_memory() {
    // SAFETY: setting an option is thread-safe and valid at any time.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

#[derive(Parser)]
#[command(
    name = "v4",
    version,
    about = "Port, train and serve DeepSeek-V4 across accelerators",
    long_about = "v4 runs the DeepSeek-V4 architecture (mHC streams, CSA/HCA compressed attention, \
                  lightning indexer, hash + top-k MoE) on burn backends: cpu (the default: burn-ndarray with v4's kernels), ndarray, \
                  npu (an Ascend 910B-style emulator: --device npu --npu-config FILE.toml), and the \
                  accelerator backends compiled in with cargo features.\n\n\
                  Start with:  v4 info tests/fixtures/v4-tiny-a/hf"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summarise a model directory: config, layer schedule, parameter counts, tensor dtypes.
    Info(commands::info::Args),
    /// Write a seeded random checkpoint (HF layout, f32) of a config, to convert and run at any size.
    Synth(commands::synth::Args),
    /// Run a full-sequence forward pass and write logits and per-layer streams to a safetensors file.
    Forward(commands::forward::Args),
    /// Time the full-sequence forward pass on random weights for a config.
    Bench(commands::bench::Args),
    /// Convert a checkpoint between precisions (BF16, FP8, MXFP4, NVFP4, F32; Ascend W8A8, MXFP8) and layouts.
    Convert(commands::convert::Args),
    /// Generate text (or token ids) from a prompt with the incremental cache, streaming to stdout.
    Generate(commands::generate::Args),
    /// Chat interactively in V4's chat format (one message per stdin line).
    Chat(commands::chat::Args),
    /// Time prefill and decode of the inference runner on random weights for a config.
    BenchInfer(commands::bench_infer::Args),
    /// Fine-tune or train from scratch from a TOML config (AdamW, schedule, resumable HF-layout checkpoints).
    Train(commands::train::Args),
    /// Record the model's probe points (stats, full tensors or checksums) into a self-describing trace file.
    Trace(commands::trace::Args),
    /// Compare a candidate backend against a reference trace: metrics, pass/fail, first divergence, reports.
    Validate(commands::validate::Args),
    /// The migration table: the release checkpoint on the CPU against each Ascend precision path (910B BF16,
    /// 910B W8A8, 950 MXFP8, 950 release) on the NPU emulator: agreement, perplexity, bytes, estimated time.
    PortReport(commands::port_report::Args),
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    let result = on_compute_threads(move || run(cli).map_err(|e| e.to_string()));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `job` on a thread of its own rayon pool (`RAYON_NUM_THREADS` threads, default one per core)
/// instead of the main thread. The command's serial parts then run on a pool thread and its parallel ops
/// split across the same threads: N threads on N cores, not N spinning workers plus a main thread
/// competing with them for the cores.
fn on_compute_threads<T: Send>(job: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new().build() {
        Ok(pool) => pool.install(job),
        Err(_) => job(),
    }
}

fn run(cli: Cli) -> io::Result<()> {
    match cli.command {
        Command::Info(args) => commands::info::run(args),
        Command::Synth(args) => commands::synth::run(args),
        Command::Forward(args) => commands::forward::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Convert(args) => commands::convert::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Chat(args) => commands::chat::run(args),
        Command::BenchInfer(args) => commands::bench_infer::run(args),
        Command::Train(args) => commands::train::run(args),
        Command::Trace(args) => commands::trace::run(args),
        Command::Validate(args) => commands::validate::run(args),
        Command::PortReport(args) => commands::port_report::run(args),
    }
}
