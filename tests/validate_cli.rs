//! `v4 trace` and `v4 validate` end to end through the binary: a pass exits 0 and writes the reports,
//! an impossible tolerance exits non-zero, the help explains the modes.

use std::path::PathBuf;
use std::process::Command;

fn v4(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_v4"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run v4")
}

#[test]
fn trace_then_validate_on_the_npu_emulator() {
    let dir = std::env::temp_dir().join(format!("v4-validate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = |n: &str| -> String { dir.join(n).display().to_string() };
    let f = "tests/fixtures/v4-tiny-a";
    let (model, input) = (format!("{f}/hf"), format!("{f}/io.safetensors"));

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
