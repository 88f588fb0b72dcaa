//! End-to-end validation on the tiny fixture: ndarray reference vs the NPU emulator (f32 and bf16
//! policies), an injected fault localised in isolated mode, HF's io.safetensors as a reference, and the
//! size of a stats-mode trace.

use burn::module::Param;
use burn::tensor::Tensor;
use burn_ndarray::{NdArray, NdArrayDevice};
use std::path::PathBuf;
use std::sync::Mutex;
use v4_checkpoint::read_config;
use v4_model::{Tokens, V4Model};
use v4_validate::report::Report;
use v4_validate::run::trace;
use v4_validate::trace::{TraceInfo, TraceMode};
use v4_validate::{validate, Dtype, ProbeFilter, RunMode, Status, Tolerances, Trace, ValidateOptions};

type Cpu = NdArray<f32>;

/// The NPU emulator's policy is global per device: NPU tests take turns.
static NPU: Mutex<()> = Mutex::new(());

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/v4-tiny-a")
}

fn load<B: burn::tensor::backend::Backend>(device: &B::Device) -> V4Model<B> {
    let dir = fixture().join("hf");
    let config = read_config(&dir).unwrap();
    let source = v4_checkpoint::open(&dir).unwrap();
    V4Model::load(&config, &*source, device).unwrap()
}

fn cpu_info() -> TraceInfo {
    TraceInfo {
        backend: "ndarray".into(),
        dtype: "f32".into(),
        precision_policy: serde_json::json!({"precision_mode": "f32 everywhere"}),
    }
}

fn tokens(model: &V4Model<Cpu>) -> Tokens {
    let io = Trace::read(&fixture().join("io.safetensors")).unwrap();
    let [b, s] = io.meta.input_shape;
    Tokens::new(&io.meta.input_ids, b, s, model.config.vocab_size).unwrap()
}

fn reference(mode: TraceMode, filter: &ProbeFilter) -> Trace {
    let model = load::<Cpu>(&NdArrayDevice::Cpu);
    let t = tokens(&model);
    trace(&model, &t, None, mode, filter, cpu_info(), (None, None)).unwrap()
}

fn opts(mode: RunMode, dtype: Dtype, backend: &str) -> ValidateOptions {
    ValidateOptions {
        mode,
        dtype,
        tolerances: Tolerances::default(),
        golden: None,
        candidate: TraceInfo {
            backend: backend.into(),
            dtype: dtype.name().into(),
            precision_policy: serde_json::json!({"precision_mode": backend}),
        },
    }
}

fn npu_report(reference: &Trace, config: &str, dtype: Dtype) -> Report {
    let _guard = NPU.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    let path = fixture().join("../../../configs").join(config);
    v4_npu::install_config_file(&device, &path).unwrap();
    let model = load::<v4_npu::Npu>(&device);
    validate(&model, reference, &opts(RunMode::Both, dtype, "npu")).unwrap()
}

fn max_drift(report: &Report, mode: RunMode) -> Vec<f64> {
    report.layer_curve(mode).into_iter().map(|(_, e)| e).collect()
}

#[test]
fn ndarray_vs_npu_f32_passes_and_bf16_drifts_more() {
    let reference = reference(TraceMode::Full, &ProbeFilter::default());
    // The reference round-trips through its file.
    let dir = std::env::temp_dir().join(format!("v4-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("ref.safetensors");
    reference.write(&path).unwrap();
    let reference = Trace::read(&path).unwrap();
    assert_eq!(reference.meta.info.backend, "ndarray");
    assert!(reference.get("layers.3.ffn.router.indices").is_some());

    let f32_report = npu_report(&reference, "npu-910b-f32.toml", Dtype::F32);
    println!("{}", f32_report.summary(10));
    assert!(f32_report.passed, "f32 NPU emulation must pass");
    let probes = f32_report
        .results
        .iter()
        .filter(|r| r.mode == RunMode::Isolated)
        .count();
    assert!(probes > 30, "isolated mode compared {probes} probes");
    f32_report.write(&dir.join("f32")).unwrap();
    assert!(std::fs::read_to_string(dir.join("f32/report.html"))
        .unwrap()
        .contains("<svg"));
    assert!(
        std::fs::read_to_string(dir.join("f32/report.csv"))
            .unwrap()
            .lines()
            .count()
            > probes
    );

    let bf16_report = npu_report(&reference, "npu-910b-bf16.toml", Dtype::Bf16);
    println!("{}", bf16_report.summary(10));
    let (a, b) = (
        max_drift(&f32_report, RunMode::Propagated),
        max_drift(&bf16_report, RunMode::Propagated),
    );
    println!("per-layer max rel L2, propagated: f32 {a:?}\n bf16 {b:?}");
    assert_eq!(a.len(), b.len());
    assert_eq!(a.len(), 5, "4 layers + head");
    for (x, y) in a.iter().zip(&b) {
        assert!(
            y.is_finite() && *y > *x,
            "bf16 drift {y} must exceed f32 drift {x}"
        );
        assert!(*y > 1e-4, "bf16 drift {y} is implausibly small");
    }
    // Drift accumulates: the propagated head error exceeds the isolated one.
    let iso = max_drift(&bf16_report, RunMode::Isolated);
    assert!(b.last().unwrap() >= iso.last().unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn injected_fault_is_localised_in_isolated_mode() {
    let reference = reference(TraceMode::Full, &ProbeFilter::default());
    let mut model = load::<Cpu>(&NdArrayDevice::Cpu);
    // Drop layer 2's attention sinks (a sink logit of -1e4 contributes nothing to the softmax).
    let sinks = &model.layers[2].attn.sinks;
    let dropped = Tensor::<Cpu, 1>::full(sinks.dims(), -1e4, &NdArrayDevice::Cpu);
    model.layers[2].attn.sinks = Param::from_tensor(dropped);
    let report = validate(&model, &reference, &opts(RunMode::Both, Dtype::F32, "ndarray")).unwrap();
    println!("{}", report.summary(12));
    assert!(!report.passed);
    let iso = &report
        .localisation
        .iter()
        .find(|(m, _)| *m == RunMode::Isolated)
        .unwrap()
        .1;
    assert_eq!(iso.first_divergent_layer, Some(2));
    assert_eq!(iso.first_divergent_probe.as_deref(), Some("layers.2.attn.core"));
    // Only layer 2 fails in isolated mode; the ops before the fault pass.
    for r in report.results.iter().filter(|r| r.mode == RunMode::Isolated) {
        if r.status == Status::Fail {
            assert_eq!(r.layer, Some(2), "{} fails outside layer 2", r.name);
        }
        if ["layers.2.attn.q", "layers.2.attn.kv", "layers.2.attn.input"].contains(&r.name.as_str()) {
            assert_eq!(r.status, Status::Pass, "{}", r.name);
        }
    }
    // Propagated mode: drift first crosses the bounds at the same layer, and later layers drift too,
    // reported as drift (the isolated gates decide).
    let prop = &report.localisation[0];
    assert_eq!(prop.0, RunMode::Propagated);
    assert_eq!(prop.1.first_divergent_layer, Some(2));
    assert!(report.results.iter().any(|r| r.mode == RunMode::Propagated
        && r.layer == Some(3)
        && r.status == Status::Warn
        && r.warnings
            .iter()
            .any(|w| w.starts_with("propagated drift: relative L2"))));
}

#[test]
fn hf_fixture_is_a_reference() {
    let reference = Trace::read(&fixture().join("io.safetensors")).unwrap();
    let names: Vec<&str> = reference.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "layers.0.input",
            "layers.1.input",
            "layers.2.input",
            "layers.3.input",
            "final.hidden",
            "logits"
        ]
    );
    let model = load::<Cpu>(&NdArrayDevice::Cpu);
    let report = validate(&model, &reference, &opts(RunMode::Both, Dtype::F32, "ndarray")).unwrap();
    println!("{}", report.summary(12));
    assert!(report.passed);
    // Isolated mode ran every layer on HF's streams and compared its output with HF's next input.
    assert!(report.results.iter().any(|r| r.mode == RunMode::Isolated
        && r.name == "layers.1.output"
        && r.reference == "layers.2.input"));
    assert!(report
        .results
        .iter()
        .any(|r| r.mode == RunMode::Isolated && r.name == "logits" && r.float.unwrap().kl.is_some()));
}

#[test]
fn stats_trace_is_small_and_compares_by_statistics() {
    let reference = reference(TraceMode::Stats, &ProbeFilter::default());
    let path = std::env::temp_dir().join(format!("v4-validate-stats-{}.safetensors", std::process::id()));
    reference.write(&path).unwrap();
    let bytes = std::fs::metadata(&path).unwrap().len();
    let per_layer = bytes / 4;
    println!(
        "stats-mode trace: {bytes} bytes, {per_layer} bytes per layer, {} probes",
        reference.entries.len()
    );
    assert!(per_layer < 8 * 1024, "{per_layer} bytes per layer");
    let full = reference_full_size();
    assert!(bytes * 100 < full, "stats {bytes} vs full {full}");
    let back = Trace::read(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(back.meta.mode, TraceMode::Stats);
    let model = load::<Cpu>(&NdArrayDevice::Cpu);
    let report = validate(&model, &back, &opts(RunMode::Both, Dtype::F32, "ndarray")).unwrap();
    assert!(report.passed);
    assert!(report.notes.iter().any(|n| n.contains("isolated mode skipped")));
    assert!(report.results.iter().all(|r| r.stats_l2_diff.is_some()));

    // Checksum mode: the same backend reproduces every checksum bit for bit.
    let filter = ProbeFilter::parse(Some("1"), Some("*.attn.*")).unwrap();
    let sums = reference_with(TraceMode::Checksum, &filter);
    assert!(sums.entries.iter().all(|e| e.name.starts_with("layers.1.attn.")));
    let report = validate(&model, &sums, &opts(RunMode::Propagated, Dtype::F32, "ndarray")).unwrap();
    assert!(report.results.iter().all(|r| r.checksum_equal == Some(true)));
}

fn reference_with(mode: TraceMode, filter: &ProbeFilter) -> Trace {
    reference(mode, filter)
}

fn reference_full_size() -> u64 {
    let t = reference(TraceMode::Full, &ProbeFilter::default());
    let path = std::env::temp_dir().join(format!("v4-validate-full-{}.safetensors", std::process::id()));
    t.write(&path).unwrap();
    let n = std::fs::metadata(&path).unwrap().len();
    std::fs::remove_file(&path).ok();
    n
}

#[test]
fn first_nan_origin_is_reported() {
    let reference = reference(TraceMode::Full, &ProbeFilter::default());
    let mut model = load::<Cpu>(&NdArrayDevice::Cpu);
    let sinks = &model.layers[1].attn.sinks;
    let nan = Tensor::<Cpu, 1>::full(sinks.dims(), f32::NAN, &NdArrayDevice::Cpu);
    model.layers[1].attn.sinks = Param::from_tensor(nan);
    let report = validate(&model, &reference, &opts(RunMode::Both, Dtype::F32, "ndarray")).unwrap();
    assert!(!report.passed);
    for (mode, loc) in &report.localisation {
        assert_eq!(
            loc.first_nonfinite.as_deref(),
            Some("layers.1.attn.core"),
            "{mode:?}"
        );
        assert_eq!(loc.first_divergent_layer, Some(1), "{mode:?}");
    }
    let core = report
        .results
        .iter()
        .find(|r| r.name == "layers.1.attn.core")
        .unwrap();
    assert!(
        core.reasons.iter().any(|r| r.contains("NaN/Inf pattern")),
        "{:?}",
        core.reasons
    );
}

/// The reference-relative gate with a golden: a bf16 reference is judged against an f32 CPU golden, so a
/// bf16 candidate passes when its error is within k = 3 times the reference's own (plus the floor).
#[test]
fn golden_gate_scales_with_the_reference_error() {
    let golden = reference(TraceMode::Full, &ProbeFilter::default());
    let _guard = NPU.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    v4_npu::install_config_file(&device, &fixture().join("../../../configs/npu-910b-bf16.toml")).unwrap();
    let model = load::<v4_npu::Npu>(&device);
    let t = {
        let [b, s] = golden.meta.input_shape;
        Tokens::new(&golden.meta.input_ids, b, s, model.config.vocab_size).unwrap()
    };
    let bf16_ref = trace(
        &model,
        &t,
        None,
        TraceMode::Full,
        &ProbeFilter::default(),
        cpu_info(),
        (None, None),
    )
    .unwrap();
    let mut o = opts(RunMode::Isolated, Dtype::Bf16, "npu");
    // A floor far below bf16's error: only the golden term can make it pass.
    o.tolerances = Tolerances::from_toml("[defaults]\nrel_l2_floor = 1e-7\n").unwrap();
    o.golden = Some(golden.clone());
    let report = validate(&model, &bf16_ref, &o).unwrap();
    assert!(report.passed, "{}", report.summary(5));
    let core = report
        .results
        .iter()
        .find(|r| r.name == "layers.1.attn.core")
        .unwrap();
    assert!(core.golden_rel_l2.unwrap() > 1e-3, "{:?}", core.golden_rel_l2);
    // A faulty bf16 candidate still fails against the same golden, at the faulty op.
    let mut model = model;
    let sinks = &model.layers[2].attn.sinks;
    let dropped = Tensor::<v4_npu::Npu, 1>::full(sinks.dims(), -1e4, &device);
    model.layers[2].attn.sinks = Param::from_tensor(dropped);
    let report = validate(&model, &bf16_ref, &o).unwrap();
    assert!(!report.passed);
    let loc = &report.localisation[0].1;
    assert_eq!(loc.first_divergent_probe.as_deref(), Some("layers.2.attn.core"));
}

/// bf16 drift that crosses the bounds only when propagated is a figure of the precision path: the run
/// passes on its isolated gates and reports the drift; a dropped sink under the same bounds still fails.
#[test]
fn propagated_drift_alone_does_not_fail_a_correct_backend_but_a_bug_still_does() {
    let reference = reference(TraceMode::Full, &ProbeFilter::default());
    let _guard = NPU.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    let path = fixture().join("../../../configs/npu-910b-bf16.toml");
    v4_npu::install_config_file(&device, &path).unwrap();
    let mut model = load::<v4_npu::Npu>(&device);
    let first = validate(&model, &reference, &opts(RunMode::Both, Dtype::Bf16, "npu")).unwrap();
    let worst = |mode| max_drift(&first, mode).into_iter().fold(0f64, f64::max);
    let (isolated, propagated) = (worst(RunMode::Isolated), worst(RunMode::Propagated));
    assert!(
        propagated > 1.2 * isolated,
        "drift accumulates: {propagated} vs {isolated}"
    );
    // A floor above every isolated error and below the propagated worst: only drift crosses it.
    let floor = (isolated * propagated).sqrt();
    let mut o = opts(RunMode::Both, Dtype::Bf16, "npu");
    o.tolerances =
        Tolerances::from_toml(&format!("[defaults]\nrel_l2_floor = {floor}\nkl_max = 1.0\n")).unwrap();
    let report = validate(&model, &reference, &o).unwrap();
    println!("{}", report.summary(5));
    assert!(report.passed, "{}", report.summary(5));
    let drifted: Vec<_> = report.results.iter().filter(|r| r.drifted()).collect();
    assert!(!drifted.is_empty(), "the drift is reported");
    assert!(drifted
        .iter()
        .all(|r| r.mode == RunMode::Propagated && r.status == Status::Warn));
    assert!(report.notes.iter().any(|n| n.contains("drift")));

    let sinks = &model.layers[2].attn.sinks;
    let dropped = Tensor::<v4_npu::Npu, 1>::full(sinks.dims(), -1e4, &device);
    model.layers[2].attn.sinks = Param::from_tensor(dropped);
    let report = validate(&model, &reference, &o).unwrap();
    assert!(!report.passed, "{}", report.summary(5));
    let iso = report
        .localisation
        .iter()
        .find(|(m, _)| *m == RunMode::Isolated)
        .unwrap();
    assert_eq!(iso.1.first_divergent_probe.as_deref(), Some("layers.2.attn.core"));
}
