//! One V4 layer: attention and MoE, each wrapped by an mHC site over the `c` residual streams.
//!
//! ```text
//! x_in, mix = attn_hc.pre(X);  X = mix.post(Attn(RMSNorm(x_in)), X)
//! x_in, mix = ffn_hc.pre(X);   X = mix.post(MoE(RMSNorm(x_in), ids), X)
//! ```

use crate::attention::Attention;
use crate::cache::Segment;
use crate::config::V4Config;
use crate::hyper_connection::HyperConnection;
use crate::loader::Weights;
use crate::moe::{ExpertRunner, Moe, Routing};
use crate::norm::RmsNorm;
use crate::probe::{point, tap_in, Probe, Scope};
use crate::weights::LoadError;
use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    pub attn_hc: HyperConnection<B>,
    pub attn_norm: RmsNorm<B>,
    pub attn: Attention<B>,
    pub ffn_hc: HyperConnection<B>,
    pub ffn_norm: RmsNorm<B>,
    pub ffn: Moe<B>,
    /// Position in the stack: main layers first, then the MTP layers.
    pub index: usize,
}

impl<B: Backend> Block<B> {
    /// Loads block `index` under `w` (`model.layers.{index}`, or `model.mtp.{k}` for index
    /// `num_layers + k`).
    pub fn load(cfg: &V4Config, w: &Weights<'_, '_, B>, index: usize) -> Result<Self, LoadError> {
        let eps = cfg.rms_norm_eps;
        let (attention, routing) = cfg.block_kinds(index);
        Ok(Self {
            attn_hc: HyperConnection::load(cfg, &w.pp("attn_hc"))?,
            attn_norm: w.norm("input_layernorm", cfg.hidden_size, eps)?,
            attn: Attention::load(cfg, &w.pp("self_attn"), attention)?,
            ffn_hc: HyperConnection::load(cfg, &w.pp("ffn_hc"))?,
            ffn_norm: w.norm("post_attention_layernorm", cfg.hidden_size, eps)?,
            ffn: Moe::load(cfg, &w.pp("mlp"), routing)?,
            index,
        })
    }

    /// `X: [B, S, c, D]` for the tokens `ids`; `segments` say which columns continue which layer state
    /// at which positions (see [`Segment`]). Returns the new streams and the layer's routing
    /// statistics. Its probe points are under `scope` (`layers.N`, `mtp.K`).
    pub fn forward(
        &self,
        x: Tensor<B, 4>,
        ids: &[u32],
        segments: &mut [Segment<'_, B>],
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
        scope: Scope,
    ) -> (Tensor<B, 4>, Routing<B>) {
        let (input, mix) = self.attn_hc.pre(&x);
        let input = self.attn_norm.forward(input);
        tap_in(probe, scope, point::ATTN_INPUT, &input);
        let attn = self.attn.forward(input, segments, probe, scope);
        let x = mix.post(attn, x);

        let (input, mix) = self.ffn_hc.pre(&x);
        let input = self.ffn_norm.forward(input);
        tap_in(probe, scope, point::FFN_INPUT, &input);
        let (ffn, routing) = self.ffn.forward(input, ids, self.index, runner, probe, scope);
        (mix.post(ffn, x), routing)
    }
}
