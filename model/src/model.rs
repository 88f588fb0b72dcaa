//! The DeepSeek-V4 model: embedding, `L` blocks over `c` residual streams, the HC head, norm and LM head.
//!
//! ```text
//! X = embed[ids] repeated c times    [B, S, c, D]
//! for each block: X = Block(X)
//! logits = head(RMSNorm(HcHead(X)))  [B, S, vocab]   (embedding and head are not tied)
//! ```

use crate::block::Block;
use crate::cache::{ModelCache, Segment, SequenceCaches};
use crate::config::V4Config;
use crate::hyper_connection::HcHead;
use crate::loader::{Loader, NamedParam, Residency};
use crate::moe::{ExpertRunner, LocalExperts};
use crate::norm::{Embedding, Linear, RmsNorm};
use crate::probe::{tap, NoProbe, Probe};
use crate::weights::{LoadError, WeightSource};
use burn::module::{Module, ParamId};
use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};
use std::fmt;
use std::ops::Range;

#[derive(Module, Debug)]
pub struct V4Model<B: Backend> {
    /// `[vocab, D]`
    pub embed: Embedding<B>,
    pub layers: Vec<Block<B>>,
    pub hc_head: HcHead<B>,
    pub norm: RmsNorm<B>,
    /// `[vocab, D]`
    pub head: Linear<B>,
    pub config: V4Config,
    /// Every trainable parameter under its checkpoint name, as the modules loaded them.
    pub params: Vec<NamedParam>,
    pub resident: ResidentBytes,
}

/// The bytes of weights a loaded model holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResidentBytes {
    /// In their stored precision, on the host (memory-mapped where the file already has that form).
    pub packed: usize,
    /// As f32 tensors.
    pub dense: usize,
}

/// A batch of token ids, `[batch, seq]` row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
}

/// Input the model cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputError {
    /// `ids.len() != batch * seq`, or an empty batch.
    Shape { len: usize, batch: usize, seq: usize },
    /// A token id at or beyond the vocabulary size.
    OutOfVocabulary {
        batch: usize,
        position: usize,
        id: i64,
        vocab: usize,
    },
    /// The context would exceed the model's maximum position.
    TooLong { positions: usize, max: usize },
    /// An attention mask that is not one contiguous span of real tokens per row, or has values other
    /// than 0 and 1.
    Mask { batch: usize, message: String },
    /// A padded batch whose rows are all padding.
    AllPadding { batch: usize, seq: usize },
    /// A padded batch with a different number of rows than its decoding states.
    Caches { caches: usize, batch: usize },
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InputError::Shape { len, batch, seq } => {
                write!(
                    f,
                    "{len} token ids do not form a non-empty [{batch}, {seq}] batch"
                )
            }
            InputError::OutOfVocabulary {
                batch,
                position,
                id,
                vocab,
            } => write!(
                f,
                "token id {id} at [{batch}, {position}] is outside the vocabulary (size {vocab})"
            ),
            InputError::TooLong { positions, max } => write!(
                f,
                "{positions} positions exceed the model's max_position_embeddings ({max})"
            ),
            InputError::Mask { batch, message } => write!(f, "attention mask of row {batch}: {message}"),
            InputError::AllPadding { batch, seq } => {
                write!(
                    f,
                    "every row of the [{batch}, {seq}] batch is padding: nothing to run"
                )
            }
            InputError::Caches { caches, batch } => write!(
                f,
                "a batch of {batch} rows cannot continue {caches} sequence states (one per row)"
            ),
        }
    }
}

impl std::error::Error for InputError {}

impl Tokens {
    /// Checks `ids: [batch, seq]` (any integer type) against a vocabulary size.
    pub fn new(ids: &[i64], batch: usize, seq: usize, vocab: usize) -> Result<Self, InputError> {
        if batch == 0 || seq == 0 || ids.len() != batch * seq {
            return Err(InputError::Shape {
                len: ids.len(),
                batch,
                seq,
            });
        }
        let mut out = Vec::with_capacity(ids.len());
        for (i, &id) in ids.iter().enumerate() {
            if id < 0 || id as u64 >= vocab as u64 {
                return Err(InputError::OutOfVocabulary {
                    batch: i / seq,
                    position: i % seq,
                    id,
                    vocab,
                });
            }
            out.push(id as u32);
        }
        Ok(Self { ids: out, batch, seq })
    }
}

/// Where a padded batch puts its padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// Real tokens first, padding after (shorter rows end early).
    Right,
    /// Padding first, real tokens last (all rows end at the last column).
    Left,
}

/// A `[batch, seq]` block of token ids with an attention mask, as tokenizers pad a batch: each row's
/// real tokens form one contiguous span (right padding: from column 0, left padding: up to the last
/// column) and the padding ids are never read. A row of padding only does not advance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaddedTokens {
    /// `[batch, seq]` row-major; padding columns hold any id.
    pub ids: Vec<u32>,
    pub batch: usize,
    pub seq: usize,
    /// The real tokens' columns of each row.
    spans: Vec<Range<usize>>,
}

impl PaddedTokens {
    /// From ids and an HF-style attention mask (1: token, 0: padding), both `[batch, seq]` row-major.
    /// Padding ids may be anything (even negative); real ids must be in the vocabulary.
    pub fn from_mask(
        ids: &[i64],
        mask: &[i64],
        batch: usize,
        seq: usize,
        vocab: usize,
    ) -> Result<Self, InputError> {
        if batch == 0 || seq == 0 || ids.len() != batch * seq || mask.len() != ids.len() {
            return Err(InputError::Shape {
                len: ids.len().min(mask.len()),
                batch,
                seq,
            });
        }
        let mut spans = Vec::with_capacity(batch);
        let mut out = Vec::with_capacity(ids.len());
        for row in 0..batch {
            let m = &mask[row * seq..][..seq];
            if let Some(&bad) = m.iter().find(|&&v| v != 0 && v != 1) {
                return Err(InputError::Mask {
                    batch: row,
                    message: format!("value {bad} (expected 0 for padding or 1 for a token)"),
                });
            }
            let first = m.iter().position(|&v| v == 1).unwrap_or(0);
            let len = m.iter().filter(|&&v| v == 1).count();
            if m[first..first + len].iter().any(|&v| v != 1) {
                return Err(InputError::Mask {
                    batch: row,
                    message: "the tokens are not one contiguous span (padding may only lead or trail)".into(),
                });
            }
            for (col, &id) in ids[row * seq..][..seq].iter().enumerate() {
                let real = col >= first && col < first + len;
                if real && (id < 0 || id as u64 >= vocab as u64) {
                    return Err(InputError::OutOfVocabulary {
                        batch: row,
                        position: col,
                        id,
                        vocab,
                    });
                }
                out.push(if real { id as u32 } else { 0 });
            }
            spans.push(first..first + len);
        }
        Ok(Self {
            ids: out,
            batch,
            seq,
            spans,
        })
    }

    /// Pads `rows` to the longest one with `pad_id` on `side`.
    pub fn pad(rows: &[&[u32]], side: Padding, pad_id: u32) -> Self {
        let seq = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(rows.len() * seq);
        let mut spans = Vec::with_capacity(rows.len());
        for row in rows {
            let padding = seq - row.len();
            let start = match side {
                Padding::Right => 0,
                Padding::Left => padding,
            };
            if side == Padding::Left {
                ids.extend(std::iter::repeat_n(pad_id, padding));
            }
            ids.extend_from_slice(row);
            if side == Padding::Right {
                ids.extend(std::iter::repeat_n(pad_id, padding));
            }
            spans.push(start..start + row.len());
        }
        Self {
            ids,
            batch: rows.len(),
            seq,
            spans,
        }
    }

    /// The real tokens' columns of each row.
    pub fn spans(&self) -> &[Range<usize>] {
        &self.spans
    }

    /// The attention mask, `[batch, seq]` row-major (1: token, 0: padding).
    pub fn mask(&self) -> Vec<i64> {
        let mut mask = vec![0; self.batch * self.seq];
        for (row, span) in self.spans.iter().enumerate() {
            mask[row * self.seq..][span.clone()].fill(1);
        }
        mask
    }
}

/// Which positions get logits. Generation needs only the last one: skipping the LM head for the others
/// saves `2 * (S - 1) * D * vocab` FLOPs of a prefill (a third of it for the v4-small bench config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsFor {
    /// Every position: `[B, S, vocab]`.
    All,
    /// The last position only: `[B, 1, vocab]` (the `final.*` probe points are narrowed the same way).
    Last,
}

/// What a forward pass returns besides the logits.
#[derive(Debug)]
pub struct ForwardOutput<B: Backend> {
    /// `[B, S, vocab]`, or `[B, 1, vocab]` with [`LogitsFor::Last`].
    pub logits: Tensor<B, 3>,
    /// Rows routed to each expert, per layer (for load balancing and its metrics).
    pub expert_counts: Vec<Vec<usize>>,
    /// The sequence-wise balance terms of the layers with [`Moe::sequence_balance`] set, summed over
    /// layers and sequences (see [`crate::moe::Routing::balance`]); None when no layer computes one.
    pub balance: Option<Tensor<B, 1>>,
}

impl<B: Backend> V4Model<B> {
    /// Full-sequence forward: `[B, S]` tokens -> logits `[B, S, vocab]`.
    pub fn forward(&self, tokens: &Tokens) -> Result<Tensor<B, 3>, InputError> {
        let mut cache = ModelCache::new(self.layers.len());
        Ok(self
            .forward_with(tokens, &mut cache, &LocalExperts, &mut NoProbe)?
            .logits)
    }

    /// Forward of `tokens` continuing `cache` (empty for a full sequence), with experts run by `runner`
    /// and intermediate tensors offered to `probe`.
    pub fn forward_with(
        &self,
        tokens: &Tokens,
        cache: &mut ModelCache<B>,
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
    ) -> Result<ForwardOutput<B>, InputError> {
        self.forward_logits_for(tokens, cache, runner, probe, LogitsFor::All)
    }

    /// [`forward_with`](Self::forward_with), computing the logits of the positions `which` selects.
    pub fn forward_logits_for(
        &self,
        tokens: &Tokens,
        cache: &mut ModelCache<B>,
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
        which: LogitsFor,
    ) -> Result<ForwardOutput<B>, InputError> {
        let vocab = self.config.vocab_size;
        if tokens.batch == 0 || tokens.seq == 0 || tokens.ids.len() != tokens.batch * tokens.seq {
            return Err(InputError::Shape {
                len: tokens.ids.len(),
                batch: tokens.batch,
                seq: tokens.seq,
            });
        }
        if let Some(i) = tokens.ids.iter().position(|&id| id as usize >= vocab) {
            return Err(InputError::OutOfVocabulary {
                batch: i / tokens.seq,
                position: i % tokens.seq,
                id: tokens.ids[i] as i64,
                vocab,
            });
        }
        let end = cache.position + tokens.seq;
        if end > self.config.max_position_embeddings {
            return Err(InputError::TooLong {
                positions: end,
                max: self.config.max_position_embeddings,
            });
        }
        let (b, s) = (tokens.batch, tokens.seq);
        let all_columns = 0..s;
        let (mut x, expert_counts, balance) = self.run_blocks(
            &tokens.ids,
            b,
            s,
            &mut [cache],
            std::slice::from_ref(&all_columns),
            runner,
            probe,
        );
        if which == LogitsFor::Last {
            x = x.narrow(1, s - 1, 1);
        }
        Ok(ForwardOutput {
            logits: self.logits(x, probe),
            expert_counts,
            balance,
        })
    }

    /// Forward of a padded batch: each row's real tokens (see [`PaddedTokens`]) continue that row's own
    /// state in `caches`, so the rows may be at different positions. The real tokens of all rows are packed
    /// into one `[1, N]` sequence: everything token-wise runs once over them, attention per row; padding
    /// is never computed on. Logits: `[B, S, vocab]` with zeros at padding ([`LogitsFor::All`]), or each
    /// row's last real token, `[B, 1, vocab]` ([`LogitsFor::Last`]; zeros for a row of padding only).
    pub fn forward_padded(
        &self,
        tokens: &PaddedTokens,
        caches: &mut SequenceCaches<B>,
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
        which: LogitsFor,
    ) -> Result<ForwardOutput<B>, InputError> {
        let (b, s) = (tokens.batch, tokens.seq);
        if caches.len() != b {
            return Err(InputError::Caches {
                caches: caches.len(),
                batch: b,
            });
        }
        let vocab = self.config.vocab_size;
        let max = self.config.max_position_embeddings;
        let mut packed = Vec::new();
        let mut cols = Vec::new();
        let mut active = Vec::new();
        for (row, span) in tokens.spans.iter().enumerate() {
            let real = &tokens.ids[row * s..][span.clone()];
            if let Some(i) = real.iter().position(|&id| id as usize >= vocab) {
                return Err(InputError::OutOfVocabulary {
                    batch: row,
                    position: span.start + i,
                    id: real[i] as i64,
                    vocab,
                });
            }
            let end = caches.position(row) + span.len();
            if end > max {
                return Err(InputError::TooLong { positions: end, max });
            }
            if !span.is_empty() {
                cols.push(packed.len()..packed.len() + span.len());
                active.push(row);
                packed.extend_from_slice(real);
            }
        }
        if packed.is_empty() {
            return Err(InputError::AllPadding { batch: b, seq: s });
        }
        let mut row_caches: Vec<&mut ModelCache<B>> = caches
            .rows
            .iter_mut()
            .enumerate()
            .filter(|(row, _)| !tokens.spans[*row].is_empty())
            .map(|(_, cache)| cache)
            .collect();
        let n = packed.len();
        let (x, expert_counts, balance) =
            self.run_blocks(&packed, 1, n, &mut row_caches, &cols, runner, probe);
        let device = x.device();
        let int = |v: Vec<i64>| {
            let len = v.len();
            Tensor::<B, 1, Int>::from_data(TensorData::new(v, [len]), &device)
        };
        let logits = match which {
            LogitsFor::Last => {
                let last = int(cols.iter().map(|c| c.end as i64 - 1).collect());
                let logits = self
                    .logits(x.select(1, last), probe)
                    .reshape([active.len(), vocab]);
                let rows = int(active.iter().map(|&r| r as i64).collect());
                Tensor::zeros([b, vocab], &device)
                    .select_assign(0, rows, logits, IndexingUpdateOp::Add)
                    .reshape([b, 1, vocab])
            }
            LogitsFor::All => {
                let logits = self.logits(x, probe).reshape([n, vocab]);
                let places = active
                    .iter()
                    .flat_map(|&r| tokens.spans[r].clone().map(move |c| (r * s + c) as i64))
                    .collect();
                Tensor::zeros([b * s, vocab], &device)
                    .select_assign(0, int(places), logits, IndexingUpdateOp::Add)
                    .reshape([b, s, vocab])
            }
        };
        Ok(ForwardOutput {
            logits,
            expert_counts,
            balance,
        })
    }

    /// Embedding and blocks over `ids: [batch, seq]`; `cols[i]` are the columns continuing `caches[i]`
    /// (which advance by that many positions). Returns the final streams `[batch, seq, c, D]`, the
    /// rows each routed expert received per layer, and the summed sequence-wise balance terms.
    #[allow(clippy::too_many_arguments)]
    fn run_blocks(
        &self,
        ids: &[u32],
        batch: usize,
        seq: usize,
        caches: &mut [&mut ModelCache<B>],
        cols: &[Range<usize>],
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
    ) -> (Tensor<B, 4>, Vec<Vec<usize>>, Option<Tensor<B, 1>>) {
        let d = self.config.hidden_size;
        let c = self.config.hc_mult;
        let x = self
            .embed
            .forward(ids, &self.device())
            .reshape([batch, seq, 1, d]);
        let mut x = x.repeat_dim(2, c);
        let mut expert_counts = Vec::with_capacity(self.layers.len());
        let mut balance: Option<Tensor<B, 1>> = None;
        for (layer, block) in self.layers.iter().enumerate() {
            tap(probe, &format!("layers.{}.input", block.index), &x);
            let mut segments: Vec<Segment<'_, B>> = caches
                .iter_mut()
                .zip(cols)
                .map(|(cache, cols)| Segment {
                    cols: cols.clone(),
                    start: cache.position,
                    cache: &mut cache.layers[layer],
                })
                .collect();
            let (next, routing) = block.forward(x, ids, &mut segments, runner, probe);
            x = next;
            expert_counts.push(routing.counts);
            if let Some(term) = routing.balance {
                balance = Some(match balance {
                    Some(sum) => sum + term,
                    None => term,
                });
            }
        }
        for (cache, cols) in caches.iter_mut().zip(cols) {
            cache.position += cols.len();
        }
        (x, expert_counts, balance)
    }

    /// The head: final streams `[B, S, c, D]` -> logits `[B, S, vocab]`.
    fn logits(&self, x: Tensor<B, 4>, probe: &mut dyn Probe) -> Tensor<B, 3> {
        tap(probe, "final.streams", &x);
        let hidden = self.norm.forward(self.hc_head.forward(x));
        tap(probe, "final.hidden", &hidden);
        let logits = self.head.forward(hidden);
        tap(probe, "logits", &logits);
        logits
    }

    /// Builds the model from `source` (HF tensor names) with every weight as a trainable f32 tensor,
    /// checking every tensor's presence and shape and that no tensor is left unused.
    pub fn load(config: &V4Config, source: &dyn WeightSource, device: &B::Device) -> Result<Self, LoadError> {
        Self::load_with(config, source, device, Residency::Dequantize)
    }

    /// [`load`](Self::load), with the large matrices where `residency` says.
    pub fn load_with(
        config: &V4Config,
        source: &dyn WeightSource,
        device: &B::Device,
        residency: Residency,
    ) -> Result<Self, LoadError> {
        config.validate().map_err(|error| LoadError::Config {
            path: source.describe(),
            error,
        })?;
        let loader = Loader::new(source, device, residency);
        let root = loader.root();
        let (v, d) = (config.vocab_size, config.hidden_size);
        let model = root.pp("model");
        let layers = (0..config.num_layers())
            .map(|i| Block::load(config, &model.pp("layers").pp(i), i))
            .collect::<Result<Vec<_>, _>>()?;
        let (embed, hc_head, norm, head) = (
            Embedding::load(&model, "embed_tokens", v, d)?,
            HcHead::load(config, &model.pp("hc_head"))?,
            model.norm("norm", d, config.rms_norm_eps)?,
            Linear::load(&root, "lm_head", v, d)?,
        );
        // HF does not instantiate the MTP block; its tensors may ride along in a checkpoint.
        let loaded = loader.finish(|n| n.starts_with("mtp.") || n.contains(".mtp."))?;
        Ok(Self {
            embed,
            layers,
            hc_head,
            norm,
            head,
            config: config.clone(),
            params: loaded.params,
            resident: ResidentBytes {
                packed: loaded.packed_bytes,
                dense: loaded.dense_bytes,
            },
        })
    }

    /// The checkpoint name of parameter `id`.
    pub fn param_name(&self, id: &ParamId) -> Option<&str> {
        self.params.iter().find(|p| p.id == *id).map(|p| p.name.as_str())
    }

    /// The device the model's tensors live on.
    pub fn device(&self) -> B::Device {
        self.norm.weight.device()
    }
}
