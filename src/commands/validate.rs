//! `v4 validate --reference TRACE --model DIR --device npu [--npu-config F] [--tolerances F.toml]
//! [--mode propagated|isolated|both] [--golden TRACE] [--report-dir DIR] [--layers A..B]`

use crate::commands::trace::backend_info;
use crate::device::with_backend;
use crate::io::Result;
use crate::load::{Load, RunArgs};
use burn::tensor::backend::Backend;
use std::path::PathBuf;
use v4_checkpoint::read_config;
use v4_validate::filter::parse_layers;
use v4_validate::{trace::TraceInfo, Dtype, RunMode, Tolerances, Trace, ValidateOptions};

#[derive(clap::Args)]
#[command(
    long_about = "Run the model on a candidate backend with the inputs recorded in a reference \
    trace (from `v4 trace`, or a forward-output file such as HF's io.safetensors whose hidden.N / logits \
    are mapped to layers.N.input / final.hidden / logits) and compare every probe.\n\n\
    Metrics: cosine, max/mean abs and rel error (small-value floor), RMSE, relative L2, thousandth \
    ratios, ULP error (matmul class), KL (logits), exact match / IoU of expert ids and indexer top-k \
    with near-tie classification (a flip between scores closer than the margin is benign).\n\n\
    Rules: structural errors always fail (shape, missing probe, NaN/Inf pattern); index outputs must \
    match up to near ties; floats must keep cosine >= cosine_min and pass the reference-relative gate \
    rel_l2(cand, golden) <= k * rel_l2(ref, golden) + floor (k = 2 for f32, 3 for f16/bf16; the golden \
    is the reference itself unless --golden gives a CPU trace, best `v4 trace --device ndarray-f64`). Defaults follow the candidate's \
    compute dtype (f32 / hf32 / f16 / bf16, from its precision policy); --tolerances overrides them \
    ([defaults] and [[probe]] pattern = \"glob\" tables).\n\n\
    Modes: propagated runs end to end (drift); isolated feeds each layer the reference's \
    layers.N.input streams (so the first failing layer is the faulty one, and its first failing probe \
    the faulty op); both does the two. The precision policies of both runs are diffed first.\n\n\
    Reports: a worst-first summary here; report.json, report.csv, report.html (per-layer error plot) in \
    --report-dir. Exits non-zero when any probe fails.\n\n\
    Example:\n  v4 validate --reference ref.safetensors --model tests/fixtures/v4-tiny-a/hf --device npu \
    --npu-config configs/npu-910b-bf16.toml --mode both --report-dir report/"
)]
pub struct Args {
    /// The reference trace (full mode for element-wise metrics and isolated mode).
    #[arg(long)]
    reference: PathBuf,
    #[command(flatten)]
    run: RunArgs,
    /// Tolerance overrides (TOML): `dtype = "bf16"`, `[defaults]`, `[[probe]] pattern = "glob"` with
    /// rel_l2_floor, k_ref, cosine_min, small_value, elementwise, kl_max, ulp, ulp_share, ulp_gate,
    /// tie_abs, tie_rel, max_harmful_flips, skip.
    #[arg(long)]
    tolerances: Option<PathBuf>,
    /// propagated (end to end), isolated (each layer on the reference's input streams) or both.
    #[arg(long, default_value = "both", value_parser = ["propagated", "isolated", "both"])]
    mode: String,
    /// A high-precision golden trace (full mode, e.g. `v4 trace --device ndarray-f64`) for the
    /// reference-relative gate; default: the reference itself.
    #[arg(long)]
    golden: Option<PathBuf>,
    /// Where to write report.json, report.csv and report.html.
    #[arg(long)]
    report_dir: Option<PathBuf>,
    /// Validate only main layers N, A..B (end excluded), A..=B or A..: just those layers are loaded (with
    /// the embedding and the heads), and both modes start from the reference's `layers.A.input`, so a
    /// port is validated range by range on a machine that cannot hold the model.
    #[arg(long)]
    layers: Option<String>,
    /// Probes listed in the terminal summary (worst first).
    #[arg(long, default_value_t = 20)]
    top: usize,
}

pub fn run(args: Args) -> Result<()> {
    let info = backend_info(args.run.device, args.run.npu_config.as_deref())?;
    with_backend!(args.run.device, args.run.npu_config.as_deref(), |B, device| {
        validate::<B>(&args, info, &device)
    })
}

fn validate<B: Backend>(args: &Args, info: TraceInfo, device: &B::Device) -> Result<()> {
    let reference = Trace::read(&args.reference)?;
    let golden = args.golden.as_deref().map(Trace::read).transpose()?;
    let tolerances = match &args.tolerances {
        Some(p) => Tolerances::from_file(p)?,
        None => Tolerances::default(),
    };
    let dtype = Dtype::parse(tolerances.dtype.as_deref().unwrap_or(&info.dtype))?;
    let config = read_config(&args.run.model)?;
    let layers = args.layers.as_deref().map(parse_layers).transpose()?;
    let layers = layers.map(|r| r.start..r.end.min(config.num_layers()));
    let model = Load::new(&args.run.model, &config, args.run.device, args.run.load)
        .layers(layers)
        .model::<B>(device)?;
    let opts = ValidateOptions {
        mode: args.mode.parse::<RunMode>()?,
        dtype,
        tolerances,
        golden,
        candidate: info,
    };
    let report = v4_validate::validate(&model, &reference, &opts).map_err(|e| e.to_string())?;
    print!("{}", report.summary(args.top));
    if let Some(dir) = &args.report_dir {
        report.write(dir).map_err(|e| e.to_string())?;
        println!(
            "reports: {0}/report.json, {0}/report.csv, {0}/report.html",
            dir.display()
        );
    }
    if report.passed {
        Ok(())
    } else {
        let fails = report
            .results
            .iter()
            .filter(|r| r.status == v4_validate::Status::Fail)
            .count();
        Err(format!("validation failed: {fails} probe comparisons out of tolerance").into())
    }
}
