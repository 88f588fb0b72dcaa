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
        assert!(r <= width, "rope dim {r} exceeds the vector width {width}");
        // Rope pairs repeat their angle.
        let mut cos = Vec::with_capacity(positions.len() * r);
        let mut sin = Vec::with_capacity(positions.len() * r);
        for &t in positions {
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
        // `x @ swap` maps each rope pair (x0, x1) to (-x1, x0).
        let mut swap = vec![0.0f32; r * r];
        for i in (0..r).step_by(2) {
            swap[(i + 1) * r + i] = -1.0;
            swap[i * r + i + 1] = 1.0;
        }
        let shape = [1, positions.len(), 1, r];
        RopeTables {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
            swap: Tensor::from_data(TensorData::new(swap, [r, r]), device),
        }
    }
}

/// Cos/sin for a run of positions (see [`Rope::tables`]): the rope channels `x_r` (the last `r`) become
/// `x_r * cos + (x_r @ swap) * sin`, one small matmul and three elementwise ops; the others are kept.
#[derive(Debug, Clone)]
pub struct RopeTables<B: Backend> {
    /// `[1, P, 1, r]`
    cos: Tensor<B, 4>,
    /// `[1, P, 1, r]`
    sin: Tensor<B, 4>,
    /// `[r, r]`
    swap: Tensor<B, 2>,
}

impl<B: Backend> RopeTables<B> {
    /// Rotates the last `r` channels of `x` `[B, P, H, width]` by `+angle` (or `-angle` when `inverse`).
    pub fn apply(&self, x: Tensor<B, 4>, inverse: bool) -> Tensor<B, 4> {
        let [b, p, h, width] = x.dims();
        let r = self.swap.dims()[0];
        let nope = width - r;
        let rope = x.clone().narrow(3, nope, r);
        let swapped = rope
            .clone()
            .reshape([b * p * h, r])
            .matmul(self.swap.clone())
            .reshape([b, p, h, r]);
        let turned = swapped * self.sin.clone();
        let kept = rope * self.cos.clone();
        let rotated = if inverse { kept - turned } else { kept + turned };
        if nope == 0 {
            return rotated;
        }
        Tensor::cat(vec![x.narrow(3, 0, nope), rotated], 3)
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

    /// Each rope pair `(x0, x1)` becomes `(x0 c - x1 s, x0 s + x1 c)` (and back with `-angle`), computed
    /// here in f64 from the angle; the other channels are kept bit for bit.
    #[test]
    fn tables_rotate_the_last_pairs_and_keep_the_rest() {
        type B = burn_ndarray::NdArray<f32>;
        let rope = Rope::new(4, 10000.0, None);
        let (positions, heads, width) = ([3usize, 70], 2, 10);
        let x: Vec<f32> = (0..2 * heads * width).map(|i| (i as f32 * 0.37).sin()).collect();
        let tables = rope.tables::<B>(&positions, width, &Default::default());
        let input = || {
            Tensor::<B, 4>::from_data(
                TensorData::new(x.clone(), [1, 2, heads, width]),
                &Default::default(),
            )
        };
        for inverse in [false, true] {
            let got = tables
                .apply(input(), inverse)
                .into_data()
                .to_vec::<f32>()
                .unwrap();
            assert_eq!(got.len(), x.len());
            for (row, (g, v)) in got.chunks(width).zip(x.chunks(width)).enumerate() {
                let t = positions[row / heads] as f64;
                assert_eq!(g[..width - 4], v[..width - 4], "row {row}: kept channels");
                for (i, pair) in (width - 4..width).step_by(2).enumerate() {
                    let angle = t * rope.inv_freq[i] * if inverse { -1.0 } else { 1.0 };
                    let (c, s) = (angle.cos(), angle.sin());
                    let (x0, x1) = (v[pair] as f64, v[pair + 1] as f64);
                    assert!(
                        (g[pair] as f64 - (x0 * c - x1 * s)).abs() < 3e-7,
                        "row {row} pair {i}"
                    );
                    assert!(
                        (g[pair + 1] as f64 - (x0 * s + x1 * c)).abs() < 3e-7,
                        "row {row} pair {i}"
                    );
                }
            }
        }
    }
}
