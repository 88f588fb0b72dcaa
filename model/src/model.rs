//! The DeepSeek-V4 model: embedding, `L` blocks over `c` residual streams, the HC head, norm and LM head.
//!
//! ```text
//! X = embed[ids] repeated c times    [B, S, c, D]
//! for each block: X = Block(X)
//! logits = head(RMSNorm(HcHead(X)))  [B, S, vocab]   (embedding and head are not tied)
//! ```
//!
//! The multi-token-prediction layers ([`Mtp`]) run after the main blocks on their final streams, and
//! share the embedding and the head.

use crate::block::Block;
use crate::cache::{ModelCache, Segment, SequenceCaches};
use crate::config::{ConfigError, V4Config};
use crate::hyper_connection::HcHead;
use crate::loader::{ExpertShard, Loader, NamedParam, Residency};
use crate::moe::{ExpertRunner, LocalExperts, Routing};
use crate::mtp::Mtp;
use crate::norm::{Embedding, Linear, RmsNorm};
use crate::probe::{point, tap, tap_in, NoProbe, Probe, Scope};
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
    /// The multi-token-prediction layers, by depth (empty when the checkpoint has none).
    pub mtp: Vec<Mtp<B>>,
    pub config: V4Config,
    /// Every trainable parameter under its checkpoint name, as the modules loaded them.
    pub params: Vec<NamedParam>,
    pub resident: ResidentBytes,
}

/// What a load keeps, and where ([`V4Model::load_plan`]).
#[derive(Debug, Clone, Default)]
pub struct LoadPlan {
    /// Where the large matrices live.
    pub residency: Residency,
    /// The main layers to keep (`None`: all).
    pub layers: Option<Range<usize>>,
    /// The routed experts to keep of each MoE layer.
    pub experts: ExpertShard,
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
    /// A model loaded with only some of its layers asked for logits or to start from tokens past
    /// its first layer (see [`V4Model::load_plan`]).
    Partial { layers: Range<usize>, num_layers: usize },
    /// MTP asked of a padded forward, whose drafts run one depth at a time
    /// ([`V4Model::forward_mtp_padded`]).
    PaddedMtp,
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
            InputError::Partial { layers, num_layers } => write!(
                f,
                "only layers {layers:?} of {num_layers} are loaded: logits need every layer, and a range \
                 after layer 0 starts from recorded input streams"
            ),
            InputError::PaddedMtp => write!(
                f,
                "a padded forward does not run the MTP layers: draft one depth at a time with \
                 forward_mtp_padded"
            ),
        }
    }
}

impl std::error::Error for InputError {}

impl Tokens {
    /// Checks that the ids form a non-empty `[batch, seq]` batch inside the vocabulary.
    pub fn check(&self, vocab: usize) -> Result<(), InputError> {
        if self.batch == 0 || self.seq == 0 || self.ids.len() != self.batch * self.seq {
            return Err(InputError::Shape {
                len: self.ids.len(),
                batch: self.batch,
                seq: self.seq,
            });
        }
        if let Some(i) = self.ids.iter().position(|&id| id as usize >= vocab) {
            return Err(InputError::OutOfVocabulary {
                batch: i / self.seq,
                position: i % self.seq,
                id: self.ids[i] as i64,
                vocab,
            });
        }
        Ok(())
    }

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

/// How a sequence forward runs ([`V4Model::forward_with`], [`V4Model::forward_padded`]): who runs the
/// routed experts, who records intermediate tensors, which positions get logits, and whether the MTP
/// layers run too. [`Pass::new`] is a plain pass: local experts, no probe, every position, no MTP.
pub struct Pass<'p, B: Backend> {
    runner: &'p dyn ExpertRunner<B>,
    probe: Option<&'p mut dyn Probe>,
    logits: LogitsFor,
    mtp: bool,
}

impl<B: Backend> Default for Pass<'_, B> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'p, B: Backend> Pass<'p, B> {
    /// A plain pass: local experts, no probe, logits at every position, no MTP.
    pub fn new() -> Self {
        Self {
            runner: &LocalExperts,
            probe: None,
            logits: LogitsFor::All,
            mtp: false,
        }
    }

    /// Runs the routed experts with `runner` (expert parallelism, calibration statistics).
    pub fn runner(self, runner: &'p dyn ExpertRunner<B>) -> Self {
        Self { runner, ..self }
    }

    /// Offers the intermediate tensors to `probe`.
    pub fn probe(self, probe: &'p mut dyn Probe) -> Self {
        Self {
            probe: Some(probe),
            ..self
        }
    }

    /// Computes the logits of the positions `which` selects.
    pub fn logits(self, which: LogitsFor) -> Self {
        Self {
            logits: which,
            ..self
        }
    }

    /// With `on`, also runs every MTP depth over the whole sequence ([`ForwardOutput::mtp_logits`]).
    pub fn mtp(self, on: bool) -> Self {
        Self { mtp: on, ..self }
    }
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
    /// The final streams before the HC head, `[B, S, c, D]` (the positions the logits cover); for a
    /// padded forward, every row's real tokens packed in row order, `[1, N, c, D]`. The MTP layer reads
    /// them.
    pub streams: Tensor<B, 4>,
    /// With [`Pass::mtp`], per MTP depth `k` (0-based), `[B, S - 1 - k, vocab]`: position `t` predicts
    /// token `t + 2 + k`; depths with no position left are omitted. Empty otherwise.
    pub mtp_logits: Vec<Tensor<B, 3>>,
    /// Rows routed to each expert of each MTP depth that ran.
    pub mtp_expert_counts: Vec<Vec<usize>>,
}

impl<B: Backend> V4Model<B> {
    /// Full-sequence forward: `[B, S]` tokens -> logits `[B, S, vocab]`.
    pub fn forward(&self, tokens: &Tokens) -> Result<Tensor<B, 3>, InputError> {
        let mut cache = ModelCache::new(self.layers.len());
        Ok(self.forward_with(tokens, &mut cache, Pass::new())?.logits)
    }

    /// Forward of `tokens` continuing `cache` (empty for a full sequence), run as `pass` says. The MTP
    /// depths, when asked for, read the main streams of every position and start their own state at
    /// position 0: depth 0 pairs the streams at `t` with the token at `t + 1`, depth `k` reads depth
    /// `k - 1`'s streams and the token at `t + 1 + k`.
    pub fn forward_with(
        &self,
        tokens: &Tokens,
        cache: &mut ModelCache<B>,
        pass: Pass<'_, B>,
    ) -> Result<ForwardOutput<B>, InputError> {
        self.check_whole()?;
        tokens.check(self.config.vocab_size)?;
        let end = cache.position + tokens.seq;
        if end > self.config.max_position_embeddings {
            return Err(InputError::TooLong {
                positions: end,
                max: self.config.max_position_embeddings,
            });
        }
        let mut no_probe = NoProbe;
        let probe = pass.probe.unwrap_or(&mut no_probe);
        let (b, s) = (tokens.batch, tokens.seq);
        let all_columns = 0..s;
        let (mut x, expert_counts, balance) = self.run_blocks(
            self.embed_streams(&tokens.ids, b, s),
            &tokens.ids,
            &mut [cache],
            std::slice::from_ref(&all_columns),
            pass.runner,
            probe,
        );
        let (mtp_logits, mtp_expert_counts) = match pass.mtp {
            true => self.mtp_depths(tokens, x.clone(), pass.runner, probe),
            false => (Vec::new(), Vec::new()),
        };
        if pass.logits == LogitsFor::Last {
            x = x.narrow(1, s - 1, 1);
        }
        Ok(ForwardOutput {
            logits: self.logits(x.clone(), probe),
            expert_counts,
            balance,
            streams: x,
            mtp_logits,
            mtp_expert_counts,
        })
    }

    /// The loaded layers (all of a whole model's, or the range of [`load_plan`](Self::load_plan))
    /// over `tokens` from a fresh state: starting from the embedding, or from `streams: [B, S, c, D]`
    /// entering the first loaded layer (required when it is not layer 0). Returns the streams after the
    /// last loaded layer, `[B, S, c, D]`; the head is not run.
    pub fn forward_layers(
        &self,
        tokens: &Tokens,
        streams: Option<Tensor<B, 4>>,
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
    ) -> Result<Tensor<B, 4>, InputError> {
        tokens.check(self.config.vocab_size)?;
        let (b, s) = (tokens.batch, tokens.seq);
        let x = match streams {
            Some(x) => x,
            None if self.layer_range().start == 0 => self.embed_streams(&tokens.ids, b, s),
            None => return Err(self.partial()),
        };
        let mut cache = ModelCache::new(self.layers.len());
        let all_columns = 0..s;
        let (x, _, _) = self.run_blocks(
            x,
            &tokens.ids,
            &mut [&mut cache],
            std::slice::from_ref(&all_columns),
            runner,
            probe,
        );
        Ok(x)
    }

    /// The indices of the loaded layers.
    pub fn layer_range(&self) -> Range<usize> {
        match (self.layers.first(), self.layers.last()) {
            (Some(first), Some(last)) => first.index..last.index + 1,
            _ => 0..0,
        }
    }

    fn partial(&self) -> InputError {
        InputError::Partial {
            layers: self.layer_range(),
            num_layers: self.config.num_layers(),
        }
    }

    /// Fails unless every layer is loaded.
    fn check_whole(&self) -> Result<(), InputError> {
        if self.layer_range() == (0..self.config.num_layers()) {
            Ok(())
        } else {
            Err(self.partial())
        }
    }

    /// Every MTP depth over the main streams `[B, S, c, D]` of `tokens`, each from a fresh state: per
    /// depth, its logits and the rows each of its experts received (see [`ForwardOutput::mtp_logits`]).
    fn mtp_depths(
        &self,
        tokens: &Tokens,
        mut streams: Tensor<B, 4>,
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
    ) -> (Vec<Tensor<B, 3>>, Vec<Vec<usize>>) {
        let (b, s) = (tokens.batch, tokens.seq);
        let (mut logits, mut expert_counts) = (Vec::new(), Vec::new());
        for depth in 0..self.mtp.len() {
            let n = s.saturating_sub(1 + depth);
            if n == 0 {
                break;
            }
            let next: Vec<u32> = (0..b)
                .flat_map(|row| tokens.ids[row * s + 1 + depth..][..n].iter().copied())
                .collect();
            let mut state = ModelCache::new(1);
            let columns = 0..n;
            let (x, routing) = self.run_mtp(
                depth,
                streams.narrow(1, 0, n),
                &next,
                b,
                &mut [&mut state],
                std::slice::from_ref(&columns),
                runner,
                probe,
            );
            logits.push(self.mtp_logits(depth, x.clone(), probe));
            expert_counts.push(routing.counts);
            streams = x;
        }
        (logits, expert_counts)
    }

    /// MTP layer `depth` over `streams: [batch, S, c, D]` and the next tokens `next_ids: [batch, S]`;
    /// `cols[i]` continue `caches[i]` (MTP states: one layer each), which advance. Returns the MTP block's
    /// streams.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_mtp(
        &self,
        depth: usize,
        streams: Tensor<B, 4>,
        next_ids: &[u32],
        batch: usize,
        caches: &mut [&mut ModelCache<B>],
        cols: &[Range<usize>],
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
    ) -> (Tensor<B, 4>, Routing<B>) {
        let seq = next_ids.len() / batch;
        let d = self.config.hidden_size;
        let next = self
            .embed
            .forward(next_ids, &self.device())
            .reshape([batch, seq, d]);
        let mut segments = Segment::of_layer(caches, cols, 0);
        let scope = Scope::Mtp(depth);
        let out = self.mtp[depth].forward(streams, next, next_ids, &mut segments, runner, probe, scope);
        for (cache, cols) in caches.iter_mut().zip(cols) {
            cache.position += cols.len();
        }
        out
    }

    /// MTP depth `depth`'s head: its streams `[B, S, c, D]` -> logits `[B, S, vocab]` through the shared
    /// LM head.
    pub(crate) fn mtp_logits(&self, depth: usize, x: Tensor<B, 4>, probe: &mut dyn Probe) -> Tensor<B, 3> {
        let hidden = self.mtp[depth].hidden(x);
        let logits = self.head.forward(hidden);
        tap_in(probe, Scope::Mtp(depth), point::LOGITS, &logits);
        logits
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
        pass: Pass<'_, B>,
    ) -> Result<ForwardOutput<B>, InputError> {
        self.check_whole()?;
        if pass.mtp {
            return Err(InputError::PaddedMtp);
        }
        let (runner, which) = (pass.runner, pass.logits);
        let mut no_probe = NoProbe;
        let probe = pass.probe.unwrap_or(&mut no_probe);
        let packed = self.pack(tokens, caches)?;
        let mut row_caches = packed.caches(caches);
        let n = packed.ids.len();
        let x = self.embed_streams(&packed.ids, 1, n);
        let (x, expert_counts, balance) =
            self.run_blocks(x, &packed.ids, &mut row_caches, &packed.cols, runner, probe);
        let logits = match which {
            LogitsFor::Last => {
                let hidden = self.hidden(packed.last_of_each(x.clone()), probe);
                packed.scatter_last(self.head.forward(hidden), tokens.batch)
            }
            LogitsFor::All => {
                let logits = self.logits(x.clone(), probe).reshape([n, self.config.vocab_size]);
                packed.scatter_all(logits, tokens)
            }
        };
        Ok(ForwardOutput {
            logits,
            expert_counts,
            balance,
            streams: x,
            mtp_logits: Vec::new(),
            mtp_expert_counts: Vec::new(),
        })
    }

    /// MTP depth `depth` over a padded batch: row `r`'s real tokens in `next` (the tokens one ahead of
    /// the positions the streams come from) pair with its streams in `streams` (packed `[1, N, c, D]`,
    /// row after row, as many as the real tokens) and continue the MTP states `caches` (one layer each).
    /// Returns each row's last-position logits `[B, 1, vocab]` (zeros for a row of padding only) and the
    /// MTP block's streams, packed `[1, N, c, D]` (to draft further).
    pub fn forward_mtp_padded(
        &self,
        depth: usize,
        streams: Tensor<B, 4>,
        next: &PaddedTokens,
        caches: &mut SequenceCaches<B>,
        runner: &dyn ExpertRunner<B>,
    ) -> Result<(Tensor<B, 3>, Tensor<B, 4>), InputError> {
        let packed = self.pack(next, caches)?;
        let mut row_caches = packed.caches(caches);
        let (x, _) = self.run_mtp(
            depth,
            streams,
            &packed.ids,
            1,
            &mut row_caches,
            &packed.cols,
            runner,
            &mut NoProbe,
        );
        let logits = self.mtp_logits(depth, packed.last_of_each(x.clone()), &mut NoProbe);
        Ok((packed.scatter_last(logits, next.batch), x))
    }

    /// Ends the speculative step of `cache` ([`ModelCache::speculate`]): the state becomes that of feeding
    /// only the first `keep` tokens since it began.
    pub fn rewind(&self, cache: &mut ModelCache<B>, keep: usize) {
        Self::rewind_blocks(self.layers.iter(), cache, keep);
    }

    /// [`rewind`](Self::rewind) for the state of MTP depth `depth`.
    pub fn rewind_mtp(&self, depth: usize, cache: &mut ModelCache<B>, keep: usize) {
        Self::rewind_blocks(std::iter::once(&self.mtp[depth].block), cache, keep);
    }

    fn rewind_blocks<'b>(blocks: impl Iterator<Item = &'b Block<B>>, cache: &mut ModelCache<B>, keep: usize) {
        let Some(start) = cache.speculative_start.take() else {
            return;
        };
        assert!(
            start + keep <= cache.position,
            "cannot keep {keep} of the {} speculative tokens",
            cache.position - start
        );
        if start + keep == cache.position {
            // Everything stands: the state is already right.
            cache.layers.iter_mut().for_each(|layer| layer.journal = None);
            return;
        }
        for (layer, block) in cache.layers.iter_mut().zip(blocks) {
            block.attn.rewind(layer, keep);
        }
        cache.position = start + keep;
    }

    /// Checks a padded batch against its states and packs its real tokens into one sequence.
    fn pack(&self, tokens: &PaddedTokens, caches: &SequenceCaches<B>) -> Result<Packed, InputError> {
        let (b, s) = (tokens.batch, tokens.seq);
        if caches.len() != b {
            return Err(InputError::Caches {
                caches: caches.len(),
                batch: b,
            });
        }
        let vocab = self.config.vocab_size;
        let max = self.config.max_position_embeddings;
        let mut packed = Packed {
            ids: Vec::new(),
            cols: Vec::new(),
            active: Vec::new(),
        };
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
                let at = packed.ids.len();
                packed.cols.push(at..at + span.len());
                packed.active.push(row);
                packed.ids.extend_from_slice(real);
            }
        }
        if packed.ids.is_empty() {
            return Err(InputError::AllPadding { batch: b, seq: s });
        }
        Ok(packed)
    }

    /// The embedding of `ids: [batch, seq]` copied into each of the `c` streams: `[batch, seq, c, D]`.
    fn embed_streams(&self, ids: &[u32], batch: usize, seq: usize) -> Tensor<B, 4> {
        let d = self.config.hidden_size;
        let x = self
            .embed
            .forward(ids, &self.device())
            .reshape([batch, seq, 1, d]);
        x.repeat_dim(2, self.config.hc_mult)
    }

    /// The loaded blocks over the streams `x: [batch, seq, c, D]` of `ids`; `cols[i]` are the columns
    /// continuing `caches[i]` (which advance by that many positions). Returns the streams after the last
    /// block, the rows each routed expert received per layer, and the summed sequence-wise balance terms.
    fn run_blocks(
        &self,
        mut x: Tensor<B, 4>,
        ids: &[u32],
        caches: &mut [&mut ModelCache<B>],
        cols: &[Range<usize>],
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
    ) -> (Tensor<B, 4>, Vec<Vec<usize>>, Option<Tensor<B, 1>>) {
        let mut expert_counts = Vec::with_capacity(self.layers.len());
        let mut balance: Option<Tensor<B, 1>> = None;
        for (layer, block) in self.layers.iter().enumerate() {
            let scope = Scope::Layer(block.index);
            tap_in(probe, scope, point::INPUT, &x);
            let mut segments = Segment::of_layer(caches, cols, layer);
            let (next, routing) = block.forward(x, ids, &mut segments, runner, probe, scope);
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

    /// The head: final streams `[B, S, c, D]` after every layer -> logits `[B, S, vocab]` (the HC head,
    /// the norm and the LM head), tapping `final.streams`, `final.hidden` and `logits`.
    pub fn logits(&self, x: Tensor<B, 4>, probe: &mut dyn Probe) -> Tensor<B, 3> {
        let logits = self.head.forward(self.hidden(x, probe));
        tap(probe, point::LOGITS, &logits);
        logits
    }

    /// Final streams `[B, S, c, D]` -> the normed hidden state `[B, S, D]` the LM head reads.
    fn hidden(&self, x: Tensor<B, 4>, probe: &mut dyn Probe) -> Tensor<B, 3> {
        tap(probe, point::FINAL_STREAMS, &x);
        let hidden = self.norm.forward(self.hc_head.forward(x));
        tap(probe, point::FINAL_HIDDEN, &hidden);
        hidden
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
        let plan = LoadPlan {
            residency,
            ..LoadPlan::default()
        };
        Self::load_plan(config, source, device, plan)
    }

    /// [`load`](Self::load) of what `plan` keeps: where the large matrices live, which main layers (plus
    /// the embedding, the heads and, when the range reaches the last layer, the MTP layers: a machine that
    /// cannot hold the model runs it range by range with [`forward_layers`](Self::forward_layers)), and
    /// which routed experts (one rank's share under expert parallelism). The source's tensors of other
    /// layers and experts are not read.
    pub fn load_plan(
        config: &V4Config,
        source: &dyn WeightSource,
        device: &B::Device,
        plan: LoadPlan,
    ) -> Result<Self, LoadError> {
        let LoadPlan {
            residency,
            layers,
            experts,
        } = plan;
        let layers = layers.unwrap_or(0..config.num_layers());
        let num_layers = config.num_layers();
        if layers.is_empty() || layers.end > num_layers {
            return Err(LoadError::Config {
                path: source.describe(),
                error: ConfigError {
                    key: "layers".into(),
                    message: format!("{layers:?} is not a non-empty range of the {num_layers} layers"),
                },
            });
        }
        config.validate().map_err(|error| LoadError::Config {
            path: source.describe(),
            error,
        })?;
        if experts.ranks == 0 || !config.n_routed_experts.is_multiple_of(experts.ranks) {
            return Err(LoadError::Config {
                path: source.describe(),
                error: ConfigError {
                    key: "n_routed_experts".into(),
                    message: format!(
                        "{} routed experts cannot be shared by {} expert-parallel ranks (it must divide them)",
                        config.n_routed_experts, experts.ranks
                    ),
                },
            });
        }
        let loader = Loader::new(source, device, residency, experts);
        let root = loader.root();
        let (v, d) = (config.vocab_size, config.hidden_size);
        let model = root.pp("model");
        let blocks = layers
            .clone()
            .map(|i| Block::load(config, &model.pp("layers").pp(i), i))
            .collect::<Result<Vec<_>, _>>()?;
        let (embed, hc_head, norm, head) = (
            Embedding::load(&model, "embed_tokens", v, d)?,
            HcHead::load(config, &model.pp("hc_head"))?,
            model.norm("norm", d, config.rms_norm_eps)?,
            Linear::load(&root, "lm_head", v, d)?,
        );
        // A checkpoint saved by HF transformers keeps `num_nextn_predict_layers` but drops the MTP
        // tensors: load the layers the source has (generated sources have every tensor).
        let names = source.names();
        let mtp_layers = if layers.end == num_layers {
            config.num_mtp_layers()
        } else {
            0
        };
        let mtp = (0..mtp_layers)
            .take_while(|k| {
                let prefix = format!("model.mtp.{k}.");
                names.is_empty() || names.iter().any(|n| n.starts_with(&prefix))
            })
            .map(|k| Mtp::load(config, &model.pp("mtp").pp(k), k))
            .collect::<Result<Vec<_>, _>>()?;
        let loaded = loader.finish(|name| !tensor_in_layers(name, &layers, num_layers))?;
        Ok(Self {
            embed,
            layers: blocks,
            hc_head,
            norm,
            head,
            mtp,
            config: config.clone(),
            params: loaded.params,
            resident: ResidentBytes {
                packed: loaded.packed_bytes,
                dense: loaded.dense_bytes,
            },
        })
    }

    /// Every block: the main layers, then the MTP layers' blocks.
    pub fn blocks(&self) -> impl Iterator<Item = &Block<B>> {
        self.layers.iter().chain(self.mtp.iter().map(|m| &m.block))
    }

    /// [`blocks`](Self::blocks), mutably (the routers' selection biases are updated in place).
    pub fn blocks_mut(&mut self) -> impl Iterator<Item = &mut Block<B>> {
        self.layers
            .iter_mut()
            .chain(self.mtp.iter_mut().map(|m| &mut m.block))
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

/// The real tokens of a padded batch packed into one sequence ([`V4Model::forward_padded`]).
struct Packed {
    /// `[N]`: the active rows' real tokens, row after row.
    ids: Vec<u32>,
    /// Each active row's columns in `ids`.
    cols: Vec<Range<usize>>,
    /// The rows with real tokens, in order.
    active: Vec<usize>,
}

impl Packed {
    /// The states of the active rows.
    fn caches<'c, B: Backend>(&self, caches: &'c mut SequenceCaches<B>) -> Vec<&'c mut ModelCache<B>> {
        caches
            .rows
            .iter_mut()
            .enumerate()
            .filter(|(row, _)| self.active.contains(row))
            .map(|(_, cache)| cache)
            .collect()
    }

    fn int<B: Backend>(values: Vec<i64>, device: &B::Device) -> Tensor<B, 1, Int> {
        let len = values.len();
        Tensor::from_data(TensorData::new(values, [len]), device)
    }

    /// Each active row's last position of packed `x: [1, N, ...]` -> `[1, rows, ...]`.
    fn last_of_each<B: Backend, const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let last = self.cols.iter().map(|c| c.end as i64 - 1).collect();
        let device = x.device();
        x.select(1, Self::int::<B>(last, &device))
    }

    /// The active rows' logits `[1, rows, vocab]` -> `[batch, 1, vocab]`, zeros for the other rows.
    fn scatter_last<B: Backend>(&self, logits: Tensor<B, 3>, batch: usize) -> Tensor<B, 3> {
        let vocab = logits.dims()[2];
        let device = logits.device();
        let rows = Self::int::<B>(self.active.iter().map(|&r| r as i64).collect(), &device);
        Tensor::zeros([batch, vocab], &device)
            .select_assign(
                0,
                rows,
                logits.reshape([self.active.len(), vocab]),
                IndexingUpdateOp::Add,
            )
            .reshape([batch, 1, vocab])
    }

    /// Packed logits `[N, vocab]` -> `[batch, seq, vocab]` at the real tokens' places, zeros elsewhere.
    fn scatter_all<B: Backend>(&self, logits: Tensor<B, 2>, tokens: &PaddedTokens) -> Tensor<B, 3> {
        let (b, s) = (tokens.batch, tokens.seq);
        let vocab = logits.dims()[1];
        let device = logits.device();
        let places = self
            .active
            .iter()
            .flat_map(|&r| tokens.spans[r].clone().map(move |c| (r * s + c) as i64))
            .collect();
        Tensor::zeros([b * s, vocab], &device)
            .select_assign(0, Self::int::<B>(places, &device), logits, IndexingUpdateOp::Add)
            .reshape([b, s, vocab])
    }
}

/// Whether the checkpoint tensor `name` (HF layout) belongs to a load of main layers `layers` of
/// `num_layers`: tensors of other main layers do not, nor the MTP layers unless the range reaches the
/// last layer; the embedding, heads and norms always do. A layer the config does not have belongs to
/// every load, so that the loader reports its tensors as unused.
pub fn tensor_in_layers(name: &str, layers: &Range<usize>, num_layers: usize) -> bool {
    if let Some(rest) = name.strip_prefix("model.layers.") {
        let index = rest.split('.').next().and_then(|i| i.parse::<usize>().ok());
        return index.is_none_or(|i| layers.contains(&i) || i >= num_layers);
    }
    !name.starts_with("model.mtp.") || layers.end == num_layers
}
