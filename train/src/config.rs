//! The training configuration (`config.toml`). Every section rejects unknown keys, naming them.

use crate::error::TrainError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub optimizer: OptimizerSection,
    #[serde(default)]
    pub schedule: ScheduleSection,
    #[serde(default)]
    pub training: TrainingSection,
    #[serde(default)]
    pub moe: MoeSection,
    #[serde(default)]
    pub mtp: MtpSection,
    #[serde(default)]
    pub parallel: ParallelSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub logging: LoggingSection,
}

/// Where the initial weights come from: a checkpoint directory in HF or DeepSeek release layout
/// (`checkpoint`; FP8 / FP4 weights are dequantised to f32 to train), or a model
/// `config.json` (`config`) initialised from scratch with `seed`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    pub checkpoint: Option<PathBuf>,
    pub config: Option<PathBuf>,
    #[serde(default)]
    pub seed: u64,
    /// `cpu` (burn-ndarray with v4's kernels, the default), `ndarray` (plain burn-ndarray) or `npu`
    /// (the emulator).
    #[serde(default = "default_device")]
    pub device: String,
    /// NPU precision policy / chip sheet (TOML) for `device = "npu"`.
    pub npu_config: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// JSONL: one `{"text": ...}` or `{"messages": [{"role", "content"}, ...]}` per line.
    pub train: PathBuf,
    pub validation: Option<PathBuf>,
    /// `"bytes"` (token = byte value) or a `tokenizer.json` path.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Read only the first N records of the training file (0: all).
    #[serde(default)]
    pub max_records: usize,
    /// Read only the first N records of the validation file (0: all).
    #[serde(default)]
    pub max_validation_records: usize,
    /// Validation batches per evaluation (0: the whole validation set).
    #[serde(default)]
    pub validation_batches: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSection {
    #[serde(default = "default_lr")]
    pub lr: f64,
    #[serde(default = "default_betas")]
    pub betas: [f32; 2],
    #[serde(default = "default_eps")]
    pub eps: f32,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f32,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSection {
    #[serde(default = "default_steps")]
    pub steps: usize,
    #[serde(default)]
    pub warmup: usize,
    #[serde(default = "default_decay")]
    pub decay: Decay,
    /// The learning rate at the last step, as a fraction of `optimizer.lr`.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    /// Sequences per micro-batch.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "default_one")]
    pub grad_accum: usize,
    /// Global gradient-norm clip (0: off).
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    /// Shuffling seed of the data loader.
    #[serde(default)]
    pub seed: u64,
    /// Parameters (HF names) containing any of these substrings are not updated.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Validate every N steps (0: only at the end).
    #[serde(default = "default_eval_interval")]
    pub eval_interval: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MoeSection {
    /// Aux-loss-free balancing: `bias += gamma * sign(mean_load - load)` after each step (0: frozen).
    #[serde(default)]
    pub gamma: f32,
    /// Weight of DeepSeek's sequence-wise balance loss on the top-k layers (V3 used 1e-4; 0: off).
    #[serde(default)]
    pub alpha: f32,
}

/// Multi-token prediction: the MTP layers' cross-entropy on the token `2 + k` ahead (depth `k`), averaged
/// over depths and added to the main loss with `weight` (DeepSeek-V3 §2.2: 0.3 early in training, then 0.1).
/// Gradients reach the shared embedding and head. 0 (the default): the MTP layers are carried through
/// checkpoints but not trained.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MtpSection {
    #[serde(default)]
    pub weight: f32,
}

/// Expert and data parallelism: `mpirun -np N v4 train config.toml` with `N = data_parallel x
/// expert_parallel` runs `data_parallel` replicas of the model, each sharding the routed experts of every
/// layer over its `expert_parallel` ranks (E / expert_parallel each); the global batch's sequences are
/// shared by all N ranks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ParallelSection {
    /// Number of ranks the experts are sharded over (1: every rank holds them all).
    #[serde(default = "default_one")]
    pub expert_parallel: usize,
    /// Number of replicas of the expert-parallel group (the MPI world is `data_parallel x
    /// expert_parallel` ranks).
    #[serde(default = "default_one")]
    pub data_parallel: usize,
}

impl ParallelSection {
    /// The ranks a run takes.
    pub fn world(&self) -> usize {
        self.expert_parallel * self.data_parallel
    }
}

impl Default for ParallelSection {
    fn default() -> Self {
        Self {
            expert_parallel: 1,
            data_parallel: 1,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    pub dir: Option<PathBuf>,
    /// Save every N steps (0: only at the end).
    #[serde(default)]
    pub interval: usize,
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// `"latest"` (newest checkpoint in `dir`, if any) or a checkpoint directory.
    pub resume: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// TensorBoard event files (and `metrics.jsonl`) are written here.
    pub tensorboard: Option<PathBuf>,
    /// Print / log every N steps.
    #[serde(default = "default_one")]
    pub interval: usize,
}

fn default_device() -> String {
    "cpu".into()
}
fn default_tokenizer() -> String {
    "bytes".into()
}
fn default_seq_len() -> usize {
    128
}
fn default_lr() -> f64 {
    1e-4
}
fn default_betas() -> [f32; 2] {
    [0.9, 0.95]
}
fn default_eps() -> f32 {
    1e-8
}
fn default_weight_decay() -> f32 {
    0.01
}
fn default_steps() -> usize {
    100
}
fn default_decay() -> Decay {
    Decay::Cosine
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_batch() -> usize {
    4
}
fn default_one() -> usize {
    1
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_eval_interval() -> usize {
    50
}
fn default_keep_last() -> usize {
    3
}

impl Default for OptimizerSection {
    fn default() -> Self {
        Self {
            lr: default_lr(),
            betas: default_betas(),
            eps: default_eps(),
            weight_decay: default_weight_decay(),
        }
    }
}
impl Default for ScheduleSection {
    fn default() -> Self {
        Self {
            steps: default_steps(),
            warmup: 0,
            decay: default_decay(),
            min_lr_ratio: default_min_lr_ratio(),
        }
    }
}
impl Default for TrainingSection {
    fn default() -> Self {
        Self {
            batch: default_batch(),
            grad_accum: 1,
            grad_clip: default_grad_clip(),
            seed: 0,
            freeze: Vec::new(),
            eval_interval: default_eval_interval(),
        }
    }
}
impl Default for MoeSection {
    fn default() -> Self {
        Self {
            gamma: 0.0,
            alpha: 0.0,
        }
    }
}
impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            dir: None,
            interval: 0,
            keep_last: default_keep_last(),
            resume: None,
        }
    }
}
impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            tensorboard: None,
            interval: 1,
        }
    }
}

impl TrainConfig {
    /// Parses TOML; relative paths are resolved against `base` (the config file's directory), which an
    /// error names.
    pub fn from_toml_str(text: &str, base: &Path) -> Result<Self, TrainError> {
        let invalid = |reason: String| TrainError::Config {
            path: base.to_path_buf(),
            reason,
        };
        let mut config: TrainConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        config.resolve_paths(base);
        match config.problem() {
            Some(reason) => Err(invalid(reason)),
            None => Ok(config),
        }
    }

    /// Reads and parses a config file.
    pub fn from_file(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml_str(&text, base).map_err(|e| match e {
            TrainError::Config { reason, .. } => TrainError::Config {
                path: path.to_path_buf(),
                reason,
            },
            other => other,
        })
    }

    /// The resolved configuration, defaults included, as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the config serialises")
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() && !base.as_os_str().is_empty() {
                *p = base.join(&*p);
            }
        };
        for p in [
            self.model.checkpoint.as_mut(),
            self.model.config.as_mut(),
            self.model.npu_config.as_mut(),
            Some(&mut self.data.train),
            self.data.validation.as_mut(),
            self.checkpoint.dir.as_mut(),
            self.logging.tensorboard.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
        if self.data.tokenizer != "bytes" {
            let mut p = PathBuf::from(&self.data.tokenizer);
            fix(&mut p);
            self.data.tokenizer = p.display().to_string();
        }
        if let Some(r) = &self.checkpoint.resume {
            if r != "latest" {
                let mut p = PathBuf::from(r);
                fix(&mut p);
                self.checkpoint.resume = Some(p.display().to_string());
            }
        }
    }

    /// The first inconsistency of the configuration, if any.
    fn problem(&self) -> Option<String> {
        match (&self.model.checkpoint, &self.model.config) {
            (Some(_), Some(_)) => {
                return Some(
                    "[model]: set `checkpoint` (fine-tune) OR `config` (from scratch), not both".into(),
                )
            }
            (None, None) => {
                return Some(
                    "[model]: set `checkpoint` (a model directory) or `config` (a config.json)".into(),
                )
            }
            _ => {}
        }
        if !matches!(self.model.device.as_str(), "cpu" | "ndarray" | "npu") {
            return Some(format!(
                "[model] device = \"{}\": the trainer runs on \"cpu\", \"ndarray\" or \"npu\"",
                self.model.device
            ));
        }
        if self.data.seq_len == 0 || self.training.batch == 0 || self.training.grad_accum == 0 {
            return Some("[data] seq_len, [training] batch and grad_accum must be positive".into());
        }
        if self.schedule.steps == 0 {
            return Some("[schedule] steps must be positive".into());
        }
        let (ep, dp) = (self.parallel.expert_parallel, self.parallel.data_parallel);
        if ep == 0 || dp == 0 || !self.training.batch.is_multiple_of(ep * dp) {
            return Some(format!(
                "[parallel] expert_parallel = {ep} times data_parallel = {dp} must be positive and divide \
                 [training] batch = {} (each rank takes batch / (expert_parallel x data_parallel) sequences \
                 of the global batch)",
                self.training.batch
            ));
        }
        if self.checkpoint.resume.is_some()
            && self.checkpoint.dir.is_none()
            && self.checkpoint.resume.as_deref() == Some("latest")
        {
            return Some("[checkpoint] resume = \"latest\" needs `dir`".into());
        }
        None
    }

    /// Learning rate at optimizer step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        let (lr, s) = (self.optimizer.lr, &self.schedule);
        if step < s.warmup {
            return lr * (step + 1) as f64 / s.warmup as f64;
        }
        let span = s.steps.saturating_sub(s.warmup).max(1) as f64;
        let t = ((step - s.warmup) as f64 / span).min(1.0);
        let min = lr * s.min_lr_ratio;
        match s.decay {
            Decay::Constant => lr,
            Decay::Linear => lr - (lr - min) * t,
            Decay::Cosine => min + 0.5 * (lr - min) * (1.0 + (std::f64::consts::PI * t).cos()),
        }
    }
}
