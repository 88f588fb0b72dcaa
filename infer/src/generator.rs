//! The [`Generator`]: prefill and decode over [`V4Model`] and its incremental decoding state.
//!
//! The model itself owns the decoding state (sliding-window ring, compressor states, indexer keys) and
//! continues it with chunks of any length; this module only schedules calls. It does not fork the
//! architecture: every logit comes from `V4Model::forward_padded`.
//!
//! A [`Batch`] holds one state per sequence ([`SequenceCaches`]), so sequences of different lengths run
//! together: each call right-pads the sequences' chunks into one `[B, S]` batch with its mask, and the
//! model packs the real tokens, runs the token-wise parts once over all of them and attention per
//! sequence at its own position. Padding is never computed on, so each sequence's logits are those of the
//! sequence run alone. A finished sequence sits out (is padding) while the others go on.

use crate::error::InferError;
use crate::sampling::{Sampler, SamplingParams};
use burn::tensor::{backend::Backend, Tensor};
use std::time::Instant;
use v4_model::{
    ExpertRunner, LocalExperts, LogitsFor, PaddedTokens, Padding, Pass, SequenceCaches, V4Config, V4Model,
};

/// Runs a model incrementally.
pub struct Generator<'a, B: Backend> {
    model: &'a V4Model<B>,
    runner: &'a dyn ExpertRunner<B>,
}

/// What to generate and when to stop.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    /// Tokens to generate at most (per sequence).
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after any of these ids (the config's `eos_token_id`, usually); the id is kept in
    /// the output.
    pub stop_ids: Vec<u32>,
    /// Prefill in calls of at most this many tokens (None: the whole prompt in one call). Chunking bounds
    /// the activation memory of a long prompt.
    pub prefill_chunk: Option<usize>,
}

impl Default for GenerateParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            sampling: SamplingParams::greedy(),
            stop_ids: Vec::new(),
            prefill_chunk: None,
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced a stop id (EOS).
    Eos,
    /// The token callback asked to stop (a stop string, or the user).
    Stop,
    /// It reached `max_tokens`.
    Length,
    /// The context reached `max_position_embeddings`.
    Context,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Context => "context",
        }
    }
}

/// What the token callback tells the generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// One sequence's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// Generated ids (a final stop id included).
    pub ids: Vec<u32>,
    pub finish: FinishReason,
}

/// Wall-clock timings of one generation call (all sequences together).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Tokens prefilled (all sequences).
    pub prompt_tokens: usize,
    /// Tokens generated (all sequences).
    pub generated_tokens: usize,
    /// Time of the prefill forwards.
    pub prefill_s: f64,
    /// From the start of the prefill to the first sampled token.
    pub first_token_s: f64,
    /// Time of the decode steps (forwards and sampling after the first token).
    pub decode_s: f64,
    /// Tokens produced by the decode steps (those after each sequence's first).
    pub decode_tokens: usize,
}

impl Timings {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_s.max(1e-12)
    }

    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_tokens == 0 {
            0.0
        } else {
            self.decode_tokens as f64 / self.decode_s.max(1e-12)
        }
    }
}

/// Sequences decoding together, each continuing its own state at its own position (see the module doc).
pub struct Batch<B: Backend> {
    caches: SequenceCaches<B>,
}

impl<B: Backend> Batch<B> {
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.caches.len()
    }

    pub fn is_empty(&self) -> bool {
        self.caches.is_empty()
    }

    /// Tokens consumed by sequence `i`.
    pub fn position(&self, i: usize) -> usize {
        self.caches.position(i)
    }

    /// Scalars held by all sequences' states.
    pub fn cache_elements(&self) -> usize {
        self.caches.num_elements()
    }

    /// Scalars held per consumed token (all sequences).
    pub fn cache_elements_per_token(&self) -> f64 {
        let tokens: usize = (0..self.len()).map(|i| self.position(i)).sum();
        self.cache_elements() as f64 / tokens.max(1) as f64
    }
}

/// Logits `[B, 1, vocab]` -> each row's `[vocab]`.
fn rows_of<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [_, s, v] = logits.dims();
    let data = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("logits are floats");
    data.chunks_exact(s * v).map(<[f32]>::to_vec).collect()
}

/// Checks a prompt against a config: not empty, ids in the vocabulary, within the maximum context.
pub fn check_prompt(cfg: &V4Config, ids: &[u32]) -> Result<(), InferError> {
    if ids.is_empty() {
        return Err(InferError::EmptyPrompt);
    }
    if let Some(&id) = ids.iter().find(|&&id| id as usize >= cfg.vocab_size) {
        return Err(InferError::OutOfVocabulary {
            id: id as u64,
            vocab: cfg.vocab_size,
        });
    }
    if ids.len() > cfg.max_position_embeddings {
        return Err(InferError::PromptTooLong {
            tokens: ids.len(),
            max: cfg.max_position_embeddings,
        });
    }
    Ok(())
}

impl<'a, B: Backend> Generator<'a, B> {
    /// A generator running every expert locally.
    pub fn new(model: &'a V4Model<B>) -> Self {
        Self {
            model,
            runner: &LocalExperts,
        }
    }

    /// A generator whose routed experts run through `runner` (expert parallelism).
    pub fn with_runner(model: &'a V4Model<B>, runner: &'a dyn ExpertRunner<B>) -> Self {
        Self { model, runner }
    }

    pub fn model(&self) -> &V4Model<B> {
        self.model
    }

    /// Who runs the routed experts.
    pub(crate) fn runner(&self) -> &dyn ExpertRunner<B> {
        self.runner
    }

    pub fn config(&self) -> &V4Config {
        &self.model.config
    }

    /// Checks a prompt before any work: not empty, ids in the vocabulary, within the context.
    pub fn check_prompt(&self, ids: &[u32]) -> Result<(), InferError> {
        check_prompt(self.config(), ids)
    }

    /// An empty batch of `n` sequences (to [`feed_batch`](Self::feed_batch) from the start).
    pub fn new_batch(&self, n: usize) -> Batch<B> {
        Batch {
            caches: SequenceCaches::new(self.model.layers.len(), n),
        }
    }

    /// Prefills sequences of any lengths (each in calls of at most `chunk` tokens; None: one call).
    /// Returns the batch and each sequence's last-position logits.
    pub fn prefill_batch(
        &self,
        prompts: &[&[u32]],
        chunk: Option<usize>,
    ) -> Result<(Batch<B>, Vec<Vec<f32>>), InferError> {
        if prompts.is_empty() {
            return Err(InferError::EmptyPrompt);
        }
        for p in prompts {
            self.check_prompt(p)?;
        }
        let mut batch = self.new_batch(prompts.len());
        let last = self.feed_batch(&mut batch, prompts, chunk, false)?;
        Ok((batch, last))
    }

    /// Feeds each sequence of `batch` its chunk of new tokens (any lengths, empty for a sequence that
    /// sits out), in calls of at most `chunk` tokens per sequence (None: one call). All sequences run
    /// together, each at its own position. Returns, per sequence, its last fed position's logits
    /// (`all_positions`: every fed position's, `[len * vocab]`); empty for a sequence fed nothing.
    pub fn feed_batch(
        &self,
        batch: &mut Batch<B>,
        chunks: &[&[u32]],
        chunk: Option<usize>,
        all_positions: bool,
    ) -> Result<Vec<Vec<f32>>, InferError> {
        if chunks.len() != batch.len() {
            return Err(InferError::Batch(format!(
                "{} chunks for {} sequences",
                chunks.len(),
                batch.len()
            )));
        }
        let cfg = self.config();
        for (i, c) in chunks.iter().enumerate() {
            let end = batch.position(i) + c.len();
            if end > cfg.max_position_embeddings {
                return Err(InferError::PromptTooLong {
                    tokens: end,
                    max: cfg.max_position_embeddings,
                });
            }
            if let Some(&id) = c.iter().find(|&&id| id as usize >= cfg.vocab_size) {
                return Err(InferError::OutOfVocabulary {
                    id: id as u64,
                    vocab: cfg.vocab_size,
                });
            }
        }
        let longest = chunks.iter().map(|c| c.len()).max().unwrap_or(0);
        let step = chunk.filter(|&c| c > 0).unwrap_or(longest.max(1));
        let which = if all_positions {
            LogitsFor::All
        } else {
            LogitsFor::Last
        };
        let mut out = vec![Vec::new(); chunks.len()];
        for begin in (0..longest).step_by(step) {
            let parts: Vec<&[u32]> = chunks
                .iter()
                .map(|c| &c[begin.min(c.len())..(begin + step).min(c.len())])
                .collect();
            let tokens = PaddedTokens::pad(&parts, Padding::Right, 0);
            let logits = self
                .model
                .forward_padded(
                    &tokens,
                    &mut batch.caches,
                    Pass::new().runner(self.runner).logits(which),
                )?
                .logits;
            let vocab = cfg.vocab_size;
            for ((o, row), part) in out.iter_mut().zip(rows_of(logits)).zip(&parts) {
                if part.is_empty() {
                    continue;
                }
                if all_positions {
                    o.extend_from_slice(&row[..part.len() * vocab]);
                } else {
                    *o = row;
                }
            }
        }
        Ok(out)
    }

    /// Generates from one prompt. `on_token` sees every generated id as soon as it is chosen.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerateParams,
        mut on_token: impl FnMut(u32) -> Flow,
    ) -> Result<(Generation, Timings), InferError> {
        let (mut gens, timings) = self.generate_batch(&[prompt], params, |_, id| on_token(id))?;
        Ok((gens.pop().expect("one sequence"), timings))
    }

    /// Generates from several prompts of any lengths. Sequence `i` samples with seed `seed + i`, so its
    /// result equals a single-sequence run with that seed. `on_token(i, id)` sees every generated id.
    pub fn generate_batch(
        &self,
        prompts: &[&[u32]],
        params: &GenerateParams,
        on_token: impl FnMut(usize, u32) -> Flow,
    ) -> Result<(Vec<Generation>, Timings), InferError> {
        params.sampling.validate().map_err(InferError::Batch)?;
        let started = Instant::now();
        let (mut batch, logits) = self.prefill_batch(prompts, params.prefill_chunk)?;
        let prefill_s = started.elapsed().as_secs_f64();
        let histories: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
        let samplers: Vec<Sampler> = (0..prompts.len())
            .map(|i| {
                Sampler::new(SamplingParams {
                    seed: params.sampling.seed.wrapping_add(i as u64),
                    ..params.sampling.clone()
                })
            })
            .collect();
        let mut timings = Timings {
            prompt_tokens: prompts.iter().map(|p| p.len()).sum(),
            prefill_s,
            ..Timings::default()
        };
        let gens = self.run(
            &mut batch,
            logits,
            histories,
            samplers,
            params,
            started,
            &mut timings,
            on_token,
        )?;
        Ok((gens, timings))
    }

    /// The decode loop: samples from `logits` (each sequence's last position), feeds the samples back, until
    /// every sequence has finished. `histories` hold each sequence's tokens so far (for the repetition
    /// penalty).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        batch: &mut Batch<B>,
        mut logits: Vec<Vec<f32>>,
        mut histories: Vec<Vec<u32>>,
        mut samplers: Vec<Sampler>,
        params: &GenerateParams,
        started: Instant,
        timings: &mut Timings,
        mut on_token: impl FnMut(usize, u32) -> Flow,
    ) -> Result<Vec<Generation>, InferError> {
        let n = batch.len();
        let max_ctx = self.config().max_position_embeddings;
        let mut gens: Vec<Generation> = (0..n)
            .map(|_| Generation {
                ids: Vec::new(),
                finish: FinishReason::Length,
            })
            .collect();
        let mut done = vec![params.max_tokens == 0; n];
        let mut first = true;
        let mut decode_started = Instant::now();
        loop {
            for i in 0..n {
                if done[i] {
                    continue;
                }
                let id = samplers[i].sample(&logits[i], &histories[i]);
                histories[i].push(id);
                gens[i].ids.push(id);
                if !first {
                    timings.decode_tokens += 1;
                }
                let flow = on_token(i, id);
                let finish = if params.stop_ids.contains(&id) {
                    Some(FinishReason::Eos)
                } else if flow == Flow::Stop {
                    Some(FinishReason::Stop)
                } else if gens[i].ids.len() >= params.max_tokens {
                    Some(FinishReason::Length)
                } else if batch.position(i) >= max_ctx {
                    Some(FinishReason::Context)
                } else {
                    None
                };
                if let Some(reason) = finish {
                    gens[i].finish = reason;
                    done[i] = true;
                }
            }
            if first {
                timings.first_token_s = started.elapsed().as_secs_f64();
                decode_started = Instant::now();
                first = false;
            }
            if done.iter().all(|&d| d) {
                break;
            }
            // Every running sequence advances by its last token; finished ones sit out.
            let refs: Vec<&[u32]> = (0..n)
                .map(|i| match histories[i].last() {
                    Some(last) if !done[i] => std::slice::from_ref(last),
                    _ => &[],
                })
                .collect();
            logits = self.feed_batch(batch, &refs, None, false)?;
        }
        timings.generated_tokens += gens.iter().map(|g| g.ids.len()).sum::<usize>();
        timings.decode_s = if timings.decode_tokens > 0 {
            decode_started.elapsed().as_secs_f64()
        } else {
            0.0
        };
        Ok(gens)
    }
}
