//! Partial, interleaved rotary position embedding (RoPE), with YaRN on the compressed layers.
//!
//! V4 rotates only the LAST `r` channels of a vector, in interleaved pairs `(2i, 2i+1)` by the angle
//! `t * f_i`, `f_i = base^(-2i/r)`. Sliding-only layers use `rope_theta` without scaling; compressed layers
//! (their attention, compressor and indexer) use `compress_rope_theta` with YaRN. The attention output is
//! rotated back by `-t * f_i` at the query position ("inverse RoPE"), because V doubles as K and carries the
//! key's rotation.

use crate::config::{AttentionKind, V4Config, Yarn};
use burn::tensor::{backend::Backend, Tensor, TensorData};

/// Per-pair frequencies of one RoPE flavour.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `f_i` for each of the `r/2` channel pairs.
    inv_freq: Vec<f64>,
    /// Multiplier on cos/sin (YaRN's attention factor; 1.0 in V4).
    scale: f64,
}

impl Rope {
    /// The RoPE of a layer of the given kind.
    pub fn for_layer(config: &V4Config, kind: AttentionKind) -> Self {
        match kind {
            AttentionKind::Sliding => Self::new(config.rope_head_dim, config.rope_theta, None),
            _ => Self::new(config.rope_head_dim, config.compress_rope_theta, config.yarn),
        }
    }

    /// Frequencies for a rope dim `r` and `base`, optionally YaRN-scaled.
    pub fn new(rope_dim: usize, base: f64, yarn: Option<Yarn>) -> Self {
        let half = rope_dim / 2;
        let r = rope_dim as f64;
        let mut inv_freq: Vec<f64> = (0..half).map(|i| 1.0 / base.powf(2.0 * i as f64 / r)).collect();
        let mut scale = 1.0;
        if let Some(y) = yarn {
            // The pair index at which the wavelength completes `n` turns over the original context.
            let correction = |turns: f64| {
                r * (y.original_max_position as f64 / (turns * 2.0 * std::f64::consts::PI)).ln()
                    / (2.0 * base.ln())
            };
            let low = correction(y.beta_fast).floor().max(0.0);
            let mut high = correction(y.beta_slow).ceil().min(r - 1.0);
            if low == high {
                high += 0.001;
            }
            for (i, f) in inv_freq.iter_mut().enumerate() {
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                *f = *f / y.factor * ramp + *f * (1.0 - ramp);
            }
            scale = y.attention_factor;
        }
        Rope { inv_freq, scale }
    }

    /// Number of rotated channels `r`.
    pub fn dim(&self) -> usize {
        2 * self.inv_freq.len()
    }

    /// Cos and sin tables for the given absolute positions: two `[1, P, 1, r/2, 1]` tensors, shaped to
    /// broadcast over a `[B, P, H, r/2, 2]` view of the rope channels.
    pub fn tables<B: Backend>(&self, positions: &[usize], device: &B::Device) -> RopeTables<B> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &t in positions {
            for &f in &self.inv_freq {
                let angle = t as f64 * f;
                cos.push((angle.cos() * self.scale) as f32);
                sin.push((angle.sin() * self.scale) as f32);
            }
        }
        let shape = [1, positions.len(), 1, half, 1];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }
}

/// Cos/sin for a run of positions (see [`Rope::tables`]).
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    cos: Tensor<B, 5>,
    sin: Tensor<B, 5>,
}

impl<B: Backend> RopeTables<B> {
    /// Rotates the last `r` channels of `x` `[B, P, H, dh]` by `+angle` (or `-angle` when `inverse`).
    pub fn apply(&self, x: Tensor<B, 4>, inverse: bool) -> Tensor<B, 4> {
        let [b, p, h, dh] = x.dims();
        let half = self.cos.dims()[3];
        let r = 2 * half;
        let nope = x.clone().narrow(3, 0, dh - r);
        let pairs = x.narrow(3, dh - r, r).reshape([b, p, h, half, 2]);
        let even = pairs.clone().narrow(4, 0, 1);
        let odd = pairs.narrow(4, 1, 1);
        let sin = if inverse {
            self.sin.clone().neg()
        } else {
            self.sin.clone()
        };
        let rot_even = even.clone() * self.cos.clone() - odd.clone() * sin.clone();
        let rot_odd = even * sin + odd * self.cos.clone();
        let rotated = Tensor::cat(vec![rot_even, rot_odd], 4).reshape([b, p, h, r]);
        if dh == r {
            rotated
        } else {
            Tensor::cat(vec![nope, rotated], 3)
        }
    }

    /// [`apply`](Self::apply) for a single-head `[B, P, dh]` tensor.
    pub fn apply3(&self, x: Tensor<B, 3>, inverse: bool) -> Tensor<B, 3> {
        let [b, p, dh] = x.dims();
        self.apply(x.reshape([b, p, 1, dh]), inverse).reshape([b, p, dh])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yarn_leaves_high_frequencies_and_divides_low_ones() {
        let y = Yarn {
            factor: 4.0,
            original_max_position: 32,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.0,
        };
        let plain = Rope::new(32, 160000.0, None);
        let scaled = Rope::new(32, 160000.0, Some(y));
        // Pair 0 turns many times over 32 positions: extrapolated (unchanged).
        assert_eq!(plain.inv_freq[0], scaled.inv_freq[0]);
        // The last pair is far below one turn: interpolated (divided by the factor).
        let last = plain.inv_freq.len() - 1;
        assert!((scaled.inv_freq[last] * 4.0 - plain.inv_freq[last]).abs() < 1e-15);
    }
}
