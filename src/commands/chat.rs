//! `v4 chat --model DIR`: an interactive conversation in V4's chat format. Reads one user message per line
//! from stdin (a terminal or a pipe), streams each reply; `/reset` starts over, `/exit` quits. The cache is
//! kept between turns, so a turn only prefills the tokens the conversation added.

use crate::commands::generate::{describe_acceptance, load_tokenizer, SamplingArgs, SpeculativeArgs};
use crate::device::{with_backend, Device};
use crate::io::Result;
use crate::load::{Load, LoadArgs};
use burn::tensor::backend::Backend;
use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;
use v4_checkpoint::read_config;
use v4_infer::{ChatSession, Flow, Generator, InferError, StopStrings, TextStream};

#[derive(clap::Args)]
pub struct Args {
    /// Model directory (either checkpoint layout); its tokenizer.json is used unless --tokenizer is given.
    #[arg(long)]
    model: PathBuf,
    /// tokenizer.json to use instead of the model directory's.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Thinking mode: open each assistant turn with `<think>`.
    #[arg(long)]
    think: bool,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// With --speculative, each turn prefills the whole conversation: the speculative decoder does not
    /// keep the cache between turns.
    #[command(flatten)]
    speculative: SpeculativeArgs,
    /// Backend to run on.
    #[arg(long, value_enum, default_value = "cpu")]
    device: Device,
    #[command(flatten)]
    load: LoadArgs,
}

pub fn run(args: Args) -> Result<()> {
    with_backend!(args.device, None::<&std::path::Path>, |B, device| chat::<B>(
        &args, &device
    ))
}

fn chat<B: Backend>(args: &Args, device: &B::Device) -> Result<()> {
    let config = read_config(&args.model)?;
    let tokenizer = load_tokenizer(&args.model, args.tokenizer.as_deref())?.ok_or_else(|| {
        format!(
            "{} has no tokenizer.json: chat needs one (pass --tokenizer PATH)",
            args.model.display()
        )
    })?;
    let params = args.sampling.params(&config)?;
    let model = Load::new(&args.model, &config, args.device, args.load).model::<B>(device)?;
    let generator = Generator::new(&model);
    let mut session = ChatSession::<B>::new(&tokenizer, args.system.as_deref(), args.think);

    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("v4 chat: one message per line; /reset starts over, /exit quits.");
    }
    let mut failed = 0usize;
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let message = line.trim();
        match message {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                session = ChatSession::new(&tokenizer, args.system.as_deref(), args.think);
                continue;
            }
            _ => {}
        }
        let mut stream = TextStream::new(&tokenizer);
        let mut stops = StopStrings::new(&args.sampling.stop);
        let mut stdout = std::io::stdout().lock();
        let mut failure: Option<InferError> = None;
        let on_token = |id| {
            let piece = match stream.push(id) {
                Ok(p) => p,
                Err(e) => {
                    failure = Some(e);
                    return Flow::Stop;
                }
            };
            let (shown, stop) = stops.push(&piece);
            let _ = write!(stdout, "{shown}");
            let _ = stdout.flush();
            if stop {
                Flow::Stop
            } else {
                Flow::Continue
            }
        };
        let result = match args.speculative.params() {
            Some(spec) => session
                .turn_speculative(&generator, message, &params, spec, on_token)
                .map(|(g, t, s, a)| (g, t, s, Some(a))),
            None => session
                .turn(&generator, message, &params, on_token)
                .map(|(g, t, s)| (g, t, s, None)),
        };
        match result.map_err(|e| failure.take().unwrap_or(e)) {
            Ok((generation, timings, stats, acceptance)) => {
                if !stops.stopped() {
                    let rest = stream.finish()?;
                    let (shown, _) = stops.push(&rest);
                    write!(stdout, "{shown}{}", stops.finish())?;
                }
                writeln!(stdout)?;
                stdout.flush()?;
                session.add_reply(stops.text());
                eprintln!(
                    "[{} new prompt tokens ({} reused from the cache), {:.1} tok/s prefill; {} generated at {:.1} tok/s; finish: {}]",
                    stats.prompt_tokens - stats.reused_tokens,
                    stats.reused_tokens,
                    timings.prefill_tokens_per_s(),
                    generation.ids.len(),
                    timings.decode_tokens_per_s(),
                    generation.finish.as_str()
                );
                if let Some(a) = acceptance {
                    eprintln!("[speculative (MTP): {}]", describe_acceptance(&a));
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("error: {e}");
            }
        }
    }
    if failed > 0 && !interactive {
        return Err(format!("{failed} turn(s) failed").into());
    }
    Ok(())
}
