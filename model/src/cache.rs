//! The incremental decoding state of V4 (per layer): a sliding window of the last `W - 1` K=V vectors and,
//! on compressed layers, the compressors' states (incomplete window, overlap halves, entries so far).
//! Its size is bounded by `W + S/m` entries per layer, which is what makes million-token contexts affordable.

use crate::compressor::{CompressorState, Projected};
use burn::tensor::{backend::Backend, Tensor};
use std::ops::Range;

/// One layer's state.
#[derive(Debug, Clone)]
pub struct LayerCache<B: Backend> {
    /// The last `W - 1` keys (= values), RoPE applied: `[B, <= W-1, d]`.
    pub window: Option<Tensor<B, 3>>,
    /// The attention compressor (CSA, HCA).
    pub(crate) compressor: CompressorState<B>,
    /// The indexer's compressor (CSA).
    pub(crate) indexer: CompressorState<B>,
    /// While speculating: the state before, and what the speculative tokens added.
    pub(crate) journal: Option<Box<Journal<B>>>,
}

impl<B: Backend> Default for LayerCache<B> {
    fn default() -> Self {
        Self {
            window: None,
            compressor: CompressorState::default(),
            indexer: CompressorState::default(),
            journal: None,
        }
    }
}

/// A layer's state before speculative tokens, and their contributions to it (RoPE'd keys, the
/// compressors' projections), so that a rejected suffix can be taken back exactly: restore `before`, then
/// re-absorb the accepted prefix. No matmul is repeated. Tensors are handle clones (no copy).
#[derive(Debug, Clone)]
pub(crate) struct Journal<B: Backend> {
    pub before: LayerCache<B>,
    /// `[B, n, d]`
    pub keys: Option<Tensor<B, 3>>,
    pub compressed: Option<Projected<B>>,
    pub indexed: Option<Projected<B>>,
}

impl<B: Backend> Journal<B> {
    /// Appends one forward's contributions (speculation may span several forwards).
    pub fn record(
        &mut self,
        keys: &Tensor<B, 3>,
        compressed: Option<&Projected<B>>,
        indexed: Option<&Projected<B>>,
    ) {
        self.keys = Some(match self.keys.take() {
            Some(old) => Tensor::cat(vec![old, keys.clone()], 1),
            None => keys.clone(),
        });
        let append = |slot: &mut Option<Projected<B>>, new: Option<&Projected<B>>| {
            if let Some(new) = new {
                *slot = Some(match slot.take() {
                    Some(old) => old.append(new),
                    None => new.clone(),
                });
            }
        };
        append(&mut self.compressed, compressed);
        append(&mut self.indexed, indexed);
    }
}

impl<B: Backend> LayerCache<B> {
    /// Scalars held by this layer's state.
    pub fn num_elements(&self) -> usize {
        self.window
            .as_ref()
            .map_or(0, |w| w.dims().iter().product::<usize>())
            + self.compressor.num_elements()
            + self.indexer.num_elements()
    }
}

/// The whole model's decoding state: one [`LayerCache`] per layer and the next absolute position.
#[derive(Debug, Clone)]
pub struct ModelCache<B: Backend> {
    pub(crate) layers: Vec<LayerCache<B>>,
    pub(crate) position: usize,
    /// The position where the current speculative step began ([`ModelCache::speculate`]).
    pub(crate) speculative_start: Option<usize>,
}

impl<B: Backend> ModelCache<B> {
    /// An empty state for a model of `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: (0..num_layers).map(|_| LayerCache::default()).collect(),
            position: 0,
            speculative_start: None,
        }
    }

    /// Tokens consumed so far.
    pub fn position(&self) -> usize {
        self.position
    }

    /// Scalars held by the whole state.
    pub fn num_elements(&self) -> usize {
        self.layers.iter().map(LayerCache::num_elements).sum()
    }

    /// Starts a speculative step: the forwards that follow are journaled, so that
    /// [`V4Model::rewind`](crate::V4Model::rewind) can keep any prefix of their tokens. Speculating again
    /// before rewinding keeps the earlier start.
    pub fn speculate(&mut self) {
        for layer in &mut self.layers {
            if layer.journal.is_none() {
                let before = layer.clone();
                layer.journal = Some(Box::new(Journal {
                    before,
                    keys: None,
                    compressed: None,
                    indexed: None,
                }));
            }
        }
        self.speculative_start.get_or_insert(self.position);
    }
}

/// Decoding states of sequences that advance independently (prompts of different lengths, padded
/// batches): one batch-1 [`ModelCache`] per sequence, each at its own position. A padded forward
/// ([`crate::V4Model::forward_padded`]) packs every sequence's real tokens into one row, runs the
/// token-wise parts (projections, mHC, MoE, head) once over all of them and attention per sequence.
#[derive(Debug, Clone)]
pub struct SequenceCaches<B: Backend> {
    pub(crate) rows: Vec<ModelCache<B>>,
}

impl<B: Backend> SequenceCaches<B> {
    /// Empty states for `batch` sequences of a model of `num_layers` layers.
    pub fn new(num_layers: usize, batch: usize) -> Self {
        Self {
            rows: (0..batch).map(|_| ModelCache::new(num_layers)).collect(),
        }
    }

    /// Number of sequences.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Tokens consumed so far by sequence `i`.
    pub fn position(&self, i: usize) -> usize {
        self.rows[i].position
    }

    /// Sequence `i`'s state.
    pub fn row_mut(&mut self, i: usize) -> &mut ModelCache<B> {
        &mut self.rows[i]
    }

    /// Scalars held by all states.
    pub fn num_elements(&self) -> usize {
        self.rows.iter().map(ModelCache::num_elements).sum()
    }
}

/// The part of a forward's `[B, S]` tokens that continues one layer state: columns `cols` of every row,
/// at absolute positions `start..start + cols.len()`. A uniform batch is one segment over all columns;
/// a packed batch (`B = 1`) has one segment per sequence.
pub struct Segment<'a, B: Backend> {
    pub cols: Range<usize>,
    pub start: usize,
    pub cache: &'a mut LayerCache<B>,
}

impl<'a, B: Backend> Segment<'a, B> {
    /// Layer `layer`'s segments of a forward: `cols[i]` continue `caches[i]` at its position.
    pub(crate) fn of_layer(
        caches: &'a mut [&mut ModelCache<B>],
        cols: &[Range<usize>],
        layer: usize,
    ) -> Vec<Self> {
        caches
            .iter_mut()
            .zip(cols)
            .map(|(cache, cols)| Segment {
                cols: cols.clone(),
                start: cache.position,
                cache: &mut cache.layers[layer],
            })
            .collect()
    }
}
