//! Expert parallelism: an [`ExpertRunner`] that runs each MoE layer's routed experts on the rank that owns
//! them (rank `r` of `N` owns, and holds, experts `[r E/N, (r+1) E/N)`).
//!
//! Per layer, the model hands the runner its rows grouped by expert (`counts[e]` rows for expert `e`):
//! 1. the per-expert counts of every rank are summed into a `[N x E]` table (`all_reduce_sum_u64`), so
//!    every rank knows how many rows it sends to and receives from each rank;
//! 2. **dispatch**: the rows for rank `q`'s experts (contiguous, as experts are) go to `q` (all-to-all-v);
//! 3. the received rows (by source rank, then expert) are regrouped by local expert and run (as one
//!    autodiff op, [`grouped_experts`]);
//! 4. **combine**: the outputs go back to their source ranks in the order they came (all-to-all-v with the
//!    splits swapped), and the model weights and sums them as for local experts.
//!
//! Both exchanges are one autodiff op ([`exchange`]): its backward sends the output's gradient back along
//! the reversed splits of its forward. Backward therefore runs the exchanges in reverse order on every rank
//! (each layer's dispatch feeds its combine, which feeds the next layer: burn executes them by depth),
//! and each expert's weight gradient collects the rows of every rank: it is complete where it is, and
//! never sent anywhere.

use crate::collective::Collective;
use crate::fused_experts::grouped_experts;
use burn::tensor::{backend::Backend, Int, Tensor, TensorData, TensorPrimitive};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use v4_model::moe::Experts;
use v4_model::{ExpertRunner, ExpertShard};

/// Runs the routed experts sharded over the ranks of a [`Collective`]; each rank's model holds only its
/// own experts ([`ExpertShard`]).
#[derive(Clone)]
pub struct ExpertParallel {
    collective: Arc<dyn Collective>,
    stats: Arc<ExchangeStats>,
}

/// What the exchanges did since they were last read.
#[derive(Debug, Default)]
struct ExchangeStats {
    /// Rows this rank received for its experts, per layer.
    received: Mutex<BTreeMap<usize, usize>>,
    /// Time spent in the all-to-all exchanges, forward and backward.
    nanos: AtomicU64,
}

impl ExpertParallel {
    pub fn new(collective: Arc<dyn Collective>) -> Self {
        Self {
            collective,
            stats: Arc::default(),
        }
    }

    /// The time the exchanges (forward and backward) took since the last call.
    pub fn take_exchange_time(&self) -> Duration {
        Duration::from_nanos(self.stats.nanos.swap(0, Ordering::Relaxed))
    }

    /// The experts this rank holds.
    pub fn shard(&self) -> ExpertShard {
        ExpertShard {
            rank: self.collective.rank(),
            ranks: self.collective.size(),
        }
    }

    /// The rows the all-to-all brought this rank for its experts, per layer (the rows it sent itself
    /// included), counted since the last call.
    pub fn take_received(&self) -> BTreeMap<usize, usize> {
        std::mem::take(&mut *self.stats.received.lock().expect("not poisoned"))
    }
}

impl<I: Backend, C: CheckpointStrategy> ExpertRunner<Autodiff<I, C>> for ExpertParallel {
    fn run(
        &self,
        layer: usize,
        experts: &Experts<Autodiff<I, C>>,
        rows: Tensor<Autodiff<I, C>, 2>,
        counts: &[usize],
    ) -> Tensor<Autodiff<I, C>, 2> {
        let (ranks, rank) = (self.collective.size(), self.collective.rank());
        let e = counts.len();
        assert_eq!(e % ranks, 0, "checked at start-up: the ranks divide the experts");
        let per = e / ranks;
        assert_eq!(
            (experts.first, experts.len()),
            (rank * per, per),
            "each rank holds its own experts"
        );
        let mut table = vec![0u64; ranks * e];
        for (slot, &c) in table[rank * e..][..e].iter_mut().zip(counts) {
            *slot = c as u64;
        }
        self.collective.all_reduce_sum_u64(&mut table);
        // Rows rank `src` sends to rank `dst`'s expert `j`.
        let rows_for = |src: usize, dst: usize, j: usize| table[src * e + dst * per + j] as usize;
        let send: Vec<usize> = (0..ranks)
            .map(|dst| (0..per).map(|j| rows_for(rank, dst, j)).sum())
            .collect();
        let recv: Vec<usize> = (0..ranks)
            .map(|src| (0..per).map(|j| rows_for(src, rank, j)).sum())
            .collect();

        let received = exchange(&self.collective, &self.stats, rows, &send, &recv);
        let mut counts = self.stats.received.lock().expect("not poisoned");
        *counts.entry(layer).or_default() += received.dims()[0];
        drop(counts);
        // Regroup by local expert: received rows are ordered by source rank, then expert.
        let mut order = Vec::with_capacity(recv.iter().sum());
        let mut local_counts = vec![0usize; per];
        for (j, local) in local_counts.iter_mut().enumerate() {
            let mut base = 0;
            for (src, &from_src) in recv.iter().enumerate() {
                let before: usize = (0..j).map(|k| rows_for(src, rank, k)).sum();
                let n = rows_for(src, rank, j);
                order.extend((base + before..base + before + n).map(|i| i as i64));
                *local += n;
                base += from_src;
            }
        }
        let outputs = if order.is_empty() {
            // Nothing to run here; the (empty) result still hangs off the dispatch, so that its backward
            // exchange runs on this rank as on the others.
            received.mul_scalar(0.0)
        } else {
            let device = received.device();
            let n = order.len();
            let mut inverse = vec![0i64; n];
            for (k, &i) in order.iter().enumerate() {
                inverse[i as usize] = k as i64;
            }
            let index =
                |v: Vec<i64>| Tensor::<Autodiff<I, C>, 1, Int>::from_data(TensorData::new(v, [n]), &device);
            let grouped = received.select(0, index(order));
            grouped_experts(experts, grouped, &local_counts).select(0, index(inverse))
        };
        exchange(&self.collective, &self.stats, outputs, &recv, &send)
    }
}

/// Sends `send[q]` consecutive rows of `x: [R, W]` to rank `q` and returns the rows received, `recv[q]`
/// from rank `q`, in rank order. Differentiable: the backward sends the gradient back the same way.
fn exchange<I: Backend, C: CheckpointStrategy>(
    collective: &Arc<dyn Collective>,
    stats: &Arc<ExchangeStats>,
    x: Tensor<Autodiff<I, C>, 2>,
    send: &[usize],
    recv: &[usize],
) -> Tensor<Autodiff<I, C>, 2> {
    let width = x.dims()[1];
    let mut input = x.into_primitive().tensor();
    if !input.is_tracked() {
        // Tracked even under frozen parameters: every rank must run the backward exchange.
        let leaf = Tensor::<Autodiff<I, C>, 2>::from_primitive(TensorPrimitive::Float(input)).require_grad();
        input = leaf.into_primitive().tensor();
    }
    let inner = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(input.primitive.clone()));
    let device = inner.device();
    let output = send_rows::<I>(collective.as_ref(), stats, inner, send, recv, width, &device);
    let output = output.into_primitive().tensor();
    let state = ExchangeState {
        collective: Shared(collective.clone(), stats.clone()),
        send: recv.to_vec(),
        recv: send.to_vec(),
        width,
    };
    let result = match Exchange
        .prepare::<C>([input.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish(state, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

/// The host exchange of `x: [sum send, width]` -> `[sum recv, width]`.
fn send_rows<I: Backend>(
    collective: &dyn Collective,
    stats: &ExchangeStats,
    x: Tensor<I, 2>,
    send: &[usize],
    recv: &[usize],
    width: usize,
    device: &I::Device,
) -> Tensor<I, 2> {
    let host = x
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("f32 rows");
    let started = Instant::now();
    let (got, counts) = collective.all_to_all_v(&host, send, width);
    let nanos = started.elapsed().as_nanos() as u64;
    stats.nanos.fetch_add(nanos, Ordering::Relaxed);
    assert_eq!(counts, recv, "the ranks disagree on the exchange's splits");
    let rows = recv.iter().sum();
    Tensor::from_data(TensorData::new(got, [rows, width]), device)
}

#[derive(Debug)]
struct Exchange;

/// The collective and the exchange statistics, shared with the backward step.
#[derive(Clone, Debug)]
struct Shared(Arc<dyn Collective>, Arc<ExchangeStats>);

/// The backward's splits: the forward's, swapped.
#[derive(Clone, Debug)]
struct ExchangeState {
    collective: Shared,
    send: Vec<usize>,
    recv: Vec<usize>,
    width: usize,
}

impl<I: Backend> Backward<I, 1> for Exchange {
    type State = ExchangeState;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let state = ops.state;
        let grad = Tensor::<I, 2>::from_primitive(TensorPrimitive::Float(grads.consume::<I>(&ops.node)));
        let device = grad.device();
        let back = send_rows::<I>(
            state.collective.0.as_ref(),
            &state.collective.1,
            grad,
            &state.send,
            &state.recv,
            state.width,
            &device,
        );
        let [parent] = ops.parents;
        if let Some(node) = parent {
            grads.register::<I>(node.id, back.into_primitive().tensor());
        }
    }
}

/// Runs the routed experts of a model each rank holds a share of ([`ExpertShard`]), on rows every rank
/// has: inference, where every rank runs the same requests. Each rank computes the rows routed to its own
/// experts and one all-reduce of the `[R, D]` outputs (zeros for the rows of other ranks' experts) gives
/// every rank all of them. With the rows already on every rank, this is the all-to-all's combine without
/// its dispatch; each row's output comes from one rank alone, so the result is one process's, bit for bit.
#[derive(Clone)]
pub struct ShardedExperts {
    collective: Arc<dyn Collective>,
}

impl ShardedExperts {
    pub fn new(collective: Arc<dyn Collective>) -> Self {
        Self { collective }
    }

    /// The experts this rank holds.
    pub fn shard(&self) -> ExpertShard {
        ExpertShard {
            rank: self.collective.rank(),
            ranks: self.collective.size(),
        }
    }
}

impl<B: Backend> ExpertRunner<B> for ShardedExperts {
    fn run(&self, _layer: usize, experts: &Experts<B>, rows: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2> {
        let held = self.shard().range(counts.len());
        assert_eq!(
            (experts.first, experts.len()),
            (held.start, held.len()),
            "each rank holds its own experts"
        );
        let [r, d] = rows.dims();
        let device = rows.device();
        let start: usize = counts[..held.start].iter().sum();
        let n: usize = counts[held.clone()].iter().sum();
        let mut outputs = vec![0f32; r * d];
        if n > 0 {
            let mine = experts.forward_grouped(rows.narrow(0, start, n), &counts[held]);
            let mine = mine
                .into_data()
                .convert::<f32>()
                .into_vec::<f32>()
                .expect("f32 rows");
            outputs[start * d..(start + n) * d].copy_from_slice(&mine);
        }
        self.collective.all_reduce_sum_f32(&mut outputs);
        Tensor::from_data(TensorData::new(outputs, [r, d]), &device)
    }
}
