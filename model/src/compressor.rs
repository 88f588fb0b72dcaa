//! The KV compressor (V4 §2.3): learned gated pooling of every `m` consecutive tokens into one entry.
//!
//! `Ckv = x Wkv^T`, `Z = x Wgate^T + ape[p]` (p: position inside the window), and one entry per complete
//! window is `sum_p softmax_p(Z) * Ckv` (softmax per channel over the window's slots), then RMSNorm and
//! RoPE at the window's first position.
//!
//! Without overlap (HCA) a window has `m` slots. With overlap (CSA, m = 4) the projections are twice as
//! wide: slots `0..m` take the FIRST half of the channels of the previous window's tokens and slots `m..2m`
//! the SECOND half of the current window's tokens, so each entry sees `2m` tokens with stride `m`.
//!
//! The same code compresses a whole sequence and a chunk that continues an earlier call: the
//! [`CompressorState`] carries the incomplete window's projections, the previous window's first halves
//! and the entries emitted so far. A full-sequence forward simply starts from an empty state. The work is
//! split in two: [`Compressor::project`] is token-wise (run once over a packed batch of sequences) and
//! [`Compressor::absorb`] continues one sequence's state.

use crate::config::{AttentionKind, V4Config};
use crate::loader::Weights;
use crate::norm::{Linear, RmsNorm};
use crate::rope::Rope;
use crate::weights::{Init, LoadError};
use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Tensor};

/// One compressor (the attention's, width `head_dim`, or the indexer's, width `index_head_dim`).
#[derive(Module, Debug)]
pub struct Compressor<B: Backend> {
    /// `[coff * width, D]`, coff = 2 with overlap.
    pub wkv: Linear<B>,
    /// `[coff * width, D]`
    pub wgate: Linear<B>,
    /// Absolute-position bias of the gate inside a window: `[m, coff * width]`.
    pub ape: Param<Tensor<B, 2>>,
    /// RMSNorm of an entry: `[width]`.
    pub norm: RmsNorm<B>,
    pub rate: usize,
    pub width: usize,
    pub overlap: bool,
    pub rope: Rope,
}

impl<B: Backend> Compressor<B> {
    /// Loads `kv_proj`, `gate_proj`, `position_bias` and `kv_norm` under `w`: entries of `width`
    /// channels, one per `rate` tokens, over overlapping windows when `overlap` (CSA).
    pub fn load(
        cfg: &V4Config,
        w: &Weights<'_, '_, B>,
        width: usize,
        rate: usize,
        overlap: bool,
    ) -> Result<Self, LoadError> {
        let d = cfg.hidden_size;
        let channels = if overlap { 2 * width } else { width };
        Ok(Self {
            wkv: Linear::load(w, "kv_proj", channels, d)?,
            wgate: Linear::load(w, "gate_proj", channels, d)?,
            ape: w.plain("position_bias", [rate, channels], Init::Small)?,
            norm: w.norm("kv_norm", width, cfg.rms_norm_eps)?,
            rate,
            width,
            overlap,
            rope: Rope::for_layer(cfg, AttentionKind::Csa { rate }),
        })
    }
}

/// A compressor's projections of some tokens: `[B, S, coff * width]` each.
#[derive(Debug, Clone)]
pub struct Projected<B: Backend> {
    pub kv: Tensor<B, 3>,
    pub gate: Tensor<B, 3>,
}

impl<B: Backend> Projected<B> {
    /// These tokens followed by `next`'s.
    pub fn append(self, next: &Self) -> Self {
        Self {
            kv: Tensor::cat(vec![self.kv, next.kv.clone()], 1),
            gate: Tensor::cat(vec![self.gate, next.gate.clone()], 1),
        }
    }

    /// The tokens of columns `cols` (one sequence of a packed batch).
    pub fn columns(&self, cols: &std::ops::Range<usize>) -> Self {
        Self {
            kv: self.kv.clone().narrow(1, cols.start, cols.len()),
            gate: self.gate.clone().narrow(1, cols.start, cols.len()),
        }
    }
}

/// What a compressor remembers between calls, per sequence of the batch.
#[derive(Debug, Clone)]
pub struct CompressorState<B: Backend> {
    /// Projections of the tokens of the incomplete window: `[B, p, coff * width]` each, `p < m`.
    pending: Option<(Tensor<B, 3>, Tensor<B, 3>)>,
    /// First halves (kv, gate) of the last complete window, for the next entry's overlap: `[B, 1, m, width]`.
    previous: Option<(Tensor<B, 4>, Tensor<B, 4>)>,
    /// Entries emitted so far: `[B, T, width]`.
    entries: Option<Tensor<B, 3>>,
    /// Number of entries emitted so far (`entries`' length).
    count: usize,
}

impl<B: Backend> Default for CompressorState<B> {
    fn default() -> Self {
        Self {
            pending: None,
            previous: None,
            entries: None,
            count: 0,
        }
    }
}

impl<B: Backend> CompressorState<B> {
    /// Entries emitted so far, `[B, T, width]` (None before the first complete window).
    pub fn entries(&self) -> Option<&Tensor<B, 3>> {
        self.entries.as_ref()
    }

    /// Number of scalars held (for cache accounting).
    pub fn num_elements(&self) -> usize {
        let n3 = |t: &Tensor<B, 3>| t.dims().iter().product::<usize>();
        let n4 = |t: &Tensor<B, 4>| t.dims().iter().product::<usize>();
        self.pending.as_ref().map_or(0, |(a, b)| n3(a) + n3(b))
            + self.previous.as_ref().map_or(0, |(a, b)| n4(a) + n4(b))
            + self.entries.as_ref().map_or(0, n3)
    }
}

impl<B: Backend> Compressor<B> {
    /// The token-wise half: projections of the new tokens `x: [B, S, D]`, `([B, S, coff * width]` each).
    /// Computed for a whole (packed) batch at once, then [`absorb`](Self::absorb)ed per sequence.
    pub fn project(&self, x: Tensor<B, 3>) -> Projected<B> {
        Projected {
            kv: self.wkv.forward(x.clone()),
            gate: self.wgate.forward(x),
        }
    }

    /// The stateful half: continues `state` with the projections of one sequence's (or one equal-position
    /// batch's) new tokens and returns all entries so far, `[B, T, width]`.
    pub fn absorb(&self, projected: Projected<B>, state: &mut CompressorState<B>) -> Option<Tensor<B, 3>> {
        let (m, w) = (self.rate, self.width);
        let Projected { mut kv, mut gate } = projected;
        let [batch, _, _] = kv.dims();
        if let Some((pending_kv, pending_gate)) = state.pending.take() {
            kv = Tensor::cat(vec![pending_kv, kv], 1);
            gate = Tensor::cat(vec![pending_gate, gate], 1);
        }
        let [_, total, channels] = kv.dims();
        let windows = total / m;
        let usable = windows * m;
        if usable < total {
            state.pending = Some((
                kv.clone().narrow(1, usable, total - usable),
                gate.clone().narrow(1, usable, total - usable),
            ));
        }
        if windows == 0 {
            return state.entries.clone();
        }
        let kv = kv.narrow(1, 0, usable).reshape([batch, windows, m, channels]);
        let gate = gate.narrow(1, 0, usable).reshape([batch, windows, m, channels])
            + self.ape.val().reshape([1, 1, m, channels]);

        let (kv, gate) = if self.overlap {
            let (first_kv, second_kv) = (kv.clone().narrow(3, 0, w), kv.narrow(3, w, w));
            let (first_gate, second_gate) = (gate.clone().narrow(3, 0, w), gate.narrow(3, w, w));
            let device = first_kv.device();
            let (prev_kv, prev_gate) = state.previous.take().unwrap_or_else(|| {
                (
                    Tensor::zeros([batch, 1, m, w], &device),
                    Tensor::full([batch, 1, m, w], f32::NEG_INFINITY, &device),
                )
            });
            state.previous = Some((
                first_kv.clone().narrow(1, windows - 1, 1),
                first_gate.clone().narrow(1, windows - 1, 1),
            ));
            let shift = |prev: Tensor<B, 4>, first: Tensor<B, 4>| {
                if windows == 1 {
                    prev
                } else {
                    Tensor::cat(vec![prev, first.narrow(1, 0, windows - 1)], 1)
                }
            };
            (
                Tensor::cat(vec![shift(prev_kv, first_kv), second_kv], 2),
                Tensor::cat(vec![shift(prev_gate, first_gate), second_gate], 2),
            )
        } else {
            (kv, gate)
        };

        // [B, n, slots, w] -> [B, n, w]
        let pooled = (kv * activation::softmax(gate, 2))
            .sum_dim(2)
            .reshape([batch, windows, w]);
        let positions: Vec<usize> = (state.count..state.count + windows).map(|i| i * m).collect();
        let tables = self.rope.tables::<B>(&positions, w, &pooled.device());
        let entries = tables.apply3(self.norm.forward(pooled), false);

        state.count += windows;
        let all = match state.entries.take() {
            Some(old) => Tensor::cat(vec![old, entries], 1),
            None => entries,
        };
        state.entries = Some(all.clone());
        Some(all)
    }
}
