//! The DeepSeek-V4 model: embedding, `L` blocks over `c` residual streams, the HC head, norm and LM head.
//!
//! ```text
//! X = embed[ids] repeated c times    [B, S, c, D]
//! for each block: X = Block(X)
//! logits = head(RMSNorm(HcHead(X)))  [B, S, vocab]   (embedding and head are not tied)
//! ```

use crate::attention::Attention;
use crate::block::Block;
use crate::cache::{ModelCache, Segment, SequenceCaches};
use crate::compressor::Compressor;
use crate::config::{AttentionKind, RoutingKind, V4Config};
use crate::hyper_connection::{HcHead, HyperConnection};
use crate::indexer::Indexer;
use crate::moe::{ExpertRunner, Experts, LocalExperts, Moe, SharedExpert};
use crate::norm::{Linear, RmsNorm};
use crate::probe::{tap, NoProbe, Probe};
use crate::rope::Rope;
use crate::weights::{HostData, LoadError, WeightSource};
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};
use std::collections::HashSet;
use std::fmt;
use std::ops::Range;

#[derive(Module, Debug)]
pub struct V4Model<B: Backend> {
    /// `[vocab, D]`
    pub embed: Param<Tensor<B, 2>>,
    pub layers: Vec<Block<B>>,
    pub hc_head: HcHead<B>,
    pub norm: RmsNorm<B>,
    /// `[vocab, D]`
    pub head: Linear<B>,
    pub config: V4Config,
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
        let device = self.embed.device();
        let ids_t = Tensor::<B, 1, Int>::from_data(
            TensorData::new(ids.iter().map(|&t| t as i64).collect::<Vec<_>>(), [batch * seq]),
            &device,
        );
        let x = self.embed.val().select(0, ids_t).reshape([batch, seq, 1, d]);
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

    /// Builds the model from `source` (HF tensor names), checking every tensor's presence and shape and
    /// that no tensor is left unused.
    pub fn load(config: &V4Config, source: &dyn WeightSource, device: &B::Device) -> Result<Self, LoadError> {
        config.validate().map_err(|error| LoadError::Config {
            path: source.describe(),
            error,
        })?;
        let mut loader = Loader {
            source,
            device,
            used: HashSet::new(),
        };
        let model = Self::build(config, &mut loader)?;
        let unexpected: Vec<String> = source
            .names()
            .into_iter()
            // HF does not instantiate the MTP block; its tensors may ride along in a checkpoint.
            .filter(|n| !loader.used.contains(n) && !n.starts_with("mtp.") && !n.contains(".mtp."))
            .collect();
        if !unexpected.is_empty() {
            return Err(LoadError::Unexpected {
                source: source.describe(),
                names: unexpected,
            });
        }
        Ok(model)
    }

    fn build(cfg: &V4Config, w: &mut Loader<'_, B>) -> Result<Self, LoadError> {
        let (v, d, c) = (cfg.vocab_size, cfg.hidden_size, cfg.hc_mult);
        let eps = cfg.rms_norm_eps;
        let mut layers = Vec::with_capacity(cfg.num_layers());
        for (i, (&kind, &routing)) in cfg.attention.iter().zip(&cfg.routing).enumerate() {
            let p = format!("model.layers.{i}");
            let hc = |w: &mut Loader<'_, B>, site: &str| -> Result<HyperConnection<B>, LoadError> {
                let n = (2 + c) * c;
                Ok(HyperConnection {
                    fn_t: Param::from_tensor(w.f32_t(&format!("{p}.{site}.fn"), [n, c * d])?),
                    base: Param::from_tensor(w.f32(&format!("{p}.{site}.base"), [n])?),
                    scale: Param::from_tensor(w.f32(&format!("{p}.{site}.scale"), [3])?),
                    hc_mult: c,
                    sinkhorn_iters: cfg.hc_sinkhorn_iters,
                    hc_eps: cfg.hc_eps,
                    norm_eps: eps,
                })
            };
            layers.push(Block {
                attn_hc: hc(w, "attn_hc")?,
                attn_norm: w.norm(&format!("{p}.input_layernorm.weight"), d, eps)?,
                attn: Self::build_attention(cfg, w, &format!("{p}.self_attn"), kind)?,
                ffn_hc: hc(w, "ffn_hc")?,
                ffn_norm: w.norm(&format!("{p}.post_attention_layernorm.weight"), d, eps)?,
                ffn: Self::build_moe(cfg, w, &format!("{p}.mlp"), routing)?,
                index: i,
            });
        }
        Ok(Self {
            embed: Param::from_tensor(w.f32("model.embed_tokens.weight", [v, d])?),
            layers,
            hc_head: HcHead {
                fn_t: Param::from_tensor(w.f32_t("model.hc_head.hc_fn", [c, c * d])?),
                base: Param::from_tensor(w.f32("model.hc_head.hc_base", [c])?),
                scale: Param::from_tensor(w.f32("model.hc_head.hc_scale", [1])?),
                hc_eps: cfg.hc_eps,
                norm_eps: eps,
            },
            norm: w.norm("model.norm.weight", d, eps)?,
            head: w.linear("lm_head.weight", v, d)?,
            config: cfg.clone(),
        })
    }

    fn build_compressor(
        cfg: &V4Config,
        w: &mut Loader<'_, B>,
        p: &str,
        width: usize,
        rate: usize,
        overlap: bool,
    ) -> Result<Compressor<B>, LoadError> {
        let d = cfg.hidden_size;
        let channels = if overlap { 2 * width } else { width };
        Ok(Compressor {
            wkv: w.linear(&format!("{p}.kv_proj.weight"), channels, d)?,
            wgate: w.linear(&format!("{p}.gate_proj.weight"), channels, d)?,
            ape: Param::from_tensor(w.f32(&format!("{p}.position_bias"), [rate, channels])?),
            norm: w.norm(&format!("{p}.kv_norm.weight"), width, cfg.rms_norm_eps)?,
            rate,
            width,
            overlap,
            rope: Rope::for_layer(cfg, AttentionKind::Csa { rate }),
        })
    }

    fn build_attention(
        cfg: &V4Config,
        w: &mut Loader<'_, B>,
        p: &str,
        kind: AttentionKind,
    ) -> Result<Attention<B>, LoadError> {
        let (d, h, hd, q) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.q_lora_rank);
        let (g, r) = (cfg.o_groups, cfg.o_lora_rank);
        let eps = cfg.rms_norm_eps;
        let (compressor, indexer) = match kind {
            AttentionKind::Sliding => (None, None),
            AttentionKind::Hca { rate } => (
                Some(Self::build_compressor(
                    cfg,
                    w,
                    &format!("{p}.compressor"),
                    hd,
                    rate,
                    false,
                )?),
                None,
            ),
            AttentionKind::Csa { rate } => {
                let ip = format!("{p}.compressor.indexer");
                let (hi, di) = (cfg.index_heads, cfg.index_head_dim);
                let indexer = Indexer {
                    wq_b: w.linear(&format!("{ip}.q_b_proj.weight"), hi * di, q)?,
                    weights_proj: w.linear(&format!("{ip}.scorer.weights_proj.weight"), hi, d)?,
                    compressor: Self::build_compressor(cfg, w, &ip, di, rate, true)?,
                    heads: hi,
                    head_dim: di,
                    topk: cfg.index_topk,
                };
                (
                    Some(Self::build_compressor(
                        cfg,
                        w,
                        &format!("{p}.compressor"),
                        hd,
                        rate,
                        true,
                    )?),
                    Some(indexer),
                )
            }
        };
        let group_in = h * hd / g;
        Ok(Attention {
            wq_a: w.linear(&format!("{p}.q_a_proj.weight"), q, d)?,
            q_norm: w.norm(&format!("{p}.q_a_norm.weight"), q, eps)?,
            wq_b: w.linear(&format!("{p}.q_b_proj.weight"), h * hd, q)?,
            wkv: w.linear(&format!("{p}.kv_proj.weight"), hd, d)?,
            kv_norm: w.norm(&format!("{p}.kv_norm.weight"), hd, eps)?,
            wo_a: Param::from_tensor(w.f32_blocks_t(&format!("{p}.o_a_proj.weight"), [g, r, group_in])?),
            wo_b: w.linear(&format!("{p}.o_b_proj.weight"), d, g * r)?,
            sinks: Param::from_tensor(w.f32(&format!("{p}.sinks"), [h])?),
            compressor,
            indexer,
            kind,
            rope: Rope::for_layer(cfg, kind),
            num_heads: h,
            head_dim: hd,
            window: cfg.sliding_window,
            norm_eps: eps,
            dense_selection_factor: crate::attention::DENSE_SELECTION_FACTOR,
        })
    }

    fn build_moe(
        cfg: &V4Config,
        w: &mut Loader<'_, B>,
        p: &str,
        routing: RoutingKind,
    ) -> Result<Moe<B>, LoadError> {
        let (d, e, i, k) = (
            cfg.hidden_size,
            cfg.n_routed_experts,
            cfg.moe_intermediate_size,
            cfg.experts_per_token,
        );
        let (bias, tid2eid) = match routing {
            RoutingKind::TopK => (
                w.host_f32(&format!("{p}.gate.e_score_correction_bias"), [e])?,
                Vec::new(),
            ),
            RoutingKind::Hash => {
                let name = format!("{p}.gate.tid2eid");
                let table = w.host_i64(&name, [cfg.vocab_size, k])?;
                let table = table
                    .into_iter()
                    .map(|x| {
                        u32::try_from(x)
                            .ok()
                            .filter(|&x| (x as usize) < e)
                            .ok_or_else(|| LoadError::Value {
                                source: w.source.describe(),
                                name: name.clone(),
                                message: format!("expert id {x} outside 0..{e}"),
                            })
                    })
                    .collect::<Result<Vec<u32>, _>>()?;
                (vec![0.0; e], table)
            }
        };
        Ok(Moe {
            gate: w.linear(&format!("{p}.gate.weight"), e, d)?,
            bias,
            tid2eid,
            experts: Experts {
                w13_t: Param::from_tensor(
                    w.f32_blocks_t(&format!("{p}.experts.gate_up_proj"), [e, 2 * i, d])?,
                ),
                w2_t: Param::from_tensor(w.f32_blocks_t(&format!("{p}.experts.down_proj"), [e, d, i])?),
                limit: cfg.swiglu_limit,
            },
            shared: SharedExpert {
                w1: w.linear(&format!("{p}.shared_experts.gate_proj.weight"), i, d)?,
                w2: w.linear(&format!("{p}.shared_experts.down_proj.weight"), d, i)?,
                w3: w.linear(&format!("{p}.shared_experts.up_proj.weight"), i, d)?,
            },
            routing,
            score_func: cfg.score_func,
            top_k: k,
            route_scale: cfg.route_scale,
            sequence_balance: false,
        })
    }
}

/// Transposes each of the `n` row-major `[rows, cols]` blocks of `data` (checkpoint order <-> the
/// transposed order the model keeps its projections in).
pub fn transpose_blocks(data: &[f32], n: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for (src, dst) in data
        .chunks_exact(rows * cols)
        .zip(out.chunks_exact_mut(rows * cols))
        .take(n)
    {
        for r in 0..rows {
            for c in 0..cols {
                dst[c * rows + r] = src[r * cols + c];
            }
        }
    }
    out
}

/// Reads tensors by name from a source, checking shapes and remembering what was used.
struct Loader<'a, B: Backend> {
    source: &'a dyn WeightSource,
    device: &'a B::Device,
    used: HashSet<String>,
}

impl<B: Backend> Loader<'_, B> {
    fn read(&mut self, name: &str, shape: &[usize]) -> Result<HostData, LoadError> {
        self.read_as(name, shape, &[])
    }

    /// Reads `name`, accepting `shape` or any of the equivalent `alternatives` (same elements, same order).
    fn read_as(
        &mut self,
        name: &str,
        shape: &[usize],
        alternatives: &[&[usize]],
    ) -> Result<HostData, LoadError> {
        let tensor = self.source.read(name, shape)?;
        if tensor.shape != shape && !alternatives.contains(&tensor.shape.as_slice()) {
            return Err(LoadError::Shape {
                source: self.source.describe(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: tensor.shape,
            });
        }
        self.used.insert(name.to_string());
        Ok(tensor.data)
    }

    fn host_f32<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Vec<f32>, LoadError> {
        let data = self.read(name, &shape)?;
        self.finite_f32(name, data)
    }

    fn finite_f32(&self, name: &str, data: HostData) -> Result<Vec<f32>, LoadError> {
        match data {
            HostData::F32(v) => {
                if let Some(bad) = v.iter().find(|x| !x.is_finite()) {
                    return Err(LoadError::Value {
                        source: self.source.describe(),
                        name: name.to_string(),
                        message: format!("contains the non-finite value {bad}"),
                    });
                }
                Ok(v)
            }
            HostData::I64(_) => Err(LoadError::Dtype {
                source: self.source.describe(),
                name: name.to_string(),
                dtype: "an integer type".into(),
                hint: "expected floating-point weights".into(),
            }),
        }
    }

    fn host_i64<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Vec<i64>, LoadError> {
        match self.read(name, &shape)? {
            HostData::I64(v) => Ok(v),
            HostData::F32(_) => Err(LoadError::Dtype {
                source: self.source.describe(),
                name: name.to_string(),
                dtype: "a floating-point type".into(),
                hint: "expected integer ids".into(),
            }),
        }
    }

    fn f32<const D: usize>(&mut self, name: &str, shape: [usize; D]) -> Result<Tensor<B, D>, LoadError> {
        let data = self.host_f32(name, shape)?;
        Ok(Tensor::from_data(TensorData::new(data, shape), self.device))
    }

    /// A `[rows, cols]` checkpoint matrix, transposed to a contiguous `[cols, rows]` tensor.
    fn f32_t(&mut self, name: &str, shape: [usize; 2]) -> Result<Tensor<B, 2>, LoadError> {
        let [rows, cols] = shape;
        let data = transpose_blocks(&self.host_f32(name, shape)?, 1, rows, cols);
        Ok(Tensor::from_data(
            TensorData::new(data, [cols, rows]),
            self.device,
        ))
    }

    /// A `[n, rows, cols]` checkpoint tensor (HF's flat `[n * rows, cols]` accepted too), each block
    /// transposed: a contiguous `[n, cols, rows]` tensor.
    fn f32_blocks_t(&mut self, name: &str, shape: [usize; 3]) -> Result<Tensor<B, 3>, LoadError> {
        let [n, rows, cols] = shape;
        let data = self.read_as(name, &shape, &[&[n * rows, cols]])?;
        let data = transpose_blocks(&self.finite_f32(name, data)?, n, rows, cols);
        Ok(Tensor::from_data(
            TensorData::new(data, [n, cols, rows]),
            self.device,
        ))
    }

    fn linear(&mut self, name: &str, out: usize, input: usize) -> Result<Linear<B>, LoadError> {
        Ok(Linear::from_transposed(self.f32_t(name, [out, input])?))
    }

    fn norm(&mut self, name: &str, dim: usize, eps: f64) -> Result<RmsNorm<B>, LoadError> {
        Ok(RmsNorm::new(self.f32(name, [dim])?, eps))
    }
}
