//! Errors of inference: each names what is wrong with the request and how to fix it.

use std::fmt;
use v4_model::InputError;

/// Why a generation request cannot run.
#[derive(Debug, Clone, PartialEq)]
pub enum InferError {
    /// The prompt has no tokens.
    EmptyPrompt,
    /// The prompt alone does not fit the model's context.
    PromptTooLong { tokens: usize, max: usize },
    /// A token id at or beyond the vocabulary size.
    OutOfVocabulary { id: u64, vocab: usize },
    /// Chat text names a special token the tokenizer does not have.
    UnknownSpecialToken { token: String },
    /// Text was given but the model directory has no tokenizer.
    NoTokenizer { dir: String },
    /// The tokenizer file could not be read or used.
    Tokenizer(String),
    /// A batch call whose chunks do not fit its sequences.
    Batch(String),
    /// Speculative decoding cannot run as asked (no MTP layer, no drafts).
    Speculative(String),
    /// The model rejected its input.
    Model(InputError),
}

impl fmt::Display for InferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InferError::EmptyPrompt => write!(f, "the prompt is empty: give at least one token"),
            InferError::PromptTooLong { tokens, max } => write!(
                f,
                "the prompt has {tokens} tokens, more than the model's maximum context of {max} \
                 (max_position_embeddings): shorten it"
            ),
            InferError::OutOfVocabulary { id, vocab } => write!(
                f,
                "token id {id} is outside the model's vocabulary (ids 0..{})",
                vocab.saturating_sub(1)
            ),
            InferError::UnknownSpecialToken { token } => write!(
                f,
                "unknown special token `{token}`: the tokenizer has no such token (V4's chat tokens are \
                 <｜begin▁of▁sentence｜>, <｜end▁of▁sentence｜>, <｜User｜>, <｜Assistant｜>, <think>, </think>)"
            ),
            InferError::NoTokenizer { dir } => write!(
                f,
                "{dir} has no tokenizer.json: pass --tokenizer PATH, or give raw token ids with --prompt-ids 1,2,3"
            ),
            InferError::Tokenizer(message) => write!(f, "tokenizer: {message}"),
            InferError::Batch(message) => write!(f, "batch: {message}"),
            InferError::Speculative(message) => write!(f, "speculative decoding: {message}"),
            InferError::Model(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for InferError {}

impl From<InputError> for InferError {
    fn from(e: InputError) -> Self {
        match e {
            InputError::OutOfVocabulary { id, vocab, .. } => {
                InferError::OutOfVocabulary { id: id as u64, vocab }
            }
            other => InferError::Model(other),
        }
    }
}
