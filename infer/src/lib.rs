//! Inference for DeepSeek-V4: prefill, incremental decoding with the model's own cache, sampling, the V4
//! tokenizer and chat format.
//!
//! - [`generator`]: [`Generator`] (prefill of any length in chunks, decode with any chunk size, batches of
//!   sequences of different lengths) and the generation loop;
//! - [`speculative`]: speculative decoding with V4's MTP layer as the drafter, exact state rollback;
//! - [`sampling`]: greedy, temperature, top-k, top-p, repetition penalty, seeded PRNG;
//! - [`tokenizer`]: `tokenizer.json` through HF `tokenizers`, streaming detokenization, stop strings;
//! - [`chat`]: V4's chat format and a multi-turn session reusing its cache;
//! - [`memory`]: the decoding state's size from a config (bytes per token).
//!
//! The architecture lives in `v4_model` only: every logit comes from `V4Model::forward_with`.

pub mod chat;
pub mod error;
pub mod generator;
pub mod memory;
pub mod sampling;
pub mod scaling;
pub mod speculative;
pub mod tokenizer;

pub use chat::{encode_chat, render_chat, ChatSession, Message, Role};
pub use error::InferError;
pub use generator::{
    check_prompt, Batch, FinishReason, Flow, GenerateParams, Generation, Generator, Timings,
};
pub use memory::{cache_footprint, human_bytes, scalars_per_token, CacheFootprint};
pub use sampling::{Sampler, SamplingParams};
pub use speculative::{Acceptance, SpeculativeParams};
pub use tokenizer::{StopStrings, TextStream, V4Tokenizer};

/// Where the repository keeps the V4 tokenizer (relative to the workspace root).
pub const TOKENIZER_FIXTURE: &str = "tests/fixtures/tokenizer/deepseek-v4/tokenizer.json";
