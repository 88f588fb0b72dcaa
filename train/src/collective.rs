//! Collectives for data- and expert-parallel training, and the single-process implementation.
//!
//! Expert-parallel design (not implemented in this crate yet; no MPI here): an `ExpertRunner` for EP holds a
//! `Collective` and the rank's expert shard `[e0, e1)`. Per MoE layer, in `run(layer, experts, rows, counts)`:
//! 1. `all_to_all_counts(counts)` tells every rank how many rows it receives per local expert;
//! 2. rows (already grouped by expert, a deterministic stable order) are cut by destination rank and sent
//!    with `all_to_all_v`; the received rows are regrouped by local expert and run by `forward_grouped`;
//! 3. outputs go back with `all_to_all_v` using the swapped split sizes, in the original order.
//!    Backward needs the same two exchanges in reverse with the cached splits, i.e. a custom autodiff op
//!    around the exchange (burn's `Backward` trait), so expert weight gradients accumulate on their owner.
//!
//! Per optimizer step: dense gradients are all-reduced over all data-parallel ranks (scale 1/DP), expert
//! gradients only over replicas of the same shard, the squared gradient norm is all-reduced for clipping,
//! and the `[moe layers x E]` load counts are all-reduced before the bias update. MPI (`mpi` crate,
//! all-to-all-v + sub-communicators) is the intended engine; it is NOT part of this crate yet.

/// The collective operations training needs, on host buffers.
pub trait Collective {
    /// This process's rank and the group size.
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Elementwise sum across ranks, in place.
    fn all_reduce_sum_f32(&self, data: &mut [f32]);
    fn all_reduce_sum_u64(&self, data: &mut [u64]);
    /// Sends `send[counts[r] rows for rank r]` (row width `width`), returns what every rank sent here and
    /// the per-source row counts.
    fn all_to_all_v(&self, send: &[f32], counts: &[usize], width: usize) -> (Vec<f32>, Vec<usize>);
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
    fn all_reduce_sum_u64(&self, _data: &mut [u64]) {}
    fn all_to_all_v(&self, send: &[f32], counts: &[usize], width: usize) -> (Vec<f32>, Vec<usize>) {
        assert_eq!(counts.len(), 1, "a single process sends only to itself");
        assert_eq!(send.len(), counts[0] * width);
        (send.to_vec(), counts.to_vec())
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
