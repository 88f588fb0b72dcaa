//! Data: JSONL records (`text` or chat `messages`) tokenized into one stream of (token, loss mask), cut into
//! windows of `seq_len + 1`, shuffled per epoch by a seeded generator. The loader's state is just
//! `(epoch, cursor)`: the order of an epoch is a pure function of the seed and the epoch.

use crate::error::TrainError;
use serde::{Deserialize, Serialize};
use std::path::Path;
use v4_infer::chat;
use v4_infer::InferError;
use v4_infer::V4Tokenizer;

/// How text becomes tokens.
pub enum Tokenizer {
    /// Token = byte value (vocabulary 256), for models without a tokenizer.
    Bytes,
    /// A `tokenizer.json` (the V4 tokenizer); chat records use V4's chat format.
    Json(Box<V4Tokenizer>),
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => f.write_str("Bytes"),
            Tokenizer::Json(t) => write!(f, "Json({})", t.path().display()),
        }
    }
}

impl Tokenizer {
    /// `"bytes"`, or the path of a `tokenizer.json`.
    pub fn from_spec(spec: &str) -> Result<Self, TrainError> {
        match spec {
            "bytes" => Ok(Tokenizer::Bytes),
            path => V4Tokenizer::from_file(Path::new(path))
                .map(|t| Tokenizer::Json(Box::new(t)))
                .map_err(|e| TrainError::Data {
                    path: path.into(),
                    reason: format!("[data] tokenizer: {e}"),
                }),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => 256,
            Tokenizer::Json(t) => t.vocab_size(),
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, InferError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Json(t) => t.encode(text),
        }
    }

    /// A chat conversation as segments of (text, is it a loss target): V4's chat format with a real
    /// tokenizer (BOS, system, `<｜User｜>`, `<｜Assistant｜></think>` answer EOS), `<|role|>` headers with
    /// bytes. Only assistant answers (and their end marker) are targets.
    fn chat_segments(&self, messages: &[Message]) -> Vec<(String, bool)> {
        let mut out = Vec::new();
        match self {
            Tokenizer::Bytes => {
                for m in messages {
                    let target = m.role == "assistant";
                    out.push((format!("<|{}|>\n", m.role), false));
                    out.push((format!("{}\n", m.content), target));
                }
            }
            Tokenizer::Json(_) => {
                out.push((chat::BOS.to_string(), false));
                for m in messages {
                    match m.role.as_str() {
                        "system" => out.push((m.content.clone(), false)),
                        "user" => out.push((format!("{}{}", chat::USER, m.content), false)),
                        _ => {
                            out.push((format!("{}{}", chat::ASSISTANT, chat::END_THINK), false));
                            out.push((format!("{}{}", chat::strip_thinking(&m.content), chat::EOS), true));
                        }
                    }
                }
            }
        }
        out
    }
}

/// One training window: `seq_len + 1` tokens and, per token, whether it is a loss target.
#[derive(Debug, Clone, PartialEq)]
pub struct Window {
    pub tokens: Vec<u32>,
    pub mask: Vec<bool>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: String,
}

/// Other fields (source, play, ...) are metadata and ignored.
#[derive(Debug, Deserialize)]
struct Record {
    text: Option<String>,
    messages: Option<Vec<Message>>,
    /// Token ids already tokenized (all targets): e.g. the ids `scripts/bench-peers.sh` gives both v4 and HF.
    ids: Option<Vec<u32>>,
}

/// Reads `path` (JSONL) into windows of `seq_len + 1` tokens. `text` records are all targets; chat records
/// are rendered by [`Tokenizer::chat_segments`], with only the assistant answers as targets.
pub fn load_windows(
    path: &Path,
    tokenizer: &Tokenizer,
    seq_len: usize,
    max_records: usize,
) -> Result<Vec<Window>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let (mut tokens, mut mask) = (Vec::new(), Vec::new());
    let push =
        |s: &str, target: bool, tokens: &mut Vec<u32>, mask: &mut Vec<bool>| -> Result<(), InferError> {
            let ids = tokenizer.encode(s)?;
            mask.extend(std::iter::repeat_n(target, ids.len()));
            tokens.extend(ids);
            Ok(())
        };
    let mut records = 0;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if max_records > 0 && records == max_records {
            break;
        }
        records += 1;
        let bad = |reason: String| TrainError::Data {
            path: path.to_path_buf(),
            reason: format!("line {}: {reason}", n + 1),
        };
        let record: Record = serde_json::from_str(line).map_err(|e| bad(e.to_string()))?;
        match (record.text, record.messages, record.ids) {
            (Some(t), None, None) => {
                push(&format!("{t}\n\n"), true, &mut tokens, &mut mask).map_err(|e| bad(e.to_string()))?
            }
            (None, None, Some(ids)) => {
                mask.extend(std::iter::repeat_n(true, ids.len()));
                tokens.extend(ids);
            }
            (None, Some(messages), None) => {
                let roles = ["system", "user", "assistant"];
                if let Some(m) = messages.iter().find(|m| !roles.contains(&m.role.as_str())) {
                    return Err(bad(format!(
                        "unknown role `{}` (system, user, assistant)",
                        m.role
                    )));
                }
                for (text, target) in tokenizer.chat_segments(&messages) {
                    push(&text, target, &mut tokens, &mut mask).map_err(|e| bad(e.to_string()))?;
                }
            }
            _ => {
                return Err(bad(
                    "a record needs exactly one of `text`, `messages` or `ids`".into()
                ))
            }
        }
    }
    let w = seq_len + 1;
    let windows: Vec<Window> = tokens
        .chunks_exact(w)
        .zip(mask.chunks_exact(w))
        .map(|(t, m)| Window {
            tokens: t.to_vec(),
            mask: m.to_vec(),
        })
        // A window whose targets are all masked teaches nothing.
        .filter(|win| win.mask[1..].iter().any(|&m| m))
        .collect();
    if windows.is_empty() {
        return Err(TrainError::Data {
            path: path.to_path_buf(),
            reason: format!("fewer than {w} tokens with loss targets (seq_len {seq_len})"),
        });
    }
    Ok(windows)
}

/// SplitMix64.
#[derive(Debug, Clone)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// The resumable position of the loader.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub cursor: usize,
}

/// Shuffled batches of windows.
#[derive(Debug, Clone)]
pub struct Loader {
    pub windows: Vec<Window>,
    pub seed: u64,
    pub state: LoaderState,
    order: Vec<usize>,
}

impl Loader {
    pub fn new(windows: Vec<Window>, seed: u64, state: LoaderState) -> Self {
        let mut loader = Self {
            windows,
            seed,
            state,
            order: Vec::new(),
        };
        loader.order = loader.epoch_order(state.epoch);
        loader
    }

    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.windows.len()).collect();
        let mut rng = SplitMix(self.seed ^ epoch.wrapping_mul(0xA076_1D64_78BD_642F));
        for i in (1..order.len()).rev() {
            let j = (rng.next_u64() % (i as u64 + 1)) as usize;
            order.swap(i, j);
        }
        order
    }

    /// The next `batch` windows (crossing into the next epoch when one ends).
    pub fn next_batch(&mut self, batch: usize) -> Vec<&Window> {
        let mut picked = Vec::with_capacity(batch);
        for _ in 0..batch {
            if self.state.cursor == self.order.len() {
                self.state.epoch += 1;
                self.state.cursor = 0;
                self.order = self.epoch_order(self.state.epoch);
            }
            picked.push(self.order[self.state.cursor]);
            self.state.cursor += 1;
        }
        picked.into_iter().map(|i| &self.windows[i]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_masks_only_assistant_contents() {
        let dir = std::env::temp_dir().join(format!("v4-train-chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.jsonl");
        let line =
            r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
        std::fs::write(&path, line).unwrap();
        // "<|user|>\nhi\n<|assistant|>\nyo\n" = 9 + 3 + 14 + 3 = 29 tokens: one window of 29.
        let w = load_windows(&path, &Tokenizer::Bytes, 28, 0).unwrap();
        assert_eq!(w.len(), 1);
        let text: String = w[0].tokens.iter().map(|&t| t as u8 as char).collect();
        let targets: String = w[0]
            .tokens
            .iter()
            .zip(&w[0].mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t as u8 as char)
            .collect();
        assert_eq!(text, "<|user|>\nhi\n<|assistant|>\nyo\n");
        assert_eq!(targets, "yo\n");
    }

    /// With the V4 tokenizer, a chat record is V4's chat format, and exactly the assistant's answer and its
    /// EOS are targets: the targets decode back to them.
    #[test]
    fn v4_tokenizer_chat_uses_the_v4_format_and_masks_all_but_the_answer() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let spec = root.join(v4_infer::TOKENIZER_FIXTURE);
        let tokenizer = Tokenizer::from_spec(spec.to_str().unwrap()).unwrap();
        let Tokenizer::Json(inner) = &tokenizer else {
            panic!("expected a tokenizer.json")
        };
        let dir = std::env::temp_dir().join(format!("v4-train-v4chat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.jsonl");
        let line = r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who wrote Hamlet?"}, {"role": "assistant", "content": "Shakespeare."}]}"#;
        std::fs::write(&path, line).unwrap();
        let messages = [
            v4_infer::Message::new(v4_infer::Role::System, "Be brief."),
            v4_infer::Message::new(v4_infer::Role::User, "Who wrote Hamlet?"),
            v4_infer::Message::new(v4_infer::Role::Assistant, "Shakespeare."),
        ];
        // The whole conversation as the inference side renders it, minus its trailing generation prompt.
        let rendered = v4_infer::render_chat(&messages, false);
        let expected = rendered
            .strip_suffix(&format!("{}{}", chat::ASSISTANT, chat::END_THINK))
            .unwrap();
        let n = inner.encode(expected).unwrap().len();
        let w = load_windows(&path, &tokenizer, n - 1, 0).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(inner.decode(&w[0].tokens, false).unwrap(), expected);
        let targets: Vec<u32> = w[0]
            .tokens
            .iter()
            .zip(&w[0].mask)
            .filter(|(_, &m)| m)
            .map(|(&t, _)| t)
            .collect();
        assert_eq!(
            inner.decode(&targets, false).unwrap(),
            format!("Shakespeare.{}", chat::EOS)
        );

        std::fs::write(&path, r#"{"messages": [{"role": "narrator", "content": "x"}]}"#).unwrap();
        let err = load_windows(&path, &tokenizer, 4, 0).unwrap_err();
        assert!(
            matches!(&err, TrainError::Data { reason, .. }
                if reason.contains("line 1:") && reason.contains("unknown role `narrator`")),
            "{err}"
        );
        let err = Tokenizer::from_spec("/no/such/tokenizer.json").unwrap_err();
        assert!(
            matches!(&err, TrainError::Data { .. }) && err.to_string().contains("no such file"),
            "{err}"
        );
    }

    #[test]
    fn loader_order_depends_only_on_seed_and_position() {
        let windows: Vec<Window> = (0..5)
            .map(|i| Window {
                tokens: vec![i, i],
                mask: vec![true, true],
            })
            .collect();
        let mut a = Loader::new(windows.clone(), 3, LoaderState::default());
        let first: Vec<u32> = (0..7).map(|_| a.next_batch(1)[0].tokens[0]).collect();
        let mut b = Loader::new(windows.clone(), 3, LoaderState::default());
        for _ in 0..4 {
            b.next_batch(1);
        }
        let mut c = Loader::new(windows, 3, b.state);
        let rest: Vec<u32> = (0..3).map(|_| c.next_batch(1)[0].tokens[0]).collect();
        assert_eq!(&first[4..], &rest[..]);
    }
}
