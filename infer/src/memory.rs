//! What the decoding state costs, computed from a config alone (it mirrors `v4_model::cache`, and a test
//! checks it against `ModelCache::num_elements`).
//!
//! Per layer, after `n` tokens (batch 1):
//! - the sliding window: the last `min(n, W - 1)` K=V vectors of `head_dim`;
//! - a compressor of rate `m` and width `w` (`head_dim` for the attention's, `index_head_dim` for CSA's
//!   indexer): `floor(n / m)` entries of `w`, plus the incomplete window's projected values and gate scores
//!   (`n mod m` tokens x `coff * w` x 2, `coff` = 2 with overlap), plus, with overlap (CSA), the previous
//!   window's first halves (`m x w` x 2).
//!
//! So the state is bounded by `W + n/m` entries per layer: per token it grows by `(head_dim + di) / m`
//! scalars on CSA layers and `head_dim / m` on HCA layers, nothing on sliding-only layers.

use v4_model::{AttentionKind, V4Config};

/// Scalars held by the decoding state, by kind (batch 1).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheFootprint {
    /// Sliding-window K=V vectors.
    pub window: usize,
    /// Compressed attention entries (CSA and HCA).
    pub entries: usize,
    /// The indexer's compressed keys (CSA).
    pub index_keys: usize,
    /// Incomplete windows and overlap halves of all compressors.
    pub pending: usize,
}

impl CacheFootprint {
    pub fn total(&self) -> usize {
        self.window + self.entries + self.index_keys + self.pending
    }
}

/// (entries, pending) scalars of one compressor after `n` tokens.
fn compressor(n: usize, rate: usize, width: usize, overlap: bool) -> (usize, usize) {
    let coff = if overlap { 2 } else { 1 };
    let pending = (n % rate) * coff * width * 2;
    let previous = if overlap && n >= rate { rate * width * 2 } else { 0 };
    ((n / rate) * width, pending + previous)
}

/// The state of a model of `config` after `tokens` tokens.
pub fn cache_footprint(config: &V4Config, tokens: usize) -> CacheFootprint {
    let mut f = CacheFootprint::default();
    let hd = config.head_dim;
    for &kind in &config.attention {
        f.window += tokens.min(config.sliding_window.saturating_sub(1)) * hd;
        match kind {
            AttentionKind::Sliding => {}
            AttentionKind::Hca { rate } => {
                let (e, p) = compressor(tokens, rate, hd, false);
                f.entries += e;
                f.pending += p;
            }
            AttentionKind::Csa { rate } => {
                let (e, p) = compressor(tokens, rate, hd, true);
                f.entries += e;
                f.pending += p;
                let (k, p) = compressor(tokens, rate, config.index_head_dim, true);
                f.index_keys += k;
                f.pending += p;
            }
        }
    }
    f
}

/// Scalars the state grows by per token, in the limit of long contexts.
pub fn scalars_per_token(config: &V4Config) -> f64 {
    config
        .attention
        .iter()
        .map(|&kind| match kind {
            AttentionKind::Sliding => 0.0,
            AttentionKind::Hca { rate } => config.head_dim as f64 / rate as f64,
            AttentionKind::Csa { rate } => (config.head_dim + config.index_head_dim) as f64 / rate as f64,
        })
        .sum()
}

/// A human-readable byte count.
pub fn human_bytes(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = bytes;
    let mut unit = 0;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{x:.0} {}", UNITS[unit])
    } else {
        format!("{x:.2} {}", UNITS[unit])
    }
}
