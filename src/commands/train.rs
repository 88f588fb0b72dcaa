//! `v4 train CONFIG.toml [--print-config] [--stop-after N]`: fine-tune (or train from scratch) with the
//! v4-train crate on an autodiff backend chosen by `[model] device`.

use crate::io::Result;
use std::path::PathBuf;
use v4_train::{train, Autodiff, RunOptions, TrainConfig};

#[derive(clap::Args)]
pub struct Args {
    /// Training configuration (TOML: [model], [data], [optimizer], [schedule], [training], [moe],
    /// [checkpoint], [logging]).
    config: PathBuf,
    /// Print the resolved configuration, defaults filled in, and exit.
    #[arg(long)]
    print_config: bool,
    /// Stop after this many optimizer steps without a final checkpoint, as if interrupted.
    #[arg(long)]
    stop_after: Option<usize>,
}

pub fn run(args: Args) -> Result<()> {
    let cfg = TrainConfig::from_file(&args.config)?;
    if args.print_config {
        print!("{}", cfg.to_toml());
        return Ok(());
    }
    let opts = RunOptions {
        stop_after: args.stop_after,
        quiet: false,
    };
    let report = match cfg.model.device.as_str() {
        "cpu" => train::<Autodiff<v4_cpu::Cpu>>(&cfg, &burn_ndarray::NdArrayDevice::Cpu, &opts)?,
        "ndarray" => {
            train::<Autodiff<burn_ndarray::NdArray<f32>>>(&cfg, &burn_ndarray::NdArrayDevice::Cpu, &opts)?
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
    Ok(())
}
