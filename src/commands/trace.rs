//! `v4 trace --model DIR --input IDS.safetensors --output TRACE.safetensors [--mode stats|full|checksum]
//! [--layers A..B] [--filter GLOB,...]`

use crate::device::{with_backend, Device};
use crate::io::{read_input_ids, Result};
use crate::load::{entry_streams, Load, RunArgs};
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};
use v4_checkpoint::read_config;
use v4_model::Tokens;
use v4_validate::{trace::TraceInfo, ProbeFilter, TraceMode};

#[derive(clap::Args)]
#[command(
    long_about = "Record the model's probe points on one backend into one self-describing \
    safetensors file (a trace): the probe tensors (full mode) plus JSON metadata in `__metadata__` \
    (v4 version, backend, dtype, precision policy, model config hash, input ids, per-probe shape, \
    min/max/mean/L2/NaN/Inf stats and, in checksum mode, an FNV-1a checksum).\n\n\
    Probe points, per layer N: layers.N.input, layers.N.attn.{input,q,kv,compressor.entries,\
    indexer.scores,indexer.topk,core,output}, layers.N.ffn.{input,router.scores,router.indices,\
    router.weights,output}; then final.streams, final.hidden, logits.\n\n\
    Carry the trace to the candidate's machine and run `v4 validate --reference TRACE ...` there.\n\n\
    Example:\n  v4 trace --model tests/fixtures/v4-tiny-a/hf --input tests/fixtures/v4-tiny-a/io.safetensors \
    --output ref.safetensors\n  v4 trace ... --mode stats --layers 0..2 --filter 'layers.*.attn.*,logits'"
)]
pub struct Args {
    #[command(flatten)]
    run: RunArgs,
    /// Safetensors file holding `input_ids` (i64 or i32, [batch, seq]).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the trace.
    #[arg(long)]
    output: PathBuf,
    /// stats: min/max/mean/L2/NaN/Inf counts only (tiny; compares by statistics); full: the tensors
    /// (needed for element-wise metrics and isolated mode); checksum: stats + a bitwise checksum.
    #[arg(long, default_value = "full", value_parser = ["stats", "full", "checksum"])]
    mode: String,
    /// Layers to record: N, A..B (end excluded), A..=B, A..; only those layers are loaded (with the
    /// embedding and heads), and the head probes are recorded when the range reaches the last layer. A
    /// range after layer 0 starts from --streams.
    #[arg(long)]
    layers: Option<String>,
    /// The streams entering the first layer of --layers: a `v4 forward` output (`hidden.A`) or a full
    /// `v4 trace` (`layers.A.input`) of the same input ids.
    #[arg(long, requires = "layers")]
    streams: Option<PathBuf>,
    /// Comma-separated globs over probe names (`*` any run, `?` one character), e.g. `*.router.*,logits`.
    #[arg(long)]
    filter: Option<String>,
}

/// The backend, compute dtype and precision policy of a `--device` / `--npu-config` pair.
pub fn backend_info(device: Device, npu_config: Option<&Path>) -> Result<TraceInfo> {
    Ok(match device {
        Device::Npu => {
            let cfg = match npu_config {
                Some(p) => v4_npu::NpuConfig::from_toml_file(p).map_err(|e| e.to_string())?,
                None => v4_npu::NpuConfig::default(),
            };
            let p = cfg.policy;
            let rank = |d: v4_npu::NpuDType| match d {
                v4_npu::NpuDType::F32 => 0,
                v4_npu::NpuDType::Hf32 => 1,
                v4_npu::NpuDType::F16 => 2,
                v4_npu::NpuDType::Bf16 => 3,
            };
            let coarsest = [p.cube_input_dtype(), p.cube_output_dtype(), p.vector_dtype()]
                .into_iter()
                .max_by_key(|d| rank(*d))
                .expect("3");
            let mut policy = serde_json::to_value(p)?;
            if let Some(o) = policy.as_object_mut() {
                o.insert("chip".into(), cfg.chip.name.clone().into());
                o.insert(
                    "matmul".into(),
                    format!(
                        "{:?} operands -> {:?} output, f32 accumulation",
                        p.cube_input_dtype(),
                        p.cube_output_dtype()
                    )
                    .to_lowercase()
                    .into(),
                );
                o.insert(
                    "vector".into(),
                    format!("{:?}", p.vector_dtype()).to_lowercase().into(),
                );
            }
            TraceInfo {
                backend: "npu".into(),
                dtype: format!("{coarsest:?}").to_lowercase(),
                precision_policy: policy,
            }
        }
        Device::NdarrayF64 => TraceInfo {
            backend: "ndarray-f64".into(),
            // Stored as f32; the candidate's f32 defaults apply when it is used as a golden.
            dtype: "f32".into(),
            precision_policy: serde_json::json!({
                "precision_mode": "f64 (golden: burn-ndarray f64 tensors, stored rounded to f32)",
                "matmul": "f64 operands -> f64 output, f64 accumulation",
                "vector": "f64"
            }),
        },
        other => TraceInfo {
            backend: format!("{other:?}").to_lowercase(),
            dtype: "f32".into(),
            precision_policy: serde_json::json!({
                "precision_mode": "f32 (burn f32 tensors, no precision policy)",
                "matmul": "f32 operands -> f32 output, f32 accumulation",
                "vector": "f32"
            }),
        },
    })
}

pub fn run(args: Args) -> Result<()> {
    let info = backend_info(args.run.device, args.run.npu_config.as_deref())?;
    with_backend!(
        args.run.device,
        args.run.npu_config.as_deref(),
        |B, device| trace::<B>(&args, info, &device)
    )
}

fn trace<B: Backend>(args: &Args, info: TraceInfo, device: &B::Device) -> Result<()> {
    let mode: TraceMode = args.mode.parse()?;
    let filter = ProbeFilter::parse(args.layers.as_deref(), args.filter.as_deref())?;
    let config = read_config(&args.run.model)?;
    let (ids, batch, seq) = read_input_ids(&args.input)?;
    let tokens = Tokens::new(&ids, batch, seq, config.vocab_size)
        .map_err(|e| format!("{}: {e}", args.input.display()))?;
    let range = filter
        .layers
        .clone()
        .map(|r| r.start..r.end.min(config.num_layers()));
    let streams = match &range {
        Some(range) => entry_streams::<B>(args.streams.as_deref(), range, &tokens, &config, device)?,
        None => None,
    };
    let model = Load::new(&args.run.model, &config, args.run.device, args.run.load)
        .layers(range)
        .model::<B>(device)?;
    let trace = v4_validate::run::trace(
        &model,
        &tokens,
        streams,
        mode,
        &filter,
        info,
        (args.layers.clone(), args.filter.clone()),
    )
    .map_err(|e| e.to_string())?;
    if trace.entries.is_empty() {
        return Err("no probe point matches --layers / --filter".into());
    }
    if args.output.canonicalize().ok() == args.input.canonicalize().ok() && args.output.exists() {
        return Err(format!("{}: refusing to overwrite the input file", args.output.display()).into());
    }
    trace.write(&args.output)?;
    let bytes = std::fs::metadata(&args.output)?.len();
    println!(
        "trace [{batch}, {seq}] on {:?} ({} mode): {} probes, {} bytes ({} per layer) -> {}",
        args.run.device,
        args.mode,
        trace.entries.len(),
        bytes,
        bytes / config.num_layers().max(1) as u64,
        args.output.display()
    );
    Ok(())
}
