//! RMSNorm, the bias-free linear layer every projection of V4 uses, and the token embedding.

use crate::loader::{PackedWeight, Weights};
use crate::weights::{Init, LoadError};
use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use v4_formats::PackedMatrix;

/// `x / sqrt(mean(x^2) + eps)` over the last dimension, without a weight ("unweighted RMSNorm").
pub fn rms_normalize<B: Backend, const D: usize>(x: Tensor<B, D>, eps: f64) -> Tensor<B, D> {
    // A division, not `recip()`: burn-ndarray's SIMD reciprocal is an approximation (~1e-4 relative).
    let rms = x.clone().square().mean_dim(D - 1).add_scalar(eps).sqrt();
    x / rms
}

/// RMSNorm with a learned per-channel weight: `w * x / sqrt(mean(x^2) + eps)`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// `[dim]`
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
}

impl<B: Backend> RmsNorm<B> {
    /// Normalizes `[..., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dim = self.weight.dims()[0];
        let mut shape = [1; D];
        shape[D - 1] = dim;
        rms_normalize(x, self.eps) * self.weight.val().reshape(shape)
    }
}

/// `y = x W^T` for a checkpoint weight `W: [out, in]`. As an f32 tensor it is kept TRANSPOSED (`[in, out]`,
/// contiguous) so that every call multiplies by a contiguous matrix instead of copying a transposed view;
/// in its checkpoint precision it stays `[out, in]` on the host ([`PackedWeight`]). Exactly one is set.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `W^T: [in, out]`, trainable.
    pub weight_t: Option<Param<Tensor<B, 2>>>,
    /// `W: [out, in]` in its stored precision (never trained).
    pub packed: Option<PackedWeight>,
}

impl<B: Backend> Linear<B> {
    /// Loads `name.weight` (`[out, in]`): in its stored precision when the load keeps it, else as f32.
    pub fn load(w: &Weights<'_, '_, B>, name: &str, out: usize, input: usize) -> Result<Self, LoadError> {
        let name = format!("{name}.weight");
        if let Some(mut packed) = w.packed(&name, &[out, input])? {
            return Ok(Self {
                weight_t: None,
                packed: packed.pop(),
            });
        }
        Ok(Self {
            weight_t: Some(w.transposed(&name, [out, input], Init::FanIn)?),
            packed: None,
        })
    }

    /// `[in, out]`.
    fn dims(&self) -> [usize; 2] {
        match (&self.weight_t, &self.packed) {
            (Some(w), _) => w.dims(),
            (None, Some(p)) => [p.matrix.cols, p.matrix.rows],
            (None, None) => unreachable!("a Linear holds a weight"),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.dims()[1]
    }

    /// `[..., in] -> [..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let [input, out] = self.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let x = x.reshape([rows, input]);
        let y = match (&self.weight_t, &self.packed) {
            (Some(w), _) => x.matmul(w.val()),
            (None, Some(p)) => p.forward(x),
            (None, None) => unreachable!("a Linear holds a weight"),
        };
        let mut out_dims = dims;
        out_dims[D - 1] = out;
        y.reshape(out_dims)
    }
}

/// A grouped projection (V4's low-rank output projection `wo_a`): `g` independent linear maps, group
/// `j` taking input slice `j` (`[.., in]`) to `out` features. The checkpoint stacks them as
/// `[g * out, in]`. As f32 they are kept transposed per group, `[g, in, out]` (trainable); in their
/// stored precision, as one row band per group. Exactly one is set.
#[derive(Module, Debug)]
pub struct GroupedLinear<B: Backend> {
    /// `[g, in, out]`, trainable.
    pub weight_t: Option<Param<Tensor<B, 3>>>,
    /// Per group, `[out, in]` in its stored precision.
    pub packed: Option<Vec<PackedWeight>>,
}

impl<B: Backend> GroupedLinear<B> {
    /// Loads `name.weight` (`[groups * out, in]`). In its stored precision when the load keeps it and
    /// the groups fall on whole scale tiles; else as f32.
    pub fn load(
        w: &Weights<'_, '_, B>,
        name: &str,
        groups: usize,
        out: usize,
        input: usize,
    ) -> Result<Self, LoadError> {
        let name = format!("{name}.weight");
        if let Some(bands) = w.packed_bands(&name, [groups * out, input], groups)? {
            return Ok(Self {
                weight_t: None,
                packed: Some(bands),
            });
        }
        Ok(Self {
            weight_t: Some(w.blocks_transposed(&name, [groups, out, input], true, Init::FanIn)?),
            packed: None,
        })
    }

    /// Number of groups.
    pub fn groups(&self) -> usize {
        match (&self.weight_t, &self.packed) {
            (Some(w), _) => w.dims()[0],
            (None, Some(bands)) => bands.len(),
            (None, None) => unreachable!("a GroupedLinear holds a weight"),
        }
    }

    /// `[n, g, in] -> [n, g * out]`.
    pub fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 2> {
        let [n, g, input] = x.dims();
        match (&self.weight_t, &self.packed) {
            (Some(w), _) => {
                let out = w.dims()[2];
                x.swap_dims(0, 1)
                    .matmul(w.val())
                    .swap_dims(0, 1)
                    .reshape([n, g * out])
            }
            (None, Some(bands)) => {
                let per_group = bands
                    .iter()
                    .enumerate()
                    .map(|(j, band)| band.forward(x.clone().narrow(1, j, 1).reshape([n, input])))
                    .collect();
                Tensor::cat(per_group, 1)
            }
            (None, None) => unreachable!("a GroupedLinear holds a weight"),
        }
    }
}

impl PackedWeight {
    /// `x: [n, in] -> x W^T: [n, out]`: on the stored bytes by the host kernel, or (without one, or
    /// when gradients must flow to `x`) through `W` dequantised for this call only.
    pub fn forward<B: Backend>(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let [n, _] = x.dims();
        Self::forward_grouped(&[(n, self)], x)
    }

    /// `x: [R, in]` in consecutive groups of rows, group `g` (`n_g` rows) times its own weight:
    /// `[R, out]` (routed experts' rows, grouped by expert; one group for [`PackedWeight::forward`]).
    /// The host kernel runs every group in one call; otherwise each group multiplies its weight
    /// dequantised. Every weight has the same shape.
    pub fn forward_grouped<B: Backend>(groups: &[(usize, &PackedWeight)], x: Tensor<B, 2>) -> Tensor<B, 2> {
        let device = x.device();
        let [r, _] = x.dims();
        let kernel = groups.first().and_then(|(_, w)| w.kernel.as_ref());
        match kernel {
            Some(kernel)
                if !B::ad_enabled(&device) && groups.iter().all(|(_, w)| kernel.supports(&w.matrix)) =>
            {
                let x = x.into_data().convert::<f32>();
                let x = x.as_slice::<f32>().expect("f32 after convert");
                let rows = groups[0].1.matrix.rows;
                let matrices: Vec<(usize, &PackedMatrix)> =
                    groups.iter().map(|&(n, w)| (n, &*w.matrix)).collect();
                let mut y = vec![0f32; r * rows];
                kernel.matmul_t_grouped(x, &matrices, &mut y);
                Tensor::from_data(TensorData::new(y, [r, rows]), &device)
            }
            _ if groups.len() == 1 => groups[0].1.dequantized_forward(x),
            _ => {
                let mut start = 0;
                let outputs = groups
                    .iter()
                    .map(|&(n, w)| {
                        start += n;
                        w.dequantized_forward(x.clone().narrow(0, start - n, n))
                    })
                    .collect();
                Tensor::cat(outputs, 0)
            }
        }
    }

    /// `x W^T` through `W` dequantised to f32 for this call only (gradients flow to `x`).
    fn dequantized_forward<B: Backend>(&self, x: Tensor<B, 2>) -> Tensor<B, 2> {
        let m = &self.matrix;
        let w = Tensor::<B, 2>::from_data(TensorData::new(m.to_f32(), [m.rows, m.cols]), &x.device());
        x.matmul(w.transpose())
    }
}

/// The token embedding `[vocab, D]`: an f32 tensor (trainable), or rows decoded from the stored
/// precision as tokens need them. Exactly one is set.
#[derive(Module, Debug)]
pub struct Embedding<B: Backend> {
    pub weight: Option<Param<Tensor<B, 2>>>,
    pub packed: Option<PackedWeight>,
}

impl<B: Backend> Embedding<B> {
    /// Loads `name.weight` (`[vocab, dim]`).
    pub fn load(w: &Weights<'_, '_, B>, name: &str, vocab: usize, dim: usize) -> Result<Self, LoadError> {
        let name = format!("{name}.weight");
        if let Some(mut packed) = w.packed(&name, &[vocab, dim])? {
            return Ok(Self {
                weight: None,
                packed: packed.pop(),
            });
        }
        Ok(Self {
            weight: Some(w.plain(&name, [vocab, dim], Init::FanIn)?),
            packed: None,
        })
    }

    /// Bytes the table occupies as held (stored precision, or f32).
    pub fn held_bytes(&self) -> usize {
        match (&self.weight, &self.packed) {
            (Some(w), _) => 4 * w.dims().iter().product::<usize>(),
            (None, Some(p)) => p.matrix.stored_bytes(),
            (None, None) => 0,
        }
    }

    /// The rows of `ids`: `[ids.len(), D]`.
    pub fn forward(&self, ids: &[u32], device: &B::Device) -> Tensor<B, 2> {
        match (&self.weight, &self.packed) {
            (Some(w), _) => {
                let ids = ids.iter().map(|&t| t as i64).collect::<Vec<_>>();
                let len = ids.len();
                w.val().select(
                    0,
                    Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [len]), device),
                )
            }
            (None, Some(p)) => {
                let d = p.matrix.cols;
                let mut rows = vec![0f32; ids.len() * d];
                for (row, &id) in rows.chunks_exact_mut(d).zip(ids) {
                    p.matrix.decode_rows(id as usize..id as usize + 1, row);
                }
                Tensor::from_data(TensorData::new(rows, [ids.len(), d]), device)
            }
            (None, None) => unreachable!("an Embedding holds a weight"),
        }
    }
}
