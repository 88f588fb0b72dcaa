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
use burn::tensor::{activation, backend::Backend, Tensor, TensorData};

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
        let mu = project(x, self.fn_t.val(), self.norm_eps);
        let (pre, mix) = if B::ad_enabled(&mu.device()) {
            self.mixes(mu)
        } else {
            self.mixes_on_host(mu)
        };
        (collapse(pre, x.clone()), mix)
    }

    /// `pre: [B, S, c]` and the [`StreamMix`] from the projection `mu: [B, S, (2+c)c]`, as tensor ops
    /// (differentiable).
    fn mixes(&self, mu: Tensor<B, 3>) -> (Tensor<B, 3>, StreamMix<B>) {
        let [b, s, _] = mu.dims();
        let c = self.hc_mult;
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
        let mix = StreamMix {
            post: post.reshape([b, s, c, 1]),
            comb_t: comb.swap_dims(2, 3),
        };
        (pre, mix)
    }

    /// [`Self::mixes`] computed on the host, for passes without gradients. Its tensor form is ~125
    /// ops on `[B, S, 4, 4]` per site (`2 * iters` normalisations), each costing far more than its 16
    /// numbers per token: at decode of a small model they were half of a verification forward.
    fn mixes_on_host(&self, mu: Tensor<B, 3>) -> (Tensor<B, 3>, StreamMix<B>) {
        let [b, s, _] = mu.dims();
        let (c, device) = (self.hc_mult, mu.device());
        let host = |t: Tensor<B, 1>| {
            t.into_data()
                .convert::<f32>()
                .to_vec::<f32>()
                .expect("f32 after convert")
        };
        let scale = host(self.scale.val());
        let base = host(self.base.val());
        let mu = host(mu.reshape([b * s * (2 + c) * c]));
        let site = Site {
            c,
            scale: [scale[0], scale[1], scale[2]],
            base: &base,
            iters: self.sinkhorn_iters,
            eps: self.hc_eps as f32,
        };
        let (pre, post, comb_t) = site.mixes(&mu);
        let tensor =
            |v: Vec<f32>, shape: [usize; 4]| Tensor::<B, 4>::from_data(TensorData::new(v, shape), &device);
        let mix = StreamMix {
            post: tensor(post, [b, s, c, 1]),
            comb_t: tensor(comb_t, [b, s, c, c]),
        };
        (tensor(pre, [b, s, c, 1]).reshape([b, s, c]), mix)
    }
}

/// One site's parameters on the host, for [`HyperConnection::mixes_on_host`].
struct Site<'a> {
    c: usize,
    scale: [f32; 3],
    /// `[(2+c)c]`
    base: &'a [f32],
    iters: usize,
    eps: f32,
}

impl Site<'_> {
    /// `(pre [T, c], post [T, c], comb_t [T, c, c])` from `mu: [T, (2+c)c]`, by the same f32 steps as the
    /// tensor form: sigmoids, a softmax over each row of the logits, then Sinkhorn's alternating
    /// column and row normalisations.
    fn mixes(&self, mu: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let c = self.c;
        let n = (2 + c) * c;
        let tokens = mu.len() / n;
        let (mut pre, mut post, mut comb_t) = (
            Vec::with_capacity(tokens * c),
            Vec::with_capacity(tokens * c),
            Vec::with_capacity(tokens * c * c),
        );
        let sigmoid = |v: f32| 1.0 / (1.0 + (-v).exp());
        for m in mu.chunks_exact(n) {
            let at = |which: usize, i: usize| m[i] * self.scale[which] + self.base[i];
            pre.extend((0..c).map(|j| sigmoid(at(0, j)) + self.eps));
            post.extend((c..2 * c).map(|j| 2.0 * sigmoid(at(1, j))));
            let mut comb: Vec<f32> = (2 * c..n).map(|i| at(2, i)).collect();
            for row in comb.chunks_exact_mut(c) {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                row.iter_mut().for_each(|v| *v = (*v - max).exp());
                let sum: f32 = row.iter().sum();
                row.iter_mut().for_each(|v| *v = *v / sum + self.eps);
            }
            self.normalize_columns(&mut comb);
            for _ in 1..self.iters {
                for row in comb.chunks_exact_mut(c) {
                    let sum = row.iter().sum::<f32>() + self.eps;
                    row.iter_mut().for_each(|v| *v /= sum);
                }
                self.normalize_columns(&mut comb);
            }
            comb_t.extend((0..c * c).map(|i| comb[(i % c) * c + i / c]));
        }
        (pre, post, comb_t)
    }

    /// Divides each column of the row-major `c x c` matrix by its sum plus `eps`.
    fn normalize_columns(&self, comb: &mut [f32]) {
        let c = self.c;
        for k in 0..c {
            let sum = (0..c).map(|j| comb[j * c + k]).sum::<f32>() + self.eps;
            (0..c).for_each(|j| comb[j * c + k] /= sum);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn_ndarray::NdArray;

    /// The host mixes equal the tensor ops' (the differentiable form training uses) on random
    /// projections, site parameters and a batch of several tokens.
    #[test]
    fn host_mixes_equal_the_tensor_ops() {
        type B = NdArray<f32>;
        let device = Default::default();
        let c = 4;
        let n = (2 + c) * c;
        let site = HyperConnection::<B> {
            fn_t: Param::from_tensor(Tensor::zeros([c * 8, n], &device)),
            base: Param::from_tensor(Tensor::random([n], Distribution::Normal(0.0, 0.5), &device)),
            scale: Param::from_tensor(Tensor::random([3], Distribution::Uniform(0.5, 2.0), &device)),
            hc_mult: c,
            sinkhorn_iters: 20,
            hc_eps: 1e-6,
            norm_eps: 1e-6,
        };
        let mu = Tensor::<B, 3>::random([2, 3, n], Distribution::Normal(0.0, 2.0), &device);
        let (want_pre, want) = site.mixes(mu.clone());
        let (got_pre, got) = site.mixes_on_host(mu);
        for (got, want) in [
            (got_pre.reshape([-1]), want_pre.reshape([-1])),
            (got.post.reshape([-1]), want.post.reshape([-1])),
            (got.comb_t.clone().reshape([-1]), want.comb_t.reshape([-1])),
        ] {
            let (got, want) = (
                got.to_data().to_vec::<f32>().unwrap(),
                want.to_data().to_vec::<f32>().unwrap(),
            );
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() <= 5e-7 * w.abs().max(1.0), "{g} vs {w}");
            }
        }
        // Doubly stochastic up to Sinkhorn's convergence: the rows of comb_t (comb's columns) sum to 1.
        let comb_t = got.comb_t.to_data().to_vec::<f32>().unwrap();
        for row in comb_t.chunks_exact(c) {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
    }
}
