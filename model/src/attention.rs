//! V4 attention (§2.3): shared-KV multi-query attention over a sliding window plus compressed entries,
//! with per-head attention sinks and a grouped low-rank output projection.
//!
//! ```text
//! qr = RMSNorm(x Wq_a^T)                     [B, S, q_lora]   (also the indexer's query latent)
//! q  = RoPE(rmsnorm_per_head(qr Wq_b^T))     [B, S, H, d]
//! kv = RoPE(RMSNorm(x Wkv^T))                [B, S, d]        one head, both K and V
//! keys of query t: the window (t-W, t] + compressed entries (CSA: the indexer's top-k; HCA: all complete)
//! p  = softmax over keys, with a per-head sink logit that has no value
//! o  = inverse-RoPE(p V) at t ; out = Wo_b (per-group Wo_a o_g)
//! ```
//! Queries are processed in chunks, each against only the keys its window can reach, so the cost of a
//! prefill grows linearly with its length.

use crate::cache::{Journal, LayerCache, Segment};
use crate::compressor::{Compressor, Projected};
use crate::config::{AttentionKind, V4Config};
use crate::indexer::{IndexQueries, Indexer, Selection};
use crate::loader::Weights;
use crate::norm::{rms_normalize, GroupedLinear, Linear, RmsNorm};
use crate::probe::{point, tap_in, wanted, NoProbe, Probe, Scope};
use crate::rope::Rope;
use crate::weights::{Init, LoadError};
use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Int, Tensor, TensorData};
use std::ops::{Range, RangeInclusive};

#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// `[q_lora, D]`
    pub wq_a: Linear<B>,
    pub q_norm: RmsNorm<B>,
    /// `[H * d, q_lora]`
    pub wq_b: Linear<B>,
    /// `[d, D]`
    pub wkv: Linear<B>,
    pub kv_norm: RmsNorm<B>,
    /// Per-group low-rank projection: `g` maps `[H * d / g] -> [R]`.
    pub wo_a: GroupedLinear<B>,
    /// `[D, g * R]`
    pub wo_b: Linear<B>,
    /// Per-head sink logits: `[H]`.
    pub sinks: Param<Tensor<B, 1>>,
    pub compressor: Option<Compressor<B>>,
    pub indexer: Option<Indexer<B>>,
    pub kind: AttentionKind,
    pub rope: Rope,
    pub num_heads: usize,
    pub head_dim: usize,
    pub window: usize,
    pub norm_eps: f64,
    /// CSA: score all entries under a mask while they number at most this times the top-k, else gather
    /// the picks. Both give the same result; the choice is speed only (0 forces gathering).
    pub dense_selection_factor: usize,
}

impl<B: Backend> Attention<B> {
    /// Loads the attention of a layer of `kind` under `w` (`self_attn`), with its compressor and, for
    /// CSA, its indexer.
    pub fn load(cfg: &V4Config, w: &Weights<'_, '_, B>, kind: AttentionKind) -> Result<Self, LoadError> {
        let (d, h, hd, q) = (cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.q_lora_rank);
        let (g, r) = (cfg.o_groups, cfg.o_lora_rank);
        let eps = cfg.rms_norm_eps;
        let compressor = w.pp("compressor");
        let (compressor, indexer) = match kind {
            AttentionKind::Sliding => (None, None),
            AttentionKind::Hca { rate } => (Some(Compressor::load(cfg, &compressor, hd, rate, false)?), None),
            AttentionKind::Csa { rate } => (
                Some(Compressor::load(cfg, &compressor, hd, rate, true)?),
                Some(Indexer::load(cfg, &compressor.pp("indexer"), rate)?),
            ),
        };
        Ok(Self {
            wq_a: Linear::load(w, "q_a_proj", q, d)?,
            q_norm: w.norm("q_a_norm", q, eps)?,
            wq_b: Linear::load(w, "q_b_proj", h * hd, q)?,
            wkv: Linear::load(w, "kv_proj", hd, d)?,
            kv_norm: w.norm("kv_norm", hd, eps)?,
            wo_a: GroupedLinear::load(w, "o_a_proj", g, r, h * hd / g)?,
            wo_b: Linear::load(w, "o_b_proj", d, g * r)?,
            sinks: w.plain("sinks", [h], Init::Small)?,
            compressor,
            indexer,
            kind,
            rope: Rope::for_layer(cfg, kind),
            num_heads: h,
            head_dim: hd,
            window: cfg.sliding_window,
            norm_eps: eps,
            dense_selection_factor: DENSE_SELECTION_FACTOR,
        })
    }
}

/// CSA scores every complete entry under a mask (one matmul) while there are at most this many times
/// `index_topk` of them, and gathers the picks beyond (the default of [`Attention::dense_selection_factor`]).
pub const DENSE_SELECTION_FACTOR: usize = 4;

/// One segment's share of the token-wise projections (before RoPE).
struct SegmentInputs<B: Backend> {
    /// Per-head normed queries: `[B, S, H, d]`.
    q: Tensor<B, 4>,
    /// Normed shared key/value: `[B, S, d]`.
    kv: Tensor<B, 3>,
    compressed: Option<Projected<B>>,
    index: Option<IndexQueries<B>>,
}

/// Compressed keys a chunk of queries can read.
enum CompressedKeys<'a, B: Backend> {
    /// HCA: every complete entry (`i < floor((t + 1) / m)`).
    All { entries: &'a Tensor<B, 3>, rate: usize },
    /// CSA: the indexer's picks.
    Selected {
        entries: &'a Tensor<B, 3>,
        selection: &'a Selection,
    },
}

impl<B: Backend> Attention<B> {
    /// Attends the new tokens `x: [B, S, D]`. Each segment continues its own layer state with its
    /// columns (one segment over all columns for a uniform batch, one per sequence for a packed one).
    /// The projections run once over all tokens; the stateful part (RoPE at the segment's positions,
    /// window, compressors, indexer, softmax) runs per segment.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        segments: &mut [Segment<'_, B>],
        probe: &mut dyn Probe,
        scope: Scope,
    ) -> Tensor<B, 3> {
        let [batch, seq, _] = x.dims();
        let (h, d) = (self.num_heads, self.head_dim);
        let qr = self.q_norm.forward(self.wq_a.forward(x.clone()));
        let q = rms_normalize(
            self.wq_b.forward(qr.clone()).reshape([batch, seq, h, d]),
            self.norm_eps,
        );
        let kv = self.kv_norm.forward(self.wkv.forward(x.clone()));
        let compressed = self.compressor.as_ref().map(|c| c.project(x.clone()));
        let index = self.indexer.as_ref().map(|i| i.project(x, qr));

        // Per-tensor probe points are only offered for a single segment (whole-batch tensors).
        let single = segments.len() == 1;
        let mut silent = NoProbe;
        let mut outputs = Vec::with_capacity(segments.len());
        for segment in segments.iter_mut() {
            let cols = &segment.cols;
            let probe: &mut dyn Probe = if single { &mut *probe } else { &mut silent };
            let inputs = SegmentInputs {
                q: q.clone().narrow(1, cols.start, cols.len()),
                kv: kv.clone().narrow(1, cols.start, cols.len()),
                compressed: compressed.as_ref().map(|p| p.columns(cols)),
                index: index.as_ref().map(|i| i.columns(cols)),
            };
            outputs.push(self.segment(inputs, segment.start, segment.cache, probe, scope));
        }
        let o = if outputs.len() == 1 {
            outputs.pop().expect("one segment")
        } else {
            Tensor::cat(outputs, 1)
        };

        // Grouped output projection: [B*S, g, H*d/g] -> [B*S, g*R] -> [B, S, D].
        let g = self.wo_a.groups();
        let grouped = o.reshape([batch * seq, g, self.num_heads * self.head_dim / g]);
        let low = self.wo_a.forward(grouped);
        let low_width = low.dims()[1];
        let low = low.reshape([batch, seq, low_width]);
        let out = self.wo_b.forward(low);
        tap_in(probe, scope, point::ATTN_OUTPUT, &out);
        out
    }

    /// One segment's attention: its new tokens at positions `start..` continue `cache`. Returns the
    /// attention output per head after the inverse RoPE, `[B, S, H, d]`.
    fn segment(
        &self,
        inputs: SegmentInputs<B>,
        start: usize,
        cache: &mut LayerCache<B>,
        probe: &mut dyn Probe,
        scope: Scope,
    ) -> Tensor<B, 4> {
        let SegmentInputs {
            q,
            kv,
            compressed,
            index,
        } = inputs;
        let [batch, seq, _, d] = q.dims();
        let positions: Vec<usize> = (start..start + seq).collect();
        let tables = self.rope.tables::<B>(&positions, d, &q.device());
        let q = tables.apply(q, false);
        let kv = tables.apply3(kv, false);
        tap_in(probe, scope, point::ATTN_Q, &q);
        tap_in(probe, scope, point::ATTN_KV, &kv);

        if let Some(journal) = cache.journal.as_mut() {
            journal.record(&kv, compressed.as_ref(), index.as_ref().map(IndexQueries::keys));
        }
        let key_start = start - cache.window.as_ref().map_or(0, |w| w.dims()[1]);
        let keys = self.extend_window(cache, kv);

        let compressed = match (&self.compressor, compressed) {
            (Some(c), Some(projected)) => c.absorb(projected, &mut cache.compressor),
            _ => None,
        };
        if let Some(entries) = &compressed {
            tap_in(probe, scope, point::COMPRESSOR_ENTRIES, entries);
        }
        // The indexer's compressor must see every token, even before the first complete window.
        let selection = match (&self.indexer, index) {
            (Some(indexer), Some(queries)) => {
                let picked = indexer.select(queries, start, &mut cache.indexer);
                if let Some((selection, scores)) = &picked {
                    tap_in(probe, scope, point::INDEXER_SCORES, scores);
                    if let Some(name) = wanted(probe, scope, point::INDEXER_TOPK) {
                        let shape = [batch, seq, selection.k];
                        probe.record(&name, TensorData::new(selection.indices.clone(), shape));
                    }
                }
                picked.map(|(s, _)| s)
            }
            _ => None,
        };
        let extra = match (&compressed, &selection, self.kind) {
            (Some(entries), Some(selection), AttentionKind::Csa { .. }) => {
                Some(CompressedKeys::Selected { entries, selection })
            }
            (Some(entries), _, AttentionKind::Hca { rate }) => Some(CompressedKeys::All { entries, rate }),
            _ => None,
        };

        let o = self.attend(q, &keys, key_start, start, extra.as_ref());
        tap_in(probe, scope, point::ATTN_CORE, &o);
        tables.apply(o, true)
    }

    /// Appends new keys `kv: [B, n, d]` to the cached window; returns the cached keys then the new ones,
    /// and keeps the last `W - 1` of them in `cache`.
    fn extend_window(&self, cache: &mut LayerCache<B>, kv: Tensor<B, 3>) -> Tensor<B, 3> {
        let keys = match cache.window.take() {
            Some(previous) => Tensor::cat(vec![previous, kv], 1),
            None => kv,
        };
        let total = keys.dims()[1];
        let keep = total.min(self.window.saturating_sub(1));
        if keep > 0 {
            cache.window = Some(keys.clone().narrow(1, total - keep, keep));
        }
        keys
    }

    /// Ends a speculative step on `cache` ([`crate::ModelCache::speculate`]): the state becomes what it
    /// would be had only the first `keep` speculative tokens been fed.
    pub(crate) fn rewind(&self, cache: &mut LayerCache<B>, keep: usize) {
        let Some(journal) = cache.journal.take() else {
            return;
        };
        let Journal {
            before,
            keys,
            compressed,
            indexed,
        } = *journal;
        *cache = before;
        if keep == 0 {
            return;
        }
        let prefix = 0..keep;
        if let Some(keys) = keys {
            self.extend_window(cache, keys.narrow(1, 0, keep));
        }
        if let (Some(c), Some(p)) = (&self.compressor, compressed) {
            c.absorb(p.columns(&prefix), &mut cache.compressor);
        }
        if let (Some(i), Some(p)) = (&self.indexer, indexed) {
            i.compressor.absorb(p.columns(&prefix), &mut cache.indexer);
        }
    }

    /// The compression rate of this layer's compressor (1 for sliding-only layers).
    fn compressed_rate(&self) -> usize {
        self.kind.rate().max(1)
    }

    /// Softmax attention of `q: [B, S, H, d]` (query positions from `q_start`) over the window keys
    /// `keys: [B, L, d]` (positions from `key_start`) and the compressed keys.
    fn attend(
        &self,
        q: Tensor<B, 4>,
        keys: &Tensor<B, 3>,
        key_start: usize,
        q_start: usize,
        extra: Option<&CompressedKeys<'_, B>>,
    ) -> Tensor<B, 4> {
        let [batch, seq, h, d] = q.dims();
        let device = q.device();
        let scale = 1.0 / (d as f64).sqrt();
        let window = self.window;
        let chunk = window.max(64);
        let sinks = self.sinks.val().reshape([1, 1, h, 1]);
        let mut outputs = Vec::new();
        for begin in (0..seq).step_by(chunk) {
            let len = chunk.min(seq - begin);
            let first = q_start + begin;
            let last = first + len - 1;
            // Keys any query of the chunk can see: positions (first - W, last].
            let k0 = (first + 1).saturating_sub(window).max(key_start) - key_start;
            let k1 = last + 1 - key_start;
            let kw = keys.clone().narrow(1, k0, k1 - k0);
            let mask = window_mask(first..=last, key_start + k0..key_start + k1, window);
            let mask = Tensor::<B, 4>::from_data(TensorData::new(mask, [1, len, 1, k1 - k0]), &device);
            let qc = q.clone().narrow(1, begin, len);
            let q_rows = qc.clone().reshape([batch, len * h, d]);
            let win_scores = q_rows
                .clone()
                .matmul(kw.clone().swap_dims(1, 2))
                .reshape([batch, len, h, k1 - k0])
                .mul_scalar(scale)
                + mask;

            let mut parts = vec![win_scores];
            // The compressed keys of this chunk and how to mix their probabilities back.
            let mut values: Option<Tensor<B, 3>> = None;
            let mut gathered: Option<Tensor<B, 3>> = None;
            // Dense: score every complete entry under a mask (HCA; CSA while the entries are few, where one
            // matmul beats gathering). Gathered: score only the indexer's picks (CSA on long contexts).
            let mut dense: Option<(&Tensor<B, 3>, usize, Tensor<B, 4>)> = None;
            match extra {
                Some(CompressedKeys::All { entries, rate }) => {
                    let visible = ((last + 1) / rate).min(entries.dims()[1]);
                    if visible > 0 {
                        let mask = complete_entries_mask(first..=last, visible, *rate);
                        let mask = TensorData::new(mask, [1, len, 1, visible]);
                        dense = Some((*entries, visible, Tensor::from_data(mask, &device)));
                    }
                }
                Some(CompressedKeys::Selected { entries, selection }) => {
                    let k = selection.k;
                    let [_, count, _] = entries.dims();
                    let picks = |b: usize, s: usize| &selection.indices[((b * seq) + s) * k..][..k];
                    let visible = ((last + 1) / self.compressed_rate()).min(count);
                    if visible <= self.dense_selection_factor * k {
                        let rows = (0..batch).flat_map(|b| (begin..begin + len).map(move |s| (b, s)));
                        let mask = selected_entries_mask(rows.map(|(b, s)| picks(b, s)), visible);
                        if visible > 0 {
                            let mask = TensorData::new(mask, [batch, len, 1, visible]);
                            dense = Some((*entries, visible, Tensor::from_data(mask, &device)));
                        }
                    } else {
                        let picked = (0..batch).flat_map(|b| (begin..begin + len).map(move |s| (b, s)));
                        let (rows, mask) = gathered_entries(picked.map(|(b, s)| (b * count, picks(b, s))));
                        let rows = TensorData::new(rows, [batch * len * k]);
                        let rows = Tensor::<B, 1, Int>::from_data(rows, &device);
                        let mask = TensorData::new(mask, [batch, len, 1, k]);
                        let mask = Tensor::<B, 4>::from_data(mask, &device);
                        let sel = (*entries)
                            .clone()
                            .reshape([batch * count, d])
                            .select(0, rows)
                            .reshape([batch * len, k, d]);
                        let s = qc
                            .reshape([batch * len, h, d])
                            .matmul(sel.clone().swap_dims(1, 2))
                            .reshape([batch, len, h, k])
                            .mul_scalar(scale)
                            + mask;
                        parts.push(s);
                        gathered = Some(sel);
                    }
                }
                None => {}
            }
            if let Some((entries, visible, mask)) = dense {
                let ec = entries.clone().narrow(1, 0, visible);
                let s = q_rows
                    .clone()
                    .matmul(ec.clone().swap_dims(1, 2))
                    .reshape([batch, len, h, visible])
                    .mul_scalar(scale)
                    + mask;
                parts.push(s);
                values = Some(ec);
            }
            parts.push(sinks.clone().expand([batch, len, h, 1]));
            let widths: Vec<usize> = parts.iter().map(|p| p.dims()[3]).collect();
            let probs = activation::softmax(Tensor::cat(parts, 3), 3);

            let pw = probs
                .clone()
                .narrow(3, 0, widths[0])
                .reshape([batch, len * h, widths[0]]);
            let mut o = pw.matmul(kw).reshape([batch, len, h, d]);
            if let Some(ec) = values {
                let p = probs
                    .clone()
                    .narrow(3, widths[0], widths[1])
                    .reshape([batch, len * h, widths[1]]);
                o = o + p.matmul(ec).reshape([batch, len, h, d]);
            }
            if let Some(sel) = gathered {
                let p = probs
                    .narrow(3, widths[0], widths[1])
                    .reshape([batch * len, h, widths[1]]);
                o = o + p.matmul(sel).reshape([batch, len, h, d]);
            }
            outputs.push(o);
        }
        if outputs.len() == 1 {
            outputs.pop().expect("one chunk")
        } else {
            Tensor::cat(outputs, 1)
        }
    }
}

/// Additive mask (0 visible, -inf hidden) of queries at positions `queries` over window keys at `keys`:
/// a query at `t` sees the keys in `(t - window, t]`. Row-major `[queries, keys]`.
fn window_mask(queries: RangeInclusive<usize>, keys: Range<usize>, window: usize) -> Vec<f32> {
    queries
        .flat_map(|t| keys.clone().map(move |u| u <= t && u + window > t))
        .map(visible_to_additive)
        .collect()
}

/// Additive mask of queries at positions `queries` over the first `visible` compressed entries, entry `i`
/// summarising positions `[i * rate, (i + 1) * rate)`: a query at `t` sees the entries complete by then,
/// `i < (t + 1) / rate`. Row-major `[queries, visible]`.
fn complete_entries_mask(queries: RangeInclusive<usize>, visible: usize, rate: usize) -> Vec<f32> {
    queries
        .flat_map(|t| (0..visible).map(move |i| i < (t + 1) / rate))
        .map(visible_to_additive)
        .collect()
}

/// Additive mask over the first `visible` compressed entries for queries whose indexer picked the
/// entries `picks` (one slice per query row; -1 pads an unfilled pick). Row-major `[rows, visible]`.
fn selected_entries_mask<'p>(picks: impl Iterator<Item = &'p [i64]>, visible: usize) -> Vec<f32> {
    let mut mask = Vec::new();
    for row in picks {
        let start = mask.len();
        mask.resize(start + visible, f32::NEG_INFINITY);
        for &i in row.iter().filter(|&&i| i >= 0) {
            mask[start + i as usize] = 0.0;
        }
    }
    mask
}

/// For gathering the picked entries of each query row (its sequence's first entry row, its picks): the
/// flat entry rows to gather (a padding pick gathers entry 0) and the additive mask that hides padding.
fn gathered_entries<'p>(rows: impl Iterator<Item = (usize, &'p [i64])>) -> (Vec<i64>, Vec<f32>) {
    rows.flat_map(|(base, picks)| {
        picks
            .iter()
            .map(move |&i| (base as i64 + i.max(0), visible_to_additive(i >= 0)))
    })
    .unzip()
}

fn visible_to_additive(visible: bool) -> f32 {
    if visible {
        0.0
    } else {
        f32::NEG_INFINITY
    }
}
