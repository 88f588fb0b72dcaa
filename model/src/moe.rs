//! V4's mixture of experts (§2.1): a router picks `K` of `E` routed experts per token, plus one shared
//! expert for every token. No dense FFN layers, no expert groups.
//!
//! ```text
//! s   = score(x Wg^T)                      sqrt(softplus(.)) in V4
//! idx = tid2eid[token]  (hash layers)  |  topK(s + bias)  (bias chooses, it does not weight)
//! w   = s[idx] / sum(s[idx]) * route_scale
//! y   = sum_e w_e * W2_e(silu(min(W1_e x, L)) * clamp(W3_e x, -L, L)) + W2_s(silu(W1_s x) * W3_s x)
//! ```
//! Experts run batched: the rows routed to each expert are gathered and multiplied once per expert. The
//! "run these experts on these rows" step goes through [`ExpertRunner`], so expert parallelism can send
//! the rows to other processes without touching the model.

use crate::config::{RoutingKind, ScoreFunc, V4Config};
use crate::loader::{PackedWeight, Weights};
use crate::norm::Linear;
use crate::probe::{point, tap_in, wanted, Probe, Scope};
use crate::weights::{Init, LoadError};
use burn::module::{Module, Param};
use burn::tensor::{activation, backend::Backend, IndexingUpdateOp, Int, Tensor, TensorData};

/// The routed experts of one layer (all of them, or one rank's consecutive share under expert
/// parallelism): stacked f32 tensors (trainable), or each expert's matrices in their stored precision.
/// Exactly one of `w13_t`/`w2_t` and `packed` is set. Expert indices below are local (0 = `first`).
#[derive(Module, Debug)]
pub struct Experts<B: Backend> {
    /// The layer's index of the first expert held.
    pub first: usize,
    /// Gate (w1) then up (w3) projections, transposed per expert: `[E, D, 2I]` (HF's `gate_up_proj`
    /// is `[E, 2I, D]`).
    pub w13_t: Option<Param<Tensor<B, 3>>>,
    /// Down projections, transposed per expert: `[E, I, D]` (HF's `down_proj` is `[E, D, I]`).
    pub w2_t: Option<Param<Tensor<B, 3>>>,
    /// Per expert, `gate_up [2I, D]` and `down [D, I]` in their stored precision.
    pub packed: Option<Vec<(PackedWeight, PackedWeight)>>,
    /// SwiGLU clamp `L`.
    pub limit: f64,
}

/// The experts' f32 weight stacks: `w13_t [E, D, 2I]` (gate and up, fused) and `w2_t [E, I, D]`.
pub type DenseExperts<'a, B> = (&'a Param<Tensor<B, 3>>, &'a Param<Tensor<B, 3>>);

impl<B: Backend> Experts<B> {
    /// Loads HF's fused `gate_up_proj [E, 2I, D]` and `down_proj [E, D, I]` under `w`: the experts of
    /// the load's [`ExpertShard`](crate::loader::ExpertShard), reading only their rows.
    pub fn load(w: &Weights<'_, '_, B>, e: usize, d: usize, i: usize, limit: f64) -> Result<Self, LoadError> {
        let held = w.expert_range(e);
        let first = held.start;
        let packed_gate_up = w.packed_experts("gate_up_proj", [e, 2 * i, d], held.clone())?;
        let packed_down = w.packed_experts("down_proj", [e, d, i], held.clone())?;
        if let (Some(gate_up), Some(down)) = (packed_gate_up, packed_down) {
            return Ok(Self {
                first,
                w13_t: None,
                w2_t: None,
                packed: Some(gate_up.into_iter().zip(down).collect()),
                limit,
            });
        }
        Ok(Self {
            first,
            w13_t: Some(w.experts_transposed("gate_up_proj", [e, 2 * i, d], held.clone(), Init::FanIn)?),
            w2_t: Some(w.experts_transposed("down_proj", [e, d, i], held, Init::FanIn)?),
            packed: None,
            limit,
        })
    }

    /// The trainable `(w13_t, w2_t)`; None when the experts are kept in their stored precision.
    pub fn dense(&self) -> Option<DenseExperts<'_, B>> {
        self.w13_t.as_ref().zip(self.w2_t.as_ref())
    }

    /// `(E, D, I)`: experts, model width, hidden width.
    pub fn shape(&self) -> (usize, usize, usize) {
        match (&self.w13_t, &self.packed) {
            (Some(w), _) => {
                let [e, d, two_i] = w.dims();
                (e, d, two_i / 2)
            }
            (None, Some(p)) => (p.len(), p[0].0.matrix.cols, p[0].1.matrix.cols),
            (None, None) => (0, 0, 0),
        }
    }

    /// Bytes the weights occupy as held (stored precision, or f32).
    pub fn held_bytes(&self) -> usize {
        match &self.packed {
            Some(p) => p
                .iter()
                .map(|(a, b)| a.matrix.stored_bytes() + b.matrix.stored_bytes())
                .sum(),
            None => {
                let (e, d, i) = self.shape();
                4 * 3 * e * d * i
            }
        }
    }

    /// Number of experts held.
    pub fn len(&self) -> usize {
        self.shape().0
    }

    /// Whether there are no experts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Expert `e` on `rows: [n, D]`: `W2(silu(min(W1 x, L)) * clamp(W3 x, -L, L))`.
    pub fn forward_expert(&self, e: usize, rows: Tensor<B, 2>) -> Tensor<B, 2> {
        self.down(e, self.swiglu(e, rows))
    }

    /// The hidden activation of expert `e` on `rows: [n, D]`: `silu(min(W1 x, L)) * clamp(W3 x, -L, L)`,
    /// `[n, I]` (the input of its down projection).
    pub fn swiglu(&self, e: usize, rows: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = match (&self.w13_t, &self.packed) {
            (Some(w13), _) => {
                let [_, d, two_i] = w13.dims();
                rows.matmul(w13.val().narrow(0, e, 1).reshape([d, two_i]))
            }
            (None, Some(p)) => p[e].0.forward(rows),
            (None, None) => unreachable!("experts hold weights"),
        };
        self.activate(h)
    }

    /// `silu(min(gate, L)) * clamp(up, -L, L)` of the gate and up projections `h: [n, 2I]` -> `[n, I]`.
    fn activate(&self, h: Tensor<B, 2>) -> Tensor<B, 2> {
        let i = h.dims()[1] / 2;
        let gate = h.clone().narrow(1, 0, i).clamp_max(self.limit);
        let up = h.narrow(1, i, i).clamp(-self.limit, self.limit);
        activation::silu(gate) * up
    }

    /// The down projection of expert `e`: `[n, I] -> [n, D]`.
    pub fn down(&self, e: usize, hidden: Tensor<B, 2>) -> Tensor<B, 2> {
        match (&self.w2_t, &self.packed) {
            (Some(w2), _) => {
                let [_, i, d] = w2.dims();
                hidden.matmul(w2.val().narrow(0, e, 1).reshape([i, d]))
            }
            (None, Some(p)) => p[e].1.forward(hidden),
            (None, None) => unreachable!("experts hold weights"),
        }
    }

    /// Runs `rows: [R, D]`, grouped by expert (`counts[e]` consecutive rows for held expert `e`), and
    /// returns the outputs in the same order.
    pub fn forward_grouped(&self, rows: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2> {
        assert_eq!(counts.len(), self.len(), "a count per held expert");
        let used: Vec<(usize, usize)> = counts
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, n)| n > 0)
            .collect();
        if let (Some(p), false) = (&self.packed, used.is_empty()) {
            // Stored precision: every expert's projection in one grouped product (one parallel section
            // for a decode step's experts instead of one per expert and projection).
            let gate_up: Vec<_> = used.iter().map(|&(e, n)| (n, &p[e].0)).collect();
            let down: Vec<_> = used.iter().map(|&(e, n)| (n, &p[e].1)).collect();
            let hidden = self.activate(PackedWeight::forward_grouped(&gate_up, rows));
            return PackedWeight::forward_grouped(&down, hidden);
        }
        let mut outputs = Vec::new();
        let mut offset = 0;
        for (e, &n) in counts.iter().enumerate() {
            if n > 0 {
                outputs.push(self.forward_expert(e, rows.clone().narrow(0, offset, n)));
                offset += n;
            }
        }
        Tensor::cat(outputs, 0)
    }
}

/// Executes routed experts on grouped rows. The local runner computes them in place; an expert-parallel
/// runner exchanges the rows with the ranks that own the experts.
pub trait ExpertRunner<B: Backend> {
    /// `rows: [R, D]` grouped by expert (`counts[e]` rows for each of the layer's `E` experts; this
    /// process may hold only some of them: [`Experts::first`]); returns `[R, D]`.
    fn run(&self, layer: usize, experts: &Experts<B>, rows: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2>;
}

/// Runs every expert in this process (which holds them all).
#[derive(Debug, Default, Clone, Copy)]
pub struct LocalExperts;

impl<B: Backend> ExpertRunner<B> for LocalExperts {
    fn run(&self, _layer: usize, experts: &Experts<B>, rows: Tensor<B, 2>, counts: &[usize]) -> Tensor<B, 2> {
        experts.forward_grouped(rows, counts)
    }
}

/// The shared expert: a plain (unclamped) SwiGLU MLP.
#[derive(Module, Debug)]
pub struct SharedExpert<B: Backend> {
    /// `[I, D]`
    pub w1: Linear<B>,
    /// `[D, I]`
    pub w2: Linear<B>,
    /// `[I, D]`
    pub w3: Linear<B>,
}

impl<B: Backend> SharedExpert<B> {
    pub fn load(w: &Weights<'_, '_, B>, d: usize, i: usize) -> Result<Self, LoadError> {
        Ok(Self {
            w1: Linear::load(w, "gate_proj", i, d)?,
            w2: Linear::load(w, "down_proj", d, i)?,
            w3: Linear::load(w, "up_proj", i, d)?,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.w2
            .forward(activation::silu(self.w1.forward(x.clone())) * self.w3.forward(x))
    }
}

/// One MoE layer.
#[derive(Module, Debug)]
pub struct Moe<B: Backend> {
    /// Router projection `[E, D]`.
    pub gate: Linear<B>,
    /// Selection-only bias of top-k layers, `[E]` (updated by load balancing, never by gradients).
    pub bias: Vec<f32>,
    /// Token id -> expert ids of hash layers, `[vocab * K]`.
    pub tid2eid: Vec<u32>,
    /// The checkpoint name of the routing state (`bias` of top-k layers, `tid2eid` of hash layers).
    pub state_name: String,
    pub experts: Experts<B>,
    pub shared: SharedExpert<B>,
    pub routing: RoutingKind,
    pub score_func: ScoreFunc,
    /// The layer's routed experts `E` (this process may hold only some: [`Experts::first`]).
    pub n_routed: usize,
    pub top_k: usize,
    pub route_scale: f64,
    /// Also compute the sequence-wise balance term of a top-k layer (training with a balance loss).
    pub sequence_balance: bool,
}

/// What a MoE layer reports besides its output.
#[derive(Debug)]
pub struct Routing<B: Backend> {
    /// Rows routed to each expert.
    pub counts: Vec<usize>,
    /// With [`Moe::sequence_balance`] on a top-k layer, DeepSeek's sequence-wise balance term summed over
    /// the batch's sequences: `sum_b sum_i f_bi P_bi`, `f_bi = E / (K S) * (tokens of b routed to i)`,
    /// `P_bi = mean_t s_ti / sum_j s_tj` (differentiable through `P`). `[1]`.
    pub balance: Option<Tensor<B, 1>>,
}

/// `sqrt(softplus(x))` with softplus computed without overflow.
fn sqrt_softplus<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    let softplus = x.clone().clamp_min(0.0) + x.abs().neg().exp().log1p();
    softplus.sqrt()
}

impl<B: Backend> Moe<B> {
    /// Loads the layer's router (`gate.*`), routed experts (`experts.*`) and shared expert
    /// (`shared_experts.*`) under `w`.
    pub fn load(cfg: &V4Config, w: &Weights<'_, '_, B>, routing: RoutingKind) -> Result<Self, LoadError> {
        let (d, e, i, k) = (
            cfg.hidden_size,
            cfg.n_routed_experts,
            cfg.moe_intermediate_size,
            cfg.experts_per_token,
        );
        let gate = w.pp("gate");
        let state = match routing {
            RoutingKind::TopK => "e_score_correction_bias",
            RoutingKind::Hash => "tid2eid",
        };
        let (bias, tid2eid) = match routing {
            RoutingKind::TopK => (gate.host_f32(state, &[e], Init::Small)?, Vec::new()),
            RoutingKind::Hash => {
                let table = gate.host_i64(state, &[cfg.vocab_size, k], Init::ExpertIds)?;
                let table = table
                    .into_iter()
                    .map(|x| {
                        u32::try_from(x)
                            .ok()
                            .filter(|&x| (x as usize) < e)
                            .ok_or_else(|| gate.value_error(state, format!("expert id {x} outside 0..{e}")))
                    })
                    .collect::<Result<Vec<u32>, _>>()?;
                (vec![0.0; e], table)
            }
        };
        Ok(Moe {
            gate: Linear::load(w, "gate", e, d)?,
            bias,
            tid2eid,
            state_name: gate.name(state),
            experts: Experts::load(&w.pp("experts"), e, d, i, cfg.swiglu_limit)?,
            shared: SharedExpert::load(&w.pp("shared_experts"), d, i)?,
            routing,
            score_func: cfg.score_func,
            n_routed: e,
            top_k: k,
            route_scale: cfg.route_scale,
            sequence_balance: false,
        })
    }

    /// Routes and runs `x: [B, S, D]` for the tokens `ids` (`[B * S]`, for hash routing). Returns the
    /// output and the routing statistics.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        ids: &[u32],
        layer: usize,
        runner: &dyn ExpertRunner<B>,
        probe: &mut dyn Probe,
        scope: Scope,
    ) -> (Tensor<B, 3>, Routing<B>) {
        let [batch, seq, d] = x.dims();
        let (n, k) = (batch * seq, self.top_k);
        let device = x.device();
        let flat = x.reshape([n, d]);
        let (chosen, weights, balance) = self.route(flat.clone(), ids, [batch, seq], probe, scope);

        // Dispatch: the rows of each expert together, in token order; combine: each output weighted and
        // added back at its token.
        let (counts, pair_order) = group_by_expert(&chosen, self.n_routed);
        let token_order: Vec<i64> = pair_order.iter().map(|&p| p / k as i64).collect();
        let tokens = Tensor::<B, 1, Int>::from_data(TensorData::new(token_order, [n * k]), &device);
        let pairs = Tensor::<B, 1, Int>::from_data(TensorData::new(pair_order, [n * k]), &device);
        let rows = flat.clone().select(0, tokens.clone());
        let outputs = runner.run(layer, &self.experts, rows, &counts);
        let pair_weights = weights.reshape([n * k]).select(0, pairs).reshape([n * k, 1]);
        let routed = Tensor::zeros([n, d], &device).select_assign(
            0,
            tokens,
            outputs * pair_weights,
            IndexingUpdateOp::Add,
        );
        let out = (routed + self.shared.forward(flat)).reshape([batch, seq, d]);
        tap_in(probe, scope, point::FFN_OUTPUT, &out);
        (out, Routing { counts, balance })
    }

    /// The router (DeepSeek's `Gate`) on `flat: [n, D]` (`n = batch * seq` tokens `ids`): each token's `k`
    /// experts (`[n * k]`, by rank), their combine weights `[n, k]`, and the sequence-wise balance term
    /// when it is on.
    fn route(
        &self,
        flat: Tensor<B, 2>,
        ids: &[u32],
        [batch, seq]: [usize; 2],
        probe: &mut dyn Probe,
        scope: Scope,
    ) -> (Vec<usize>, Tensor<B, 2>, Option<Tensor<B, 1>>) {
        let (n, k) = (batch * seq, self.top_k);
        let logits = self.gate.forward(flat);
        let scores = match self.score_func {
            ScoreFunc::SqrtSoftplus => sqrt_softplus(logits),
            ScoreFunc::Sigmoid => activation::sigmoid(logits),
            ScoreFunc::Softmax => activation::softmax(logits, 1),
        };
        tap_in(probe, scope, point::ROUTER_SCORES, &scores);
        let chosen: Vec<usize> = match self.routing {
            RoutingKind::Hash => ids
                .iter()
                .flat_map(|&t| self.tid2eid[t as usize * k..][..k].iter().map(|&e| e as usize))
                .collect(),
            RoutingKind::TopK => {
                let host = scores
                    .clone()
                    .into_data()
                    .convert::<f32>()
                    .into_vec::<f32>()
                    .expect("router scores are f32");
                top_k_biased(&host, &self.bias, k)
            }
        };
        if let Some(name) = wanted(probe, scope, point::ROUTER_INDICES) {
            let ids: Vec<i64> = chosen.iter().map(|&e| e as i64).collect();
            probe.record(&name, TensorData::new(ids, [n, k]));
        }
        let balance = (self.sequence_balance && self.routing == RoutingKind::TopK)
            .then(|| self.balance_term(&scores, &chosen, [batch, seq]));
        let index = Tensor::<B, 2, Int>::from_data(
            TensorData::new(chosen.iter().map(|&e| e as i64).collect::<Vec<_>>(), [n, k]),
            &scores.device(),
        );
        let mut weights = scores.gather(1, index);
        if self.score_func != ScoreFunc::Softmax {
            weights = weights.clone() / weights.sum_dim(1).add_scalar(1e-20);
        }
        let weights = weights.mul_scalar(self.route_scale);
        tap_in(probe, scope, point::ROUTER_WEIGHTS, &weights);
        (chosen, weights, balance)
    }

    /// DeepSeek's sequence-wise balance term (see [`Routing::balance`]) of `scores: [n, E]` and the
    /// chosen experts.
    fn balance_term(
        &self,
        scores: &Tensor<B, 2>,
        chosen: &[usize],
        [batch, seq]: [usize; 2],
    ) -> Tensor<B, 1> {
        let (experts, k) = (self.n_routed, self.top_k);
        let mut f = vec![0f32; batch * experts];
        for (pair, &e) in chosen.iter().enumerate() {
            f[(pair / k / seq) * experts + e] += 1.0;
        }
        let scale = experts as f32 / (k * seq) as f32;
        let f = Tensor::<B, 2>::from_data(TensorData::new(f, [batch, experts]), &scores.device())
            .mul_scalar(scale);
        let affinity = scores.clone() / scores.clone().sum_dim(1);
        let p = affinity
            .reshape([batch, seq, experts])
            .mean_dim(1)
            .reshape([batch, experts]);
        (p * f).sum()
    }
}

/// Each row's `k` experts of highest `score + bias` (`scores`: rows of `bias.len()`), by rank; ties go to
/// the lower index. The bias only selects: the combine weights use the unbiased scores.
fn top_k_biased(scores: &[f32], bias: &[f32], k: usize) -> Vec<usize> {
    let experts = bias.len();
    let mut chosen = Vec::with_capacity(scores.len() / experts * k);
    let mut order: Vec<usize> = Vec::with_capacity(experts);
    for row in scores.chunks_exact(experts) {
        let biased = |e: usize| row[e] + bias[e];
        let by_rank = |a: &usize, b: &usize| biased(*b).total_cmp(&biased(*a)).then(a.cmp(b));
        order.clear();
        order.extend(0..experts);
        if k < experts {
            order.select_nth_unstable_by(k - 1, by_rank);
        }
        order.truncate(k);
        order.sort_unstable_by(by_rank);
        chosen.extend_from_slice(&order);
    }
    chosen
}

/// Groups the (token, slot) pairs of `chosen` by expert with a counting sort (tokens stay in order within
/// an expert): the rows each expert receives, and the pair indices in expert order.
fn group_by_expert(chosen: &[usize], experts: usize) -> (Vec<usize>, Vec<i64>) {
    let mut counts = vec![0usize; experts];
    for &e in chosen {
        counts[e] += 1;
    }
    let mut next: Vec<usize> = counts
        .iter()
        .scan(0, |acc, &c| {
            let start = *acc;
            *acc += c;
            Some(start)
        })
        .collect();
    let mut pair_order = vec![0i64; chosen.len()];
    for (pair, &e) in chosen.iter().enumerate() {
        pair_order[next[e]] = pair as i64;
        next[e] += 1;
    }
    (counts, pair_order)
}
