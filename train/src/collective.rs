//! Collectives for data- and expert-parallel training: the [`Collective`] trait, the single-process
//! identity and, with the `mpi` cargo feature, MPI (`mpirun -np N v4 train config.toml`).
//!
//! How a training step uses them (see `expert_parallel` for the MoE exchange):
//! - every rank runs `batch / N` sequences of the global batch, its loss divided by the global number of
//!   target tokens, so the SUM of the ranks' gradients is the gradient of the global batch's loss;
//! - routed rows travel to the rank owning their expert and back with `all_to_all_v` (forward and, in
//!   reverse with the same splits, backward), so each expert's gradient holds every rank's rows of its
//!   replica and stays on its rank, the only one of the replica that holds the expert;
//! - the dense gradients are summed over all ranks (`all_reduce_sum_f32`, the loss with them), the expert
//!   gradients over the replicas holding the same shard ([`Groups`], with `data_parallel` > 1), the
//!   experts' squared gradient norms over a replica (`all_reduce_sum_f64`, for clipping), and the load
//!   counts for the bias update over all ranks (`all_reduce_sum_u64`).

use std::sync::Arc;

/// The collective operations training needs, on host buffers. Every rank must make the same calls in the
/// same order.
pub trait Collective: Send + Sync {
    /// This process's rank and the group size.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Elementwise sum across ranks, in place.
    fn all_reduce_sum_f32(&self, data: &mut [f32]);
    fn all_reduce_sum_f64(&self, data: &mut [f64]);
    fn all_reduce_sum_u64(&self, data: &mut [u64]);
    /// Sends `send[counts[r] rows for rank r]` (row width `width`), returns what every rank sent here and
    /// the per-source row counts.
    fn all_to_all_v(&self, send: &[f32], counts: &[usize], width: usize) -> (Vec<f32>, Vec<usize>);
    /// The group of the ranks that pass the same `color`, ranked in this group's order (every rank calls
    /// it, at the same point).
    fn split(&self, color: usize) -> Arc<dyn Collective>;
}

impl std::fmt::Debug for dyn Collective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Collective(rank {} of {})", self.rank(), self.size())
    }
}

/// The groups of a run of `data_parallel x expert_parallel` ranks: world rank `r` is shard `r % EP` of
/// replica `r / EP`.
#[derive(Clone)]
pub struct Groups {
    pub world: Arc<dyn Collective>,
    /// The ranks of this replica, one per expert shard: the all-to-all runs among them.
    pub experts: Arc<dyn Collective>,
    /// The ranks holding this rank's expert shard, one per replica: expert gradients are summed among them.
    pub replicas: Arc<dyn Collective>,
}

impl Groups {
    /// Splits `world` into replicas of `expert_parallel` consecutive ranks (which must divide it).
    pub fn new(world: Arc<dyn Collective>, expert_parallel: usize) -> Self {
        let rank = world.rank();
        let experts = world.split(rank / expert_parallel);
        let replicas = world.split(rank % expert_parallel);
        Self {
            world,
            experts,
            replicas,
        }
    }

    /// This rank's replica (0 for every rank without data parallelism).
    pub fn replica(&self) -> usize {
        self.replicas.rank()
    }
}

/// One process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f32(&self, _data: &mut [f32]) {}
    fn all_reduce_sum_f64(&self, _data: &mut [f64]) {}
    fn all_reduce_sum_u64(&self, _data: &mut [u64]) {}
    fn all_to_all_v(&self, send: &[f32], counts: &[usize], width: usize) -> (Vec<f32>, Vec<usize>) {
        assert_eq!(counts.len(), 1, "a single process sends only to itself");
        assert_eq!(send.len(), counts[0] * width);
        (send.to_vec(), counts.to_vec())
    }
    fn split(&self, _color: usize) -> Arc<dyn Collective> {
        Arc::new(SingleProcess)
    }
}

/// An MPI communicator (OpenMPI through the `mpi` crate): the world, or a group split from it.
#[cfg(feature = "mpi")]
pub struct Mpi {
    /// Kept alive (MPI finalizes when the last holder drops it) by every group split from the world.
    universe: Arc<mpi::environment::Universe>,
    comm: mpi::topology::SimpleCommunicator,
}

// The universe is only used from one thread at a time (MPI is initialised with `Threading::Serialized`).
#[cfg(feature = "mpi")]
unsafe impl Send for Mpi {}
#[cfg(feature = "mpi")]
unsafe impl Sync for Mpi {}

#[cfg(feature = "mpi")]
impl Mpi {
    /// Initialises MPI (once per process; None if it was already initialised).
    pub fn init() -> Option<Self> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Serialized)?;
        let comm = universe.world();
        Some(Self {
            universe: Arc::new(universe),
            comm,
        })
    }
}

#[cfg(feature = "mpi")]
impl Collective for Mpi {
    fn rank(&self) -> usize {
        use mpi::topology::Communicator;
        self.comm.rank() as usize
    }
    fn size(&self) -> usize {
        use mpi::topology::Communicator;
        self.comm.size() as usize
    }
    fn all_reduce_sum_f32(&self, data: &mut [f32]) {
        use mpi::traits::CommunicatorCollectives;
        let send = data.to_vec();
        let op = mpi::collective::SystemOperation::sum();
        self.comm.all_reduce_into(&send[..], data, op);
    }
    fn all_reduce_sum_f64(&self, data: &mut [f64]) {
        use mpi::traits::CommunicatorCollectives;
        let send = data.to_vec();
        let op = mpi::collective::SystemOperation::sum();
        self.comm.all_reduce_into(&send[..], data, op);
    }
    fn all_reduce_sum_u64(&self, data: &mut [u64]) {
        use mpi::traits::CommunicatorCollectives;
        let send = data.to_vec();
        let op = mpi::collective::SystemOperation::sum();
        self.comm.all_reduce_into(&send[..], data, op);
    }
    fn all_to_all_v(&self, send: &[f32], counts: &[usize], width: usize) -> (Vec<f32>, Vec<usize>) {
        use mpi::datatype::{Partition, PartitionMut};
        use mpi::traits::CommunicatorCollectives;
        let world = &self.comm;
        let displs = |c: &[i32]| {
            c.iter()
                .scan(0, |acc, &n| {
                    let d = *acc;
                    *acc += n;
                    Some(d)
                })
                .collect::<Vec<i32>>()
        };
        let send_counts: Vec<i32> = counts.iter().map(|&c| (c * width) as i32).collect();
        let mut recv_counts = vec![0i32; counts.len()];
        world.all_to_all_into(&send_counts[..], &mut recv_counts[..]);
        let total: i32 = recv_counts.iter().sum();
        let mut recv = vec![0f32; total as usize];
        let send_displs = displs(&send_counts);
        let recv_displs = displs(&recv_counts);
        let outgoing = Partition::new(send, &send_counts[..], &send_displs[..]);
        let mut incoming = PartitionMut::new(&mut recv[..], &recv_counts[..], &recv_displs[..]);
        world.all_to_all_varcount_into(&outgoing, &mut incoming);
        let rows = recv_counts.iter().map(|&c| c as usize / width.max(1)).collect();
        (recv, rows)
    }
    fn split(&self, color: usize) -> Arc<dyn Collective> {
        use mpi::topology::{Color, Communicator};
        let comm = self
            .comm
            .split_by_color(Color::with_value(color as i32))
            .expect("a defined color joins a group");
        Arc::new(Self {
            universe: self.universe.clone(),
            comm,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn single_process_collectives_are_identities() {
        let c = SingleProcess;
        let mut x = vec![1.0f32, 2.0];
        c.all_reduce_sum_f32(&mut x);
        assert_eq!(x, [1.0, 2.0]);
        let (rows, counts) = c.all_to_all_v(&[1.0, 2.0, 3.0, 4.0], &[2], 2);
        assert_eq!((rows, counts), (vec![1.0, 2.0, 3.0, 4.0], vec![2]));
        assert_eq!((c.rank(), c.size()), (0, 1));
    }
}
