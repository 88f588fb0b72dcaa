//! What a conversion did, per tensor: dtypes in and out, scale scheme, error statistics.

use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::PathBuf;

/// Quantisation error of one output tensor against its (dequantised) input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorStats {
    /// max |x - q|.
    pub max_abs_err: f32,
    /// sqrt(Σ(x-q)² / Σx²).
    pub rel_l2: f64,
    /// The same for plain round-to-nearest, when calibration chose the scales.
    pub rel_l2_rtn: Option<f64>,
}

/// One output tensor (a fused HF expert tensor counts once).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorReport {
    /// Name of the output tensor (its scale tensors are named after it).
    pub name: String,
    /// Shard it was written to.
    pub shard: String,
    /// Logical shape (dequantised).
    pub shape: Vec<usize>,
    /// Input storage, e.g. `F8_E4M3+F8_E8M0/128x128` or `F32`.
    pub input: String,
    /// Output storage, e.g. `I8(E2M1x2)+F8_E8M0/32`.
    pub output: String,
    /// Scale scheme: `fp8-e8m0-128x128`, `mxfp4-rceil`, `nvfp4-modelopt`, `bf16-rne`, `f32`, `i64`,
    /// with `+search` when calibrated.
    pub scheme: String,
    /// The input already had the output's encoding: bytes were copied, not re-quantised.
    pub copied: bool,
    /// Error statistics; `None` when the shard was kept from an interrupted run.
    pub stats: Option<ErrorStats>,
}

/// The result of [`crate::convert`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ConvertReport {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Layout detected in the input.
    pub input_layout: String,
    pub output_layout: String,
    pub target: String,
    pub calibration: String,
    /// False when the run stopped early (`stop_after_shards`): the temporary directory holds the
    /// finished shards and a re-run resumes.
    pub complete: bool,
    pub shards_total: usize,
    pub shards_written: usize,
    /// Shards found finished and verified in the temporary directory of an earlier run.
    pub shards_resumed: usize,
    /// Stored input bytes of the tensors converted in this run.
    pub bytes_in: u64,
    /// Bytes of the shards written in this run.
    pub bytes_out: u64,
    pub seconds: f64,
    pub tensors: Vec<TensorReport>,
    /// Anything else worth knowing (missing config.json, skipped sub-directories, ...).
    pub notes: Vec<String>,
}

impl ConvertReport {
    /// Pretty-printed JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// A few lines for a terminal: totals, throughput, tensors per scheme with their worst and
    /// mean relative error, and the calibration gain.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let state = if self.complete {
            "done"
        } else {
            "stopped early (re-run to resume)"
        };
        let _ = writeln!(
            s,
            "{} ({}) -> {} ({}), target {}, calibration {}: {state}",
            self.input.display(),
            self.input_layout,
            self.output.display(),
            self.output_layout,
            self.target,
            self.calibration
        );
        let gbps = if self.seconds > 0.0 {
            self.bytes_in as f64 / self.seconds / 1e9
        } else {
            0.0
        };
        let _ = writeln!(
            s,
            "shards: {} written, {} resumed, {} total; {:.3} GB in, {:.3} GB out, {:.2} s ({gbps:.2} GB/s of input)",
            self.shards_written,
            self.shards_resumed,
            self.shards_total,
            self.bytes_in as f64 / 1e9,
            self.bytes_out as f64 / 1e9,
            self.seconds,
        );
        let mut groups: Vec<(String, Vec<&TensorReport>)> = Vec::new();
        for t in &self.tensors {
            let key = format!(
                "{} -> {} [{}]{}",
                t.input,
                t.output,
                t.scheme,
                if t.copied { " copied" } else { "" }
            );
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(t),
                None => groups.push((key, vec![t])),
            }
        }
        for (key, ts) in &groups {
            let stats: Vec<&ErrorStats> = ts.iter().filter_map(|t| t.stats.as_ref()).collect();
            let _ = write!(s, "  {:4} x {key}", ts.len());
            if let Some(worst) = stats.iter().max_by(|a, b| a.rel_l2.total_cmp(&b.rel_l2)) {
                let mean = stats.iter().map(|e| e.rel_l2).sum::<f64>() / stats.len() as f64;
                let _ = write!(s, ": rel L2 mean {mean:.3e}, worst {:.3e}", worst.rel_l2);
                let rtn: Vec<f64> = stats.iter().filter_map(|e| e.rel_l2_rtn).collect();
                if rtn.len() == stats.len() {
                    let mean_rtn = rtn.iter().sum::<f64>() / rtn.len() as f64;
                    let _ = write!(
                        s,
                        " (RTN {mean_rtn:.3e}, {:+.1}%)",
                        100.0 * (mean / mean_rtn - 1.0)
                    );
                }
            }
            s.push('\n');
        }
        for n in &self.notes {
            let _ = writeln!(s, "note: {n}");
        }
        s
    }
}
