//! V4's chat format and a multi-turn chat session that reuses the cache between turns.
//!
//! The format follows DeepSeek's public V3.1 / V3.2 conventions (which V4's tokenizer shares):
//!
//! ```text
//! <｜begin▁of▁sentence｜>{system}<｜User｜>{u1}<｜Assistant｜></think>{a1}<｜end▁of▁sentence｜><｜User｜>{u2}<｜Assistant｜><think>
//! ```
//!
//! The system prompt follows BOS directly; an earlier assistant turn is written with an empty thinking
//! part (`</think>` then the answer, its reasoning dropped) and closed by EOS; the generation prompt opens
//! the assistant turn with `<think>` (thinking mode) or `</think>` (answer directly, the default).

use crate::error::InferError;
use crate::generator::{Batch, GenerateParams, Generation, Generator, Timings};
use crate::sampling::{Sampler, SamplingParams};
use crate::speculative::{Acceptance, SpeculativeParams};
use crate::tokenizer::V4Tokenizer;
use burn::tensor::backend::Backend;
use std::time::Instant;

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
pub const USER: &str = "<｜User｜>";
pub const ASSISTANT: &str = "<｜Assistant｜>";
pub const THINK: &str = "<think>";
pub const END_THINK: &str = "</think>";

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// The prompt text of a conversation, ending with the generation prompt of the assistant's next turn.
pub fn render_chat(messages: &[Message], thinking: bool) -> String {
    let mut out = String::from(BOS);
    let system: Vec<&str> = messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.as_str())
        .collect();
    out.push_str(&system.join("\n\n"));
    for m in messages {
        match m.role {
            Role::System => {}
            Role::User => {
                out.push_str(USER);
                out.push_str(&m.content);
            }
            Role::Assistant => {
                out.push_str(ASSISTANT);
                out.push_str(END_THINK);
                out.push_str(strip_thinking(&m.content));
                out.push_str(EOS);
            }
        }
    }
    out.push_str(ASSISTANT);
    out.push_str(if thinking { THINK } else { END_THINK });
    out
}

/// The answer part of a reply: what follows the last `</think>` (the whole reply when there is none).
pub fn strip_thinking(reply: &str) -> &str {
    match reply.rfind(END_THINK) {
        Some(at) => reply[at + END_THINK.len()..].trim_start_matches('\n'),
        None => reply,
    }
}

/// Token ids of a conversation's prompt. Fails when the tokenizer lacks V4's chat tokens or a message
/// names a special token the tokenizer does not have.
pub fn encode_chat(
    tokenizer: &V4Tokenizer,
    messages: &[Message],
    thinking: bool,
) -> Result<Vec<u32>, InferError> {
    for token in [BOS, EOS, USER, ASSISTANT, THINK, END_THINK] {
        if tokenizer.token_id(token).is_none() {
            return Err(InferError::UnknownSpecialToken {
                token: token.to_string(),
            });
        }
    }
    for m in messages {
        tokenizer.check_special_tokens(&m.content)?;
    }
    tokenizer.encode(&render_chat(messages, thinking))
}

/// A conversation with a model: its messages and the cache of the tokens already run, so that a new turn
/// only prefills what the conversation added.
///
/// Without thinking, the format writes an earlier assistant turn exactly as it was generated
/// (`<｜Assistant｜></think>` answer EOS), so a new turn's prompt is the transcript so far (the tokens the
/// model saw and produced, EOS added when the reply was cut by `max_tokens`) followed by the new user turn:
/// the cache always extends. In thinking mode the reasoning of earlier turns is dropped from the prompt, and
/// after a reply cut by a stop string the text differs from the tokens: the conversation is then
/// re-rendered, and the cache reused only when the new prompt extends what it holds.
pub struct ChatSession<'t, B: Backend> {
    tokenizer: &'t V4Tokenizer,
    pub messages: Vec<Message>,
    pub thinking: bool,
    batch: Option<Batch<B>>,
    /// The tokens the cache holds.
    fed: Vec<u32>,
    /// Every token of the conversation so far as the model saw and produced it, when the next turn can
    /// simply extend it.
    transcript: Option<Vec<u32>>,
    turns: u64,
}

/// What a turn did besides generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TurnStats {
    /// Prompt tokens of the turn (the whole conversation so far).
    pub prompt_tokens: usize,
    /// Of those, tokens already in the cache (not run again).
    pub reused_tokens: usize,
}

impl<'t, B: Backend> ChatSession<'t, B> {
    pub fn new(tokenizer: &'t V4Tokenizer, system: Option<&str>, thinking: bool) -> Self {
        let messages = system
            .filter(|s| !s.is_empty())
            .map(|s| vec![Message::new(Role::System, s)])
            .unwrap_or_default();
        Self {
            tokenizer,
            messages,
            thinking,
            batch: None,
            fed: Vec::new(),
            transcript: None,
            turns: 0,
        }
    }

    /// Adds the user's message and generates the assistant's reply; `on_token` sees each id. Call
    /// [`ChatSession::add_reply`] with the reply's text afterwards. On error the user message is removed.
    pub fn turn(
        &mut self,
        generator: &Generator<'_, B>,
        user: &str,
        params: &GenerateParams,
        on_token: impl FnMut(u32) -> crate::generator::Flow,
    ) -> Result<(Generation, Timings, TurnStats), InferError> {
        self.messages.push(Message::new(Role::User, user));
        let result = self.run_turn(generator, params, on_token);
        if result.is_err() {
            self.messages.pop();
        }
        result
    }

    fn run_turn(
        &mut self,
        generator: &Generator<'_, B>,
        params: &GenerateParams,
        mut on_token: impl FnMut(u32) -> crate::generator::Flow,
    ) -> Result<(Generation, Timings, TurnStats), InferError> {
        params.sampling.validate().map_err(InferError::Batch)?;
        let ids = self.prompt_ids()?;
        generator.check_prompt(&ids)?;
        let started = Instant::now();
        let reusable = self.batch.is_some() && self.fed.len() < ids.len() && ids.starts_with(&self.fed);
        let (mut batch, logits, reused) = if reusable {
            let mut batch = self.batch.take().expect("checked");
            let delta = &ids[self.fed.len()..];
            let logits = generator.feed_batch(&mut batch, &[delta], params.prefill_chunk, false)?;
            (batch, logits, self.fed.len())
        } else {
            self.batch = None;
            let (batch, logits) = generator.prefill_batch(&[&ids], params.prefill_chunk)?;
            (batch, logits, 0)
        };
        let mut timings = Timings {
            prompt_tokens: ids.len() - reused,
            prefill_s: started.elapsed().as_secs_f64(),
            ..Timings::default()
        };
        let sampler = Sampler::new(SamplingParams {
            seed: params.sampling.seed.wrapping_add(self.turns),
            ..params.sampling.clone()
        });
        self.turns += 1;
        let mut gens = generator.run(
            &mut batch,
            logits,
            vec![ids.clone()],
            vec![sampler],
            params,
            started,
            &mut timings,
            |_, id| on_token(id),
        )?;
        let generation = gens.pop().expect("one sequence");
        // The cache holds the prompt and every generated token but the last.
        let n = generation.ids.len();
        self.record_transcript(&ids, &generation);
        self.fed = ids;
        self.fed.extend_from_slice(&generation.ids[..n.saturating_sub(1)]);
        self.batch = Some(batch);
        let stats = TurnStats {
            prompt_tokens: self.fed.len() - n.saturating_sub(1),
            reused_tokens: reused,
        };
        Ok((generation, timings, stats))
    }

    /// [`turn`](Self::turn) with MTP speculative decoding (the model needs an MTP layer). The speculative
    /// decoder keeps caches of its own, so every such turn prefills the whole conversation
    /// (`reused_tokens` is 0); the output is what [`turn`](Self::turn) would give (greedy: the same tokens;
    /// sampled: the same distribution).
    pub fn turn_speculative(
        &mut self,
        generator: &Generator<'_, B>,
        user: &str,
        params: &GenerateParams,
        speculative: SpeculativeParams,
        mut on_token: impl FnMut(u32) -> crate::generator::Flow,
    ) -> Result<(Generation, Timings, TurnStats, Acceptance), InferError> {
        self.messages.push(Message::new(Role::User, user));
        let result = self.prompt_ids().and_then(|ids| {
            let params = GenerateParams {
                sampling: SamplingParams {
                    seed: params.sampling.seed.wrapping_add(self.turns),
                    ..params.sampling.clone()
                },
                ..params.clone()
            };
            let (mut gens, timings, acceptance) =
                generator.generate_speculative(&[&ids], &params, speculative, |_, id| on_token(id))?;
            Ok((ids, gens.pop().expect("one sequence"), timings, acceptance))
        });
        let (ids, generation, timings, acceptance) = match result {
            Ok(r) => r,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        self.turns += 1;
        self.batch = None;
        self.fed.clear();
        self.record_transcript(&ids, &generation);
        let stats = TurnStats {
            prompt_tokens: ids.len(),
            reused_tokens: 0,
        };
        Ok((generation, timings, stats, acceptance))
    }

    /// The token ids of the conversation so far, ending with the opened assistant turn: the transcript
    /// extended by the new user turn when it can be, else the whole conversation rendered again.
    fn prompt_ids(&self) -> Result<Vec<u32>, InferError> {
        let eos = self.tokenizer.token_id(EOS);
        match (&self.transcript, eos, self.messages.last()) {
            (Some(transcript), Some(eos), Some(user)) if !self.thinking => {
                self.tokenizer.check_special_tokens(&user.content)?;
                let mut ids = transcript.clone();
                if ids.last() != Some(&eos) {
                    ids.push(eos);
                }
                let turn = format!("{USER}{}{ASSISTANT}{END_THINK}", user.content);
                ids.extend(self.tokenizer.encode(&turn)?);
                Ok(ids)
            }
            _ => encode_chat(self.tokenizer, &self.messages, self.thinking),
        }
    }

    /// Keeps `prompt` + `generation` as the transcript a next turn extends (not after a stop string, whose
    /// text is what the history keeps).
    fn record_transcript(&mut self, prompt: &[u32], generation: &Generation) {
        self.transcript = (generation.finish != crate::generator::FinishReason::Stop)
            .then(|| prompt.iter().chain(&generation.ids).copied().collect());
    }

    /// Records the assistant's reply (its thinking part is dropped from the history, as V4's format does).
    pub fn add_reply(&mut self, text: &str) {
        self.messages
            .push(Message::new(Role::Assistant, strip_thinking(text)));
    }

    /// Tokens the cache holds.
    pub fn cached_tokens(&self) -> usize {
        self.fed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_v3_style_turns() {
        let messages = vec![
            Message::new(Role::System, "You are helpful."),
            Message::new(Role::User, "hello"),
            Message::new(Role::Assistant, "<think>hmm</think>Hi!"),
            Message::new(Role::User, "1+1=?"),
        ];
        assert_eq!(
            render_chat(&messages, false),
            "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>hello<｜Assistant｜></think>Hi!\
             <｜end▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜></think>"
        );
        assert!(render_chat(&messages[1..2], true).ends_with("<｜Assistant｜><think>"));
    }
}
