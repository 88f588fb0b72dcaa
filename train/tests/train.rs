//! End-to-end training tests on the tiny fixture model and a slice of Shakespeare.

use burn_autodiff::Autodiff;
use burn_ndarray::{NdArray, NdArrayDevice};
use std::path::Path;
use v4_train::{train, RunOptions, TrainConfig, TrainError};

type B = Autodiff<NdArray<f32>>;

mod support;
use support::root;

const SUITE: &str = "test";

/// A config for the tiny model; `extra` is appended (TOML sections).
fn config(dir: &Path, train_file: &str, valid_file: &str, schedule: &str, extra: &str) -> TrainConfig {
    let r = root();
    let text = format!(
        r#"
[model]
checkpoint = "{model}"

[data]
train = "{data}/{train_file}"
validation = "{data}/{valid_file}"
tokenizer = "bytes"
seq_len = 24
validation_batches = 2

[optimizer]
lr = 3e-3
betas = [0.9, 0.95]
eps = 1e-8
weight_decay = 0.0

{schedule}

{extra}
"#,
        model = r.join("tests/fixtures/v4-tiny-a/hf").display(),
        data = r.join("tests/fixtures/data/shakespeare").display(),
    );
    TrainConfig::from_toml_str(&text, dir).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn fine_tuning_lowers_validation_loss() {
    let dir = support::scratch(SUITE, "finetune");
    let cfg = config(
        &dir,
        "train.jsonl",
        "valid.jsonl",
        "[schedule]\nsteps = 8\nwarmup = 1\ndecay = \"cosine\"",
        "[training]\nbatch = 4\ngrad_clip = 1.0\neval_interval = 4\n[moe]\ngamma = 0.001",
    );
    let report = train::<B>(&cfg, &NdArrayDevice::Cpu, &RunOptions::default()).unwrap();
    let first = report.validations.first().unwrap().1;
    let last = report.validations.last().unwrap().1;
    println!("validation loss: {:?}", report.validations);
    println!(
        "train losses: {:?}",
        report.steps.iter().map(|s| s.loss).collect::<Vec<_>>()
    );
    assert!(last < first - 0.5, "validation loss {first} -> {last}");
    // The balancing moved the selection biases of the top-k layers.
    assert!(
        !report.final_biases.is_empty(),
        "the tiny model has top-k layers, so biases to balance"
    );
    assert!(report.final_biases.iter().flatten().any(|&b| b != 0.0));
}

#[test]
fn chat_data_trains_on_assistant_turns() {
    let dir = support::scratch(SUITE, "chat");
    let cfg = config(
        &dir,
        "chat-train.jsonl",
        "chat-valid.jsonl",
        "[schedule]\nsteps = 3\ndecay = \"linear\"",
        "[training]\nbatch = 2\ngrad_accum = 2",
    );
    let report = train::<B>(
        &cfg,
        &NdArrayDevice::Cpu,
        &RunOptions {
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    println!("chat validation loss: {:?}", report.validations);
    assert_eq!(report.steps.len(), 3);
    assert!(report.steps.iter().all(|s| s.loss.is_finite()));
}

#[test]
fn resume_reproduces_the_uninterrupted_run() {
    let schedule = "[schedule]\nsteps = 4\nwarmup = 1";
    let extra = |ckpt: &Path, resume: bool| {
        format!(
            "[training]\nbatch = 2\ngrad_accum = 2\nseed = 7\neval_interval = 0\n[moe]\ngamma = 0.01\n\
             [checkpoint]\ndir = \"{}\"\ninterval = 2\nkeep_last = 2\n{}",
            ckpt.display(),
            if resume { "resume = \"latest\"" } else { "" }
        )
    };
    let quiet = RunOptions {
        quiet: true,
        ..Default::default()
    };
    let dir_a = support::scratch(SUITE, "resume-a");
    let full = config(
        &dir_a,
        "train.jsonl",
        "valid.jsonl",
        schedule,
        &extra(&dir_a.join("ckpt"), false),
    );
    let a = train::<B>(&full, &NdArrayDevice::Cpu, &quiet).unwrap();

    let dir_b = support::scratch(SUITE, "resume-b");
    let first = config(
        &dir_b,
        "train.jsonl",
        "valid.jsonl",
        schedule,
        &extra(&dir_b.join("ckpt"), true),
    );
    // Interrupted after step 3: the newest checkpoint is step 2.
    let b1 = train::<B>(
        &first,
        &NdArrayDevice::Cpu,
        &RunOptions {
            stop_after: Some(3),
            quiet: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(b1.steps.len(), 3);
    let b2 = train::<B>(&first, &NdArrayDevice::Cpu, &quiet).unwrap();
    assert_eq!(b2.start_step, 2);
    let full_losses: Vec<f64> = a.steps.iter().map(|s| s.loss).collect();
    let resumed: Vec<f64> = b1.steps[..2].iter().chain(&b2.steps).map(|s| s.loss).collect();
    println!("uninterrupted: {full_losses:?}\nresumed:       {resumed:?}");
    // Two runs in ONE process are not bitwise repeatable: they differ in the last bits at step 2, before
    // any checkpoint, with one rayon thread as with two, by up to 1.3e-5 in the loss after four steps
    // (AMD EPYC) and 8e-4 in a parameter (Intel Xeon; AdamW amplifies sign flips of tiny gradients).
    // Separate processes are bit-identical (measured with the CLI, 1 and 2 threads), so the state left in
    // the process, not the math, is the source; allocation-address-dependent kernel paths are the
    // suspects. Bit-exact resume is asserted across processes in tests/train_cli.rs
    // (`resume_from_a_checkpoint_is_bit_exact`); here the losses are compared to 3e-5 and the resumed
    // position (data, step, tokens) exactly.
    let rel = |x: f64, y: f64| (x - y).abs() / x.abs().max(1e-12);
    let worst = full_losses
        .iter()
        .zip(&resumed)
        .map(|(x, y)| rel(*x, *y))
        .fold(0.0, f64::max);
    println!("largest relative loss difference: {worst:.2e}");
    assert_eq!(full_losses.len(), resumed.len());
    assert!(worst < 3e-5, "resume diverged: {full_losses:?} vs {resumed:?}");
    assert_eq!(full_losses[0], resumed[0]);
    let state =
        |d: &Path| std::fs::read_to_string(d.join("ckpt/step-00000004/training/trainer_state.json")).unwrap();
    assert_eq!(state(&dir_a), state(&dir_b));
    let (va, vb) = (a.validations.last().unwrap().1, b2.validations.last().unwrap().1);
    assert!(rel(va, vb) < 1e-5, "{va} vs {vb}");

    // keep_last = 2
    let kept: Vec<_> = std::fs::read_dir(dir_a.join("ckpt"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");

    // A corrupt checkpoint is refused.
    let ckpt = dir_b.join("ckpt/step-00000004");
    let path = ckpt.join("model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0x55;
    std::fs::write(&path, bytes).unwrap();
    let err = train::<B>(&first, &NdArrayDevice::Cpu, &quiet).unwrap_err();
    println!("{err}");
    assert!(
        matches!(&err, TrainError::Checkpoint { reason, .. }
            if reason.contains("corrupt") && reason.contains("model.safetensors")),
        "{err}"
    );

    // The saved checkpoint (HF layout) loads as a model.
    let good = dir_a.join("ckpt/step-00000004");
    let config = v4_checkpoint::read_config(&good).unwrap();
    let source = v4_checkpoint::open(&good).unwrap();
    v4_model::V4Model::<NdArray<f32>>::load(&config, &*source, &NdArrayDevice::Cpu).unwrap();
}

#[test]
fn unknown_config_key_is_named() {
    let text =
        "[model]\ncheckpoint = \"x\"\n[data]\ntrain = \"t.jsonl\"\n[optimizer]\nlearning_rate = 1e-3\n";
    let err = TrainConfig::from_toml_str(text, Path::new("")).unwrap_err();
    println!("{err}");
    assert!(
        matches!(&err, TrainError::Config { reason, .. } if reason.contains("learning_rate")),
        "{err}"
    );
    let text = "[model]\ncheckpoint = \"x\"\nsed = 3\n[data]\ntrain = \"t.jsonl\"\n";
    let err = TrainConfig::from_toml_str(text, Path::new("")).unwrap_err();
    assert!(
        matches!(&err, TrainError::Config { reason, .. } if reason.contains("sed")),
        "{err}"
    );
}

#[test]
fn a_step_runs_on_the_npu_emulator() {
    let dir = support::scratch(SUITE, "npu");
    let cfg = config(
        &dir,
        "train.jsonl",
        "valid.jsonl",
        "[schedule]\nsteps = 1",
        "[training]\nbatch = 1\n",
    );
    let device = Default::default();
    let report = train::<Autodiff<v4_npu::Npu>>(&cfg, &device, &RunOptions::default()).unwrap();
    assert_eq!(report.steps.len(), 1);
    assert!(report.steps[0].loss.is_finite());
    println!("npu step: {:?}", report.steps[0]);
}

/// `[moe] alpha` adds the sequence-wise balance loss: reported per step (about 1 per top-k layer when
/// balanced), and it changes the gradients (the run diverges from the one without it); off, it is absent.
#[test]
fn sequence_balance_loss_is_reported_and_trained() {
    let run = |alpha: f32| {
        let dir = support::scratch(SUITE, &format!("balance-{alpha}"));
        let cfg = config(
            &dir,
            "train.jsonl",
            "valid.jsonl",
            "[schedule]\nsteps = 3",
            &format!("[training]\nbatch = 2\n[moe]\nalpha = {alpha}"),
        );
        let quiet = RunOptions {
            quiet: true,
            ..Default::default()
        };
        train::<B>(&cfg, &NdArrayDevice::Cpu, &quiet).unwrap()
    };
    let off = run(0.0);
    let on = run(0.5);
    assert!(off.steps.iter().all(|s| s.balance.is_none()));
    // v4-tiny-a has 3 top-k MoE layers: 3 when perfectly balanced.
    for s in &on.steps {
        let b = s.balance.expect("reported");
        assert!(b > 1.0 && b < 2.0 * 4.0, "balance term {b}");
    }
    // The first step's cross-entropy is computed before any update: equal. Later ones differ.
    assert_eq!(on.steps[0].loss, off.steps[0].loss);
    assert_ne!(on.steps[2].loss, off.steps[2].loss);
}
