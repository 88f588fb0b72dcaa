//! The lightning indexer of CSA layers (V4 §2.3.1): picks, for each query, the top-k compressed entries
//! its attention will read.
//!
//! It owns a narrow compressor (width `di`, overlapping windows like the attention's) whose entries are the
//! index keys `KI`, and scores `I[t, i] = sum_h w[t, h] * relu(qI[t, h] . KI_i)` with
//! `qI = RoPE(qr Wq_b^T)` per index head and `w = x Wproj^T / sqrt(di) / sqrt(Hi)`. Only entries whose
//! window is complete at `t` (`i < floor((t + 1) / m)`) are eligible; ties go to the lowest index.
//! The selection is a set of integers, so it is computed on the host.

use crate::compressor::{Compressor, CompressorState, Projected};
use crate::config::V4Config;
use crate::loader::Weights;
use crate::norm::Linear;
use crate::weights::LoadError;
use burn::module::Module;
use burn::tensor::{activation, backend::Backend, Tensor};
use std::ops::Range;

#[derive(Module, Debug)]
pub struct Indexer<B: Backend> {
    /// `[Hi * di, q_lora]`
    pub wq_b: Linear<B>,
    /// `[Hi, D]`
    pub weights_proj: Linear<B>,
    pub compressor: Compressor<B>,
    pub heads: usize,
    pub head_dim: usize,
    pub topk: usize,
}

impl<B: Backend> Indexer<B> {
    /// Loads the indexer under `w` (`self_attn.compressor.indexer`): its query projection, head weights
    /// and its own overlapping compressor of `index_head_dim` channels.
    pub fn load(cfg: &V4Config, w: &Weights<'_, '_, B>, rate: usize) -> Result<Self, LoadError> {
        let (heads, head_dim) = (cfg.index_heads, cfg.index_head_dim);
        Ok(Self {
            wq_b: Linear::load(w, "q_b_proj", heads * head_dim, cfg.q_lora_rank)?,
            weights_proj: Linear::load(&w.pp("scorer"), "weights_proj", heads, cfg.hidden_size)?,
            compressor: Compressor::load(cfg, w, head_dim, rate, true)?,
            heads,
            head_dim,
            topk: cfg.index_topk,
        })
    }
}

/// The entries each query reads: `indices[(b * S + s) * k + j]`, `-1` where fewer than `k` are eligible.
#[derive(Debug, Clone, PartialEq)]
pub struct Selection {
    pub indices: Vec<i64>,
    /// Picks per query (`min(index_topk, T)`).
    pub k: usize,
}

/// Queries scored per matmul: bounds the `[B, chunk * Hi, T]` score tensor on long sequences.
const QUERY_CHUNK: usize = 256;

/// The indexer's token-wise inputs for some tokens (see [`Indexer::project`]).
#[derive(Debug, Clone)]
pub struct IndexQueries<B: Backend> {
    /// Index queries before RoPE: `[B, S, Hi, di]`.
    q: Tensor<B, 4>,
    /// Per-head weights, already scaled by `1 / (sqrt(di) sqrt(Hi))`: `[B, S, Hi]`.
    weights: Tensor<B, 3>,
    /// The index compressor's projections.
    keys: Projected<B>,
}

impl<B: Backend> IndexQueries<B> {
    /// The indexer compressor's projections of these tokens.
    pub fn keys(&self) -> &Projected<B> {
        &self.keys
    }

    /// The tokens of columns `cols` (one sequence of a packed batch).
    pub fn columns(&self, cols: &Range<usize>) -> Self {
        Self {
            q: self.q.clone().narrow(1, cols.start, cols.len()),
            weights: self.weights.clone().narrow(1, cols.start, cols.len()),
            keys: self.keys.columns(cols),
        }
    }
}

impl<B: Backend> Indexer<B> {
    /// The token-wise half, for a whole (packed) batch: `x: [B, S, D]` is the attention input and
    /// `qr: [B, S, q_lora]` the normed query latent.
    pub fn project(&self, x: Tensor<B, 3>, qr: Tensor<B, 3>) -> IndexQueries<B> {
        let [batch, seq, _] = x.dims();
        let (hi, di) = (self.heads, self.head_dim);
        IndexQueries {
            q: self.wq_b.forward(qr).reshape([batch, seq, hi, di]),
            weights: self
                .weights_proj
                .forward(x.clone())
                .mul_scalar(1.0 / ((di as f64).sqrt() * (hi as f64).sqrt())),
            keys: self.compressor.project(x),
        }
    }

    /// Continues one sequence's index keys with its new tokens (absolute positions from `start`), scores
    /// the queries against all keys and selects the top-k per query. Returns None while no entry exists.
    pub fn select(
        &self,
        queries: IndexQueries<B>,
        start: usize,
        state: &mut CompressorState<B>,
    ) -> Option<(Selection, Tensor<B, 3>)> {
        let IndexQueries { q, weights, keys } = queries;
        let keys = self.compressor.absorb(keys, state)?;
        let [batch, seq, hi, di] = q.dims();
        let [_, entries, _] = keys.dims();
        let positions: Vec<usize> = (start..start + seq).collect();
        let tables = self.compressor.rope.tables::<B>(&positions, di, &q.device());
        let q = tables.apply(q, false);
        let keys_t = keys.clone().swap_dims(1, 2); // [B, di, T]

        let mut scores = Vec::with_capacity(batch * seq * entries);
        let mut chunks = Vec::new();
        for begin in (0..seq).step_by(QUERY_CHUNK) {
            let len = QUERY_CHUNK.min(seq - begin);
            let qc = q.clone().narrow(1, begin, len).reshape([batch, len * hi, di]);
            let wc = weights.clone().narrow(1, begin, len).reshape([batch, len, hi, 1]);
            let s = activation::relu(qc.matmul(keys_t.clone())).reshape([batch, len, hi, entries]);
            chunks.push((s * wc).sum_dim(2).reshape([batch, len, entries]));
        }
        let all = Tensor::cat(chunks, 1);
        scores.extend(
            all.clone()
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("index scores are f32"),
        );

        let k = self.topk.min(entries);
        let rate = self.compressor.rate;
        let mut indices = vec![-1i64; batch * seq * k];
        let mut order: Vec<usize> = Vec::with_capacity(entries);
        for b in 0..batch {
            for s in 0..seq {
                let eligible = ((start + s + 1) / rate).min(entries);
                let row = &scores[(b * seq + s) * entries..][..entries];
                // Descending score, then ascending index: a total order, so the pick is deterministic.
                let by_rank = |i: &usize, j: &usize| row[*j].total_cmp(&row[*i]).then(i.cmp(j));
                order.clear();
                order.extend(0..eligible);
                if eligible > k && k > 0 {
                    order.select_nth_unstable_by(k - 1, by_rank);
                    order.truncate(k);
                }
                order.sort_unstable_by(by_rank);
                let out = &mut indices[(b * seq + s) * k..][..k];
                for (slot, &i) in out.iter_mut().zip(order.iter()) {
                    *slot = i as i64;
                }
            }
        }
        Some((Selection { indices, k }, all))
    }
}
