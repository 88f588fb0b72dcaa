//! The [`Generator`]: prefill and decode over [`V4Model`] and its incremental [`ModelCache`].
//!
//! The model itself owns the decoding state (sliding-window ring, compressor states, indexer keys) and
//! continues it from `cache.position()` with chunks of any length; this module only schedules calls. It does
//! not fork the architecture: every logit comes from `V4Model::forward_with`.
//!
//! Batches of sequences with different lengths: the model's cache holds one position for the whole batch
//! (no padding masks), so a [`Batch`] groups the sequences by prompt length and gives each group its own
//! cache. Sequences of equal length run together in one `[g, S]` forward per call; groups of different
//! lengths run one after the other. No padding token ever enters a cache, so each sequence's logits are
//! exactly those of the sequence run alone. A sequence that has finished while the rest of its group goes
//! on is fed its last token again and its outputs are ignored.

use crate::error::InferError;
use crate::sampling::{Sampler, SamplingParams};
use burn::tensor::{backend::Backend, Tensor};
use std::collections::BTreeMap;
use std::time::Instant;
use v4_model::{ExpertRunner, LocalExperts, LogitsFor, ModelCache, NoProbe, Tokens, V4Config, V4Model};

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
    /// the memory of a long prompt (the model computes logits for every position of a call).
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

/// Sequences grouped by length, each group with its own cache (see the module doc).
pub struct Batch<B: Backend> {
    groups: Vec<Group<B>>,
    /// `(group, row)` of each sequence.
    slots: Vec<(usize, usize)>,
}

struct Group<B: Backend> {
    cache: ModelCache<B>,
    /// Sequence indices, in row order.
    members: Vec<usize>,
}

impl<B: Backend> Batch<B> {
    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Tokens consumed by sequence `i`.
    pub fn position(&self, i: usize) -> usize {
        self.groups[self.slots[i].0].cache.position()
    }

    /// Number of caches (groups of equal length).
    pub fn num_groups(&self) -> usize {
        self.groups.len()
    }

    /// Scalars held by all caches.
    pub fn cache_elements(&self) -> usize {
        self.groups.iter().map(|g| g.cache.num_elements()).sum()
    }

    /// Scalars held per consumed token (all sequences).
    pub fn cache_elements_per_token(&self) -> f64 {
        let tokens: usize = (0..self.len()).map(|i| self.position(i)).sum();
        self.cache_elements() as f64 / tokens.max(1) as f64
    }
}

/// Logits `[B, S, vocab]` -> the last position's row of each sequence.
fn last_rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
    let [b, s, v] = logits.dims();
    let last = logits.narrow(1, s - 1, 1).reshape([b, v]);
    let data = last
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("logits are floats");
    data.chunks_exact(v).map(<[f32]>::to_vec).collect()
}

/// Logits `[B, S, vocab]` -> each sequence's `[S * vocab]`.
fn all_rows<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<f32>> {
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

    pub fn config(&self) -> &V4Config {
        &self.model.config
    }

    /// An empty decoding state.
    pub fn new_cache(&self) -> ModelCache<B> {
        ModelCache::new(self.model.layers.len())
    }

    /// Checks a prompt before any work: not empty, ids in the vocabulary, within the context.
    pub fn check_prompt(&self, ids: &[u32]) -> Result<(), InferError> {
        check_prompt(self.config(), ids)
    }

    /// One forward call of `rows` (equal lengths, one row per sequence of the cache's batch) continuing
    /// `cache`: logits `[B, S, vocab]`, or `[B, 1, vocab]` for [`LogitsFor::Last`].
    pub fn forward(
        &self,
        cache: &mut ModelCache<B>,
        rows: &[&[u32]],
        which: LogitsFor,
    ) -> Result<Tensor<B, 3>, InferError> {
        let seq = rows.first().map_or(0, |r| r.len());
        if rows.iter().any(|r| r.len() != seq) {
            return Err(InferError::Batch(
                "the rows of one forward call must have equal lengths".into(),
            ));
        }
        let ids: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        let vocab = self.config().vocab_size;
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(InferError::OutOfVocabulary { id: id as u64, vocab });
        }
        let tokens = Tokens {
            ids,
            batch: rows.len(),
            seq,
        };
        Ok(self
            .model
            .forward_logits_for(&tokens, cache, self.runner, &mut NoProbe, which)?
            .logits)
    }

    /// Feeds `rows` to `cache` in calls of at most `chunk` tokens (None: one call) and returns the logits
    /// of the last position of each row, `[B, vocab]` (all positions' logits when `all_positions`:
    /// `[B, S, vocab]` flattened per row). Calls starting below the first CSA window are stretched to
    /// complete it; continuing a cache that holds `0 < n < m` tokens is not exact (see the module doc: use a
    /// [`Batch`] for that).
    pub fn feed(
        &self,
        cache: &mut ModelCache<B>,
        rows: &[&[u32]],
        chunk: Option<usize>,
        all_positions: bool,
    ) -> Result<Vec<Vec<f32>>, InferError> {
        let seq = rows.first().map_or(0, |r| r.len());
        if rows.is_empty() || seq == 0 {
            return Err(InferError::EmptyPrompt);
        }
        let step = chunk.filter(|&c| c > 0).unwrap_or(seq);
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); rows.len()];
        let mut last = Vec::new();
        let mut begin = 0;
        while begin < seq {
            let len = step.min(seq - begin);
            let part: Vec<&[u32]> = rows.iter().map(|r| &r[begin..begin + len]).collect();
            let which = if all_positions {
                LogitsFor::All
            } else {
                LogitsFor::Last
            };
            let logits = self.forward(cache, &part, which)?;
            if all_positions {
                for (o, rows) in out.iter_mut().zip(all_rows(logits)) {
                    o.extend(rows);
                }
            } else if begin + len == seq {
                last = last_rows(logits);
            }
            begin += len;
        }
        Ok(if all_positions { out } else { last })
    }

    /// Prefill: `rows` from an empty cache; the last position's logits of each row.
    pub fn prefill(
        &self,
        rows: &[&[u32]],
        chunk: Option<usize>,
    ) -> Result<(ModelCache<B>, Vec<Vec<f32>>), InferError> {
        for r in rows {
            self.check_prompt(r)?;
        }
        let mut cache = self.new_cache();
        let last = self.feed(&mut cache, rows, chunk, false)?;
        Ok((cache, last))
    }

    /// Prefills sequences of any lengths: groups them by length (one cache per group), runs each group as
    /// one batch. Returns the batch and each sequence's last-position logits.
    pub fn prefill_batch(
        &self,
        prompts: &[&[u32]],
        chunk: Option<usize>,
    ) -> Result<(Batch<B>, Vec<Vec<f32>>), InferError> {
        for p in prompts {
            self.check_prompt(p)?;
        }
        let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for (i, p) in prompts.iter().enumerate() {
            by_len.entry(p.len()).or_default().push(i);
        }
        let mut batch = Batch {
            groups: Vec::new(),
            slots: vec![(0, 0); prompts.len()],
        };
        let mut last = vec![Vec::new(); prompts.len()];
        for (_, members) in by_len {
            let rows: Vec<&[u32]> = members.iter().map(|&i| prompts[i]).collect();
            let mut cache = self.new_cache();
            let logits = self.feed(&mut cache, &rows, chunk, false)?;
            let g = batch.groups.len();
            for (row, (&i, l)) in members.iter().zip(logits).enumerate() {
                batch.slots[i] = (g, row);
                last[i] = l;
            }
            batch.groups.push(Group { cache, members });
        }
        Ok((batch, last))
    }

    /// Feeds each sequence of `batch` its chunk (any length, equal within a group; a group whose chunks
    /// are all empty is skipped and gets empty results). Returns, per sequence, the last position's logits
    /// (`all_positions`: every fed position's, `[len * vocab]`).
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
        let mut out = vec![Vec::new(); batch.len()];
        for group in &mut batch.groups {
            let rows: Vec<&[u32]> = group.members.iter().map(|&i| chunks[i]).collect();
            if rows.iter().all(|r| r.is_empty()) {
                continue;
            }
            if rows.iter().any(|r| r.len() != rows[0].len()) {
                return Err(InferError::Batch(format!(
                    "sequences {:?} share a cache (same length so far) and must be fed chunks of equal length",
                    group.members
                )));
            }
            let end = group.cache.position() + rows[0].len();
            let max = self.config().max_position_embeddings;
            if end > max {
                return Err(InferError::PromptTooLong { tokens: end, max });
            }
            let logits = self.feed(&mut group.cache, &rows, chunk, all_positions)?;
            for (&i, l) in group.members.iter().zip(logits) {
                out[i] = l;
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
            // Every sequence of a group that is still running advances by its last token; finished ones
            // repeat theirs (ignored), fully finished groups are skipped.
            let mut chunks: Vec<Vec<u32>> = vec![Vec::new(); n];
            for group in &batch.groups {
                if group.members.iter().all(|&i| done[i]) {
                    continue;
                }
                for &i in &group.members {
                    chunks[i] = vec![*histories[i].last().expect("a token")];
                }
            }
            let refs: Vec<&[u32]> = chunks.iter().map(Vec::as_slice).collect();
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
