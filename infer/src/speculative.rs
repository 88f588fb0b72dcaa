//! Speculative decoding with V4's own MTP layer as the drafter.
//!
//! Each step, for every running sequence:
//! 1. **Draft.** The MTP layer reads the main model's streams at the last verified position `t` and the
//!    token at `t + 1`, and proposes token `t + 2`; for `k > 1` it runs again on its own output streams
//!    and its draft (recursive MTP), on a journaled state that is rewound afterwards.
//! 2. **Verify.** One main-model forward over `[last token, draft 1 .. draft k]` (k + 1 positions) gives
//!    the target distribution at every position. Drafts are accepted left to right by the speculative
//!    sampling rule ([`Sampler::verify`]); the first rejected one is replaced, and when all stand the
//!    last position adds a bonus token. Greedy output is the plain greedy output.
//! 3. **Roll back.** The main state was journaled ([`ModelCache::speculate`](v4_model::ModelCache::speculate)):
//!    [`V4Model::rewind`] keeps the accepted prefix exactly (window, compressor and indexer states), with
//!    no forward repeated. The MTP state then absorbs the verified positions, paired with their next tokens.
//!
//! Sequences of a batch accept different numbers of tokens and simply continue at their own positions.

use crate::error::InferError;
use crate::generator::{FinishReason, Flow, GenerateParams, Generation, Generator, Timings};
use crate::sampling::{Sampler, SamplingParams};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use std::time::Instant;
use v4_model::{LogitsFor, PaddedTokens, Padding, Pass, SequenceCaches};

/// How to speculate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpeculativeParams {
    /// Drafts per step (`k`): 1 runs the MTP layer once, more run it recursively.
    pub draft_tokens: usize,
    /// Rejects every draft whatever the target says: each step then keeps one token and rewinds `k`.
    /// A check of the rollback (the output must still equal plain decoding), not a mode to run.
    pub reject_all: bool,
}

impl Default for SpeculativeParams {
    fn default() -> Self {
        Self {
            draft_tokens: 1,
            reject_all: false,
        }
    }
}

/// How the drafts fared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Acceptance {
    /// Drafts proposed at each draft position (index 0: the first draft of a step).
    pub proposed: Vec<usize>,
    /// Drafts accepted at each draft position.
    pub accepted: Vec<usize>,
    /// Verification forwards (steps) over all sequences.
    pub steps: usize,
}

impl Acceptance {
    /// The share of drafts accepted at draft position `j` (of those proposed there).
    pub fn rate(&self, j: usize) -> f64 {
        self.accepted[j] as f64 / self.proposed[j].max(1) as f64
    }

    /// Tokens produced per verification forward of one sequence (1 + accepted drafts, on average).
    pub fn tokens_per_step(&self) -> f64 {
        let accepted: usize = self.accepted.iter().sum();
        1.0 + accepted as f64 / self.steps.max(1) as f64
    }
}

/// One running sequence's speculative state.
struct Row {
    history: Vec<u32>,
    sampler: Sampler,
    generation: Generation,
    done: bool,
    /// Drafts for the next step, with the distributions they were drawn from.
    drafts: Vec<(u32, Vec<(u32, f64)>)>,
    /// What the MTP layer reads next: positions of the latest packed main streams, and the tokens that
    /// follow them.
    mtp_input: (Vec<i64>, Vec<u32>),
}

impl<B: Backend> Generator<'_, B> {
    /// [`generate_batch`](Generator::generate_batch) with MTP speculative decoding. The model must have
    /// an MTP layer. The prompts are prefilled in one call (`prefill_chunk` is not used: the MTP layer
    /// reads the streams of every prompt position).
    pub fn generate_speculative(
        &self,
        prompts: &[&[u32]],
        params: &GenerateParams,
        speculative: SpeculativeParams,
        mut on_token: impl FnMut(usize, u32) -> Flow,
    ) -> Result<(Vec<Generation>, Timings, Acceptance), InferError> {
        self.check_speculative(prompts, params, speculative)?;
        let model = self.model();
        let n = prompts.len();
        let started = Instant::now();
        let mut caches = SequenceCaches::new(model.layers.len(), n);
        let mut mtp_caches = SequenceCaches::new(1, n);
        let prompt = PaddedTokens::pad(prompts, Padding::Right, 0);
        let out = model.forward_padded(
            &prompt,
            &mut caches,
            Pass::new().runner(self.runner()).logits(LogitsFor::Last),
        )?;
        let last = rows_of(out.logits);
        let mut timings = Timings {
            prompt_tokens: prompts.iter().map(|p| p.len()).sum(),
            prefill_s: started.elapsed().as_secs_f64(),
            ..Timings::default()
        };
        let mut offset = 0;
        let mut rows: Vec<Row> = Vec::with_capacity(n);
        for (i, p) in prompts.iter().enumerate() {
            let mut row = Row {
                history: p.to_vec(),
                sampler: Sampler::new(SamplingParams {
                    seed: params.sampling.seed.wrapping_add(i as u64),
                    ..params.sampling.clone()
                }),
                generation: Generation {
                    ids: Vec::new(),
                    finish: FinishReason::Length,
                },
                done: params.max_tokens == 0,
                drafts: Vec::new(),
                mtp_input: (Vec::new(), Vec::new()),
            };
            if !row.done {
                let id = row.sampler.sample(&last[i][0], &row.history);
                let kept = emit(
                    i,
                    &mut row,
                    &[id],
                    p.len(),
                    params,
                    self.config().max_position_embeddings,
                    &mut on_token,
                );
                // The MTP layer pairs every prompt position with the token after it.
                let next = p[1..].iter().chain(&kept).copied().collect();
                row.mtp_input = ((offset..offset + p.len() as i64).collect(), next);
            }
            offset += p.len() as i64;
            rows.push(row);
        }
        timings.first_token_s = started.elapsed().as_secs_f64();
        let decode_started = Instant::now();
        let mut acceptance = Acceptance {
            proposed: vec![0; speculative.draft_tokens],
            accepted: vec![0; speculative.draft_tokens],
            steps: 0,
        };
        let mut streams = out.streams;
        while rows.iter().any(|r| !r.done) {
            self.draft(
                &mut rows,
                streams,
                &mut mtp_caches,
                &caches,
                params,
                speculative.draft_tokens,
            )?;
            streams = self.verify(
                &mut rows,
                &mut caches,
                params,
                speculative,
                &mut acceptance,
                &mut on_token,
            )?;
        }
        timings.decode_s = decode_started.elapsed().as_secs_f64();
        let gens: Vec<Generation> = rows.into_iter().map(|r| r.generation).collect();
        timings.generated_tokens = gens.iter().map(|g| g.ids.len()).sum();
        timings.decode_tokens = timings.generated_tokens - gens.iter().filter(|g| !g.ids.is_empty()).count();
        Ok((gens, timings, acceptance))
    }

    fn check_speculative(
        &self,
        prompts: &[&[u32]],
        params: &GenerateParams,
        speculative: SpeculativeParams,
    ) -> Result<(), InferError> {
        if self.model().mtp.is_empty() {
            return Err(InferError::Speculative(
                "it drafts with the MTP layer, and this checkpoint has none \
                 (num_nextn_predict_layers = 0, or its mtp.* tensors are missing)"
                    .into(),
            ));
        }
        if speculative.draft_tokens == 0 {
            return Err(InferError::Speculative(
                "--draft-tokens must be at least 1".into(),
            ));
        }
        params.sampling.validate().map_err(InferError::Batch)?;
        if prompts.is_empty() {
            return Err(InferError::EmptyPrompt);
        }
        prompts.iter().try_for_each(|p| self.check_prompt(p))
    }

    /// Feeds each running row's pending MTP input (main `streams` positions and their next tokens), and
    /// drafts up to `k` tokens per row: the first from that call, the others recursively on the MTP's own
    /// streams over a journaled state, rewound afterwards.
    fn draft(
        &self,
        rows: &mut [Row],
        streams: Tensor<B, 4>,
        mtp_caches: &mut SequenceCaches<B>,
        caches: &SequenceCaches<B>,
        params: &GenerateParams,
        k: usize,
    ) -> Result<(), InferError> {
        let model = self.model();
        let max_ctx = self.config().max_position_embeddings;
        let budget: Vec<usize> = rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let left = params.max_tokens.saturating_sub(r.generation.ids.len() + 1);
                let room = max_ctx.saturating_sub(caches.position(i) + 1);
                if r.done {
                    0
                } else {
                    k.min(left).min(room)
                }
            })
            .collect();
        let indices: Vec<i64> = rows
            .iter()
            .filter(|r| !r.done)
            .flat_map(|r| r.mtp_input.0.clone())
            .collect();
        let next: Vec<Vec<u32>> = rows
            .iter_mut()
            .map(|r| {
                r.drafts.clear();
                if r.done {
                    Vec::new()
                } else {
                    std::mem::take(&mut r.mtp_input.1)
                }
            })
            .collect();
        let mut input = positions(streams, indices);
        let mut fed = next;
        for j in 0..k {
            let refs: Vec<&[u32]> = fed.iter().map(Vec::as_slice).collect();
            let tokens = PaddedTokens::pad(&refs, Padding::Right, 0);
            let (logits, x) = model.forward_mtp_padded(0, input, &tokens, mtp_caches, self.runner())?;
            let logits = rows_of(logits);
            // Rows that draft further, and where their last MTP stream sits in `x`.
            let mut more = Vec::new();
            let mut end = 0i64;
            let mut next_fed = vec![Vec::new(); rows.len()];
            for (i, row) in rows.iter_mut().enumerate() {
                if fed[i].is_empty() {
                    continue;
                }
                end += fed[i].len() as i64;
                if j >= budget[i] {
                    continue;
                }
                // The history the draft follows: the tokens so far, then this step's drafts (appended in
                // place and taken back, not copied every step).
                let base = row.history.len();
                row.history.extend(row.drafts.iter().map(|d| d.0));
                let q = row.sampler.distribution(&logits[i][0], &row.history);
                row.history.truncate(base);
                let token = row.sampler.draw(&q);
                row.drafts.push((token, q));
                if j + 1 < budget[i] {
                    if j == 0 {
                        mtp_caches.row_mut(i).speculate();
                    }
                    more.push(end - 1);
                    next_fed[i] = vec![token];
                }
            }
            if more.is_empty() {
                break;
            }
            input = positions(x, more);
            fed = next_fed;
        }
        for (i, b) in budget.iter().enumerate() {
            if *b > 1 {
                model.rewind_mtp(0, mtp_caches.row_mut(i), 0);
            }
        }
        Ok(())
    }

    /// One main-model forward over each running row's last token and its drafts; accepts, emits and
    /// rewinds. Returns the packed streams of that forward (the next MTP input's source).
    fn verify(
        &self,
        rows: &mut [Row],
        caches: &mut SequenceCaches<B>,
        params: &GenerateParams,
        speculative: SpeculativeParams,
        acceptance: &mut Acceptance,
        on_token: &mut impl FnMut(usize, u32) -> Flow,
    ) -> Result<Tensor<B, 4>, InferError> {
        let model = self.model();
        let chunks: Vec<Vec<u32>> = rows
            .iter()
            .map(|r| match (r.done, r.history.last()) {
                (false, Some(&last)) => std::iter::once(last)
                    .chain(r.drafts.iter().map(|d| d.0))
                    .collect(),
                _ => Vec::new(),
            })
            .collect();
        for (i, chunk) in chunks.iter().enumerate() {
            if !chunk.is_empty() {
                caches.row_mut(i).speculate();
            }
        }
        let refs: Vec<&[u32]> = chunks.iter().map(Vec::as_slice).collect();
        let tokens = PaddedTokens::pad(&refs, Padding::Right, 0);
        let out = model.forward_padded(&tokens, caches, Pass::new().runner(self.runner()))?;
        let logits = rows_of(out.logits);
        let mut offset = 0i64;
        for (i, row) in rows.iter_mut().enumerate() {
            let chunk = &chunks[i];
            if chunk.is_empty() {
                continue;
            }
            acceptance.steps += 1;
            // Accepted drafts join the history in place while later positions are checked; `emit` adds
            // them for good.
            let base = row.history.len();
            let mut tokens = Vec::with_capacity(chunk.len());
            for (j, target) in logits[i][..chunk.len()].iter().enumerate() {
                let p = row.sampler.distribution(target, &row.history);
                let Some((draft, q)) = row.drafts.get(j) else {
                    tokens.push(row.sampler.draw(&p));
                    break;
                };
                acceptance.proposed[j] += 1;
                let verdict = if speculative.reject_all {
                    Err(row.sampler.draw(&p))
                } else {
                    row.sampler.verify(*draft, q, &p)
                };
                match verdict {
                    Ok(token) => {
                        acceptance.accepted[j] += 1;
                        tokens.push(token);
                        row.history.push(token);
                    }
                    Err(token) => {
                        tokens.push(token);
                        break;
                    }
                }
            }
            row.history.truncate(base);
            let start = caches.position(i) - chunk.len();
            let max_ctx = self.config().max_position_embeddings;
            let kept = emit(i, row, &tokens, start + 1, params, max_ctx, on_token);
            model.rewind(caches.row_mut(i), kept.len());
            row.mtp_input = ((offset..offset + kept.len() as i64).collect(), kept);
            offset += chunk.len() as i64;
        }
        Ok(out.streams)
    }
}

/// Emits `tokens` for sequence `i` in order until it finishes; the first one is sampled when `consumed`
/// tokens have been fed (the next, one more). Returns the tokens kept.
fn emit(
    i: usize,
    row: &mut Row,
    tokens: &[u32],
    consumed: usize,
    params: &GenerateParams,
    max_ctx: usize,
    on_token: &mut impl FnMut(usize, u32) -> Flow,
) -> Vec<u32> {
    let mut kept = Vec::with_capacity(tokens.len());
    for (j, &id) in tokens.iter().enumerate() {
        row.history.push(id);
        row.generation.ids.push(id);
        kept.push(id);
        let flow = on_token(i, id);
        let finish = if params.stop_ids.contains(&id) {
            Some(FinishReason::Eos)
        } else if flow == Flow::Stop {
            Some(FinishReason::Stop)
        } else if row.generation.ids.len() >= params.max_tokens {
            Some(FinishReason::Length)
        } else if consumed + j >= max_ctx {
            Some(FinishReason::Context)
        } else {
            None
        };
        if let Some(reason) = finish {
            row.generation.finish = reason;
            row.done = true;
            break;
        }
    }
    kept
}

/// Logits `[B, S, vocab]` -> per row, per position, `[vocab]`.
fn rows_of<B: Backend>(logits: Tensor<B, 3>) -> Vec<Vec<Vec<f32>>> {
    let [b, s, v] = logits.dims();
    let data = logits
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("logits are floats");
    (0..b)
        .map(|r| (0..s).map(|p| data[(r * s + p) * v..][..v].to_vec()).collect())
        .collect()
}

/// Positions `indices` of a packed `[1, N, c, D]` tensor.
fn positions<B: Backend>(x: Tensor<B, 4>, indices: Vec<i64>) -> Tensor<B, 4> {
    let len = indices.len();
    let device = x.device();
    x.select(
        1,
        Tensor::<B, 1, Int>::from_data(TensorData::new(indices, [len]), &device),
    )
}
