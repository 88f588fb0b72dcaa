//! Activation statistics for activation-aware FP4 calibration: the mean square `E[x_j²]` of every input
//! channel `j` of every routed expert's two projections, gathered while the model runs on calibration
//! text. A quantizer weights each block's squared error by these, so channels that carry large
//! activations get the accurate scales.
//!
//! [`ExpertActivationStats`] is an [`ExpertRunner`]: it computes the experts exactly as
//! [`LocalExperts`](crate::LocalExperts) does and measures their inputs on the way.

use crate::moe::{ExpertRunner, Experts};
use burn::tensor::{backend::Backend, Tensor};
use std::cell::RefCell;
use std::collections::BTreeMap;

/// Running sums of one MoE layer.
#[derive(Debug, Clone)]
struct LayerSums {
    /// Rows each expert received, `[E]`.
    rows: Vec<u64>,
    /// Σ x² of the gate/up projections' input, `[E, D]` row-major.
    input_sq: Vec<f64>,
    /// Σ h² of the down projection's input (the SwiGLU activation), `[E, I]` row-major.
    hidden_sq: Vec<f64>,
}

/// Per-input-channel mean squares of one layer's routed experts.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertMeanSquares {
    /// Rows each expert received.
    pub rows: Vec<u64>,
    /// `E[x_j²]` of the input of `gate_up_proj` (w1 and w3), `[E * D]`, expert by expert.
    pub gate_up: Vec<f32>,
    /// `E[h_j²]` of the input of `down_proj` (w2), `[E * I]`, expert by expert.
    pub down: Vec<f32>,
}

/// Runs the routed experts in this process and accumulates the mean square of their inputs.
#[derive(Debug, Default)]
pub struct ExpertActivationStats {
    layers: RefCell<BTreeMap<usize, LayerSums>>,
}

/// Σ over rows of `x²`: `[n, C] -> C` values on the host.
fn column_sum_squares<B: Backend>(x: Tensor<B, 2>) -> Vec<f64> {
    let sums = (x.clone() * x)
        .sum_dim(0)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("activations are float");
    sums.into_iter().map(f64::from).collect()
}

impl ExpertActivationStats {
    pub fn new() -> Self {
        Self::default()
    }

    /// Total rows seen, over all layers and experts.
    pub fn rows(&self) -> u64 {
        self.layers.borrow().values().flat_map(|l| l.rows.iter()).sum()
    }

    /// The mean squares per MoE layer index. An expert that received no calibration rows takes its
    /// layer's mean over all experts, so it is still calibrated by the layer's typical activations.
    pub fn mean_squares(&self) -> BTreeMap<usize, ExpertMeanSquares> {
        fn means(sums: &[f64], rows: &[u64]) -> Vec<f32> {
            let width = sums.len() / rows.len().max(1);
            let total: u64 = rows.iter().sum();
            let layer_mean: Vec<f64> = (0..width)
                .map(|j| sums.iter().skip(j).step_by(width).sum::<f64>() / total.max(1) as f64)
                .collect();
            sums.chunks_exact(width)
                .zip(rows)
                .flat_map(|(expert, &n)| {
                    expert.iter().zip(&layer_mean).map(move |(s, mean)| {
                        if n == 0 {
                            *mean as f32
                        } else {
                            (s / n as f64) as f32
                        }
                    })
                })
                .collect()
        }
        self.layers
            .borrow()
            .iter()
            .map(|(&layer, sums)| {
                let stats = ExpertMeanSquares {
                    rows: sums.rows.clone(),
                    gate_up: means(&sums.input_sq, &sums.rows),
                    down: means(&sums.hidden_sq, &sums.rows),
                };
                (layer, stats)
            })
            .collect()
    }
}

impl<B: Backend> ExpertRunner<B> for ExpertActivationStats {
    fn run(&self, layer: usize, experts: &Experts<B>, rows: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2> {
        let (e_total, d, i) = experts.shape();
        let mut layers = self.layers.borrow_mut();
        let sums = layers.entry(layer).or_insert_with(|| LayerSums {
            rows: vec![0; e_total],
            input_sq: vec![0.0; e_total * d],
            hidden_sq: vec![0.0; e_total * i],
        });
        let mut outputs = Vec::new();
        let mut offset = 0;
        for (e, &n) in counts.iter().enumerate() {
            if n == 0 {
                continue;
            }
            let input = rows.clone().narrow(0, offset, n);
            offset += n;
            let hidden = experts.swiglu(e, input.clone());
            sums.rows[e] += n as u64;
            let add = |acc: &mut [f64], new: Vec<f64>| acc.iter_mut().zip(new).for_each(|(a, b)| *a += b);
            add(&mut sums.input_sq[e * d..(e + 1) * d], column_sum_squares(input));
            add(
                &mut sums.hidden_sq[e * i..(e + 1) * i],
                column_sum_squares(hidden.clone()),
            );
            outputs.push(experts.down(e, hidden));
        }
        Tensor::cat(outputs, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::LocalExperts;
    use burn::module::Param;
    use burn::tensor::TensorData;
    use burn_ndarray::NdArray;

    type B = NdArray<f32>;

    fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<B, D> {
        Tensor::from_data(TensorData::new(values, shape), &Default::default())
    }

    /// Two experts, D = 2, I = 1, on three rows: two for expert 0, one for expert 1.
    #[test]
    fn mean_squares_match_a_hand_computation_and_outputs_match_local_experts() {
        let experts = Experts::<B> {
            first: 0,
            // [E, D, 2I]: expert 0 gate = x0, up = x1; expert 1 gate = x0 + x1, up = 1·x0.
            w13_t: Some(Param::from_tensor(tensor(
                vec![1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0],
                [2, 2, 2],
            ))),
            w2_t: Some(Param::from_tensor(tensor(vec![1.0, -1.0, 2.0, 0.5], [2, 1, 2]))),
            packed: None,
            limit: 10.0,
        };
        let rows = vec![1.0f32, 2.0, -3.0, 0.5, 0.25, -1.0];
        let x = tensor(rows.clone(), [3, 2]);
        let stats = ExpertActivationStats::new();
        let measured = ExpertRunner::<B>::run(&stats, 7, &experts, x.clone(), &[2, 1]);
        let local = LocalExperts.run(7, &experts, x, &[2, 1]);
        assert_eq!(measured.into_data(), local.into_data());

        let silu = |v: f32| v / (1.0 + (-v).exp());
        let h0 = [silu(1.0) * 2.0, silu(-3.0) * 0.5];
        let h1 = silu(0.25 - 1.0) * 0.25;
        let m = &stats.mean_squares()[&7];
        assert_eq!(m.rows, vec![2, 1]);
        let expected_gate_up = [(1.0 + 9.0) / 2.0, (4.0 + 0.25) / 2.0, 0.0625, 1.0];
        for (got, want) in m.gate_up.iter().zip(expected_gate_up) {
            assert!((got - want).abs() < 1e-6, "{:?}", m.gate_up);
        }
        let expected_down = [(h0[0] * h0[0] + h0[1] * h0[1]) / 2.0, h1 * h1];
        for (got, want) in m.down.iter().zip(expected_down) {
            assert!((got - want).abs() < 1e-6, "{:?}", m.down);
        }
        assert_eq!(stats.rows(), 3);
    }

    #[test]
    fn an_expert_without_rows_takes_the_layer_mean() {
        let experts = Experts::<B> {
            first: 0,
            w13_t: Some(Param::from_tensor(tensor(vec![1.0; 8], [2, 2, 2]))),
            w2_t: Some(Param::from_tensor(tensor(vec![1.0; 4], [2, 1, 2]))),
            packed: None,
            limit: 10.0,
        };
        let stats = ExpertActivationStats::new();
        ExpertRunner::<B>::run(
            &stats,
            0,
            &experts,
            tensor(vec![1.0, 2.0, 3.0, 4.0], [2, 2]),
            &[2, 0],
        );
        let m = &stats.mean_squares()[&0];
        assert_eq!(m.gate_up[2..], m.gate_up[..2]);
        assert_eq!(m.gate_up[..2], [5.0, 10.0]);
    }
}
