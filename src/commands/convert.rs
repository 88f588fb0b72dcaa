//! `v4 convert --input DIR --output DIR --to {bf16,fp8,fp4-mx,fp4-nv,f32,w8a8,w4a8,mxfp8}`

use crate::calibration::{expert_importance, read_sequences, smoothing_factors};
use crate::io::Result;
use clap::ValueEnum;
use std::collections::HashMap;
use std::path::PathBuf;
use v4_checkpoint::read_config;
use v4_convert::{convert, Calibration, ConvertOptions, Layout, Target};
use v4_infer::V4Tokenizer;

/// Output precision.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum To {
    /// Every float tensor in BF16 (e.g. a 910B without FP8).
    Bf16,
    /// The release's plan: FP8 e4m3 + E8M0 128x128 for the big linears, BF16/F32 for the rest.
    Fp8,
    /// As fp8, with routed experts in MXFP4 (E2M1 + E8M0 per 32, RCEIL), as V4 ships.
    #[value(name = "fp4-mx")]
    Fp4Mx,
    /// As fp8, with routed experts in NVFP4 (E2M1 + E4M3 per 16 + F32 tensor scale, ModelOpt 0.47 rules).
    #[value(name = "fp4-nv")]
    Fp4Nv,
    /// Every float tensor in F32.
    F32,
    /// Ascend 910B/910C: msModelSlim's V4 W8A8_DYNAMIC recipe (INT8 weights, one scale per output channel,
    /// for wq_a/wq_b/wkv, the indexer's wq_b and all experts; BF16/F32 elsewhere), written as AscendV1
    /// (quant_model_weights*.safetensors + quant_model_description.json) for vllm-ascend's
    /// `--quantization ascend`. No QuaRot rotation is applied.
    W8a8,
    /// Ascend 910B/910C: msModelSlim's V4-Pro recipe, as w8a8 but the routed experts INT4 (W4A8_DYNAMIC: one
    /// scale per output channel, two rows packed per byte, vllm-ascend's scale_bias), the form vllm-ascend's
    /// W4A8 MoE loads (it refuses per-group INT4). AscendV1 files; no QuaRot rotation.
    W4a8,
    /// Ascend 950: every release FP8/FP4 linear as MXFP8 (E4M3 + E8M0 per 32, OCP rule), AscendV1 files.
    Mxfp8,
}

/// Tensor naming of the output.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OutLayout {
    /// DeepSeek's release names (`layers.N.attn.wq_a.weight`, per-expert w1/w2/w3).
    Deepseek,
    /// HF transformers names (`model.layers.N.self_attn.q_a_proj.weight`, fused experts).
    Hf,
}

/// How FP4 block scales are chosen.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Calibrate {
    /// Round to nearest with the scheme's exact scale rule (reproduces the release bit for bit).
    Rtn,
    /// Per-block scale search minimising squared weight error (MXFP4 exponents e-1/e/e+1, NVFP4 scale sweep).
    WeightSearch,
    /// Activation-aware: the same search, each input channel's error weighted by its E[x²], measured by
    /// running the model on `--calib-data` (per expert, for the gate/up and the down projection).
    Activation,
    /// SmoothQuant for INT8 activations (`--to w8a8`, `w4a8`): per input channel j of the linears reading an RMSNorm,
    /// s_j = max|x_j|^α / max|W_j|^(1-α) (activations measured on `--calib-data`), rounded to a power of two,
    /// divided out of the norm's weight and multiplied into the linears' columns: the same function, with
    /// activation outliers moved into the weights. Covers attn_norm (wq_a, wkv, compressors, indexer) and
    /// ffn_norm (router, shared and routed experts' w1/w3).
    Smooth,
}

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint directory (either layout; single file or sharded with model.safetensors.index.json).
    #[arg(long)]
    input: PathBuf,
    /// Directory to create (must not exist, or be empty). Written under a temporary name and renamed
    /// at the end; an interrupted run resumes, skipping the shards it already wrote and verified.
    #[arg(long)]
    output: PathBuf,
    /// Output precision.
    #[arg(long, value_enum)]
    to: To,
    /// Output tensor naming.
    #[arg(long, value_enum, default_value = "deepseek")]
    layout: OutLayout,
    /// FP4 scale selection.
    #[arg(long, value_enum, default_value = "rtn")]
    calibrate: Calibrate,
    /// Calibration text for `--calibrate activation` (JSONL: {"text": ...}, chat {"messages": [...]}, or
    /// raw {"ids": [...]} for models without a tokenizer). Use text the model will not be judged on.
    #[arg(long)]
    calib_data: Option<PathBuf>,
    /// tokenizer.json for --calib-data (default: the one in --input).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Calibration tokens to run, at most.
    #[arg(long, default_value_t = 16384)]
    calib_tokens: usize,
    /// Tokens per calibration forward pass.
    #[arg(long, default_value_t = 512)]
    calib_seq_len: usize,
    /// SmoothQuant's migration strength α for `--calibrate smooth` (0: none moved into the weights, 1: all).
    #[arg(long, default_value_t = 0.5)]
    smooth_alpha: f32,
    /// Bytes of tensor data per output shard.
    #[arg(long, default_value_t = v4_convert::DEFAULT_SHARD_SIZE)]
    shard_size: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Also write the per-tensor conversion report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    let target = match args.to {
        To::Bf16 => Target::Bf16,
        To::Fp8 => Target::Fp8,
        To::Fp4Mx => Target::Fp4Mx,
        To::Fp4Nv => Target::Fp4Nv,
        To::F32 => Target::F32,
        To::W8a8 => Target::W8a8,
        To::W4a8 => Target::W4a8,
        To::Mxfp8 => Target::Mxfp8,
    };
    let mut opts = ConvertOptions::new(&args.input, &args.output, target);
    opts.layout = match args.layout {
        OutLayout::Deepseek => Layout::DeepSeek,
        OutLayout::Hf => Layout::Hf,
    };
    opts.calibration = match args.calibrate {
        Calibrate::Rtn => Calibration::Rtn,
        Calibrate::WeightSearch => Calibration::WeightSearch {
            channel_importance: None,
        },
        Calibrate::Activation => Calibration::WeightSearch {
            channel_importance: Some(measure_importance(&args)?),
        },
        Calibrate::Smooth => Calibration::Rtn,
    };
    if matches!(args.calibrate, Calibrate::Smooth) {
        let sequences = calibration_sequences(&args, "smooth")?;
        let factors = smoothing_factors::<v4_cpu::Cpu>(
            &args.input,
            &sequences,
            args.smooth_alpha,
            &Default::default(),
        )?;
        opts.smoothing = Some(factors);
    }
    if args.calib_data.is_some() && !matches!(args.calibrate, Calibrate::Activation | Calibrate::Smooth) {
        return Err("--calib-data is only used by --calibrate activation and smooth".into());
    }
    opts.shard_size = args.shard_size;
    opts.threads = args.threads;
    let report = convert(&opts)?;
    if let Some(path) = &args.report {
        crate::io::write_atomically(path, report.to_json().as_bytes())?;
    }
    println!("{}", report.summary());
    Ok(())
}

/// `E[x²]` of the routed experts' inputs, from the model in `--input` run on `--calib-data` (CPU backend).
fn measure_importance(args: &Args) -> Result<HashMap<String, Vec<f32>>> {
    let sequences = calibration_sequences(args, "activation")?;
    expert_importance::<v4_cpu::Cpu>(&args.input, &sequences, &Default::default())
}

/// The token sequences of `--calib-data`, which `--calibrate {method}` needs.
fn calibration_sequences(args: &Args, method: &str) -> Result<Vec<Vec<u32>>> {
    let data = args
        .calib_data
        .as_ref()
        .ok_or_else(|| format!("--calibrate {method} needs --calib-data FILE.jsonl"))?;
    let tokenizer = match &args.tokenizer {
        Some(path) => Some(V4Tokenizer::from_file(path)?),
        None => V4Tokenizer::from_model_dir(&args.input)?,
    };
    let config = read_config(&args.input)?;
    let sequences = read_sequences(
        data,
        tokenizer.as_ref(),
        config.vocab_size,
        args.calib_seq_len.min(config.max_position_embeddings),
        args.calib_tokens,
    )?;
    Ok(sequences)
}
