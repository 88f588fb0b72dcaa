//! The DeepSeek-V4 architecture, written once against burn's generic [`Backend`](burn::tensor::backend::Backend).
//!
//! Read it block by block:
//! - [`config`]: the hyper-parameters, from HF's `config.json` or DeepSeek's `inference/config.json`;
//!   [`accounting`]: their parameter and FLOP counts;
//! - [`model`]: embedding, blocks, HC head, norm, LM head; [`block`]: one layer;
//! - [`hyper_connection`]: mHC residual streams with the Sinkhorn projection;
//! - [`attention`]: shared-KV MQA with sliding window, sinks and grouped output projection;
//! - [`compressor`]: CSA / HCA compression of the KV sequence; [`indexer`]: CSA's lightning indexer;
//! - [`mtp`]: the multi-token-prediction layer (training's extra loss, speculative decoding's drafts);
//! - [`moe`]: routed + shared experts; [`rope`]: partial interleaved RoPE with YaRN; [`norm`]: RMSNorm, Linear;
//! - [`cache`]: the incremental decoding state; [`probe`]: named probe points for validation;
//! - [`calibration`]: activation statistics of the experts' inputs for FP4 calibration;
//! - [`weights`]: where weights come from (the `v4-checkpoint` crate opens files as a source); [`loader`]:
//!   how each module loads its own tensors, and where the large matrices live (f32, or their stored precision).
//!
//! Probe points, per layer `N`: `layers.N.input` (streams entering the layer), `layers.N.attn.{q,kv,core,
//! output}`, `layers.N.attn.compressor.entries`, `layers.N.attn.indexer.{scores,topk}`,
//! `layers.N.ffn.router.{scores,indices,weights}`, `layers.N.ffn.output`; then `final.streams`,
//! `final.hidden` and `logits`; the MTP layer's as `mtp.K.*` (its block) and `mtp.K.logits`.

pub mod accounting;
pub mod attention;
pub mod block;
pub mod cache;
pub mod calibration;
pub mod compressor;
pub mod config;
pub mod hyper_connection;
pub mod indexer;
pub mod loader;
pub mod model;
pub mod moe;
pub mod mtp;
pub mod norm;
pub mod probe;
pub mod rope;
pub mod weights;

pub use accounting::ParamCounts;
pub use cache::{ModelCache, SequenceCaches};
pub use calibration::{ExpertActivationStats, ExpertMeanSquares};
pub use config::{AttentionKind, ConfigError, RoutingKind, V4Config};
pub use loader::{ExpertShard, Layout, NamedParam, PackedWeight, Residency};
pub use model::{
    tensor_in_layers, ForwardOutput, InputError, LoadPlan, LogitsFor, PaddedTokens, Padding, Pass,
    ResidentBytes, Tokens, V4Model,
};
pub use moe::{ExpertRunner, LocalExperts};
pub use probe::{NoProbe, Probe, Recorder};
pub use weights::{HostData, HostTensor, Init, LoadError, RandomWeights, TensorSpec, WeightSource};
