//! `v4 forward --model DIR --input IDS.safetensors --output OUT.safetensors`

use crate::device::with_backend;
use crate::io::{read_input_ids, write_safetensors, Output, Result};
use crate::load::{entry_streams, Load, RunArgs};
use crate::parallel::Ranks;
use burn::tensor::backend::Backend;
use burn::tensor::TensorData;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;
use v4_checkpoint::read_config;
use v4_model::probe::{point, Scope};
use v4_model::{LocalExperts, Pass, Recorder, Tokens, V4Config};
use v4_validate::filter::parse_layers;

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    run: RunArgs,
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
    /// Run only main layers N, A..B (end excluded), A..=B or A..: just those layers are loaded (with the
    /// embedding and the heads), so a model too large for this machine runs range by range. Writes
    /// `hidden.N` (the streams entering each layer of the range) and `hidden.B` (the streams after it);
    /// `logits` only when the range ends at the last layer. A range after layer 0 starts from --streams.
    #[arg(long)]
    layers: Option<String>,
    /// The streams entering the first layer of --layers: a `v4 forward` output (`hidden.A`) or a full
    /// `v4 trace` (`layers.A.input`) of the same input ids, e.g. from the previous range.
    #[arg(long, requires = "layers")]
    streams: Option<PathBuf>,
}

pub fn run(args: Args) -> Result<()> {
    with_backend!(args.run.device, args.run.npu_config.as_deref(), |B, device| {
        forward::<B>(&args, &device)
    })
}

fn forward<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let config = read_config(&args.run.model)?;
    let (ids, batch, seq) = read_input_ids(&args.input)?;
    let tokens = Tokens::new(&ids, batch, seq, config.vocab_size)
        .map_err(|e| format!("{}: {e}", args.input.display()))?;
    let range = args.layers.as_deref().map(parse_layers).transpose()?;
    let range = range.map(|r| r.start..r.end.min(config.num_layers()));
    if let Some(range) = range.filter(|r| *r != (0..config.num_layers())) {
        return forward_layers::<B>(args, &config, &tokens, range, device);
    }
    let ranks = Ranks::launched()?;
    let started = Instant::now();
    let model = Load::new(&args.run.model, &config, args.run.device, args.run.load)
        .experts(ranks.shard())
        .model::<B>(device)?;
    let loaded = started.elapsed();
    let runner = ranks.runner();

    let layers = config.num_layers();
    let mtp = !model.mtp.is_empty() && seq >= 2;
    let mut recorder = Recorder::new(|name: &str| written(name, mtp));
    let started = Instant::now();
    let pass = Pass::new().runner(runner).probe(&mut recorder).mtp(mtp);
    let depths = model
        .forward_with(&tokens, &mut v4_model::ModelCache::new(layers), pass)?
        .mtp_logits
        .len();
    let elapsed = started.elapsed();
    if !ranks.lead() {
        return Ok(());
    }

    let outputs = recorder
        .records
        .into_iter()
        .map(|(probe, data)| output(output_name(&probe, layers), data))
        .collect::<Result<Vec<_>>>()?;
    write_safetensors(&args.output, &outputs, Path::new(&args.input))?;
    let mtp_note = match depths {
        0 => String::new(),
        1 => ", mtp_logits".into(),
        n => format!(", mtp_logits of {n} depths"),
    };
    println!(
        "forward [{batch}, {seq}] on {:?}: loaded in {:.2}s, ran in {:.3}s ({:.0} tokens/s); wrote logits{mtp_note} and {} hidden states to {}",
        args.run.device,
        loaded.as_secs_f64(),
        elapsed.as_secs_f64(),
        (batch * seq) as f64 / elapsed.as_secs_f64(),
        layers + 1,
        args.output.display()
    );
    Ok(())
}

/// `--layers A..B` short of the whole model: loads only those layers and runs them from the embedding
/// (A = 0) or from the recorded streams entering layer A.
fn forward_layers<B: Backend>(
    args: &Args,
    config: &V4Config,
    tokens: &Tokens,
    range: Range<usize>,
    device: &B::Device,
) -> Result<()> {
    let num_layers = config.num_layers();
    if range.is_empty() {
        return Err(format!("--layers {range:?}: no layer of the {num_layers} in that range").into());
    }
    let streams = entry_streams::<B>(args.streams.as_deref(), &range, tokens, config, device)?;
    let started = Instant::now();
    let model = Load::new(&args.run.model, config, args.run.device, args.run.load)
        .layers(Some(range.clone()))
        .model::<B>(device)?;
    let loaded = started.elapsed();
    let mut recorder = Recorder::new(|name: &str| written(name, false));
    let started = Instant::now();
    let out = model.forward_layers(tokens, streams, &LocalExperts, &mut recorder)?;
    let mut outputs = Vec::new();
    let last = if range.end == num_layers {
        model.logits(out, &mut recorder);
        point::LOGITS.to_string()
    } else {
        outputs.push(output(format!("hidden.{}", range.end), out.into_data())?);
        format!("hidden.{}", range.end)
    };
    let elapsed = started.elapsed();
    for (probe, data) in recorder.records {
        outputs.push(output(output_name(&probe, num_layers), data)?);
    }
    write_safetensors(&args.output, &outputs, Path::new(&args.input))?;
    println!(
        "forward [{}, {}] of layers {range:?} of {num_layers} on {:?}: loaded in {:.2}s, ran in {:.3}s; wrote {} tensors up to {last} to {}",
        tokens.batch,
        tokens.seq,
        args.run.device,
        loaded.as_secs_f64(),
        elapsed.as_secs_f64(),
        outputs.len(),
        args.output.display()
    );
    Ok(())
}

/// Whether probe `name` is written: the streams entering each layer, the final hidden state, the logits,
/// and with `mtp` the final streams and every MTP depth's logits.
fn written(name: &str, mtp: bool) -> bool {
    match Scope::parse(name) {
        Some((Scope::Layer(_), point)) => point == point::INPUT,
        Some((Scope::Mtp(_), point)) => mtp && point == point::LOGITS,
        None => name == point::FINAL_HIDDEN || name == point::LOGITS || (mtp && name == point::FINAL_STREAMS),
    }
}

/// The output name of a written probe of a model of `layers` main layers (HF's `hidden_states` numbering).
fn output_name(probe: &str, layers: usize) -> String {
    match Scope::parse(probe) {
        Some((Scope::Layer(n), _)) => format!("hidden.{n}"),
        Some((Scope::Mtp(0), _)) => "mtp_logits".into(),
        Some((Scope::Mtp(k), _)) => format!("mtp_logits.{k}"),
        None if probe == point::FINAL_HIDDEN => format!("hidden.{layers}"),
        None if probe == point::FINAL_STREAMS => "streams".into(),
        None => probe.into(),
    }
}

/// A recorded tensor as the f32 output `name`.
fn output(name: String, data: TensorData) -> Result<Output> {
    Ok(Output {
        name,
        shape: data.shape.to_vec(),
        data: data
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| format!("{e:?}"))?,
    })
}
