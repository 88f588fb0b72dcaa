//! Running a model with probes: traces, propagated and isolated candidate runs, and [`validate`].

use crate::judge::compare;
use crate::options::{RunMode, ValidateOptions};
use crate::report::{policy_diff, Report, RoutingInfo};
use crate::trace::{config_hash, Trace, TraceInfo, TraceMode};
use crate::{filter::ProbeFilter, Error, Result};
use burn::tensor::{backend::Backend, Tensor, TensorData};
use v4_model::cache::{LayerCache, Segment};
use v4_model::probe::{point, tap, Probe, Scope};
use v4_model::{LocalExperts, ModelCache, Recorder, RoutingKind, Tokens, V4Model};

/// Probe records in forward order.
pub type Records = Vec<(String, TensorData)>;

/// Records every probe point `wants` accepts during a full-sequence forward of `tokens`.
pub fn record<B: Backend>(
    model: &V4Model<B>,
    tokens: &Tokens,
    wants: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, TensorData)>> {
    let mut recorder = Recorder::new(|n: &str| wants(n));
    let mut cache = ModelCache::new(model.layers.len());
    model.forward_with(tokens, &mut cache, v4_model::Pass::new().probe(&mut recorder))?;
    Ok(recorder.records)
}

/// Records like [`record`] on a model loaded with only some layers ([`V4Model::load_plan`]): runs
/// them from `streams` entering the first one (the embedding for layer 0), records their probes and the
/// streams after the last as `layers.N.output`, then the head when the range reaches the last layer.
pub fn record_range<B: Backend>(
    model: &V4Model<B>,
    streams: Option<Tensor<B, 4>>,
    tokens: &Tokens,
    wants: &dyn Fn(&str) -> bool,
) -> Result<Records> {
    let range = model.layer_range();
    let mut recorder = Recorder::new(|n: &str| wants(n));
    let out = model.forward_layers(tokens, streams, &LocalExperts, &mut recorder)?;
    if range.end == model.config.num_layers() {
        model.logits(out, &mut recorder);
    } else {
        let name = format!("layers.{}.output", range.end - 1);
        recorder.records.push((name, out.into_data()));
    }
    Ok(recorder.records)
}

/// The reference's streams entering the first loaded layer of `model` (None from layer 0).
fn reference_streams<B: Backend>(model: &V4Model<B>, reference: &Trace) -> Result<Option<Tensor<B, 4>>> {
    let first = model.layer_range().start;
    if first == 0 {
        return Ok(None);
    }
    let name = format!("layers.{first}.input");
    let (shape, values) = reference.f32(&name).ok_or_else(|| {
        Error::trace(
            &reference.path,
            format!(
                "the reference holds no `{name}` (full mode) to start layers {:?} from",
                model.layer_range()
            ),
        )
    })?;
    Ok(Some(streams4(shape, values, &model.device())?))
}

/// Reference streams `[B, S, c, D]` as a tensor.
fn streams4<B: Backend>(shape: &[usize], values: &[f32], device: &B::Device) -> Result<Tensor<B, 4>> {
    let s: [usize; 4] = shape.try_into().map_err(|_| {
        Error::Reference(format!(
            "reference streams have shape {shape:?}, expected [B, S, c, D]"
        ))
    })?;
    Ok(Tensor::from_data(TensorData::new(values.to_vec(), s), device))
}

/// Records a trace of `model` on `tokens`; a model loaded with only some layers starts from `streams`
/// (see [`record_range`]).
#[allow(clippy::too_many_arguments)]
pub fn trace<B: Backend>(
    model: &V4Model<B>,
    tokens: &Tokens,
    streams: Option<Tensor<B, 4>>,
    mode: TraceMode,
    filter: &ProbeFilter,
    info: TraceInfo,
    describe: (Option<String>, Option<String>),
) -> Result<Trace> {
    let whole = model.layer_range() == (0..model.config.num_layers());
    let records = if whole {
        record(model, tokens, &|n| filter.wants(n))?
    } else {
        record_range(model, streams, tokens, &|n| filter.wants(n))?
    };
    Trace::from_records(
        records,
        mode,
        info,
        config_hash(&model.config),
        tokens.ids.iter().map(|&x| x as i64).collect(),
        [tokens.batch, tokens.seq],
        describe.0,
        describe.1,
    )
}

/// Isolated mode: runs every layer whose input streams the reference holds on those streams (empty
/// cache, positions from 0), recording its probes and its output as `layers.N.output`; then the head on
/// the reference's `final.streams` (or `final.hidden`). Returns the records and the layers skipped.
pub fn run_isolated<B: Backend>(
    model: &V4Model<B>,
    reference: &Trace,
    tokens: &Tokens,
    wants: &dyn Fn(&str) -> bool,
) -> Result<(Records, Vec<usize>)> {
    let device = model.device();
    let mut records = Vec::new();
    let mut skipped = Vec::new();
    let tensor4 = |shape: &[usize], v: &[f32]| streams4::<B>(shape, v, &device);
    for block in &model.layers {
        let i = block.index;
        let scope = Scope::Layer(i);
        let Some((shape, values)) = reference.f32(&scope.name(point::INPUT)) else {
            skipped.push(i);
            continue;
        };
        let x = tensor4(shape, values)?;
        let mut recorder = Recorder::new(|n: &str| wants(n));
        let mut cache = LayerCache::default();
        let mut segment = [Segment {
            cols: 0..tokens.seq,
            start: 0,
            cache: &mut cache,
        }];
        let (out, _) = block.forward(x, &tokens.ids, &mut segment, &LocalExperts, &mut recorder, scope);
        records.extend(recorder.records);
        records.push((scope.name(point::OUTPUT), out.into_data()));
    }
    let mut probe = Recorder::new(|n: &str| wants(n));
    if let Some((shape, values)) = reference.f32(point::FINAL_STREAMS) {
        let hidden = model.norm.forward(model.hc_head.forward(tensor4(shape, values)?));
        tap(&mut probe as &mut dyn Probe, point::FINAL_HIDDEN, &hidden);
        tap(
            &mut probe as &mut dyn Probe,
            point::LOGITS,
            &model.head.forward(hidden),
        );
    } else if let Some((shape, values)) = reference.f32(point::FINAL_HIDDEN) {
        let s: [usize; 3] = shape.try_into().map_err(|_| {
            Error::Reference(format!(
                "reference final.hidden has shape {shape:?}, expected [B, S, D]"
            ))
        })?;
        let hidden = Tensor::<B, 3>::from_data(TensorData::new(values.to_vec(), s), &device);
        tap(
            &mut probe as &mut dyn Probe,
            point::LOGITS,
            &model.head.forward(hidden),
        );
    }
    records.extend(probe.records);
    Ok((records, skipped))
}

/// Runs `model` (the candidate) on the reference's inputs and compares every probe.
pub fn validate<B: Backend>(model: &V4Model<B>, reference: &Trace, opts: &ValidateOptions) -> Result<Report> {
    let meta = &reference.meta;
    if !meta.config_hash.is_empty() && meta.config_hash != config_hash(&model.config) {
        return Err(Error::trace(
            &reference.path,
            format!(
                "the reference was traced with another model config (hash {} vs {})",
                meta.config_hash,
                config_hash(&model.config)
            ),
        ));
    }
    let [batch, seq] = meta.input_shape;
    let tokens = Tokens::new(&meta.input_ids, batch, seq, model.config.vocab_size)?;
    // Per layer of the model (a range load knows the bias of its own layers only).
    let routing: Vec<RoutingInfo> = (0..model.config.num_layers())
        .map(|i| RoutingInfo {
            hash: model.config.routing[i] == RoutingKind::Hash,
            bias: model
                .layers
                .iter()
                .find(|b| b.index == i)
                .map_or_else(Vec::new, |b| b.ffn.bias.clone()),
        })
        .collect();
    let whole = model.layer_range() == (0..model.config.num_layers());
    // The candidate records what the reference holds, plus the scores that judge top-k flips.
    let wants = |n: &str| reference.get(n).is_some() || n.ends_with(".scores");
    let mut report = Report::new(reference, opts, policy_diff(&meta.info, &opts.candidate));
    let modes: &[RunMode] = match opts.mode {
        RunMode::Both => &[RunMode::Propagated, RunMode::Isolated],
        RunMode::Propagated => &[RunMode::Propagated],
        RunMode::Isolated => &[RunMode::Isolated],
    };
    for &mode in modes {
        let records = match mode {
            RunMode::Isolated => {
                if meta.mode != TraceMode::Full {
                    report
                        .notes
                        .push("isolated mode skipped: the reference holds no full tensors".into());
                    continue;
                }
                let (records, skipped) = run_isolated(model, reference, &tokens, &wants)?;
                if !skipped.is_empty() {
                    report.notes.push(format!(
                        "isolated mode: the reference lacks the input streams of layers {skipped:?} (not run)"
                    ));
                }
                records
            }
            _ if whole => record(model, &tokens, &wants)?,
            _ => record_range(model, reference_streams(model, reference)?, &tokens, &wants)?,
        };
        report.results.extend(compare(
            reference,
            opts.golden.as_ref(),
            records,
            mode,
            opts,
            &routing,
            &model.layer_range(),
        )?);
    }
    report.finish(model.config.num_layers());
    Ok(report)
}
