//! `v4 forward --model DIR --input IDS.safetensors --output OUT.safetensors`

use crate::device::{with_backend, Device};
use crate::io::{read_input_ids, write_safetensors, Output, Result};
use crate::load::{load_model, LoadArgs};
use burn::tensor::backend::Backend;
use std::path::{Path, PathBuf};
use std::time::Instant;
use v4_model::{read_config, LocalExperts, Recorder, Tokens};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: config.json + safetensors, in HF layout (f32/bf16) or DeepSeek's release layout
    /// (FP8/FP4, dequantized at load).
    #[arg(long)]
    model: PathBuf,
    /// Safetensors file holding `input_ids` (i64 or i32, [batch, seq]).
    #[arg(long)]
    input: PathBuf,
    /// Where to write `logits` [B,S,vocab] and `hidden.N`: the streams entering layer N [B,S,c,D], and
    /// `hidden.L` the final normed hidden state [B,S,D] (the layout of HF's hidden_states). When the
    /// checkpoint has an MTP layer (and S >= 2), also `mtp_logits` [B,S-1,vocab] (position t predicts
    /// token t+2 from the main streams at t and the input token t+1) and `streams` [B,S,c,D], the final
    /// streams the MTP layer reads.
    #[arg(long)]
    output: PathBuf,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    #[command(flatten)]
    load: LoadArgs,
    /// NPU precision policy and chip sheet (TOML), for `--device npu`.
    #[arg(long)]
    npu_config: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    with_backend!(args.device, args.npu_config.as_deref(), |B, device| forward::<B>(
        &args, &device
    ))
}

fn forward<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let config = read_config(&args.model)?;
    let (ids, batch, seq) = read_input_ids(&args.input)?;
    let tokens = Tokens::new(&ids, batch, seq, config.vocab_size)
        .map_err(|e| format!("{}: {e}", args.input.display()))?;
    let started = Instant::now();
    let model = load_model::<B>(&args.model, &config, args.device, args.load, device)?;
    let loaded = started.elapsed();

    let layers = config.num_layers();
    let mtp = !model.mtp.is_empty() && seq >= 2;
    let mut recorder = Recorder::new(|name: &str| {
        (name.starts_with("layers.") && name.ends_with(".input") && name.split('.').count() == 3)
            || name == "final.hidden"
            || name == "logits"
            || (mtp && (name == "final.streams" || (name.starts_with("mtp.") && name.ends_with(".logits"))))
    });
    let started = Instant::now();
    let depths = if mtp {
        model
            .forward_mtp(&tokens, &LocalExperts, &mut recorder)?
            .logits
            .len()
    } else {
        model.forward_with(
            &tokens,
            &mut v4_model::ModelCache::new(layers),
            &LocalExperts,
            &mut recorder,
        )?;
        0
    };
    let elapsed = started.elapsed();

    let outputs = recorder
        .records
        .into_iter()
        .map(|(name, data)| {
            let name = match name.as_str() {
                "logits" => name,
                "final.hidden" => format!("hidden.{layers}"),
                "final.streams" => "streams".into(),
                "mtp.0.logits" => "mtp_logits".into(),
                other if other.starts_with("mtp.") => format!("mtp_logits.{}", &other[4..other.len() - 7]),
                other => format!(
                    "hidden.{}",
                    other.trim_start_matches("layers.").trim_end_matches(".input")
                ),
            };
            Ok(Output {
                name,
                shape: data.shape.to_vec(),
                data: data
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .map_err(|e| format!("{e:?}"))?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    write_safetensors(&args.output, &outputs, Path::new(&args.input))?;
    let mtp_note = match depths {
        0 => String::new(),
        1 => ", mtp_logits".into(),
        n => format!(", mtp_logits of {n} depths"),
    };
    println!(
        "forward [{batch}, {seq}] on {:?}: loaded in {:.2}s, ran in {:.3}s ({:.0} tokens/s); wrote logits{mtp_note} and {} hidden states to {}",
        args.device,
        loaded.as_secs_f64(),
        elapsed.as_secs_f64(),
        (batch * seq) as f64 / elapsed.as_secs_f64(),
        layers + 1,
        args.output.display()
    );
    Ok(())
}
