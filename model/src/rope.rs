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

    /// Rotation tables for the given absolute positions and vectors of width `width` (the rope channels
    /// are the last `r` of them).
    pub fn tables<B: Backend>(&self, positions: &[usize], width: usize, device: &B::Device) -> RopeTables<B> {
        let r = self.dim();
        let nope = width - r;
        // Full-width tables: nope channels keep cos 1 / sin 0, rope pairs repeat their angle.
        let mut cos = Vec::with_capacity(positions.len() * width);
        let mut sin = Vec::with_capacity(positions.len() * width);
        for &t in positions {
            cos.extend(std::iter::repeat_n(1.0f32, nope));
            sin.extend(std::iter::repeat_n(0.0f32, nope));
            for &f in &self.inv_freq {
                let angle = t as f64 * f;
                let (c, s) = (
                    (angle.cos() * self.scale) as f32,
                    (angle.sin() * self.scale) as f32,
                );
                cos.extend([c, c]);
                sin.extend([s, s]);
            }
        }
        // `x @ swap` maps each rope pair (x0, x1) to (-x1, x0), and nope channels to 0.
        let mut swap = vec![0.0f32; width * width];
        for i in (nope..width).step_by(2) {
            swap[(i + 1) * width + i] = -1.0;
            swap[i * width + i + 1] = 1.0;
        }
        let shape = [1, positions.len(), 1, width];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            swap: Tensor::from_data(TensorData::new(swap, [width, width]), device),
        }
    }
}

/// Cos/sin for a run of positions (see [`Rope::tables`]): the rotation is
/// `x * cos + (x @ swap) * sin`, one small matmul and three elementwise ops, with no slicing.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `[1, P, 1, width]`
    cos: Tensor<B, 4>,
    /// `[1, P, 1, width]`
    sin: Tensor<B, 4>,
    /// `[width, width]`
    swap: Tensor<B, 2>,
}

impl<B: Backend> RopeTables<B> {
    /// Rotates the last `r` channels of `x` `[B, P, H, width]` by `+angle` (or `-angle` when `inverse`).
    pub fn apply(&self, x: Tensor<B, 4>, inverse: bool) -> Tensor<B, 4> {
        let [b, p, h, width] = x.dims();
        let swapped = x
            .clone()
            .reshape([b * p * h, width])
            .matmul(self.swap.clone())
            .reshape([b, p, h, width]);
        let turned = swapped * self.sin.clone();
        let kept = x * self.cos.clone();
        if inverse {
            kept - turned
        } else {
            kept + turned
        }
    }

    /// [`apply`](Self::apply) for a single-head `[B, P, width]` tensor.
    pub fn apply3(&self, x: Tensor<B, 3>, inverse: bool) -> Tensor<B, 3> {
        let [b, p, width] = x.dims();
        self.apply(x.reshape([b, p, 1, width]), inverse)
            .reshape([b, p, width])
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
