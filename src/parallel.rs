//! Expert parallelism for the commands that run a model (`mpirun -np N v4 generate | forward |
//! bench-infer`, with the `mpi` feature): each rank loads and holds only its 1/N of every layer's routed
//! experts, runs the same requests, and the experts' outputs are summed over the ranks. Rank 0 prints
//! and writes; the other ranks' standard output is discarded (their errors still show).

use crate::io::Result;
use burn::tensor::backend::Backend;
use std::sync::Arc;
use v4_model::{ExpertRunner, ExpertShard, LocalExperts};
use v4_train::collective::Collective;
use v4_train::expert_parallel::ShardedExperts;

/// This process's place among the ranks of a launch (alone without `mpirun`).
pub struct Ranks {
    experts: Option<ShardedExperts>,
}

impl Ranks {
    /// The MPI world when this process was started by `mpirun` / `srun` with more than one rank.
    pub fn launched() -> Result<Self> {
        let experts = match launched_ranks() {
            Some(n) if n > 1 => Some(ShardedExperts::new(world(n)?)),
            _ => None,
        };
        let ranks = Self { experts };
        if !ranks.lead() {
            silence_stdout()?;
        }
        Ok(ranks)
    }

    /// The routed experts this rank loads.
    pub fn shard(&self) -> ExpertShard {
        self.experts
            .as_ref()
            .map_or(ExpertShard::default(), ShardedExperts::shard)
    }

    /// Whether this rank prints and writes (rank 0, or a process alone).
    pub fn lead(&self) -> bool {
        self.shard().rank == 0
    }

    /// What runs the routed experts: here, or shared with the other ranks.
    pub fn runner<B: Backend>(&self) -> &dyn ExpertRunner<B> {
        match &self.experts {
            Some(sharded) => sharded,
            None => &LocalExperts,
        }
    }
}

/// The number of ranks `mpirun` (OpenMPI) or a PMI launcher (`srun --mpi=pmix`) started, if either did.
pub fn launched_ranks() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.parse::<usize>().ok())
}

#[cfg(feature = "mpi")]
pub fn world(_ranks: usize) -> Result<Arc<dyn Collective>> {
    let world = v4_train::collective::Mpi::init().ok_or("MPI could not be initialised")?;
    Ok(Arc::new(world))
}

#[cfg(not(feature = "mpi"))]
pub fn world(ranks: usize) -> Result<Arc<dyn Collective>> {
    Err(format!(
        "started as one of {ranks} ranks, but this v4 was built without MPI: install OpenMPI and libclang \
         (Debian: apt-get install libopenmpi-dev openmpi-bin libclang-dev) and `cargo build --release \
         --features mpi`"
    )
    .into())
}

/// Points this process's standard output at `/dev/null`.
fn silence_stdout() -> Result<()> {
    use std::os::fd::AsRawFd;
    let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
    // SAFETY: both descriptors are open; dup2 replaces fd 1 atomically.
    if unsafe { libc::dup2(null.as_raw_fd(), libc::STDOUT_FILENO) } < 0 {
        return Err(format!(
            "cannot silence this rank's output: {}",
            std::io::Error::last_os_error()
        )
        .into());
    }
    Ok(())
}
