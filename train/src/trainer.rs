//! The training loop, generic over burn's [`AutodiffBackend`].

use crate::adamw::{sum_of_squares, AdamW};
use crate::checkpoint::{self, CheckpointData, MomentState, SharedTensor, TrainerState};
use crate::collective::{Collective, Groups, SingleProcess};
use crate::config::TrainConfig;
use crate::data::{load_windows, Loader, Tokenizer, Window};
use crate::error::TrainError;
use crate::expert_parallel::ExpertParallel;
use crate::fused_experts::FusedExperts;
use crate::metrics::{MetricsWriter, MoeHealth};
use crate::params::{host_params, named_params, routing_state, to_checkpoint, HostF32, NamedParam};
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{activation, Int, Tensor, TensorData};
use indicatif::{ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;
use v4_checkpoint::read_config;
use v4_model::config::RoutingKind;
use v4_model::{
    ExpertRunner, ExpertShard, ForwardOutput, LoadPlan, ModelCache, Pass, RandomWeights, Tokens, V4Model,
};

/// How a run ends early (for tests and `--stop-after`) and which processes take part.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Stop (without a final checkpoint, as if interrupted) once this many optimizer steps are done.
    pub stop_after: Option<usize>,
    /// Print nothing.
    pub quiet: bool,
    /// The ranks of an expert-parallel run (None: this process alone). Its size must equal
    /// `[parallel] expert_parallel`.
    pub collective: Option<Arc<dyn Collective>>,
    /// Write the first step's gradients (summed over the ranks, before clipping) here (safetensors).
    pub dump_gradients: Option<PathBuf>,
    /// Set (by a Ctrl-C handler) to end the run after the current step, writing a checkpoint. In an
    /// expert-parallel run the ranks agree on it during the step, so they stop at the same one.
    pub interrupt: Option<Arc<AtomicBool>>,
    /// The device's peak FLOP/s (for the MFU; None: not reported).
    pub peak_flops: Option<f64>,
}

/// One optimizer step's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct StepLog {
    /// 1-based step number.
    pub step: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs utilisation: `tokens/s * 6 * active parameters / peak` (with a known peak).
    pub mfu: Option<f64>,
    /// The sequence-wise balance loss (before its weight alpha), when it is on.
    pub balance: Option<f64>,
    /// The MTP loss (before its weight, averaged over depths), when `[mtp] weight` is on.
    pub mtp: Option<f64>,
    /// Under expert parallelism, the share of the step this rank spent in the all-to-all exchanges.
    pub all_to_all: Option<f64>,
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    /// The step the run started from (0, or the resumed checkpoint's).
    pub start_step: usize,
    pub steps: Vec<StepLog>,
    /// `(step, validation loss)`, the first at the starting step.
    pub validations: Vec<(usize, f64)>,
    /// `(step, MTP validation loss)` (averaged over depths), when the model has MTP layers.
    pub mtp_validations: Vec<(usize, f64)>,
    pub checkpoints: Vec<PathBuf>,
    /// Per top-k layer, the final selection bias.
    pub final_biases: Vec<Vec<f32>>,
    /// The run ended early on [`RunOptions::interrupt`].
    pub interrupted: bool,
}

type Inner<B> = <B as AutodiffBackend>::InnerBackend;

/// Each trainable parameter's gradient, flattened, on the host.
type HostGrads = HashMap<ParamId, Vec<f32>>;

/// Masked next-token cross-entropy summed over targets and divided by `denom`.
fn masked_loss<B: Backend>(
    logits: Tensor<B, 3>,
    targets: Vec<i64>,
    mask: Vec<f32>,
    denom: f64,
) -> Tensor<B, 1> {
    let [b, s, _] = logits.dims();
    let device = logits.device();
    let logp = activation::log_softmax(logits, 2);
    let t = Tensor::<B, 3, Int>::from_data(TensorData::new(targets, [b, s, 1]), &device);
    let picked = logp.gather(2, t).reshape([b, s]);
    let m = Tensor::<B, 2>::from_data(TensorData::new(mask, [b, s]), &device);
    (picked * m).sum().neg().div_scalar(denom)
}

/// Inputs, targets and target mask of some windows.
fn batch_tensors(windows: &[&Window]) -> (Tokens, Vec<i64>, Vec<f32>) {
    let s = windows[0].tokens.len() - 1;
    let mut ids = Vec::with_capacity(windows.len() * s);
    let mut targets = Vec::with_capacity(windows.len() * s);
    let mut mask = Vec::with_capacity(windows.len() * s);
    for w in windows {
        ids.extend_from_slice(&w.tokens[..s]);
        targets.extend(w.tokens[1..].iter().map(|&t| t as i64));
        mask.extend(w.mask[1..].iter().map(|&m| if m { 1.0f32 } else { 0.0 }));
    }
    (
        Tokens {
            ids,
            batch: windows.len(),
            seq: s,
        },
        targets,
        mask,
    )
}

/// Targets in `windows` for a prediction `ahead` tokens past each input position (1: the main model,
/// `2 + k`: MTP depth `k`).
fn targets_in(windows: &[&Window], ahead: usize) -> usize {
    windows
        .iter()
        .map(|w| w.mask.iter().skip(ahead).filter(|&&m| m).count())
        .sum()
}

/// `[b, s]` row-major values shifted left by `by` columns: `[b, s - by]`.
fn shifted<T: Copy>(values: &[T], b: usize, s: usize, by: usize) -> Vec<T> {
    (0..b)
        .flat_map(|row| values[row * s + by..(row + 1) * s].iter().copied())
        .collect()
}

/// A micro-batch's forward from a fresh state: the main pass, plus the MTP depths' logits when `with_mtp`.
fn forward<B: Backend>(
    model: &V4Model<B>,
    tokens: &Tokens,
    runner: &dyn ExpertRunner<B>,
    with_mtp: bool,
) -> Result<ForwardOutput<B>, TrainError> {
    let mut cache = ModelCache::new(model.layers.len());
    let pass = Pass::new().runner(runner).mtp(with_mtp);
    Ok(model.forward_with(tokens, &mut cache, pass)?)
}

/// The MTP losses of a micro-batch, per depth: depth `k`'s cross-entropy on the token `2 + k` ahead
/// (`targets`/`mask` are the main model's, one ahead), summed and divided by `denoms[k]`.
fn mtp_losses<B: Backend>(
    logits: Vec<Tensor<B, 3>>,
    targets: &[i64],
    mask: &[f32],
    denoms: &[usize],
) -> Vec<Tensor<B, 1>> {
    logits
        .into_iter()
        .enumerate()
        .map(|(k, logits)| {
            let [b, n, _] = logits.dims();
            let s = n + 1 + k;
            masked_loss(
                logits,
                shifted(targets, b, s, 1 + k),
                shifted(mask, b, s, 1 + k),
                denoms[k].max(1) as f64,
            )
        })
        .collect()
}

/// Mean loss per target token of `model` over `windows` (in batches of `batch`, experts run by `runner`:
/// under expert parallelism every rank evaluates every window): the main model's, and the MTP layers'
/// averaged over depths (None without MTP layers).
pub fn evaluate<B: Backend>(
    model: &V4Model<B>,
    windows: &[Window],
    batch: usize,
    runner: &dyn ExpertRunner<B>,
) -> Result<(f64, Option<f64>), TrainError> {
    let depths = model.mtp.len();
    let refs: Vec<&Window> = windows.iter().collect();
    let denoms: Vec<usize> = (0..depths).map(|k| targets_in(&refs, 2 + k)).collect();
    let (mut sum, mut mtp) = (0.0f64, 0.0f64);
    for chunk in refs.chunks(batch) {
        let (tokens, targets, mask) = batch_tensors(chunk);
        let out = forward(model, &tokens, runner, depths > 0)?;
        sum += masked_loss(out.logits, targets.clone(), mask.clone(), 1.0)
            .into_scalar()
            .elem_f64();
        for loss in mtp_losses(out.mtp_logits, &targets, &mask, &denoms) {
            mtp += loss.into_scalar().elem_f64() / depths as f64;
        }
    }
    let main = sum / targets_in(&refs, 1).max(1) as f64;
    Ok((main, (depths > 0).then_some(mtp)))
}

trait ElemF64 {
    fn elem_f64(self) -> f64;
}
impl<E: burn::tensor::ElementConversion> ElemF64 for E {
    fn elem_f64(self) -> f64 {
        self.elem::<f64>()
    }
}

/// Adds each parameter's gradient (flattened) into `acc`.
struct GradCollect<'a, B: AutodiffBackend> {
    grads: &'a B::Gradients,
    acc: &'a mut HashMap<ParamId, Tensor<Inner<B>, 1>>,
    trainable: &'a HashSet<ParamId>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for GradCollect<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if !self.trainable.contains(&param.id) {
            return;
        }
        if let Some(g) = param.val().grad(self.grads) {
            let n = g.shape().num_elements();
            let g = g.reshape([n]);
            let sum = match self.acc.remove(&param.id) {
                Some(prev) => prev + g,
                None => g,
            };
            self.acc.insert(param.id, sum);
        }
    }
}

/// Applies AdamW to every parameter with a gradient (host buffers, see [`crate::adamw`]).
struct Update<'a> {
    optim: &'a AdamW,
    lr: f64,
    /// Clipping factor applied to every gradient.
    grad_scale: f32,
    grads: &'a mut HashMap<ParamId, Vec<f32>>,
    states: &'a mut HashMap<ParamId, MomentState>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Update<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let Some(grad) = self.grads.remove(&id) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let shape = tensor.shape();
        let device = tensor.device();
        let mut values = tensor
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 parameter");
        let state = self.states.entry(id).or_insert_with(|| AdamW::init(values.len()));
        self.optim
            .step(self.lr, &mut values, &grad, self.grad_scale, state);
        let value = Tensor::<B, D>::from_data(TensorData::new(values, shape), &device).require_grad();
        Param::from_mapped_value(id, value, mapper)
    }
}

/// Loads the initial model (or the resumed one), with only the experts of `experts`, and says where its
/// `config.json` text came from.
fn load_model<B: Backend>(
    cfg: &TrainConfig,
    resume: Option<&PathBuf>,
    experts: ExpertShard,
    device: &B::Device,
) -> Result<(V4Model<B>, String), TrainError> {
    let plan = LoadPlan {
        experts,
        ..LoadPlan::default()
    };
    let from_dir = |dir: &PathBuf| -> Result<(V4Model<B>, String), TrainError> {
        let config = read_config(dir)?;
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(TrainError::io(&path))?;
        // Either layout: a DeepSeek release checkpoint (FP8 / FP4) trains from its dequantised weights.
        let source = v4_checkpoint::open(dir)?;
        let model = V4Model::load_plan(&config, source.as_ref(), device, plan.clone())?;
        Ok((model, text))
    };
    if let Some(dir) = resume {
        return from_dir(dir);
    }
    if let Some(dir) = &cfg.model.checkpoint {
        return from_dir(dir);
    }
    let path = cfg
        .model
        .config
        .as_ref()
        .expect("validated: checkpoint or config");
    let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
    let config = v4_model::V4Config::from_json_str(&text).map_err(|e| TrainError::Config {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let source = RandomWeights {
        seed: cfg.model.seed,
        experts: config.n_routed_experts,
    };
    let model = V4Model::load_plan(&config, &source, device, plan)?;
    Ok((model, text))
}

/// Counts each parameter's scalars.
struct Sizes(HashMap<ParamId, usize>);

impl<B: Backend> ModuleVisitor<B> for Sizes {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.insert(param.id, param.shape().num_elements());
    }
}

/// Runs the training described by `cfg` on `device`: in this process alone, or as one rank of an
/// expert-parallel run (`opts.collective`), where each rank holds and writes its own experts and rank 0
/// prints and logs.
pub fn train<B: AutodiffBackend>(
    cfg: &TrainConfig,
    device: &B::Device,
    opts: &RunOptions,
) -> Result<RunReport, TrainError>
where
    ExpertParallel: ExpertRunner<B>,
    FusedExperts: ExpertRunner<B>,
{
    let collective: Arc<dyn Collective> = opts.collective.clone().unwrap_or_else(|| Arc::new(SingleProcess));
    let (rank, ranks) = (collective.rank(), collective.size());
    let (ep, dp) = (cfg.parallel.expert_parallel, cfg.parallel.data_parallel);
    if ranks != ep * dp {
        return Err(TrainError::Mismatch(format!(
            "[parallel] expert_parallel = {ep} x data_parallel = {dp} but {ranks} process(es) run: start it \
             with `mpirun -np {} v4 train ...`",
            ep * dp
        )));
    }
    let groups = Groups::new(collective.clone(), ep);
    let lead = rank == 0;
    let bar = match lead && !opts.quiet {
        true => ProgressBar::new(cfg.schedule.steps as u64),
        false => ProgressBar::hidden(),
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:40} step {pos}/{len}, {elapsed} elapsed, ETA {eta}")
            .expect("a valid template"),
    );
    let say = |s: String| {
        if !opts.quiet && lead {
            bar.suspend(|| println!("{s}"));
        }
    };
    let (tokenizer, train_windows, valid_windows) = load_data(cfg)?;
    let micro = cfg.training.batch;

    // Resume?
    let resume_dir: Option<PathBuf> = match cfg.checkpoint.resume.as_deref() {
        None => None,
        Some("latest") => checkpoint::latest(cfg.checkpoint.dir.as_ref().expect("validated"))?,
        Some(path) => Some(PathBuf::from(path)),
    };
    if let Some(dir) = &resume_dir {
        checkpoint::verify(dir)?;
    }
    let expert_parallel = ExpertParallel::new(groups.experts.clone());
    let (mut model, config_json) =
        load_model::<B>(cfg, resume_dir.as_ref(), expert_parallel.shard(), device)?;
    check_vocabulary(
        cfg,
        &tokenizer,
        [&train_windows, &valid_windows],
        model.config.vocab_size,
    )?;
    let runner: &dyn ExpertRunner<B> = if ep > 1 { &expert_parallel } else { &FusedExperts };
    // The MTP layers are trained (and their loss computed) only with a weight.
    let mtp_depths = if cfg.mtp.weight > 0.0 { model.mtp.len() } else { 0 };
    if cfg.mtp.weight > 0.0 && mtp_depths == 0 {
        return Err(TrainError::Mismatch(
            "[mtp] weight is set, but the model has no MTP layer (num_nextn_predict_layers = 0)".into(),
        ));
    }
    if cfg.moe.alpha > 0.0 {
        for block in model.layers.iter_mut() {
            block.ffn.sequence_balance = block.ffn.routing == RoutingKind::TopK;
        }
    }
    // Training FLOPs per token: forward + backward (twice the forward's), the forward counting every
    // active parameter but the embedding table (a lookup) plus attention's score and value products.
    let seq = cfg.data.seq_len.max(1);
    let flops_per_token = 3.0 * model.config.forward_flops(seq) / seq as f64;
    let mut sizes = Sizes(HashMap::new());
    model.visit(&mut sizes);
    let named: Vec<NamedParam> = named_params(&model);
    let trainable: HashSet<ParamId> = named
        .iter()
        .filter(|p| !cfg.training.freeze.iter().any(|f| p.name.contains(f.as_str())))
        .map(|p| p.id)
        .collect();
    let (state, mut states) = match &resume_dir {
        Some(dir) => resume_state(dir, &named, &sizes.0)?,
        None => (TrainerState::default(), HashMap::new()),
    };
    let optim = AdamW {
        beta_1: cfg.optimizer.betas[0],
        beta_2: cfg.optimizer.betas[1],
        eps: cfg.optimizer.eps,
        weight_decay: cfg.optimizer.weight_decay,
    };

    let mut loader = Loader::new(train_windows, cfg.training.seed, state.loader);
    let mut tokens_seen = state.tokens_seen;
    let mut report = RunReport {
        start_step: state.step,
        ..Default::default()
    };
    let mut metrics = match lead {
        true => cfg.logging.tensorboard.as_deref().map(MetricsWriter::create),
        false => None,
    };
    if let Some(dir) = &resume_dir {
        say(format!("resumed from {} at step {}", dir.display(), state.step));
    }
    say(format!(
        "training {} of {} parameter tensors, {} train windows of {} tokens, {} validation windows",
        trainable.len(),
        named.len(),
        loader.windows.len(),
        cfg.data.seq_len,
        valid_windows.len()
    ));
    if !opts.quiet {
        // Every rank says what it holds (the experts divide; the rest is replicated).
        let held: usize = sizes.0.values().sum();
        let experts = expert_parallel.shard().range(model.config.n_routed_experts);
        println!(
            "rank {rank} of {ranks} (replica {}): holds {held} parameters ({:.1} MB as f32, as much again twice for AdamW's \
             moments), routed experts {experts:?} of each layer",
            groups.replica(),
            held as f64 * 4e-6
        );
    }
    let validate =
        |step: usize, model: &V4Model<B>, report: &mut RunReport, metrics: &mut Option<MetricsWriter>| {
            let (v, mtp) = evaluate(model, &valid_windows, micro, runner)?;
            let mtp_note = mtp.map(|l| format!("  MTP {l:.4}")).unwrap_or_default();
            say(format!("step {step:>6}  validation loss {v:.4}{mtp_note}"));
            report.validations.push((step, v));
            report.mtp_validations.extend(mtp.map(|l| (step, l)));
            if let Some(m) = metrics.as_mut() {
                m.scalar("valid/loss", step, v);
                if let Some(l) = mtp {
                    m.scalar("valid/mtp_loss", step, l);
                }
                m.flush();
            }
            Ok::<_, TrainError>(())
        };
    if !valid_windows.is_empty() {
        validate(state.step, &model, &mut report, &mut metrics)?;
    }

    let interrupt_requested = || opts.interrupt.as_ref().is_some_and(|f| f.load(Ordering::SeqCst));
    let total_steps = cfg.schedule.steps;
    bar.set_position(state.step as u64);
    let step_ctx = StepContext {
        cfg,
        runner,
        named: &named,
        trainable: &trainable,
        mtp_depths,
        rank,
        ranks,
        collective: collective.as_ref(),
    };
    let mut step = state.step;
    while step < total_steps {
        if opts.stop_after.is_some_and(|s| step >= s) {
            return Ok(report);
        }
        let started = Instant::now();
        let lr = cfg.lr_at(step);
        let micro_batches: Vec<Vec<Window>> = (0..cfg.training.grad_accum)
            .map(|_| loader.next_batch(micro).into_iter().cloned().collect())
            .collect();
        let (mut grads, mut sums, tokens) = accumulate(&step_ctx, &model, &micro_batches)?;
        tokens_seen += tokens;
        sums.interrupt = interrupt_requested();
        if ranks > 1 {
            sum_over_ranks(&groups, &named, &trainable, &sizes.0, &mut grads, &mut sums);
        }
        let StepSums {
            loss: loss_sum,
            balance: balance_sum,
            mtp: mtp_sum,
            loads,
            interrupt: interrupted,
        } = sums;
        let received = received_rows(groups.experts.as_ref(), &expert_parallel, &model);
        let exchange = expert_parallel.take_exchange_time().as_secs_f64();
        if let (Some(path), true) = (&opts.dump_gradients, step == report.start_step) {
            dump_gradients(path, &groups, &named, &grads)?;
        }
        let grad_norm;
        (model, grad_norm) = clip_and_update(&step_ctx, model, &groups, &mut grads, &optim, &mut states, lr);
        // Aux-loss-free balancing of the top-k layers' selection bias.
        balance_biases(&mut model, &loads, cfg.moe.gamma);
        step += 1;
        bar.set_position(step as u64);
        let elapsed = started.elapsed().as_secs_f64();
        let n_tokens = cfg.training.grad_accum * micro * cfg.data.seq_len;
        let log = StepLog {
            step,
            loss: loss_sum,
            lr,
            grad_norm,
            tokens_per_s: n_tokens as f64 / elapsed.max(1e-9),
            // Every rank has a device of this peak.
            mfu: opts
                .peak_flops
                .map(|peak| n_tokens as f64 / elapsed.max(1e-9) * flops_per_token / (peak * ranks as f64)),
            balance: (cfg.moe.alpha > 0.0).then_some(balance_sum),
            mtp: (mtp_depths > 0).then_some(mtp_sum),
            all_to_all: (ep > 1).then(|| exchange / elapsed.max(1e-9)),
        };
        if step % cfg.logging.interval.max(1) == 0 || step == total_steps {
            let max_vio = max_violation(&model, &loads);
            say(step_summary(&log, total_steps, max_vio));
            if let Some(m) = metrics.as_mut() {
                write_step_metrics(m, &log, max_vio, &model, &loads, &received);
            }
        }
        report.steps.push(log);
        let eval_now = cfg.training.eval_interval > 0 && step % cfg.training.eval_interval == 0;
        if !valid_windows.is_empty() && (eval_now || step == total_steps) {
            validate(step, &model, &mut report, &mut metrics)?;
        }
        let save_now = interrupted || (cfg.checkpoint.interval > 0 && step % cfg.checkpoint.interval == 0);
        if let (Some(root), true) = (&cfg.checkpoint.dir, save_now || step == total_steps) {
            let state = TrainerState {
                step,
                loader: loader.state,
                tokens_seen,
            };
            let path = save_checkpoint(&step_ctx, root, &model, &states, &config_json, state, &groups)?;
            say(format!("step {step:>6}  saved {}", path.display()));
            report.checkpoints.push(path);
        }
        if interrupted {
            let saved = match cfg.checkpoint.dir {
                Some(_) => "after writing its checkpoint",
                None => "without a checkpoint (no [checkpoint] dir)",
            };
            say(format!("step {step:>6}  interrupted: stopped {saved}"));
            report.interrupted = true;
            break;
        }
    }
    bar.finish_and_clear();
    report.final_biases = model
        .layers
        .iter()
        .filter(|b| b.ffn.routing == RoutingKind::TopK)
        .map(|b| b.ffn.bias.clone())
        .collect();
    Ok(report)
}

/// What every step of a run reads: the config, the parameters and which of them train, and this rank's
/// place among the processes.
struct StepContext<'a, B: AutodiffBackend> {
    cfg: &'a TrainConfig,
    runner: &'a dyn ExpertRunner<B>,
    named: &'a [NamedParam],
    trainable: &'a HashSet<ParamId>,
    /// MTP depths trained (0 without an MTP weight).
    mtp_depths: usize,
    rank: usize,
    ranks: usize,
    collective: &'a dyn Collective,
}

/// One step's forward and backward passes over `micro_batches` (this rank's share of each: every
/// `ranks`-th sequence). Returns the summed gradients on the host, the step's sums (losses divided by the
/// step's global target count, expert loads) and the tokens this rank processed.
fn accumulate<B: AutodiffBackend>(
    ctx: &StepContext<'_, B>,
    model: &V4Model<B>,
    micro_batches: &[Vec<Window>],
) -> Result<(HostGrads, StepSums, u64), TrainError> {
    let cfg = ctx.cfg;
    let all: Vec<&Window> = micro_batches.iter().flatten().collect();
    let denom = targets_in(&all, 1);
    let mtp_denoms: Vec<usize> = (0..ctx.mtp_depths).map(|k| targets_in(&all, 2 + k)).collect();
    let mut acc: HashMap<ParamId, Tensor<Inner<B>, 1>> = HashMap::new();
    let mut sums = StepSums {
        loss: 0.0,
        balance: 0.0,
        mtp: 0.0,
        loads: vec![Vec::new(); model.blocks().count()],
        interrupt: false,
    };
    let mut tokens_seen = 0u64;
    for mb in micro_batches {
        let refs: Vec<&Window> = mb.iter().skip(ctx.rank).step_by(ctx.ranks).collect();
        let (tokens, targets, mask) = batch_tensors(&refs);
        let out = forward(model, &tokens, ctx.runner, ctx.mtp_depths > 0)?;
        for (l, counts) in out.expert_counts.iter().chain(&out.mtp_expert_counts).enumerate() {
            if sums.loads[l].is_empty() {
                sums.loads[l] = vec![0; counts.len()];
            }
            for (a, c) in sums.loads[l].iter_mut().zip(counts) {
                *a += c;
            }
        }
        let mtp = mtp_losses(out.mtp_logits, &targets, &mask, &mtp_denoms);
        let mut loss = masked_loss(out.logits, targets, mask, denom.max(1) as f64);
        sums.loss += loss.clone().into_scalar().elem_f64();
        for term in mtp {
            let term = term.div_scalar(ctx.mtp_depths as f64);
            sums.mtp += term.clone().into_scalar().elem_f64();
            loss = loss + term.mul_scalar(cfg.mtp.weight as f64);
        }
        if let Some(balance) = out.balance {
            // Averaged over the step's sequences (all ranks, all micro-batches).
            let sequences = (cfg.training.batch * cfg.training.grad_accum) as f64;
            sums.balance += balance.clone().into_scalar().elem_f64() / sequences;
            loss = loss + balance.mul_scalar(cfg.moe.alpha as f64 / sequences);
        }
        let grads = loss.backward();
        model.visit(&mut GradCollect::<B> {
            grads: &grads,
            acc: &mut acc,
            trainable: ctx.trainable,
        });
        tokens_seen += (mb.len() * tokens.seq) as u64;
    }
    // The summed gradients on the host, where the optimizer works.
    let host = |g: Tensor<Inner<B>, 1>| g.into_data().convert::<f32>().into_vec::<f32>().expect("f32");
    let grads = acc.into_iter().map(|(id, g)| (id, host(g))).collect();
    Ok((grads, sums, tokens_seen))
}

/// Clips `grads` by their global norm (the dense part in parameter order, the same on every rank; the
/// experts' squares summed over the shards of a replica) and applies AdamW at `lr`. Returns the updated
/// model and the norm before clipping.
fn clip_and_update<B: AutodiffBackend>(
    ctx: &StepContext<'_, B>,
    model: V4Model<B>,
    groups: &Groups,
    grads: &mut HostGrads,
    optim: &AdamW,
    states: &mut HashMap<ParamId, MomentState>,
    lr: f64,
) -> (V4Model<B>, f64) {
    let squares = |experts: bool| -> f64 {
        ctx.named
            .iter()
            .filter(|p| p.part.is_some() == experts)
            .filter_map(|p| grads.get(&p.id))
            .map(|g| sum_of_squares(g))
            .sum()
    };
    let mut expert_squares = [squares(true)];
    groups.experts.all_reduce_sum_f64(&mut expert_squares);
    let grad_norm = (squares(false) + expert_squares[0]).sqrt();
    let clip = ctx.cfg.training.grad_clip;
    let grad_scale = if clip > 0.0 && grad_norm > clip {
        (clip / (grad_norm + 1e-6)) as f32
    } else {
        1.0
    };
    let model = model.map(&mut Update {
        optim,
        lr,
        grad_scale,
        grads,
        states,
    });
    (model, grad_norm)
}

/// Writes the checkpoint of `state` under `root` with every rank: the dense tensors from rank 0, each
/// expert shard from its first replica. Returns the step directory.
fn save_checkpoint<B: AutodiffBackend>(
    ctx: &StepContext<'_, B>,
    root: &Path,
    model: &V4Model<B>,
    states: &HashMap<ParamId, MomentState>,
    config_json: &str,
    state: TrainerState,
    groups: &Groups,
) -> Result<PathBuf, TrainError> {
    let writes = (ctx.rank == 0, groups.replica() == 0);
    let data = checkpoint_data(model, ctx.named, states, config_json, state, writes)?;
    checkpoint::save(root, &data, ctx.cfg.checkpoint.keep_last, ctx.collective)
}

/// The largest expert-load violation (max load / mean - 1) over the top-k layers of a step.
fn max_violation<B: Backend>(model: &V4Model<B>, loads: &[Vec<usize>]) -> f64 {
    loads
        .iter()
        .zip(model.blocks())
        .filter(|(l, b)| !l.is_empty() && b.ffn.routing == RoutingKind::TopK)
        .map(|(l, _)| MoeHealth::of(l).max_vio)
        .fold(0.0, f64::max)
}

/// The console line of a step.
fn step_summary(log: &StepLog, total_steps: usize, max_vio: f64) -> String {
    let optional = |v: Option<String>| v.unwrap_or_default();
    format!(
        "step {:>6}/{total_steps}  loss {:.4}{}  lr {:.3e}  grad-norm {:.3}  max-vio {max_vio:.2}{}{}  {:.0} tokens/s{}",
        log.step,
        log.loss,
        optional(log.mtp.map(|l| format!("  MTP {l:.4}"))),
        log.lr,
        log.grad_norm,
        optional(log.balance.map(|b| format!("  balance {b:.4}"))),
        optional(log.mfu.map(|m| format!("  MFU {:.1}%", 100.0 * m))),
        log.tokens_per_s,
        optional(log.all_to_all.map(|a| format!("  all-to-all {:.1}%", 100.0 * a))),
    )
}

/// The tokenizer, the training windows and the validation windows (`validation_batches` batches at most).
fn load_data(cfg: &TrainConfig) -> Result<(Tokenizer, Vec<Window>, Vec<Window>), TrainError> {
    let tokenizer = Tokenizer::from_spec(&cfg.data.tokenizer)?;
    let (seq, max) = (cfg.data.seq_len, cfg.data.max_records);
    let train = load_windows(&cfg.data.train, &tokenizer, seq, max)?;
    let mut valid = match &cfg.data.validation {
        Some(p) => load_windows(p, &tokenizer, seq, cfg.data.max_validation_records)?,
        None => Vec::new(),
    };
    if cfg.data.validation_batches > 0 {
        valid.truncate(cfg.data.validation_batches * cfg.training.batch);
    }
    Ok((tokenizer, train, valid))
}

/// Fails when the tokenizer or the token ids of the `[train, validation]` windows (pre-tokenized `ids`
/// records bypass the tokenizer) reach past the model's vocabulary.
fn check_vocabulary(
    cfg: &TrainConfig,
    tokenizer: &Tokenizer,
    windows: [&[Window]; 2],
    vocab: usize,
) -> Result<(), TrainError> {
    if tokenizer.vocab_size() > vocab {
        return Err(TrainError::Mismatch(format!(
            "the tokenizer's vocabulary ({}) exceeds the model's ({vocab})",
            tokenizer.vocab_size()
        )));
    }
    for (windows, path) in windows
        .into_iter()
        .zip([Some(&cfg.data.train), cfg.data.validation.as_ref()])
    {
        if let Some(id) = windows
            .iter()
            .flat_map(|w| &w.tokens)
            .find(|&&id| id as usize >= vocab)
        {
            return Err(TrainError::Data {
                path: path.cloned().unwrap_or_default(),
                reason: format!("token id {id} is not in the model's vocabulary [0, {vocab})"),
            });
        }
    }
    Ok(())
}

/// The trainer state and the AdamW moments of the parameters `named` (of `sizes` elements) in checkpoint
/// `dir`: of an expert shard, only its part of the stored (flat) moments.
fn resume_state(
    dir: &std::path::Path,
    named: &[NamedParam],
    sizes: &HashMap<ParamId, usize>,
) -> Result<(TrainerState, HashMap<ParamId, MomentState>), TrainError> {
    let parts: HashMap<String, Range<usize>> = named
        .iter()
        .filter_map(|p| {
            let (rows, _) = p.part.as_ref()?;
            let per = sizes[&p.id] / rows.len();
            Some((p.name.clone(), rows.start * per..rows.end * per))
        })
        .collect();
    let (state, moments) = checkpoint::read_training_state(dir, &parts)?;
    let by_name: HashMap<&str, ParamId> = named.iter().map(|p| (p.name.as_str(), p.id)).collect();
    let mut states = HashMap::new();
    for (name, m) in moments {
        let id = by_name.get(name.as_str()).ok_or_else(|| {
            TrainError::checkpoint(
                dir,
                format!("optimizer state names `{name}`, which the model does not have"),
            )
        })?;
        if m.m.data.len() != sizes[id] || m.v.data.len() != sizes[id] {
            return Err(TrainError::checkpoint(
                dir,
                format!(
                    "optimizer state of `{name}` has {} values, the parameter {}",
                    m.m.data.len(),
                    sizes[id]
                ),
            ));
        }
        states.insert(*id, m);
    }
    Ok((state, states))
}

/// DeepSeek's aux-loss-free balancing of the top-k layers' selection bias after a step with expert
/// `loads` (per block): `bias_e += gamma * sign(mean load - load_e)`.
fn balance_biases<B: Backend>(model: &mut V4Model<B>, loads: &[Vec<usize>], gamma: f32) {
    if gamma == 0.0 {
        return;
    }
    for (block, load) in model.blocks_mut().zip(loads) {
        if block.ffn.routing != RoutingKind::TopK || load.is_empty() {
            continue;
        }
        let mean = load.iter().sum::<usize>() as f64 / load.len() as f64;
        for (b, &l) in block.ffn.bias.iter_mut().zip(load) {
            let diff = mean - l as f64;
            if diff != 0.0 {
                *b += gamma * diff.signum() as f32;
            }
        }
    }
}

/// A step's scalars and, per MoE block, its load health, the rows each rank received in the all-to-all,
/// the bias range and the tokens-per-expert histogram.
fn write_step_metrics<B: Backend>(
    m: &mut MetricsWriter,
    log: &StepLog,
    max_vio: f64,
    model: &V4Model<B>,
    loads: &[Vec<usize>],
    received: &HashMap<usize, Vec<u64>>,
) {
    let step = log.step;
    m.scalar("train/loss", step, log.loss);
    m.scalar("train/lr", step, log.lr);
    m.scalar("train/grad_norm", step, log.grad_norm);
    m.scalar("train/tokens_per_s", step, log.tokens_per_s);
    let optional = [
        ("train/mfu", log.mfu),
        ("train/balance_loss", log.balance),
        ("train/mtp_loss", log.mtp),
        ("train/all_to_all_share", log.all_to_all),
    ];
    for (tag, value) in optional {
        if let Some(v) = value {
            m.scalar(tag, step, v);
        }
    }
    m.scalar("moe/max_vio", step, max_vio);
    for (load, block) in loads.iter().zip(model.blocks()) {
        if load.is_empty() {
            continue;
        }
        let layer = format!("moe/layer{}", block.index);
        let health = MoeHealth::of(load);
        m.scalar(&format!("{layer}/max_vio"), step, health.max_vio);
        m.scalar(&format!("{layer}/load_cv"), step, health.cv);
        m.scalar(&format!("{layer}/dead_experts"), step, health.dead as f64);
        for (r, rows) in received.get(&block.index).into_iter().flatten().enumerate() {
            m.scalar(&format!("{layer}/tokens_received/rank{r}"), step, *rows as f64);
        }
        if block.ffn.routing == RoutingKind::TopK {
            let (lo, hi) = block
                .ffn
                .bias
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &b| {
                    (lo.min(b), hi.max(b))
                });
            m.scalar(&format!("{layer}/bias_min"), step, lo as f64);
            m.scalar(&format!("{layer}/bias_max"), step, hi as f64);
        }
        m.expert_histogram(&format!("{layer}/tokens_per_expert"), step, load);
    }
}

/// What the ranks of a step sum besides the dense gradients.
struct StepSums {
    loss: f64,
    balance: f64,
    mtp: f64,
    /// Rows routed to each expert, per block.
    loads: Vec<Vec<usize>>,
    /// Some rank was asked to stop.
    interrupt: bool,
}

/// Sums the step over the ranks: the dense gradients (each rank's loss is already divided by the global
/// token count), the losses, the expert loads and the stop request. Expert gradients stay where they are
/// (complete: the all-to-all brought every rank's rows to their expert); the ranks only agree on whether
/// a layer's experts have one, so that a rank whose experts received no rows steps them with zeros, as
/// one process steps its whole stacked tensor. A parameter no rank has a gradient for (the indexer's)
/// stays without, as alone.
fn sum_over_ranks(
    groups: &Groups,
    named: &[NamedParam],
    trainable: &HashSet<ParamId>,
    sizes: &HashMap<ParamId, usize>,
    grads: &mut HashMap<ParamId, Vec<f32>>,
    sums: &mut StepSums,
) {
    // Per trainable parameter: a dense gradient (zeros if absent here) and a count of ranks having one.
    let mut flat = Vec::new();
    let mut slots = Vec::new();
    for p in named.iter().filter(|p| trainable.contains(&p.id)) {
        let (n, mine) = (sizes[&p.id], grads.contains_key(&p.id));
        if p.part.is_none() {
            match grads.remove(&p.id) {
                Some(g) => flat.extend(g),
                None => flat.extend(std::iter::repeat_n(0.0, n)),
            }
        }
        flat.push(mine as u8 as f32);
        slots.push(p);
    }
    flat.extend([sums.mtp as f32, sums.balance as f32, sums.loss as f32]);
    groups.world.all_reduce_sum_f32(&mut flat);
    sums.loss = flat.pop().expect("the loss") as f64;
    sums.balance = flat.pop().expect("the balance loss") as f64;
    sums.mtp = flat.pop().expect("the MTP loss") as f64;
    let mut offset = 0;
    let mut experts = Vec::new();
    for p in slots {
        let n = sizes[&p.id];
        if p.part.is_none() {
            if flat[offset + n] > 0.0 {
                grads.insert(p.id, flat[offset..offset + n].to_vec());
            }
            offset += n + 1;
        } else {
            if flat[offset] > 0.0 {
                grads.entry(p.id).or_insert_with(|| vec![0.0; n]);
                experts.push(p.id);
            }
            offset += 1;
        }
    }
    // With data parallelism, each replica's expert gradients hold its own sequences: sum the replicas'.
    if groups.replicas.size() > 1 {
        let mut flat: Vec<f32> = experts.iter().flat_map(|id| grads[id].iter().copied()).collect();
        groups.replicas.all_reduce_sum_f32(&mut flat);
        let mut rest = &flat[..];
        for id in experts {
            let g = grads.get_mut(&id).expect("inserted above");
            let (mine, tail) = rest.split_at(g.len());
            g.copy_from_slice(mine);
            rest = tail;
        }
    }
    let mut counts: Vec<u64> = sums.loads.iter().flatten().map(|&c| c as u64).collect();
    counts.push(sums.interrupt as u64);
    groups.world.all_reduce_sum_u64(&mut counts);
    sums.interrupt = counts.pop().expect("the interrupt flag") > 0;
    for (c, total) in sums.loads.iter_mut().flatten().zip(counts) {
        *c = total as usize;
    }
}

/// The rows each rank's experts received in the step's all-to-all exchanges, per block index and rank
/// (empty in one process, which exchanges nothing).
fn received_rows<B: Backend>(
    collective: &dyn Collective,
    expert_parallel: &ExpertParallel,
    model: &V4Model<B>,
) -> HashMap<usize, Vec<u64>> {
    let (rank, ranks) = (collective.rank(), collective.size());
    if ranks == 1 {
        return HashMap::new();
    }
    let mine = expert_parallel.take_received();
    let blocks: Vec<usize> = model.blocks().map(|b| b.index).collect();
    let mut table = vec![0u64; blocks.len() * ranks];
    for (slot, block) in table.chunks_exact_mut(ranks).zip(&blocks) {
        slot[rank] = mine.get(block).copied().unwrap_or(0) as u64;
    }
    collective.all_reduce_sum_u64(&mut table);
    blocks
        .into_iter()
        .zip(table.chunks_exact(ranks).map(<[u64]>::to_vec))
        .collect()
}

/// Writes the step's gradients by checkpoint name, flattened, to `path` (the lead rank; each expert
/// tensor gathered whole from the ranks holding its parts): for comparing a parallel run with one process.
fn dump_gradients(
    path: &std::path::Path,
    groups: &Groups,
    named: &[NamedParam],
    grads: &HashMap<ParamId, Vec<f32>>,
) -> Result<(), TrainError> {
    let mut dump = Vec::new();
    for p in named {
        let Some(g) = grads.get(&p.id) else { continue };
        let data = match &p.part {
            None => g.clone(),
            Some((rows, total)) => {
                let per = g.len() / rows.len();
                let mut whole = vec![0.0; per * total];
                whole[rows.start * per..rows.end * per].copy_from_slice(g);
                groups.experts.all_reduce_sum_f32(&mut whole);
                whole
            }
        };
        let shape = vec![data.len()];
        dump.push((p.name.clone(), HostF32 { shape, data }));
    }
    match groups.world.rank() {
        0 => checkpoint::write_gradients(path, &dump),
        _ => Ok(()),
    }
}

/// This rank's view of the checkpoint after a step: every tensor of the files, with the bytes this rank
/// writes (`writes.0`: the dense tensors and routing state; `writes.1`: its experts and their moments).
fn checkpoint_data<'a, B: AutodiffBackend>(
    model: &V4Model<B>,
    named: &[NamedParam],
    states: &HashMap<ParamId, MomentState>,
    config_json: &'a str,
    state: TrainerState,
    writes: (bool, bool),
) -> Result<CheckpointData<'a>, TrainError> {
    let (lead, experts) = writes;
    let host = host_params(model);
    // Whole shape and this rank's (element offset, values) of a parameter-shaped tensor.
    let share = |p: &NamedParam, shape: Vec<usize>, values: &'_ [f32]| {
        let Some((rows, total)) = &p.part else {
            return SharedTensor::f32(p.name.clone(), shape, lead.then_some((0, values)));
        };
        let per = values.len() / rows.len();
        let mut whole = shape;
        whole[0] = whole[0] / rows.len() * total;
        SharedTensor::f32(
            p.name.clone(),
            whole,
            experts.then_some((rows.start * per, values)),
        )
    };
    let mut model_tensors = Vec::new();
    for p in named {
        let t = host
            .get(&p.id)
            .ok_or_else(|| TrainError::Mismatch(format!("parameter {} not found", p.name)))?;
        let t = to_checkpoint(t, p.layout);
        model_tensors.push(share(p, t.shape.clone(), &t.data));
    }
    let (biases, tables) = routing_state(model);
    for (name, t) in biases {
        model_tensors.push(SharedTensor::f32(name, t.shape, lead.then_some((0, &t.data[..]))));
    }
    for (name, shape, values) in tables {
        model_tensors.push(SharedTensor::i64(name, shape, lead.then_some(&values[..])));
    }
    let (mut moments, mut times) = (Vec::new(), BTreeMap::new());
    for p in named {
        let Some(s) = states.get(&p.id) else { continue };
        for (prefix, values) in [("exp_avg", &s.m.data), ("exp_avg_sq", &s.v.data)] {
            let mut t = share(p, vec![values.len()], values);
            t.name = format!("{prefix}.{}", p.name);
            moments.push(t);
        }
        times.insert(p.name.clone(), s.time);
    }
    Ok(CheckpointData {
        config_json,
        model: model_tensors,
        moments,
        times,
        state,
    })
}
