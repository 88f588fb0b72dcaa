//! The V4 tokenizer (HF `tokenizers`' byte-level BPE from `tokenizer.json`), incremental detokenization for
//! streaming, and stop strings.

use crate::error::InferError;
use std::path::{Path, PathBuf};

/// A loaded `tokenizer.json`.
pub struct V4Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

impl V4Tokenizer {
    /// Reads a `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self, InferError> {
        if !path.is_file() {
            return Err(InferError::Tokenizer(format!("{}: no such file", path.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| InferError::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Self {
            inner,
            path: path.to_path_buf(),
        })
    }

    /// The tokenizer of a model directory (`DIR/tokenizer.json`), or None when it has none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>, InferError> {
        let path = dir.join("tokenizer.json");
        if path.is_file() {
            Self::from_file(&path).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token ids of `text`, special tokens written in the text recognised, nothing added (no BOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, InferError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| InferError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens (BOS, EOS, pad...) are left out when `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, InferError> {
        self.inner
            .decode(ids, skip_special)
            .map_err(|e| InferError::Tokenizer(e.to_string()))
    }

    /// The id of a token written out (e.g. `<｜User｜>`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of an id.
    pub fn id_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Fails on the first `<｜...｜>` or `<|...|>` in `text` that is not a token of this tokenizer: such text
    /// means a special token was intended and misspelled (it would otherwise be split into plain pieces).
    pub fn check_special_tokens(&self, text: &str) -> Result<(), InferError> {
        for (open, close) in [("<｜", "｜>"), ("<|", "|>")] {
            let mut rest = text;
            while let Some(start) = rest.find(open) {
                let after = &rest[start + open.len()..];
                let Some(end) = after.find(close) else { break };
                let inner = &after[..end];
                // `<|` ... `|>` across a newline or far apart is ordinary text, not a token name.
                if inner.is_empty() || inner.contains(char::is_whitespace) || inner.chars().count() > 64 {
                    rest = &rest[start + open.len()..];
                    continue;
                }
                let token = &rest[start..start + open.len() + end + close.len()];
                if self.token_id(token).is_none() {
                    return Err(InferError::UnknownSpecialToken {
                        token: token.to_string(),
                    });
                }
                rest = &rest[start + token.len()..];
            }
        }
        Ok(())
    }
}

/// Turns generated ids into text pieces as they arrive, holding back incomplete UTF-8 (a character split
/// over several byte-level tokens) until it is complete.
pub struct TextStream<'t> {
    tokenizer: &'t V4Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tokenizer: &'t V4Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_offset: 0,
            read_offset: 0,
        }
    }

    /// The new text that `id` completes (maybe empty).
    pub fn push(&mut self, id: u32) -> Result<String, InferError> {
        self.ids.push(id);
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let text = self.tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        if text.len() > prefix.len() && !text.ends_with('\u{FFFD}') && text.starts_with(&prefix) {
            let piece = text[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// Whatever is still held back (an incomplete character at the end of generation).
    pub fn finish(&mut self) -> Result<String, InferError> {
        let prefix = self
            .tokenizer
            .decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let text = self.tokenizer.decode(&self.ids[self.prefix_offset..], true)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(text.strip_prefix(prefix.as_str()).unwrap_or("").to_string())
    }
}

/// Watches streamed text for stop strings. Text that could be the start of a stop string is held back
/// until it is known not to be one, so a stop string is never printed.
#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    /// Text received and not yet emitted.
    held: String,
    /// All text emitted (the final text).
    emitted: String,
    stopped: bool,
}

impl StopStrings {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Self::default()
        }
    }

    /// Adds `piece`; returns the text safe to emit now, and whether a stop string was found (the text up
    /// to it has then been emitted and the rest dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stopped {
            return (String::new(), true);
        }
        self.held.push_str(piece);
        let found = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = found {
            let out = self.held[..at].to_string();
            self.held.clear();
            self.emitted.push_str(&out);
            self.stopped = true;
            return (out, true);
        }
        // Hold back the longest suffix of `held` that is a proper prefix of a stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if suffix.len() > keep && s.starts_with(suffix) {
                    keep = suffix.len();
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        self.emitted.push_str(&out);
        (out, false)
    }

    /// At the end of generation: the held-back text (it did not become a stop string).
    pub fn finish(&mut self) -> String {
        let out = std::mem::take(&mut self.held);
        self.emitted.push_str(&out);
        out
    }

    /// Everything emitted so far.
    pub fn text(&self) -> &str {
        &self.emitted
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }
}

#[cfg(test)]
mod tests {
    use super::StopStrings;

    #[test]
    fn stop_strings_hold_back_prefixes_and_cut_at_the_match() {
        let mut s = StopStrings::new(&["\nUser:".to_string()]);
        assert_eq!(s.push("Hello"), ("Hello".to_string(), false));
        assert_eq!(s.push(" there\nUs"), (" there".to_string(), false));
        assert_eq!(s.push("ually"), ("\nUsually".to_string(), false));
        assert_eq!(s.push("\nUser: hi"), (String::new(), true));
        assert_eq!(s.text(), "Hello there\nUsually");
        let mut t = StopStrings::new(&["END".to_string()]);
        assert_eq!(t.push("abcE"), ("abc".to_string(), false));
        assert_eq!(t.finish(), "E");
        assert_eq!(t.text(), "abcE");
    }
}
