//! The routed experts of one MoE layer as ONE autodiff op, for training.
//!
//! Through burn's autodiff, expert `e` reads its weights with `w13_t.narrow(0, e, 1)`, and the backward of
//! every such slice builds a zero tensor the size of the whole `[E, D, 2I]` parameter and adds it to the
//! gradient: `E` full-size passes per layer and step (on the v4-small bench config, 32 experts x 50 MB x 8
//! layers, about half of a training step). This op computes the experts' forward on the inner backend and
//! writes the gradients of the rows and of both weight tensors in one piece each.
//!
//! Backward, per expert with rows `x` (`h = x W13`, `g, u` its halves, `L` the SwiGLU limit):
//! ```text
//! gc = min(g, L), uc = clamp(u, -L, L), s = sigmoid(gc), a = gc s uc, y = a W2
//! dW2 = a^T dy              da = dy W2^T
//! dg = da uc (s + gc s (1 - s)) [g <= L]     du = da gc s [-L <= u <= L]
//! dW13 = x^T [dg du]        dx = [dg du] W13^T
//! ```

use burn::module::Param;
use burn::tensor::{activation, backend::Backend, Tensor, TensorPrimitive};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::CheckpointStrategy;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_autodiff::Autodiff;
use v4_model::moe::Experts;
use v4_model::ExpertRunner;

/// Runs every routed expert in this process as one autodiff op (see the module doc).
#[derive(Debug, Default, Clone, Copy)]
pub struct FusedExperts;

impl<I: Backend, C: CheckpointStrategy> ExpertRunner<Autodiff<I, C>> for FusedExperts {
    fn run(
        &self,
        _layer: usize,
        experts: &Experts<Autodiff<I, C>>,
        rows: Tensor<Autodiff<I, C>, 2>,
        counts: &[usize],
    ) -> Tensor<Autodiff<I, C>, 2> {
        grouped_experts(experts, rows, counts)
    }
}

/// `rows: [R, D]` grouped by expert (`counts[e]` rows for expert `e`; 0 for experts run elsewhere), each
/// run by its expert: `[R, D]`, differentiable in the rows and both weight tensors.
pub fn grouped_experts<I: Backend, C: CheckpointStrategy>(
    experts: &Experts<Autodiff<I, C>>,
    rows: Tensor<Autodiff<I, C>, 2>,
    counts: &[usize],
) -> Tensor<Autodiff<I, C>, 2> {
    // Experts kept in their stored precision are frozen: the model's own path differentiates in the rows.
    let Some((w13, w2)) = experts.dense() else {
        return experts.forward_grouped(rows, counts);
    };
    let x = rows.into_primitive().tensor();
    let w13 = w13.val().into_primitive().tensor();
    let w2 = w2.val().into_primitive().tensor();
    let state = FusedState {
        x: x.primitive.clone(),
        w13: w13.primitive.clone(),
        w2: w2.primitive.clone(),
        counts: counts.to_vec(),
        limit: experts.limit,
    };
    let output = inner_experts::<I>(&state)
        .forward_grouped(inner::<I, 2>(state.x.clone()), counts)
        .into_primitive()
        .tensor();
    let parents = [x.node.clone(), w13.node.clone(), w2.node.clone()];
    let result = match FusedBackward.prepare::<C>(parents).compute_bound().stateful() {
        OpsKind::Tracked(prep) => prep.finish(state, output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(result))
}

fn inner<I: Backend, const D: usize>(p: I::FloatTensorPrimitive) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// The experts on the inner backend (the model's own forward code, without autodiff).
fn inner_experts<I: Backend>(state: &FusedState<I>) -> Experts<I> {
    Experts {
        first: 0,
        w13_t: Some(Param::from_tensor(inner(state.w13.clone()))),
        w2_t: Some(Param::from_tensor(inner(state.w2.clone()))),
        packed: None,
        limit: state.limit,
    }
}

#[derive(Debug)]
struct FusedBackward;

/// The forward's inputs: the backward recomputes the activations from them.
#[derive(Debug, Clone)]
struct FusedState<I: Backend> {
    x: I::FloatTensorPrimitive,
    w13: I::FloatTensorPrimitive,
    w2: I::FloatTensorPrimitive,
    counts: Vec<usize>,
    limit: f64,
}

impl<I: Backend> Backward<I, 3> for FusedBackward {
    type State = FusedState<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let state = ops.state;
        let dy_all: Tensor<I, 2> = inner(grads.consume::<I>(&ops.node));
        let x_all: Tensor<I, 2> = inner(state.x);
        let w13_all: Tensor<I, 3> = inner(state.w13);
        let w2_all: Tensor<I, 3> = inner(state.w2);
        let [e_total, d, two_i] = w13_all.dims();
        let i = two_i / 2;
        let limit = state.limit;
        let device = x_all.device();
        let (mut dx, mut dw13, mut dw2) = (Vec::new(), Vec::new(), Vec::new());
        let mut offset = 0;
        for e in 0..e_total {
            let n = state.counts[e];
            if n == 0 {
                dw13.push(Tensor::zeros([1, d, two_i], &device));
                dw2.push(Tensor::zeros([1, i, d], &device));
                continue;
            }
            let x = x_all.clone().narrow(0, offset, n);
            let dy = dy_all.clone().narrow(0, offset, n);
            offset += n;
            let w13 = w13_all.clone().narrow(0, e, 1).reshape([d, two_i]);
            let w2 = w2_all.clone().narrow(0, e, 1).reshape([i, d]);
            let h = x.clone().matmul(w13.clone());
            let (g, u) = (h.clone().narrow(1, 0, i), h.narrow(1, i, i));
            let gc = g.clone().clamp_max(limit);
            let uc = u.clone().clamp(-limit, limit);
            let s = activation::sigmoid(gc.clone());
            let silu = gc.clone() * s.clone();
            let a = silu.clone() * uc.clone();
            dw2.push(a.transpose().matmul(dy.clone()).reshape([1, i, d]));
            let da = dy.matmul(w2.transpose());
            let dsilu = s.clone() + gc * s.clone() * (s.neg().add_scalar(1.0));
            let dg = (da.clone() * uc * dsilu).mask_fill(g.greater_elem(limit), 0.0);
            let out_of_range = u.clone().greater_elem(limit).bool_or(u.lower_elem(-limit));
            let du = (da * silu).mask_fill(out_of_range, 0.0);
            let dh = Tensor::cat(vec![dg, du], 1);
            dw13.push(x.transpose().matmul(dh.clone()).reshape([1, d, two_i]));
            dx.push(dh.matmul(w13.transpose()));
        }
        let [x_node, w13_node, w2_node] = ops.parents;
        if let Some(node) = x_node {
            grads.register::<I>(node.id, Tensor::cat(dx, 0).into_primitive().tensor());
        }
        if let Some(node) = w13_node {
            grads.register::<I>(node.id, Tensor::cat(dw13, 0).into_primitive().tensor());
        }
        if let Some(node) = w2_node {
            grads.register::<I>(node.id, Tensor::cat(dw2, 0).into_primitive().tensor());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;
    use burn_ndarray::NdArray;
    use v4_model::LocalExperts;

    type B = Autodiff<NdArray<f32>>;

    fn values(t: Tensor<NdArray<f32>, 2>) -> Vec<f32> {
        t.into_data().into_vec::<f32>().unwrap()
    }

    /// Gradients of `sum(out * probe)` w.r.t. the rows and both weight tensors.
    fn gradients(runner: &dyn ExpertRunner<B>, counts: &[usize]) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let device = Default::default();
        let seeded = |seed: u64, shape: [usize; 3]| {
            <NdArray<f32> as Backend>::seed(&device, seed);
            Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let (e, d, i) = (4, 8, 6);
        let experts = Experts {
            first: 0,
            w13_t: Some(Param::from_tensor(seeded(1, [e, d, 2 * i]).require_grad())),
            w2_t: Some(Param::from_tensor(seeded(2, [e, i, d]).require_grad())),
            packed: None,
            // Small enough that both clamps cut some of the activations.
            limit: 1.5,
        };
        let r: usize = counts.iter().sum();
        let rows = seeded(3, [1, r, d]).reshape([r, d]).require_grad();
        let probe = seeded(4, [1, r, d]).reshape([r, d]);
        let out = runner.run(0, &experts, rows.clone(), counts);
        let loss = (out.clone() * probe).sum();
        let grads = loss.backward();
        let flat = |t: Tensor<NdArray<f32>, 3>| {
            let n = t.shape().num_elements();
            values(t.reshape([1, n]))
        };
        (
            values(out.inner()),
            values(rows.grad(&grads).unwrap()),
            flat(experts.w13_t.as_ref().unwrap().val().grad(&grads).unwrap()),
            flat(experts.w2_t.as_ref().unwrap().val().grad(&grads).unwrap()),
        )
    }

    #[test]
    fn fused_experts_match_burns_autodiff_of_the_model_experts() {
        let counts = [3, 0, 2, 5];
        let reference = gradients(&LocalExperts, &counts);
        let fused = gradients(&FusedExperts, &counts);
        let parts = ["output", "rows", "w13", "w2"];
        for (name, (a, b)) in parts.iter().zip([
            (&reference.0, &fused.0),
            (&reference.1, &fused.1),
            (&reference.2, &fused.2),
            (&reference.3, &fused.3),
        ]) {
            assert_eq!(a.len(), b.len(), "{name}");
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs()));
            let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            assert!(
                diff <= 1e-5 * scale.max(1.0),
                "{name}: fused differs by {diff} (scale {scale})"
            );
        }
        // Expert 1 got no rows: a zero gradient, as burn's.
        let block = 8 * 12;
        assert!(fused.2[block..2 * block].iter().all(|&x| x == 0.0));
    }
}
