//! `v4 trace` and `v4 validate` end to end through the binary: a pass exits 0 and writes the reports,
//! an impossible tolerance exits non-zero, the help explains the modes.

use std::path::PathBuf;
use std::process::Command;

#[path = "support/scratch.rs"]
mod support;

fn v4(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_v4"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run v4")
}

/// Runs `v4 args`, which must succeed; returns its standard output.
fn v4_ok(args: &[&str]) -> String {
    let out = v4(args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "v4 {args:?}: {text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The tensor `name` of the safetensors file `path`, as f32.
fn f32_tensor(path: &str, name: &str) -> Vec<f32> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|_| panic!("{path}: no `{name}`"));
    t.data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// A fresh scratch directory for test `tag`, and the tiny fixture's model and input ids.
fn setup(tag: &str) -> (PathBuf, String, String) {
    let dir = support::scratch("validate_cli", tag);
    let f = "tests/fixtures/v4-tiny-a";
    (dir, format!("{f}/hf"), format!("{f}/io.safetensors"))
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn trace_then_validate_on_the_npu_emulator() {
    let (dir, model, input) = setup("cli");
    let p = |n: &str| -> String { dir.join(n).display().to_string() };

    let out = v4(&[
        "trace",
        "--model",
        &model,
        "--input",
        &input,
        "--output",
        &p("ref.safetensors"),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = v4(&[
        "trace",
        "--model",
        &model,
        "--input",
        &input,
        "--output",
        &p("stats.safetensors"),
        "--mode",
        "stats",
        "--layers",
        "0..2",
        "--filter",
        "*.attn.*,logits",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stats = std::fs::metadata(p("stats.safetensors")).unwrap().len();
    assert!(stats < 16 * 1024, "stats trace {stats} bytes");

    let out = v4(&[
        "validate",
        "--reference",
        &p("ref.safetensors"),
        "--model",
        &model,
        "--device",
        "npu",
        "--npu-config",
        "configs/npu-910b-f32.toml",
        "--report-dir",
        &p("report"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("precision policy diff") && text.contains("RESULT: PASS"),
        "{text}"
    );
    for f in ["report.json", "report.csv", "report.html"] {
        assert!(PathBuf::from(p("report")).join(f).exists(), "{f}");
    }

    // A tolerance no real run meets: the command fails (CI gate).
    std::fs::write(p("tight.toml"), "[defaults]\nrel_l2_floor = 0.0\n").unwrap();
    let out = v4(&[
        "validate",
        "--reference",
        &p("ref.safetensors"),
        "--model",
        &model,
        "--device",
        "npu",
        "--npu-config",
        "configs/npu-910b-bf16.toml",
        "--tolerances",
        &p("tight.toml"),
        "--mode",
        "isolated",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("RESULT: FAIL") && text.contains("first divergent layer: 0"),
        "{text}"
    );
    assert!(
        text.contains("matmul") && text.contains("bf16"),
        "policy diff: {text}"
    );

    // HF's forward-output file is accepted as a reference.
    let out = v4(&["validate", "--reference", &input, "--model", &model]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));

    let help = v4(&["validate", "--help"]);
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(help.contains("isolated") && help.contains("--golden"), "{help}");
    std::fs::remove_dir_all(&dir).ok();
}

/// `--device ndarray-f64` computes the golden in double precision: it matches HF's f32 logits as closely
/// as an f32 run does, and `validate --golden` uses it for the reference-relative gate (the CSV reports
/// the reference's own distance to it, which an f32 reference cannot have against itself).
#[test]
fn an_f64_golden_feeds_the_reference_relative_gate() {
    let (dir, model, input) = setup("golden");
    let p = |n: &str| -> String { dir.join(n).display().to_string() };
    for (device, name) in [("cpu", "ref.safetensors"), ("ndarray-f64", "golden.safetensors")] {
        let out = v4(&[
            "trace",
            "--model",
            &model,
            "--input",
            &input,
            "--output",
            &p(name),
            "--device",
            device,
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let logits = |path: &str| f32_tensor(path, "logits");
    let (hf, f32_run, f64_run) = (
        logits(&input),
        logits(&p("ref.safetensors")),
        logits(&p("golden.safetensors")),
    );
    assert!(
        max_diff(&f64_run, &hf) < 1e-4,
        "f64 golden vs HF: {}",
        max_diff(&f64_run, &hf)
    );
    let f32_vs_f64 = max_diff(&f32_run, &f64_run);
    assert!(f32_vs_f64 > 0.0 && f32_vs_f64 < 1e-4, "f32 vs f64: {f32_vs_f64}");

    v4_ok(&[
        "validate",
        "--reference",
        &p("ref.safetensors"),
        "--golden",
        &p("golden.safetensors"),
        "--model",
        &model,
        "--device",
        "npu",
        "--npu-config",
        "configs/npu-910b-f32.toml",
        "--mode",
        "propagated",
        "--report-dir",
        &p("report"),
    ]);
    let csv = std::fs::read_to_string(dir.join("report/report.csv")).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (golden_col, sqnr_col) = (col("golden_rel_l2"), col("sqnr_db"));
    let logits_row: Vec<&str> = csv
        .lines()
        .find(|l| l.split(',').nth(1) == Some("logits"))
        .expect("logits row")
        .split(',')
        .collect();
    let golden_err: f64 = logits_row[golden_col].parse().unwrap();
    assert!(
        golden_err > 0.0 && golden_err < 1e-5,
        "reference vs golden rel L2 {golden_err}"
    );
    let sqnr: f64 = logits_row[sqnr_col].parse().unwrap();
    assert!(sqnr > 80.0, "f32 NPU emulation SQNR {sqnr} dB");
    std::fs::remove_dir_all(&dir).ok();
}

/// A model run range by range (`--layers`, each range loading only its layers and starting from the
/// streams the previous range wrote) gives the whole model's streams and logits, which match HF's; and
/// `validate --layers` checks one range against a full reference trace.
#[test]
fn ranges_of_layers_run_and_validate_like_the_whole_model() {
    let (dir, model, input) = setup("layers");
    let p = |n: &str| -> String { dir.join(n).display().to_string() };
    let forward = ["forward", "--model", &model, "--input", &input, "--output"];
    v4_ok(&[&forward[..], &[&p("whole.safetensors")]].concat());
    v4_ok(&[&forward[..], &[&p("first.safetensors"), "--layers", "0..2"]].concat());
    v4_ok(
        &[
            &forward[..],
            &[
                &p("second.safetensors"),
                "--layers",
                "2..",
                "--streams",
                &p("first.safetensors"),
            ],
        ]
        .concat(),
    );
    // The first range ends with the streams entering layer 2, and has no logits.
    let first = p("first.safetensors");
    assert_eq!(f32_tensor(&first, "hidden.2").len(), 2 * 80 * 4 * 256);
    let bytes = std::fs::read(&first).unwrap();
    assert!(safetensors::SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensor("logits")
        .is_err());
    let whole = p("whole.safetensors");
    assert_eq!(
        max_diff(&f32_tensor(&first, "hidden.2"), &f32_tensor(&whole, "hidden.2")),
        0.0
    );
    let second = p("second.safetensors");
    let logits = f32_tensor(&second, "logits");
    assert_eq!(
        max_diff(&logits, &f32_tensor(&whole, "logits")),
        0.0,
        "ranges vs whole"
    );
    let hf = max_diff(&logits, &f32_tensor(&input, "logits"));
    assert!(hf <= 2e-5, "ranges vs HF: {hf}");

    // `trace --layers` loads and runs only its range too.
    let ranged_trace = p("ranged-trace.safetensors");
    v4_ok(&[
        "trace",
        "--model",
        &model,
        "--input",
        &input,
        "--output",
        &ranged_trace,
        "--layers",
        "2..",
        "--streams",
        &first,
    ]);
    assert_eq!(
        max_diff(
            &f32_tensor(&ranged_trace, "logits"),
            &f32_tensor(&whole, "logits")
        ),
        0.0
    );

    // A range after layer 0 needs its input streams.
    let out = v4(&[&forward[..], &[&p("x.safetensors"), "--layers", "2.."]].concat());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--streams"));

    // Validate layers 1..3 alone against a full reference trace: only their probes (and the head, fed
    // the reference's final streams in isolated mode) are compared.
    v4_ok(&[
        "trace",
        "--model",
        &model,
        "--input",
        &input,
        "--output",
        &p("ref.safetensors"),
    ]);
    v4_ok(&[
        "validate",
        "--reference",
        &p("ref.safetensors"),
        "--model",
        &model,
        "--layers",
        "1..3",
        "--report-dir",
        &p("report"),
    ]);
    let csv = std::fs::read_to_string(dir.join("report/report.csv")).unwrap();
    let probes: Vec<&str> = csv.lines().skip(1).filter_map(|l| l.split(',').nth(1)).collect();
    assert!(
        probes.iter().any(|n| n.starts_with("layers.1."))
            && probes.iter().any(|n| n.starts_with("layers.2."))
    );
    assert!(
        !probes
            .iter()
            .any(|n| n.starts_with("layers.0.") || n.starts_with("layers.3.")),
        "probes outside 1..3: {probes:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
