//! Training DeepSeek-V4 (fine-tuning or from scratch) on any burn autodiff backend: configuration,
//! data, AdamW with schedule / clipping / accumulation, aux-loss-free MoE balancing, atomic resumable
//! checkpoints in HF layout, and expert parallelism over MPI (`mpi` feature).

pub mod adamw;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod data;
pub mod error;
pub mod expert_parallel;
pub mod fused_experts;
pub mod metrics;
pub mod params;
pub mod trainer;

pub use burn_autodiff::Autodiff;
pub use collective::{Collective, SingleProcess};
pub use config::TrainConfig;
pub use error::TrainError;
pub use expert_parallel::ExpertParallel;
pub use trainer::{evaluate, train, RunOptions, RunReport, StepLog};
