//! `v4 generate --model DIR (--prompt TEXT | --prompt-ids 1,2,3)`: prefill, then decode token by token with
//! the model's incremental cache, streaming the text (or the ids, for models without a tokenizer).

use crate::device::{with_backend, Device};
use crate::io::Result;
use crate::load::{Load, LoadArgs};
use crate::parallel::Ranks;
use burn::tensor::backend::Backend;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use v4_checkpoint::read_config;
use v4_infer::{
    cache_footprint, check_prompt, encode_chat, Acceptance, Flow, GenerateParams, Generator, InferError,
    Message, Role, SamplingParams, SpeculativeParams, StopStrings, TextStream, V4Tokenizer,
};
use v4_model::V4Config;

/// Sampling and stopping flags, shared with `v4 chat`.
#[derive(clap::Args, Clone)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Pick the most likely token every step (the default unless a sampling flag is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p"])]
    pub greedy: bool,
    /// Sampling temperature (1.0 when only --top-k / --top-p are given).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Sample among the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Sample among the most likely tokens whose probability adds up to P.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// HF-style repetition penalty over the prompt and generated tokens (1.0: off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Seed of the sampler (the same seed gives the same tokens).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the text contains this string (repeatable; needs a tokenizer). The config's
    /// eos_token_id always stops.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Prefill in calls of at most N tokens (bounds memory on long prompts; 0: one call).
    #[arg(long, default_value_t = 512)]
    pub prefill_chunk: usize,
}

impl SamplingArgs {
    pub fn params(&self, config: &V4Config) -> Result<GenerateParams> {
        let sampled = self.temperature.is_some() || self.top_k.is_some() || self.top_p.is_some();
        let sampling = if self.greedy || !sampled {
            SamplingParams {
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
                ..SamplingParams::greedy()
            }
        } else {
            SamplingParams {
                temperature: self.temperature.unwrap_or(1.0),
                top_k: self.top_k.unwrap_or(0),
                top_p: self.top_p.unwrap_or(1.0),
                repetition_penalty: self.repetition_penalty,
                seed: self.seed,
            }
        };
        sampling.validate()?;
        Ok(GenerateParams {
            max_tokens: self.max_tokens,
            sampling,
            stop_ids: config.eos_token_id.into_iter().collect(),
            prefill_chunk: Some(self.prefill_chunk).filter(|&c| c > 0),
        })
    }
}

/// What drafts tokens for speculative decoding.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Drafter {
    /// The checkpoint's own multi-token-prediction layer (`mtp.0.*`).
    Mtp,
}

/// Speculative decoding flags, shared with `v4 bench-infer`.
#[derive(clap::Args, Clone)]
pub struct SpeculativeArgs {
    /// Speculative decoding: draft tokens with the MTP layer, then verify them in one forward of the main
    /// model and keep the accepted ones (the rejected positions' state is rolled back exactly). Greedy
    /// output is unchanged; sampled output keeps its distribution (speculative sampling's rejection rule).
    #[arg(long, value_enum)]
    pub speculative: Option<Drafter>,
    /// Drafts per step with --speculative (more than 1 runs the MTP layer recursively on its own output).
    #[arg(long, default_value_t = 1, requires = "speculative")]
    pub draft_tokens: usize,
}

impl SpeculativeArgs {
    pub fn params(&self) -> Option<SpeculativeParams> {
        self.speculative.map(|Drafter::Mtp| SpeculativeParams {
            draft_tokens: self.draft_tokens,
            reject_all: false,
        })
    }
}

/// `accepted 71% / 48% of drafts at positions 1 / 2, 1.94 tokens per step`.
pub fn describe_acceptance(a: &Acceptance) -> String {
    let rates: Vec<String> = (0..a.proposed.len())
        .map(|j| format!("{:.0}%", 100.0 * a.rate(j)))
        .collect();
    let positions: Vec<String> = (1..=a.proposed.len()).map(|j| j.to_string()).collect();
    format!(
        "accepted {} of drafts at position{} {}, {:.2} tokens per step",
        rates.join(" / "),
        if positions.len() > 1 { "s" } else { "" },
        positions.join(" / "),
        a.tokens_per_step()
    )
}

#[derive(clap::Args)]
pub struct Args {
    /// Model directory: config.json + safetensors in HF layout (f32/bf16) or DeepSeek's release layout
    /// (FP8 + MXFP4, kept in their stored precision unless --dequantize); its tokenizer.json is used when
    /// present.
    #[arg(long)]
    model: PathBuf,
    /// The prompt as text (needs a tokenizer).
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// The prompt as raw token ids, e.g. 1,2,3 (for models without a tokenizer).
    #[arg(long)]
    prompt_ids: Option<String>,
    /// tokenizer.json to use instead of the model directory's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Apply V4's chat format to --prompt (BOS, user turn, assistant generation prompt).
    #[arg(long)]
    chat: bool,
    /// System prompt (with --chat).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// Open the assistant turn in thinking mode (`<think>`) instead of answering directly (`</think>`).
    #[arg(long, requires = "chat")]
    think: bool,
    /// Do not put BOS before a plain --prompt.
    #[arg(long)]
    no_bos: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    speculative: SpeculativeArgs,
    /// Print one JSON object (generated_ids, text, timings) instead of streaming.
    #[arg(long)]
    json: bool,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    #[command(flatten)]
    load: LoadArgs,
}

pub fn run(args: Args) -> Result<()> {
    with_backend!(args.device, None::<&std::path::Path>, |B, device| generate::<B>(
        &args, &device
    ))
}

/// The tokenizer given by --tokenizer, else the model directory's (None when it has none).
pub fn load_tokenizer(model: &Path, path: Option<&Path>) -> Result<Option<V4Tokenizer>> {
    Ok(match path {
        Some(p) => Some(V4Tokenizer::from_file(p)?),
        None => V4Tokenizer::from_model_dir(model)?,
    })
}

/// Parses `1,2,3` (commas and/or spaces).
pub fn parse_ids(text: &str) -> Result<Vec<u32>> {
    text.split(|c: char| c == ',' || c.is_whitespace())
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<u32>()
                .map_err(|_| format!("--prompt-ids: `{s}` is not a token id (expected e.g. 1,2,3)").into())
        })
        .collect()
}

fn prompt_ids(args: &Args, config: &V4Config, tokenizer: Option<&V4Tokenizer>) -> Result<Vec<u32>> {
    if let Some(ids) = &args.prompt_ids {
        if args.chat {
            return Err("--chat formats a text --prompt; with --prompt-ids give the formatted ids".into());
        }
        return parse_ids(ids);
    }
    let text = args.prompt.as_deref().unwrap_or_default();
    if text.is_empty() {
        return Err(InferError::EmptyPrompt.into());
    }
    let tokenizer = tokenizer.ok_or_else(|| InferError::NoTokenizer {
        dir: args.model.display().to_string(),
    })?;
    if args.chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(Message::new(Role::System, system.as_str()));
        }
        messages.push(Message::new(Role::User, text));
        return Ok(encode_chat(tokenizer, &messages, args.think)?);
    }
    let mut ids = Vec::new();
    if !args.no_bos {
        ids.extend(config.bos_token_id);
    }
    ids.extend(tokenizer.encode(text)?);
    Ok(ids)
}

fn generate<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let config = read_config(&args.model)?;
    let tokenizer = load_tokenizer(&args.model, args.tokenizer.as_deref())?;
    if !args.sampling.stop.is_empty() && tokenizer.is_none() {
        return Err("--stop needs a tokenizer (text); this model has none".into());
    }
    let ids = prompt_ids(args, &config, tokenizer.as_ref())?;
    check_prompt(&config, &ids)?;
    let params = args.sampling.params(&config)?;

    let ranks = Ranks::launched()?;
    let started = Instant::now();
    let model = Load::new(&args.model, &config, args.device, args.load)
        .experts(ranks.shard())
        .model::<B>(device)?;
    let load_s = started.elapsed().as_secs_f64();
    let generator = Generator::with_runner(&model, ranks.runner());

    let mut stream = tokenizer.as_ref().map(TextStream::new);
    let mut stops = StopStrings::new(&args.sampling.stop);
    let mut stdout = std::io::stdout().lock();
    let mut failure: Option<InferError> = None;
    let mut on_token = |id| {
        let Some(stream) = stream.as_mut() else {
            if !args.json {
                let _ = write!(stdout, "{id} ");
                let _ = stdout.flush();
            }
            return Flow::Continue;
        };
        let piece = match stream.push(id) {
            Ok(p) => p,
            Err(e) => {
                failure = Some(e);
                return Flow::Stop;
            }
        };
        let (shown, stop) = stops.push(&piece);
        if !args.json {
            let _ = write!(stdout, "{shown}");
            let _ = stdout.flush();
        }
        if stop {
            Flow::Stop
        } else {
            Flow::Continue
        }
    };
    let (generation, timings, acceptance) = match args.speculative.params() {
        Some(spec) => {
            let (mut gens, timings, acceptance) =
                generator.generate_speculative(&[&ids], &params, spec, |_, id| on_token(id))?;
            (gens.pop().expect("one sequence"), timings, Some(acceptance))
        }
        None => {
            let (generation, timings) = generator.generate(&ids, &params, &mut on_token)?;
            (generation, timings, None)
        }
    };
    if let Some(e) = failure {
        return Err(e.into());
    }
    if !ranks.lead() {
        // Every rank generated the same tokens; rank 0 reports them.
        return Ok(());
    }
    if let Some(stream) = stream.as_mut() {
        if !stops.stopped() {
            let rest = stream.finish()?;
            let (shown, _) = stops.push(&rest);
            let tail = stops.finish();
            if !args.json {
                write!(stdout, "{shown}{tail}")?;
            }
        }
    }
    let consumed = ids.len() + generation.ids.len().saturating_sub(1);
    let cache_scalars = cache_footprint(&config, consumed).total();
    if args.json {
        let mut out = serde_json::json!({
            "prompt_ids": ids,
            "generated_ids": generation.ids,
            "finish_reason": generation.finish.as_str(),
            "timings": {
                "load_s": load_s,
                "time_to_first_token_s": timings.first_token_s,
                "prefill_s": timings.prefill_s,
                "prefill_tokens_per_s": timings.prefill_tokens_per_s(),
                "decode_s": timings.decode_s,
                "decode_tokens_per_s": timings.decode_tokens_per_s(),
                "prompt_tokens": timings.prompt_tokens,
                "generated_tokens": timings.generated_tokens,
            },
            "cache": {
                "tokens": consumed,
                "scalars": cache_scalars,
                "bytes_f32": cache_scalars * 4,
            },
        });
        if tokenizer.is_some() {
            out["text"] = serde_json::Value::String(stops.text().to_string());
        }
        if let Some(a) = &acceptance {
            out["speculative"] = serde_json::json!({
                "draft_tokens": a.proposed.len(),
                "proposed": a.proposed,
                "accepted": a.accepted,
                "steps": a.steps,
                "tokens_per_step": a.tokens_per_step(),
            });
        }
        writeln!(stdout, "{out}")?;
    } else {
        writeln!(stdout)?;
        if let Some(a) = &acceptance {
            eprintln!("[speculative (MTP): {}]", describe_acceptance(a));
        }
        eprintln!(
            "[{} prompt tokens: prefill {:.2}s ({:.1} tok/s), first token after {:.2}s; {} generated, decode {:.1} tok/s; \
             finish: {}; cache {} for {consumed} tokens; model loaded in {:.2}s]",
            timings.prompt_tokens,
            timings.prefill_s,
            timings.prefill_tokens_per_s(),
            timings.first_token_s,
            generation.ids.len(),
            timings.decode_tokens_per_s(),
            generation.finish.as_str(),
            v4_infer::human_bytes(cache_scalars as f64 * 4.0),
            load_s,
        );
    }
    Ok(())
}
