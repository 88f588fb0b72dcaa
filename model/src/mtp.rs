//! Multi-token prediction: V4's draft head. One extra block predicts token `t + 2` from the main model's
//! final streams at `t` and the embedding of token `t + 1`, sharing the main model's embedding and LM head
//! (DeepSeek's `MTPBlock`). Training adds its cross-entropy to the main loss; speculative decoding drafts
//! with it.
//!
//! ```text
//! e  = RMSNorm_e(embed[ids_{t+1}])                                  [B, S, D]
//! X' = e_proj(e) broadcast over the c streams + h_proj(RMSNorm_h(X_t))  [B, S, c, D]
//! X' = Block(X')         (its own attention state, positions those of X)
//! logits = head(RMSNorm(HcHead(X')))                                [B, S, vocab]
//! ```

use crate::block::Block;
use crate::cache::Segment;
use crate::config::V4Config;
use crate::hyper_connection::HcHead;
use crate::loader::Weights;
use crate::moe::{ExpertRunner, Routing};
use crate::norm::{Linear, RmsNorm};
use crate::probe::{Probe, Scope};
use crate::weights::LoadError;
use burn::module::Module;
use burn::tensor::{backend::Backend, Tensor};

#[derive(Module, Debug)]
pub struct Mtp<B: Backend> {
    /// Normalises the next token's embedding.
    pub enorm: RmsNorm<B>,
    /// Normalises each of the main model's streams.
    pub hnorm: RmsNorm<B>,
    /// `[D, D]`
    pub e_proj: Linear<B>,
    /// `[D, D]`
    pub h_proj: Linear<B>,
    pub block: Block<B>,
    pub hc_head: HcHead<B>,
    pub norm: RmsNorm<B>,
}

impl<B: Backend> Mtp<B> {
    /// Loads MTP layer `depth` under `w` (`model.mtp.{depth}`).
    pub fn load(cfg: &V4Config, w: &Weights<'_, '_, B>, depth: usize) -> Result<Self, LoadError> {
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(Self {
            enorm: w.norm("enorm", d, eps)?,
            hnorm: w.norm("hnorm", d, eps)?,
            e_proj: Linear::load(w, "e_proj", d, d)?,
            h_proj: Linear::load(w, "h_proj", d, d)?,
            block: Block::load(cfg, w, cfg.num_layers() + depth)?,
            hc_head: HcHead::load(cfg, &w.pp("hc_head"))?,
            norm: w.norm("norm", d, eps)?,
        })
    }

    /// `streams: [B, S, c, D]`, the main model's final streams at positions `t`; `next: [B, S, D]`, the
    /// (unnormalised) embeddings of the tokens `next_ids` at `t + 1`. Returns the MTP block's streams
    /// `[B, S, c, D]` (feed them to [`hidden`](Self::hidden), or back in as `streams` to draft further)
    /// and its routing statistics. `segments` are the MTP block's own attention states, at the positions
    /// of `streams`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        streams: Tensor<B, 4>,
        next: Tensor<B, 3>,
        next_ids: &[u32],
        segments: &mut [Segment<'_, B>],
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
        scope: Scope,
    ) -> (Tensor<B, 4>, Routing<B>) {
        let [b, s, d] = next.dims();
        let e = self
            .e_proj
            .forward(self.enorm.forward(next))
            .reshape([b, s, 1, d]);
        let x = self.h_proj.forward(self.hnorm.forward(streams)) + e;
        self.block.forward(x, next_ids, segments, runner, probe, scope)
    }

    /// The MTP head's collapse of its streams: `[B, S, c, D] -> [B, S, D]`, ready for the shared LM head.
    pub fn hidden(&self, x: Tensor<B, 4>) -> Tensor<B, 3> {
        self.norm.forward(self.hc_head.forward(x))
    }
}
