//! A checkpoint directory's model configuration.

use std::path::Path;
use v4_model::{LoadError, V4Config};

/// Reads and parses the model configuration of a checkpoint directory: HF's `config.json`, else
/// DeepSeek's `inference_config.json`.
pub fn read_config(dir: &Path) -> Result<V4Config, LoadError> {
    let candidates = [dir.join("config.json"), dir.join("inference_config.json")];
    let path = candidates
        .iter()
        .find(|p| p.is_file())
        .ok_or_else(|| LoadError::File {
            path: dir.display().to_string(),
            message: "no config.json (or inference_config.json) in this directory".into(),
        })?;
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    V4Config::from_json_str(&text).map_err(|error| LoadError::Config {
        path: path.display().to_string(),
        error,
    })
}
