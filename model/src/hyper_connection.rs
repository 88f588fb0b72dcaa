//! Manifold-constrained hyper-connections (mHC, V4 §2.2).
//!
//! The residual is `c` parallel streams `X: [B, S, c, D]`. Around each sub-block (attention, MoE) a
//! [`HyperConnection`] reads all streams and produces three mixes: `pre` collapses the streams into the
//! sub-block's input, `post` spreads the sub-block's output back over the streams, and `comb`, projected onto
//! the doubly-stochastic matrices by Sinkhorn iterations, mixes the residual streams with each other.
//! [`HcHead`] collapses the streams once more before the final norm.

use crate::config::V4Config;
use crate::loader::Weights;
use crate::norm::rms_normalize;
use crate::weights::{Init, LoadError};
use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, Tensor};

/// One mHC site. `fn^T: [cD, (2+c)c]` (the checkpoint's `fn` transposed), `base: [(2+c)c]`, `scale: [3]`
/// (pre, post, comb).
#[derive(Module, Debug)]
pub struct HyperConnection<B: Backend> {
    pub fn_t: Param<Tensor<B, 2>>,
    pub base: Param<Tensor<B, 1>>,
    pub scale: Param<Tensor<B, 1>>,
    pub hc_mult: usize,
    pub sinkhorn_iters: usize,
    pub hc_eps: f64,
    pub norm_eps: f64,
}

impl<B: Backend> HyperConnection<B> {
    /// Loads the site's `fn [(2+c)c, cD]`, `base` and `scale` under `w` (`attn_hc` or `ffn_hc`).
    pub fn load(cfg: &V4Config, w: &Weights<'_, '_, B>) -> Result<Self, LoadError> {
        let (c, d) = (cfg.hc_mult, cfg.hidden_size);
        let n = (2 + c) * c;
        Ok(Self {
            fn_t: w.transposed("fn", [n, c * d], Init::FanIn)?,
            base: w.plain("base", [n], Init::Small)?,
            scale: w.plain("scale", [3], Init::Scale)?,
            hc_mult: c,
            sinkhorn_iters: cfg.hc_sinkhorn_iters,
            hc_eps: cfg.hc_eps,
            norm_eps: cfg.rms_norm_eps,
        })
    }
}

/// The `post` and `comb` mixes of a site, kept between the sub-block's input and output.
#[derive(Debug, Clone)]
pub struct StreamMix<B: Backend> {
    /// `[B, S, c, 1]`: weight of the sub-block's output in each stream.
    post: Tensor<B, 4>,
    /// `[B, S, c(out k), c(in j)]`: the TRANSPOSED comb, so that `X'_k = sum_j comb[j, k] X_j` is one matmul.
    comb_t: Tensor<B, 4>,
}

/// Splits the projection `mu: [B, S, n]` at channel `start` for `len`, and applies `scale[which]` and `base`.
fn affine<B: Backend>(
    mu: &Tensor<B, 3>,
    scale: &Tensor<B, 1>,
    base: &Tensor<B, 1>,
    which: usize,
    start: usize,
    len: usize,
) -> Tensor<B, 3> {
    let s = scale.clone().narrow(0, which, 1).reshape([1, 1, 1]);
    let b = base.clone().narrow(0, start, len).reshape([1, 1, len]);
    mu.clone().narrow(2, start, len) * s + b
}

/// `mu = unweighted_rmsnorm(flatten(X)) @ fn^T`: `[B, S, c, D] -> [B, S, n]`.
fn project<B: Backend>(x: &Tensor<B, 4>, fn_t: Tensor<B, 2>, eps: f64) -> Tensor<B, 3> {
    let [b, s, c, d] = x.dims();
    let flat = rms_normalize(x.clone().reshape([b * s, c * d]), eps);
    let n = fn_t.dims()[1];
    flat.matmul(fn_t).reshape([b, s, n])
}

/// `sum_j pre_j X_j`: `[B, S, c]`, `[B, S, c, D] -> [B, S, D]`.
fn collapse<B: Backend>(pre: Tensor<B, 3>, x: Tensor<B, 4>) -> Tensor<B, 3> {
    let [b, s, c, d] = x.dims();
    // [B*S, 1, c] @ [B*S, c, D]: one small matmul per token beats a broadcast product and a reduction.
    pre.reshape([b * s, 1, c])
        .matmul(x.reshape([b * s, c, d]))
        .reshape([b, s, d])
}

impl<B: Backend> HyperConnection<B> {
    /// Computes the site's mixes from the streams and returns the sub-block input `[B, S, D]`.
    pub fn pre(&self, x: &Tensor<B, 4>) -> (Tensor<B, 3>, StreamMix<B>) {
        let [b, s, c, _] = x.dims();
        let mu = project(x, self.fn_t.val(), self.norm_eps);
        let scale = self.scale.val();
        let base = self.base.val();
        let pre = activation::sigmoid(affine(&mu, &scale, &base, 0, 0, c)).add_scalar(self.hc_eps);
        let post = activation::sigmoid(affine(&mu, &scale, &base, 1, c, c)).mul_scalar(2.0);
        let logits = affine(&mu, &scale, &base, 2, 2 * c, c * c).reshape([b, s, c, c]);

        // Sinkhorn-Knopp: softmax over k, then columns, then (iters - 1) x (rows, columns).
        let eps = self.hc_eps;
        let mut comb = activation::softmax(logits, 3).add_scalar(eps);
        comb = comb.clone() / comb.sum_dim(2).add_scalar(eps);
        for _ in 1..self.sinkhorn_iters {
            comb = comb.clone() / comb.sum_dim(3).add_scalar(eps);
            comb = comb.clone() / comb.sum_dim(2).add_scalar(eps);
        }
        let input = collapse(pre, x.clone());
        let mix = StreamMix {
            post: post.reshape([b, s, c, 1]),
            comb_t: comb.swap_dims(2, 3),
        };
        (input, mix)
    }
}

impl<B: Backend> StreamMix<B> {
    /// `X'_k = post_k * f + sum_j comb[j, k] X_j` for the sub-block output `f: [B, S, D]`.
    pub fn post(self, f: Tensor<B, 3>, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, s, d] = f.dims();
        let spread = self.post * f.reshape([b, s, 1, d]);
        spread + self.comb_t.matmul(x)
    }
}

/// The final collapse of the streams: `y = sum_j (sigmoid(mu_j * scale + base_j) + eps) X_j`.
/// `fn^T: [cD, c]`, `base: [c]`, `scale: [1]`.
#[derive(Module, Debug)]
pub struct HcHead<B: Backend> {
    pub fn_t: Param<Tensor<B, 2>>,
    pub base: Param<Tensor<B, 1>>,
    pub scale: Param<Tensor<B, 1>>,
    pub hc_eps: f64,
    pub norm_eps: f64,
}

impl<B: Backend> HcHead<B> {
    /// Loads `hc_fn [c, cD]`, `hc_base` and `hc_scale` under `w`.
    pub fn load(cfg: &V4Config, w: &Weights<'_, '_, B>) -> Result<Self, LoadError> {
        let (c, d) = (cfg.hc_mult, cfg.hidden_size);
        Ok(Self {
            fn_t: w.transposed("hc_fn", [c, c * d], Init::FanIn)?,
            base: w.plain("hc_base", [c], Init::Small)?,
            scale: w.plain("hc_scale", [1], Init::Scale)?,
            hc_eps: cfg.hc_eps,
            norm_eps: cfg.rms_norm_eps,
        })
    }

    /// `[B, S, c, D] -> [B, S, D]`.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        let c = x.dims()[2];
        let mu = project(&x, self.fn_t.val(), self.norm_eps);
        let pre = mu * self.scale.val().reshape([1, 1, 1]) + self.base.val().reshape([1, 1, c]);
        collapse(activation::sigmoid(pre).add_scalar(self.hc_eps), x)
    }
}
