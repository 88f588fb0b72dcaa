//! `v4 train`: config printing, unknown keys, a short run whose checkpoint `v4 forward` loads.

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "support/cli.rs"]
mod cli;
#[path = "support/scratch.rs"]
mod support;

use cli::v4;

fn scratch(name: &str) -> PathBuf {
    support::scratch("train_cli", name)
}

fn write_config(dir: &Path, extra: &str) -> PathBuf {
    write_config_steps(dir, 2, extra)
}

/// A config of `steps` steps on the tiny fixture; `extra` lands in its `[checkpoint]` section.
fn write_config_steps(dir: &Path, steps: usize, extra: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        "[model]\ncheckpoint = \"{}\"\n\n[data]\ntrain = \"{d}/train.jsonl\"\nvalidation = \"{d}/valid.jsonl\"\n\
         tokenizer = \"bytes\"\nseq_len = 16\nvalidation_batches = 1\n\n[schedule]\nsteps = {steps}\n\n\
         [training]\nbatch = 2\n\n[checkpoint]\ndir = \"{}\"\n{extra}",
        root.join("tests/fixtures/v4-tiny-a/hf").display(),
        dir.join("ckpt").display(),
        d = root.join("tests/fixtures/data/shakespeare").display(),
    );
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn train_prints_config_refuses_unknown_keys_and_writes_a_loadable_checkpoint() {
    let _scratch = support::RemoveOnSuccess;
    let dir = scratch("run");
    let config = write_config(&dir, "");
    let out = v4(&["train", "--print-config", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("[optimizer]") && text.contains("weight_decay") && text.contains("keep_last"),
        "{text}"
    );

    let bad = write_config(&scratch("bad"), "bogus_key = 1\n");
    let out = v4(&["train", bad.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bogus_key"), "{err}");

    let out = v4(&["train", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    println!("{}", String::from_utf8_lossy(&out.stdout));
    let ckpt = dir.join("ckpt/step-00000002");
    assert!(ckpt.join("model.safetensors").is_file());

    let ids: Vec<u8> = [72i64, 101, 108, 108, 111]
        .iter()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, 5], &ids).unwrap();
    let input = dir.join("ids.safetensors");
    safetensors::serialize_to_file(vec![("input_ids", view)], None, &input).unwrap();
    let output = dir.join("out.safetensors");
    let out = v4(&[
        "forward",
        "--model",
        ckpt.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(output.is_file());
}

/// CRC-32C (Castagnoli), bitwise: the checksum TFRecord frames carry, computed here independently of the
/// writer.
fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// TFRecord's masked CRC.
fn masked(data: &[u8]) -> u32 {
    let c = crc32c(data);
    (c.rotate_right(15)).wrapping_add(0xA282_EAD8)
}

/// The records of a TFRecord file, each frame's length and data checksums verified.
fn tfrecords(bytes: &[u8]) -> Vec<&[u8]> {
    let mut records = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap());
        assert_eq!(
            len_crc,
            masked(len_bytes),
            "length checksum of record {}",
            records.len()
        );
        let data = &bytes[at + 12..at + 12 + len];
        let data_crc = u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap());
        assert_eq!(
            data_crc,
            masked(data),
            "data checksum of record {}",
            records.len()
        );
        records.push(data);
        at += 16 + len;
    }
    records
}

#[test]
fn training_writes_tensorboard_event_files() {
    let _scratch = support::RemoveOnSuccess;
    let dir = scratch("tensorboard");
    let logs = dir.join("logs");
    let config = write_config(
        &dir,
        &format!(
            "\n[logging]\ntensorboard = \"{}\"\ninterval = 1\n",
            logs.display()
        ),
    );
    let out = v4(&["train", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let events: Vec<PathBuf> = std::fs::read_dir(&logs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("events.out.tfevents.")
        })
        .collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let bytes = std::fs::read(&events[0]).unwrap();
    let records = tfrecords(&bytes);
    let with_tag = |tag: &str| {
        records
            .iter()
            .filter(|r| r.windows(tag.len()).any(|w| w == tag.as_bytes()))
            .count()
    };
    // 2 steps of scalars; validation at the start and at the end; per-layer MoE health of the 3 top-k
    // layers and the hash layer.
    assert_eq!(with_tag("train/loss"), 2);
    assert_eq!(with_tag("valid/loss"), 2);
    assert_eq!(with_tag("moe/layer1/load_cv"), 2);
    assert_eq!(with_tag("moe/layer0/tokens_per_expert"), 2);
    assert_eq!(with_tag("moe/layer0/bias_min"), 0, "hash layers have no bias");
    assert!(with_tag("moe/layer3/bias_max") == 2 && with_tag("moe/layer2/dead_experts") == 2);
    let jsonl = std::fs::read_to_string(logs.join("metrics.jsonl")).unwrap();
    assert_eq!(jsonl.lines().filter(|l| l.contains("\"train/loss\"")).count(), 2);
}

/// `[parallel] expert_parallel = 2` on one process: refused with how to start it (with or without the
/// `mpi` feature).
#[test]
fn expert_parallel_without_its_ranks_is_refused() {
    let _scratch = support::RemoveOnSuccess;
    let dir = scratch("ep-mismatch");
    let config = write_config(&dir, "\n[parallel]\nexpert_parallel = 2\n");
    let out = v4(&["train", config.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("expert_parallel = 2") && err.contains("mpirun -np 2"),
        "{err}"
    );
}

/// Ctrl-C (SIGINT) ends the run after the current step with a checkpoint of that step, which resumes.
#[test]
fn ctrl_c_stops_after_the_step_with_a_checkpoint() {
    let _scratch = support::RemoveOnSuccess;
    use std::io::{BufRead, BufReader};
    let dir = scratch("ctrl-c");
    let config = write_config(&dir, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("steps = 2", "steps = 100000");
    std::fs::write(&config, text).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_v4"))
        .args(["train", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        let first_step = line.contains("step      2/");
        seen.push(line);
        if first_step {
            break;
        }
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    seen.extend(lines.map(Result::unwrap));
    let status = child.wait().unwrap();
    let out = seen.join("\n");
    assert!(status.success(), "{out}");
    let stopped = seen
        .iter()
        .find_map(|l| {
            l.trim()
                .strip_suffix("interrupted: stopped after writing its checkpoint")
        })
        .unwrap_or_else(|| panic!("no interruption line in:\n{out}"));
    let step: usize = stopped.trim().trim_start_matches("step").trim().parse().unwrap();
    assert!((2..100000).contains(&step), "{out}");
    let ckpt = dir.join(format!("ckpt/step-{step:08}"));
    assert!(ckpt.join("model.safetensors").is_file(), "{out}");

    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("steps = 100000", &format!("steps = {}", step + 1));
    std::fs::write(&config, format!("{text}resume = \"latest\"\n")).unwrap();
    let out = v4(&["train", config.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains(&format!("at step {step}")), "{text}");
}

/// Every tensor of two safetensors files, bit for bit: the same names, dtypes, shapes and bytes.
fn assert_same_tensors(a: &Path, b: &Path) {
    let (ba, bb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let ta = safetensors::SafeTensors::deserialize(&ba).unwrap();
    let tb = safetensors::SafeTensors::deserialize(&bb).unwrap();
    let (mut na, mut nb) = (ta.names(), tb.names());
    na.sort();
    nb.sort();
    assert!(!na.is_empty());
    assert_eq!(
        na,
        nb,
        "{} and {} hold different tensors",
        a.display(),
        b.display()
    );
    for name in na {
        let (x, y) = (ta.tensor(name).unwrap(), tb.tensor(name).unwrap());
        assert_eq!((x.dtype(), x.shape()), (y.dtype(), y.shape()), "{name}");
        assert!(x.data() == y.data(), "{name} differs in {}", b.display());
    }
}

/// Resuming is exact. In separate processes with one rayon thread, a run interrupted after step 3 and
/// resumed from its step-2 checkpoint ends at step 4 with every parameter and every AdamW moment bit-identical
/// to the uninterrupted run's (two updates after the resume). Within one process two runs are not
/// bit-identical (see train/tests/train.rs), so this runs the CLI.
#[test]
fn resume_from_a_checkpoint_is_bit_exact() {
    let _scratch = support::RemoveOnSuccess;
    let run = |config: &Path, extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_v4"))
            .env("RAYON_NUM_THREADS", "1")
            .arg("train")
            .arg(config)
            .args(extra)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
    };
    let full_dir = scratch("resume-full");
    run(&write_config_steps(&full_dir, 4, "interval = 2\n"), &[]);
    let part_dir = scratch("resume-part");
    let part = write_config_steps(&part_dir, 4, "interval = 2\nresume = \"latest\"\n");
    run(&part, &["--stop-after", "3"]);
    assert!(!part_dir.join("ckpt/step-00000004").exists());
    let log = run(&part, &[]);
    assert!(
        log.contains("resumed from") && log.contains("step-00000002"),
        "{log}"
    );
    for file in ["model.safetensors", "training/optimizer.safetensors"] {
        assert_same_tensors(
            &full_dir.join("ckpt/step-00000004").join(file),
            &part_dir.join("ckpt/step-00000004").join(file),
        );
    }
}

/// A DeepSeek release-layout checkpoint (FP8 / FP4) trains as its f32 HF-layout conversion does: the same
/// losses, step after step (both load the same dequantised values).
#[test]
fn training_starts_from_a_release_checkpoint_as_from_its_hf_conversion() {
    let _scratch = support::RemoveOnSuccess;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let native = root.join("tests/fixtures/v4-tiny-a/native");
    let dir = scratch("release");
    let hf = dir.join("hf");
    let out = v4(&[
        "convert",
        "--input",
        native.to_str().unwrap(),
        "--output",
        hf.to_str().unwrap(),
        "--to",
        "f32",
        "--layout",
        "hf",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let losses = |model: &Path, name: &str| -> Vec<f64> {
        let logs = dir.join(name);
        let text = format!(
            "[model]\ncheckpoint = \"{}\"\n\n[data]\ntrain = \"{}\"\ntokenizer = \"bytes\"\nseq_len = 16\n\n\
             [schedule]\nsteps = 3\n\n[training]\nbatch = 2\n\n[logging]\ntensorboard = \"{}\"\n",
            model.display(),
            root.join("tests/fixtures/data/shakespeare/train.jsonl").display(),
            logs.display(),
        );
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, text).unwrap();
        let out = v4(&["train", config.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read_to_string(logs.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v["tag"] == "train/loss")
            .map(|v| v["value"].as_f64().unwrap())
            .collect()
    };
    let (release, converted) = (losses(&native, "release"), losses(&hf, "converted"));
    assert_eq!(release.len(), 3);
    assert_eq!(release, converted);
}
