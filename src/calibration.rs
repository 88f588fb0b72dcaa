//! Calibration for `v4 convert --calib-data FILE.jsonl`: runs the checkpoint's own model over calibration
//! text and measures, for `--calibrate activation`, `E[x²]` per input channel of every routed expert
//! ([`ExpertActivationStats`], keyed by the HF tensor names the converter quantizes), or, for
//! `--calibrate smooth`, SmoothQuant factors per RMSNorm ([`smoothing_factors`]). The converter itself needs
//! no model: it only receives these numbers.

use crate::io::Result;
use burn::tensor::backend::Backend;
use burn::tensor::TensorData;
use serde_json::Value;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::Path;
use v4_checkpoint::read_config;
use v4_convert::layout::{norm_of_probe, smoothing_norm};
use v4_convert::Checkpoint;
use v4_infer::chat::{encode_chat, Message, Role};
use v4_infer::V4Tokenizer;
use v4_model::{ExpertActivationStats, ModelCache, Pass, Probe, Tokens, V4Model};

/// Token sequences for calibration, read from JSONL records: `{"text": ...}` and chat
/// `{"messages": [{"role", "content"}, ...]}` are tokenized with `tokenizer`; `{"ids": [...]}` are raw
/// token ids (for models without a tokenizer). All records are concatenated and cut into sequences of
/// `seq_len` tokens, up to `max_tokens` in all.
pub fn read_sequences(
    path: &Path,
    tokenizer: Option<&V4Tokenizer>,
    vocab: usize,
    seq_len: usize,
    max_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    if seq_len == 0 || max_tokens == 0 {
        return Err("--calib-seq-len and --calib-tokens must be positive".into());
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut tokens: Vec<u32> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if tokens.len() >= max_tokens {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {}", path.display(), n + 1);
        let record: Value = serde_json::from_str(line).map_err(|e| format!("{}: {e}", at()))?;
        let needs_tokenizer = || {
            tokenizer.ok_or_else(|| {
                format!(
                    "{}: a text record needs a tokenizer; the model directory has no tokenizer.json \
                     (pass --tokenizer FILE, or give token ids as {{\"ids\": [...]}})",
                    at()
                )
            })
        };
        let ids: Vec<u32> = if let Some(ids) = record.get("ids") {
            ids.as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
                        .collect()
                })
                .ok_or_else(|| format!("{}: `ids` must be an array of non-negative integers", at()))?
        } else if let Some(text) = record.get("text") {
            let text = text
                .as_str()
                .ok_or_else(|| format!("{}: `text` must be a string", at()))?;
            needs_tokenizer()?
                .encode(text)
                .map_err(|e| format!("{}: {e}", at()))?
        } else if let Some(messages) = record.get("messages") {
            let messages = parse_messages(messages).map_err(|e| format!("{}: {e}", at()))?;
            encode_chat(needs_tokenizer()?, &messages, false).map_err(|e| format!("{}: {e}", at()))?
        } else {
            return Err(format!("{}: a record needs `text`, `messages` or `ids`", at()).into());
        };
        if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(format!(
                "{}: token id {bad} is outside the model's vocabulary ({vocab})",
                at()
            )
            .into());
        }
        tokens.extend(ids);
    }
    tokens.truncate(max_tokens);
    if tokens.is_empty() {
        return Err(format!("{}: no calibration tokens", path.display()).into());
    }
    Ok(tokens.chunks(seq_len).map(<[u32]>::to_vec).collect())
}

fn parse_messages(value: &Value) -> std::result::Result<Vec<Message>, String> {
    let list = value.as_array().ok_or("`messages` must be an array")?;
    list.iter()
        .map(|m| {
            let role = match m.get("role").and_then(Value::as_str) {
                Some("system") => Role::System,
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                other => return Err(format!("unknown message role {other:?}")),
            };
            let content = m
                .get("content")
                .and_then(Value::as_str)
                .ok_or("a message needs a string `content`")?;
            Ok(Message::new(role, content))
        })
        .collect()
}

/// Runs the model in `dir` over `sequences` and returns `E[x²]` per input channel of every routed expert,
/// keyed by HF name: `model.layers.N.mlp.experts.gate_up_proj` (`[E * D]`) and `...down_proj` (`[E * I]`).
pub fn expert_importance<B: Backend>(
    dir: &Path,
    sequences: &[Vec<u32>],
    device: &B::Device,
) -> Result<HashMap<String, Vec<f32>>> {
    let config = read_config(dir)?;
    let source = v4_checkpoint::open(dir)?;
    let model = V4Model::<B>::load(&config, source.as_ref(), device)?;
    let stats = ExpertActivationStats::new();
    let progress = std::io::stderr().is_terminal();
    for (i, seq) in sequences.iter().enumerate() {
        if progress {
            eprint!("\rcalibration: sequence {}/{}", i + 1, sequences.len());
        }
        let tokens = Tokens::new(
            &seq.iter().map(|&t| t as i64).collect::<Vec<_>>(),
            1,
            seq.len(),
            config.vocab_size,
        )?;
        let mut cache = ModelCache::new(config.num_layers());
        model.forward_with(&tokens, &mut cache, Pass::new().runner(&stats))?;
    }
    if progress {
        eprintln!();
    }
    let tokens: usize = sequences.iter().map(Vec::len).sum();
    eprintln!(
        "calibration: {tokens} tokens in {} sequences, {} expert rows",
        sequences.len(),
        stats.rows()
    );
    let mut importance = HashMap::new();
    for (layer, m) in stats.mean_squares() {
        importance.insert(
            format!("model.layers.{layer}.mlp.experts.gate_up_proj"),
            m.gate_up,
        );
        importance.insert(format!("model.layers.{layer}.mlp.experts.down_proj"), m.down);
    }
    Ok(importance)
}

/// Largest |x| per channel of the recorded norm outputs (`<block>.attn.input`, `<block>.ffn.input`), keyed by
/// the norm's weight name.
#[derive(Default)]
struct NormAbsMax {
    amax: HashMap<String, Vec<f32>>,
}

impl Probe for NormAbsMax {
    fn wants(&self, name: &str) -> bool {
        norm_of_probe(name).is_some()
    }

    fn record(&mut self, name: &str, value: TensorData) {
        let (Some(norm), Some(&width)) = (norm_of_probe(name), value.shape.last()) else {
            return;
        };
        let values = value
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("activations are float");
        let amax = self.amax.entry(norm).or_insert_with(|| vec![0.0; width]);
        for row in values.chunks_exact(width) {
            for (m, v) in amax.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
    }
}

/// SmoothQuant factors for every RMSNorm whose output quantised linears read, keyed by the norm's DeepSeek
/// weight name: `s_j = max|x_j|^α / max|W_j|^(1-α)` (activations measured by running the model in `dir`
/// over `sequences`, weights over every linear reading that norm), rounded to the nearest power of two so
/// that folding `s` into the norm and its readers is exact.
pub fn smoothing_factors<B: Backend>(
    dir: &Path,
    sequences: &[Vec<u32>],
    alpha: f32,
    device: &B::Device,
) -> Result<HashMap<String, Vec<f32>>> {
    if !(0.0..=1.0).contains(&alpha) {
        return Err(format!("--smooth-alpha {alpha}: must lie in [0, 1]").into());
    }
    let config = read_config(dir)?;
    let source = v4_checkpoint::open(dir)?;
    let model = V4Model::<B>::load(&config, source.as_ref(), device)?;
    let mut probe = NormAbsMax::default();
    for seq in sequences {
        let ids: Vec<i64> = seq.iter().map(|&t| t as i64).collect();
        let tokens = Tokens::new(&ids, 1, seq.len(), config.vocab_size)?;
        let mut cache = ModelCache::new(config.num_layers());
        model.forward_with(&tokens, &mut cache, Pass::new().probe(&mut probe))?;
    }
    let checkpoint = Checkpoint::open(dir)?;
    let mut weight_amax: HashMap<String, Vec<f32>> = HashMap::new();
    for name in checkpoint.tensor_names() {
        let Some(norm) = smoothing_norm(&name).filter(|n| probe.amax.contains_key(n)) else {
            continue;
        };
        let shape = checkpoint.shape(&name).unwrap_or_default();
        let cols = *shape.last().unwrap_or(&1);
        let values = checkpoint.read_f32(&name)?;
        let amax = weight_amax.entry(norm).or_insert_with(|| vec![0.0; cols]);
        for row in values.chunks_exact(cols) {
            for (m, v) in amax.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
    }
    let factors = probe
        .amax
        .into_iter()
        .filter_map(|(norm, x)| {
            let w = weight_amax.get(&norm)?;
            let s = x
                .iter()
                .zip(w)
                .map(|(&x, &w)| power_of_two_factor(x, w, alpha))
                .collect();
            Some((norm, s))
        })
        .collect::<HashMap<_, _>>();
    eprintln!(
        "smoothing: factors for {} norms from {} sequences",
        factors.len(),
        sequences.len()
    );
    Ok(factors)
}

/// `x^α / w^(1-α)` rounded to the nearest power of two (1 when either side is zero), within 2^±20.
fn power_of_two_factor(x: f32, w: f32, alpha: f32) -> f32 {
    if x <= 0.0 || w <= 0.0 {
        return 1.0;
    }
    let log2 = alpha * x.log2() - (1.0 - alpha) * w.log2();
    2f32.powi(log2.round().clamp(-20.0, 20.0) as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_chat_and_id_records_are_concatenated_and_cut_into_sequences() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let tokenizer = V4Tokenizer::from_file(&root.join(v4_infer::TOKENIZER_FIXTURE)).unwrap();
        let dir = std::env::temp_dir().join(format!("v4-calib-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("calib.jsonl");
        std::fs::write(
            &path,
            "{\"text\": \"To be, or not to be\"}\n\n\
             {\"messages\": [{\"role\": \"user\", \"content\": \"Who?\"}, {\"role\": \"assistant\", \"content\": \"Hamlet.\"}]}\n\
             {\"ids\": [5, 6, 7]}\n",
        )
        .unwrap();
        let mut expected = tokenizer.encode("To be, or not to be").unwrap();
        let chat = [
            Message::new(Role::User, "Who?"),
            Message::new(Role::Assistant, "Hamlet."),
        ];
        expected.extend(encode_chat(&tokenizer, &chat, false).unwrap());
        expected.extend([5, 6, 7]);
        let vocab = tokenizer.vocab_size();

        let sequences = read_sequences(&path, Some(&tokenizer), vocab, 4, 1000).unwrap();
        assert_eq!(sequences.concat(), expected);
        assert!(sequences[..sequences.len() - 1].iter().all(|s| s.len() == 4));

        let capped = read_sequences(&path, Some(&tokenizer), vocab, 3, 5).unwrap();
        assert_eq!(capped.concat(), expected[..5]);

        let err = read_sequences(&path, None, vocab, 4, 1000)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("no tokenizer.json"),
            "{err}"
        );
        let err = read_sequences(&path, Some(&tokenizer), 1024, 4, 1000)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 1") && err.contains("outside the model's vocabulary"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
