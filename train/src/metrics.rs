//! Scalar metrics: `metrics.jsonl` (one `{"tag", "step", "value"}` per line) in the logging directory.

use std::io::Write;
use std::path::Path;

pub struct MetricsWriter {
    file: std::fs::File,
}

impl MetricsWriter {
    pub fn create(dir: &Path) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join("metrics.jsonl");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self { file })
    }

    pub fn scalar(&mut self, tag: &str, step: usize, value: f64) -> Result<(), String> {
        let line = serde_json::json!({"tag": tag, "step": step, "value": value});
        writeln!(self.file, "{line}").map_err(|e| e.to_string())
    }
}
