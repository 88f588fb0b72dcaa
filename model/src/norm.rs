//! RMSNorm and the bias-free linear layer every projection of V4 uses.

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, Tensor};

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
    pub fn new(weight: Tensor<B, 1>, eps: f64) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            eps,
        }
    }

    /// Normalizes `[..., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dim = self.weight.dims()[0];
        let mut shape = [1; D];
        shape[D - 1] = dim;
        rms_normalize(x, self.eps) * self.weight.val().reshape(shape)
    }
}

/// `y = x W^T` for a checkpoint weight `W: [out, in]`, kept TRANSPOSED (`[in, out]`, contiguous) so that
/// every call multiplies by a contiguous matrix instead of copying a transposed view.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// `W^T: [in, out]`
    pub weight_t: Param<Tensor<B, 2>>,
}

impl<B: Backend> Linear<B> {
    /// From `W^T: [in, out]` (contiguous).
    pub fn from_transposed(weight_t: Tensor<B, 2>) -> Self {
        Self {
            weight_t: Param::from_tensor(weight_t),
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        self.weight_t.dims()[1]
    }

    /// `[..., in] -> [..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let dims = x.dims();
        let [input, out] = self.weight_t.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let y = x.reshape([rows, input]).matmul(self.weight_t.val());
        let mut out_dims = dims;
        out_dims[D - 1] = out;
        y.reshape(out_dims)
    }
}
