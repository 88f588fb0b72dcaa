//! `v4 train CONFIG.toml [--print-config] [--stop-after N]`: fine-tune (or train from scratch) with the
//! v4-train crate on an autodiff backend chosen by `[model] device`.

use crate::commands::bench::matmul_peak;
use crate::io::Result;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use v4_train::{train, Autodiff, Collective, RunOptions, TrainConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Training configuration (TOML: [model], [data], [optimizer], [schedule], [training], [moe],
    /// [parallel], [checkpoint], [logging]). Expert-parallel over N processes (`mpi` feature):
    /// `mpirun -np N v4 train config.toml` with `[parallel] expert_parallel = N`: each rank loads,
    /// holds, optimizes and checkpoints only its 1/N of the routed experts (checkpoints resume on any N
    /// dividing the experts; they need a directory every rank sees). With `data_parallel = D`,
    /// `mpirun -np D*N` runs D such groups on the global batch.
    config: PathBuf,
    /// Print the resolved configuration, defaults filled in, and exit.
    #[arg(long)]
    print_config: bool,
    /// Stop after this many optimizer steps without a final checkpoint, as if the process were killed
    /// (for testing resumption).
    #[arg(long)]
    stop_after: Option<usize>,
    /// Write the first step's gradients (summed over all ranks, before clipping) to this safetensors
    /// file: compare an expert-parallel run with a single process.
    #[arg(long)]
    dump_gradients: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = TrainConfig::from_file(&args.config)?;
    if args.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let mut opts = RunOptions {
        stop_after: args.stop_after,
        quiet: false,
        collective: collective(&cfg)?,
        dump_gradients: args.dump_gradients,
        interrupt: Some(interrupt_flag()?),
        peak_flops: None,
    };
    // The MFU's denominator: this backend's measured f32 matmul peak (1024^3, best of 3).
    let peak = |gflops: f64| Some(gflops * 1e9);
    let cpu = burn_ndarray::NdArrayDevice::Cpu;
    let report = match cfg.model.device.as_str() {
        "cpu" => {
            opts.peak_flops = peak(matmul_peak::<v4_cpu::Cpu>(1024, &cpu));
            train::<Autodiff<v4_cpu::Cpu>>(&cfg, &cpu, &opts)?
        }
        "ndarray" => {
            opts.peak_flops = peak(matmul_peak::<burn_ndarray::NdArray<f32>>(1024, &cpu));
            train::<Autodiff<burn_ndarray::NdArray<f32>>>(&cfg, &cpu, &opts)?
        }
        "npu" => {
            let device = Default::default();
            if let Some(path) = &cfg.model.npu_config {
                v4_npu::install_config_file(&device, path).map_err(|e| format!("{}: {e}", path.display()))?;
            }
            let report = train::<Autodiff<v4_npu::Npu>>(&cfg, &device, &opts)?;
            eprintln!("{}", v4_npu::report(&device).summary());
            report
        }
        other => return Err(format!("[model] device = \"{other}\" is not supported by `v4 train`").into()),
    };
    if let (Some(first), Some(last)) = (report.validations.first(), report.validations.last()) {
        println!(
            "validation loss {:.4} (step {}) -> {:.4} (step {})",
            first.1, first.0, last.1, last.0
        );
    }
    if let (Some(first), Some(last)) = (report.mtp_validations.first(), report.mtp_validations.last()) {
        println!(
            "MTP validation loss {:.4} (step {}) -> {:.4} (step {})",
            first.1, first.0, last.1, last.0
        );
    }
    Ok(())
}

/// A flag set by Ctrl-C (SIGINT, and SIGTERM, which `mpirun` sends its ranks): training stops after the
/// current step with a checkpoint. A second Ctrl-C quits at once.
fn interrupt_flag() -> Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler = flag.clone();
    ctrlc::set_handler(move || {
        if handler.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("interrupted: finishing this step and writing a checkpoint (Ctrl-C again to quit now)");
    })
    .map_err(|e| format!("cannot install the Ctrl-C handler: {e}"))?;
    Ok(flag)
}

/// The MPI world when this process runs under `mpirun` (or expert parallelism is configured).
#[cfg(feature = "mpi")]
fn collective(cfg: &TrainConfig) -> Result<Option<Arc<dyn Collective>>> {
    let ranks = crate::parallel::launched_ranks();
    if cfg.parallel.world() == 1 && ranks.is_none() {
        return Ok(None);
    }
    crate::parallel::world(ranks.unwrap_or(1)).map(Some)
}

#[cfg(not(feature = "mpi"))]
fn collective(cfg: &TrainConfig) -> Result<Option<Arc<dyn Collective>>> {
    let world = cfg.parallel.world();
    if world > 1 {
        return Err(format!(
            "[parallel] expert_parallel = {} x data_parallel = {} needs MPI, and this v4 was built without it: \
             install OpenMPI and libclang (Debian: apt-get install libopenmpi-dev openmpi-bin libclang-dev), \
             then `cargo build --release --features mpi` and run `mpirun -np {world} target/release/v4 train ...`",
            cfg.parallel.expert_parallel, cfg.parallel.data_parallel
        )
        .into());
    }
    // Started as several ranks without MPI: each would train alone and write the same checkpoints.
    if let Some(ranks) = crate::parallel::launched_ranks().filter(|&n| n > 1) {
        return crate::parallel::world(ranks).map(Some);
    }
    Ok(None)
}
