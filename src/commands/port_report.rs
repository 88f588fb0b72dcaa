//! `v4 port-report --model DIR --input IDS.safetensors --output DIR`: the migration table. The release
//! checkpoint runs on the `cpu` backend (the reference: the FP8 release semantics), then once per Ascend
//! precision path on the NPU emulator with that path's chip sheet, each from the checkpoint that path would
//! hold (converted here). One row per path: agreement with the reference, perplexity on the input tokens,
//! resident weight bytes and the cost model's time per token.

use crate::device::Device;
use crate::io::{read_input_ids, write_atomically, Result};
use crate::load::{Load, LoadArgs};
use burn::tensor::backend::Backend;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use v4_checkpoint::read_config;
use v4_convert::{convert, ConvertOptions, Target};
use v4_model::{Tokens, V4Config};
use v4_npu::NpuConfig;
use v4_validate::metrics::compare_f32;

#[derive(clap::Args)]
pub struct Args {
    /// Checkpoint in DeepSeek's release layout (FP8 dense weights, MXFP4 experts): the reference.
    #[arg(long)]
    model: PathBuf,
    /// Safetensors file holding `input_ids` [batch, seq]: the tokens every path runs, and the held-out
    /// text its next-token perplexity is measured on.
    #[arg(long)]
    input: PathBuf,
    /// Directory for `port-report.md`, `port-report.html` and the converted checkpoints
    /// (`checkpoints/<target>`, reused when present).
    #[arg(long)]
    output: PathBuf,
}

/// One Ascend precision path: the checkpoint it holds and the chip sheet it runs under.
struct ChipPath {
    name: &'static str,
    /// What `v4 convert` writes for it; `None` runs the release checkpoint as it is.
    target: Option<Target>,
    /// The chip sheet (the file under `configs/` of the same name, built in).
    config: (&'static str, &'static str),
}

const PATHS: [ChipPath; 5] = [
    ChipPath {
        name: "910B BF16",
        target: Some(Target::Bf16),
        config: (
            "npu-910b-bf16.toml",
            include_str!("../../configs/npu-910b-bf16.toml"),
        ),
    },
    ChipPath {
        name: "910B W8A8_DYNAMIC",
        target: Some(Target::W8a8),
        config: (
            "npu-910b-w8a8.toml",
            include_str!("../../configs/npu-910b-w8a8.toml"),
        ),
    },
    ChipPath {
        name: "910B W4A8 experts + W8A8",
        target: Some(Target::W4a8),
        config: (
            "npu-910b-w8a8.toml",
            include_str!("../../configs/npu-910b-w8a8.toml"),
        ),
    },
    ChipPath {
        name: "950 MXFP8",
        target: Some(Target::Mxfp8),
        config: (
            "npu-950-mxfp8.toml",
            include_str!("../../configs/npu-950-mxfp8.toml"),
        ),
    },
    ChipPath {
        name: "950 release FP8 + MXFP4",
        target: None,
        config: (
            "npu-950-mxfp4.toml",
            include_str!("../../configs/npu-950-mxfp4.toml"),
        ),
    },
];

/// One row of the table.
struct Row {
    path: String,
    chip_sheet: String,
    rel_l2: f64,
    kl: f64,
    top1: f64,
    perplexity: f64,
    weight_bytes: u64,
    /// The cost model's estimate; `None` for the reference (a CPU run, not a chip).
    us_per_token: Option<f64>,
    fallbacks: u64,
}

pub fn run(args: Args) -> Result<()> {
    let config = read_config(&args.model)?;
    let (ids, batch, seq) = read_input_ids(&args.input)?;
    let tokens = Tokens::new(&ids, batch, seq, config.vocab_size)
        .map_err(|e| format!("{}: {e}", args.input.display()))?;
    let reference = reference_logits(&args.model, &config, &tokens)?;
    let score = |logits: &[f32]| Score::of(&reference, logits, &ids, batch, seq, config.vocab_size);
    let mut rows =
        vec![score(&reference).row("reference (cpu, release FP8 + MXFP4)", "-", &args.model, None, 0)?];
    for path in &PATHS {
        let dir = match path.target {
            Some(target) => converted(&args.model, &args.output, target)?,
            None => args.model.clone(),
        };
        let (logits, us, fallbacks) = npu_logits(&dir, &config, &tokens, path.config)?;
        let per_token = us / (batch * seq) as f64;
        rows.push(score(&logits).row(path.name, path.config.0, &dir, Some(per_token), fallbacks)?);
        eprintln!("{}: done", path.name);
    }
    let md = markdown(&rows, &args.model, &args.input);
    std::fs::create_dir_all(&args.output).map_err(|e| format!("{}: {e}", args.output.display()))?;
    write_atomically(&args.output.join("port-report.md"), md.as_bytes())?;
    write_atomically(
        &args.output.join("port-report.html"),
        html(&rows, &args.model).as_bytes(),
    )?;
    print!("{md}");
    Ok(())
}

/// The release checkpoint's logits on the `cpu` backend, `[batch * seq * vocab]`.
fn reference_logits(model: &Path, config: &V4Config, tokens: &Tokens) -> Result<Vec<f32>> {
    type B = v4_cpu::Cpu;
    let device = burn_ndarray::NdArrayDevice::Cpu;
    let m = Load::new(model, config, Device::Cpu, LoadArgs::default()).model::<B>(&device)?;
    logits::<B>(m.forward(tokens)?)
}

/// Logits, the cost model's device time (µs) and the fallback count of a run on the emulator under `sheet`.
fn npu_logits(
    dir: &Path,
    config: &V4Config,
    tokens: &Tokens,
    sheet: (&str, &str),
) -> Result<(Vec<f32>, f64, u64)> {
    type B = v4_npu::Npu;
    let device = Default::default();
    let npu = NpuConfig::from_toml_str(sheet.1).map_err(|e| format!("{}: {e}", sheet.0))?;
    v4_npu::install_config(&device, npu);
    v4_npu::reset_stats(&device);
    let m = Load::new(dir, config, Device::Npu, LoadArgs::default()).model::<B>(&device)?;
    let logits = logits::<B>(m.forward(tokens)?)?;
    let report = v4_npu::report(&device);
    Ok((logits, report.estimated_time_us(), report.fallback_calls()))
}

fn logits<B: Backend>(t: burn::tensor::Tensor<B, 3>) -> Result<Vec<f32>> {
    Ok(t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| format!("logits: {e:?}"))?)
}

/// `model` converted to `target` under `output/checkpoints/<target>` (kept from an earlier run).
fn converted(model: &Path, output: &Path, target: Target) -> Result<PathBuf> {
    let dir = output.join("checkpoints").join(target.name());
    if dir.join("config.json").is_file() {
        eprintln!("{}: reusing {}", target.name(), dir.display());
        return Ok(dir);
    }
    let parent = output.join("checkpoints");
    std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let mut opts = ConvertOptions::new(model, &dir, target);
    opts.progress = false;
    convert(&opts)?;
    Ok(dir)
}

/// A path's agreement with the reference and its perplexity.
struct Score {
    rel_l2: f64,
    kl: f64,
    top1: f64,
    perplexity: f64,
}

impl Score {
    fn of(reference: &[f32], logits: &[f32], ids: &[i64], batch: usize, seq: usize, vocab: usize) -> Score {
        assert_eq!(
            reference.len(),
            logits.len(),
            "logits of every path are [batch, seq, vocab]"
        );
        let m = compare_f32(reference, logits, 1e-6, 23, Some(vocab));
        let argmax = |row: &[f32]| {
            row.iter()
                .enumerate()
                .fold(0, |b, (i, &v)| if v > row[b] { i } else { b })
        };
        let agree = reference
            .chunks_exact(vocab)
            .zip(logits.chunks_exact(vocab))
            .filter(|(r, c)| argmax(r) == argmax(c))
            .count();
        Score {
            rel_l2: m.rel_l2,
            kl: m.kl.unwrap_or(0.0),
            top1: agree as f64 / (batch * seq) as f64,
            perplexity: perplexity(logits, ids, batch, seq, vocab),
        }
    }

    fn row(
        self,
        path: &str,
        sheet: &str,
        dir: &Path,
        us_per_token: Option<f64>,
        fallbacks: u64,
    ) -> Result<Row> {
        Ok(Row {
            path: path.into(),
            chip_sheet: sheet.into(),
            rel_l2: self.rel_l2,
            kl: self.kl,
            top1: self.top1,
            perplexity: self.perplexity,
            weight_bytes: weight_bytes(dir)?,
            us_per_token,
            fallbacks,
        })
    }
}

/// exp(mean NLL of token t+1 under the logits at t), over every row.
fn perplexity(logits: &[f32], ids: &[i64], batch: usize, seq: usize, vocab: usize) -> f64 {
    let mut nll = 0.0;
    for b in 0..batch {
        for t in 0..seq - 1 {
            let row = &logits[(b * seq + t) * vocab..][..vocab];
            let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64));
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            nll += lse - row[ids[b * seq + t + 1] as usize] as f64;
        }
    }
    (nll / (batch * (seq - 1)).max(1) as f64).exp()
}

/// Bytes of the weight files in `dir`: what the chip holds, weights staying as stored.
fn weight_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let entry = entry.map_err(|e| format!("{}: {e}", dir.display()))?;
        if entry.file_name().to_string_lossy().ends_with(".safetensors") {
            total += entry
                .metadata()
                .map_err(|e| format!("{}: {e}", entry.path().display()))?
                .len();
        }
    }
    Ok(total)
}

const HEADER: [&str; 9] = [
    "path",
    "chip sheet",
    "logits rel L2",
    "KL(ref ‖ path)",
    "top-1 agreement",
    "perplexity",
    "weight bytes",
    "est. µs/token",
    "fallbacks",
];

fn cells(r: &Row) -> [String; 9] {
    [
        r.path.clone(),
        r.chip_sheet.clone(),
        format!("{:.3e}", r.rel_l2),
        format!("{:.3e}", r.kl),
        format!("{:.4}", r.top1),
        format!("{:.4}", r.perplexity),
        r.weight_bytes.to_string(),
        r.us_per_token.map_or("-".into(), |u| format!("{u:.1}")),
        r.fallbacks.to_string(),
    ]
}

fn markdown(rows: &[Row], model: &Path, input: &Path) -> String {
    let mut s = format!(
        "# Migration table: {}\n\nTokens: `{}`. Reference: the release checkpoint on the `cpu` backend (f32 compute on the \
         FP8/MXFP4 weights). Each path runs the checkpoint it would hold on the NPU emulator under its chip sheet; \
         µs/token is the cost model's ESTIMATE from that sheet, not a measurement. Propagated drift (rel L2, KL) is a \
         property of the precision path, not a failure.\n\n| {} |\n|{}\n",
        model.display(),
        input.display(),
        HEADER.join(" | "),
        "---|".repeat(HEADER.len())
    );
    for r in rows {
        let _ = writeln!(s, "| {} |", cells(r).join(" | "));
    }
    s
}

fn html(rows: &[Row], model: &Path) -> String {
    let esc = |t: &str| t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let mut s = format!(
        "<!doctype html><meta charset=\"utf-8\"><title>v4 migration table</title>\
         <style>body{{font-family:sans-serif}}td,th{{padding:4px 10px;text-align:right}}td:first-child,th:first-child{{text-align:left}}</style>\
         <h1>Migration table: {}</h1><table><tr>{}</tr>",
        esc(&model.display().to_string()),
        HEADER.iter().map(|h| format!("<th>{}</th>", esc(h))).collect::<String>()
    );
    for r in rows {
        let tds: String = cells(r).iter().map(|c| format!("<td>{}</td>", esc(c))).collect();
        let _ = write!(s, "<tr>{tds}</tr>");
    }
    s + "</table><p>µs/token: the cost model's estimate from each chip sheet, not a measurement.</p>\n"
}
