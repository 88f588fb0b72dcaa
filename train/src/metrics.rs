//! Training metrics in the logging directory: TensorBoard event files (tensorboard-rs:
//! `events.out.tfevents.*`) and `metrics.jsonl` (one `{"tag", "step", "value"}` per line).
//!
//! A logging failure never stops training: the first failure of a sink is reported on stderr and that
//! sink is dropped; training and the other sink go on.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use tensorboard_rs::summary_writer::SummaryWriter;

pub struct MetricsWriter {
    dir: PathBuf,
    jsonl: Option<std::fs::File>,
    tensorboard: Option<SummaryWriter>,
}

/// Load-balance health of one MoE layer, from the rows each expert received in a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MoeHealth {
    /// `(max load - mean load) / mean load` (DeepSeek's MaxVio).
    pub max_vio: f64,
    /// Coefficient of variation of the loads: standard deviation / mean.
    pub cv: f64,
    /// Experts that received no rows.
    pub dead: usize,
}

impl MoeHealth {
    pub fn of(load: &[usize]) -> Self {
        let n = load.len().max(1) as f64;
        let mean = load.iter().sum::<usize>() as f64 / n;
        let var = load.iter().map(|&l| (l as f64 - mean).powi(2)).sum::<f64>() / n;
        let max = load.iter().copied().max().unwrap_or(0) as f64;
        Self {
            max_vio: (max - mean) / mean.max(1e-9),
            cv: var.sqrt() / mean.max(1e-9),
            dead: load.iter().filter(|&&l| l == 0).count(),
        }
    }
}

impl MetricsWriter {
    /// Opens both sinks in `dir`; one that cannot be opened is reported and skipped.
    pub fn create(dir: &Path) -> Self {
        let mut w = Self {
            dir: dir.to_path_buf(),
            jsonl: None,
            tensorboard: None,
        };
        if let Err(e) = std::fs::create_dir_all(dir) {
            eprintln!("warning: logging disabled, cannot create {}: {e}", dir.display());
            return w;
        }
        let path = dir.join("metrics.jsonl");
        match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
            Ok(file) => w.jsonl = Some(file),
            Err(e) => eprintln!("warning: not writing {}: {e}", path.display()),
        }
        match catch_unwind(|| SummaryWriter::new(dir)) {
            Ok(tb) => w.tensorboard = Some(tb),
            Err(_) => eprintln!("warning: not writing TensorBoard events in {}", dir.display()),
        }
        w
    }

    /// Runs `f` on the TensorBoard writer; a panic inside tensorboard-rs (it panics on I/O errors)
    /// drops the sink instead of ending training.
    fn with_tensorboard(&mut self, f: impl FnOnce(&mut SummaryWriter)) {
        if let Some(tb) = self.tensorboard.as_mut() {
            if catch_unwind(AssertUnwindSafe(|| f(tb))).is_err() {
                eprintln!(
                    "warning: TensorBoard logging to {} failed; training goes on without it",
                    self.dir.display()
                );
                self.tensorboard = None;
            }
        }
    }

    /// Appends one record to `metrics.jsonl`; a failed write drops that sink.
    fn line(&mut self, line: serde_json::Value) {
        if let Some(file) = self.jsonl.as_mut() {
            if let Err(e) = writeln!(file, "{line}") {
                eprintln!(
                    "warning: {}: {e}; training goes on without it",
                    self.dir.join("metrics.jsonl").display()
                );
                self.jsonl = None;
            }
        }
    }

    pub fn scalar(&mut self, tag: &str, step: usize, value: f64) {
        self.line(serde_json::json!({"tag": tag, "step": step, "value": value}));
        self.with_tensorboard(|tb| tb.add_scalar(tag, value as f32, step));
    }

    /// A histogram over expert ids weighted by the rows each expert received: bucket `e` spans
    /// `(e - 0.5, e + 0.5]` and holds `load[e]` (in `metrics.jsonl` as `"counts": load`).
    pub fn expert_histogram(&mut self, tag: &str, step: usize, load: &[usize]) {
        self.line(serde_json::json!({"tag": tag, "step": step, "counts": load}));
        let limits: Vec<f64> = (0..load.len()).map(|e| e as f64 + 0.5).collect();
        let counts: Vec<f64> = load.iter().map(|&l| l as f64).collect();
        let num: f64 = counts.iter().sum();
        let sum: f64 = counts.iter().enumerate().map(|(e, c)| e as f64 * c).sum();
        let sum_squares: f64 = counts.iter().enumerate().map(|(e, c)| (e * e) as f64 * c).sum();
        let max = load.len().saturating_sub(1) as f64;
        self.with_tensorboard(|tb| {
            tb.add_histogram_raw(tag, 0.0, max, num, sum, sum_squares, &limits, &counts, step)
        });
    }

    /// Pushes buffered events to disk (at validation and checkpoint times, and at the end).
    pub fn flush(&mut self) {
        if let Some(file) = self.jsonl.as_mut() {
            let _ = file.flush();
        }
        self.with_tensorboard(|tb| tb.flush());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moe_health_of_a_known_load() {
        // mean 3, max 6, one dead expert; variance (0 + 9 + 9 + 0) / 4 = 4.5
        let h = MoeHealth::of(&[3, 6, 0, 3]);
        assert!((h.max_vio - 1.0).abs() < 1e-12);
        assert!((h.cv - 4.5f64.sqrt() / 3.0).abs() < 1e-12);
        assert_eq!(h.dead, 1);
        assert_eq!(MoeHealth::of(&[5, 5]).max_vio, 0.0);
    }

    #[test]
    fn an_unwritable_directory_disables_logging_without_failing() {
        let file = std::env::temp_dir().join(format!("v4-metrics-file-{}", std::process::id()));
        std::fs::write(&file, b"not a directory").unwrap();
        let mut w = MetricsWriter::create(&file.join("logs"));
        w.scalar("train/loss", 1, 2.0);
        w.expert_histogram("moe/load", 1, &[1, 2]);
        w.flush();
        assert!(w.jsonl.is_none() && w.tensorboard.is_none());
        std::fs::remove_file(&file).unwrap();
    }
}
