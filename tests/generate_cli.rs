//! `v4 generate`, `v4 chat` and `v4 bench-infer` end to end, as a user runs them.

use safetensors::tensor::{Dtype, TensorView};
use std::cell::RefCell;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use v4_infer::V4Tokenizer;

#[path = "support/cli.rs"]
mod cli;
use cli::v4;
use v4_checkpoint::read_config;
use v4_model::{
    HostData, HostTensor, LoadError, RandomWeights, TensorSpec, Tokens, V4Config, V4Model, WeightSource,
};

type B = burn_ndarray::NdArray<f32>;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tiny() -> PathBuf {
    root().join("tests/fixtures/v4-tiny-a/hf")
}

fn tokenizer_path() -> PathBuf {
    root().join("tests/fixtures/tokenizer/deepseek-v4/tokenizer.json")
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Records what a model load reads, to write it out as a checkpoint.
struct Recording<'a> {
    inner: &'a dyn WeightSource,
    seen: RefCell<Vec<(String, HostTensor)>>,
}

impl WeightSource for Recording<'_> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    fn read(&self, name: &str, spec: &TensorSpec<'_>) -> Result<HostTensor, LoadError> {
        let t = self.inner.read(name, spec)?;
        self.seen.borrow_mut().push((name.to_string(), t.clone()));
        Ok(t)
    }
    fn names(&self) -> Vec<String> {
        Vec::new()
    }
}

/// A small random-weight model with the real V4 vocabulary (129,280) and its tokenizer, in HF layout, so
/// text prompts and chat run end to end (~70 MB). Built once into the temp dir and reused by later runs.
fn v4_vocab_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let done = std::env::temp_dir().join("v4-generate-cli-model-v1");
        if done.join("tokenizer.json").is_file() {
            return done;
        }
        let dir = std::env::temp_dir().join(format!("v4-generate-cli-model-tmp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let json = cli::v4_vocab_config();
        std::fs::write(dir.join("config.json"), json.to_string()).unwrap();
        let config = read_config(&dir).unwrap();
        let random = RandomWeights {
            seed: 5,
            experts: config.n_routed_experts,
        };
        let rec = Recording {
            inner: &random,
            seen: RefCell::new(Vec::new()),
        };
        V4Model::<B>::load(&config, &rec, &Default::default()).unwrap();
        let seen = rec.seen.into_inner();
        let bytes: Vec<Vec<u8>> = seen
            .iter()
            .map(|(_, t)| match &t.data {
                HostData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
                HostData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            })
            .collect();
        let views: Vec<(String, TensorView<'_>)> = seen
            .iter()
            .zip(&bytes)
            .map(|((name, t), b)| {
                let dtype = match t.data {
                    HostData::F32(_) => Dtype::F32,
                    HostData::I64(_) => Dtype::I64,
                };
                (name.clone(), TensorView::new(dtype, t.shape.clone(), b).unwrap())
            })
            .collect();
        safetensors::serialize_to_file(views, None, &dir.join("model.safetensors")).unwrap();
        std::fs::copy(tokenizer_path(), dir.join("tokenizer.json")).unwrap();
        // Another run may have finished first: either copy will do.
        if std::fs::rename(&dir, &done).is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        done
    })
}

fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The argmax of each position of an independent full (cache-less) forward must be the next generated id.
fn check_greedy(model_dir: &Path, prompt: &[u32], generated: &[u32]) {
    let config: V4Config = read_config(model_dir).unwrap();
    let model = V4Model::<B>::load(
        &config,
        &*v4_checkpoint::open(model_dir).unwrap(),
        &Default::default(),
    )
    .unwrap();
    let all: Vec<i64> = prompt.iter().chain(generated).map(|&t| t as i64).collect();
    let v = config.vocab_size;
    let logits = model
        .forward(&Tokens::new(&all, 1, all.len(), v).unwrap())
        .unwrap()
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    for (j, &id) in generated.iter().enumerate() {
        let row = &logits[(prompt.len() + j - 1) * v..][..v];
        let best = (0..v).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        assert!(
            best as u32 == id || row[best] - row[id as usize] < 1e-4,
            "token {j}: {id} vs full-forward argmax {best}"
        );
    }
}

#[test]
fn generate_prompt_ids_greedy_json_matches_full_forward_and_is_deterministic() {
    let model = tiny();
    let args = [
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "5, 17,300,42,9,100,7,7,3",
        "--greedy",
        "--max-tokens",
        "16",
        "--json",
    ];
    let run = v4(&args);
    assert!(run.status.success(), "{}", stderr(&run));
    let stdout = String::from_utf8(run.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "one JSON object: {stdout}");
    let out: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let prompt = json_ids(&out["prompt_ids"]);
    assert_eq!(prompt, vec![5, 17, 300, 42, 9, 100, 7, 7, 3]);
    let generated = json_ids(&out["generated_ids"]);
    // The tiny config's EOS is id 1: the run either stops on it or makes 16 tokens.
    match out["finish_reason"].as_str().unwrap() {
        "length" => assert_eq!(generated.len(), 16),
        "eos" => assert_eq!(generated.last(), Some(&1)),
        other => panic!("finish reason {other}"),
    }
    assert!(out.get("text").is_none(), "no tokenizer, no text");
    let t = &out["timings"];
    for key in [
        "time_to_first_token_s",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "prefill_s",
        "decode_s",
    ] {
        assert!(t[key].as_f64().unwrap() > 0.0, "{key}: {t}");
    }
    assert_eq!(t["prompt_tokens"], 9);
    check_greedy(&model, &prompt, &generated);
    let again: serde_json::Value =
        serde_json::from_str(&String::from_utf8(v4(&args).stdout).unwrap()).unwrap();
    assert_eq!(json_ids(&again["generated_ids"]), generated);
}

#[test]
fn generate_streams_ids_without_a_tokenizer() {
    let model = tiny();
    let run = v4(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt-ids",
        "5,17,300",
        "--max-tokens",
        "6",
        "--temperature",
        "0.8",
        "--top-p",
        "0.9",
        "--seed",
        "4",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let ids: Vec<u32> = String::from_utf8(run.stdout.clone())
        .unwrap()
        .split_whitespace()
        .map(|s| s.parse().unwrap())
        .collect();
    assert!(!ids.is_empty() && ids.len() <= 6);
    assert!(stderr(&run).contains("tok/s"), "{}", stderr(&run));
}

#[test]
fn generate_errors_are_clear() {
    let model = tiny();
    let m = model.to_str().unwrap();
    let tok = tokenizer_path();
    let t = tok.to_str().unwrap();
    let long: String = vec!["3"; 4097].join(",");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--prompt-ids", ""], "the prompt is empty"),
        (vec!["--prompt", ""], "the prompt is empty"),
        (vec!["--prompt-ids", long.as_str()], "maximum context of 4096"),
        (
            vec!["--prompt-ids", "1,1024"],
            "token id 1024 is outside the model's vocabulary",
        ),
        (vec!["--prompt-ids", "1,-2"], "`-2` is not a token id"),
        (vec!["--prompt", "Hello"], "has no tokenizer.json"),
        (vec!["--prompt", "Hello"], "--prompt-ids"),
        (
            vec!["--tokenizer", t, "--chat", "--prompt", "hi <｜Assistent｜>"],
            "unknown special token `<｜Assistent｜>`",
        ),
        // The tokenizer's ids exceed this model's 1024-token vocabulary.
        (
            vec!["--tokenizer", t, "--prompt", "Hello"],
            "outside the model's vocabulary",
        ),
        (
            vec!["--prompt-ids", "1,2", "--stop", "x"],
            "--stop needs a tokenizer",
        ),
        (vec!["--prompt-ids", "1,2", "--top-p", "1.5"], "top-p"),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["generate", "--model", m];
        args.extend(&extra);
        let run = v4(&args);
        assert!(!run.status.success(), "{extra:?} succeeded");
        assert!(
            stderr(&run).contains(expected),
            "{extra:?}: expected `{expected}` in: {}",
            stderr(&run)
        );
    }
    let missing = v4(&["generate", "--model", "/nonexistent/model", "--prompt-ids", "1"]);
    assert!(!missing.status.success());
    assert!(
        stderr(&missing).contains("/nonexistent/model"),
        "{}",
        stderr(&missing)
    );
}

#[test]
fn generate_text_with_the_v4_tokenizer() {
    let dir = v4_vocab_model();
    let run = v4(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt",
        "Hello, DeepSeek V4 on Ascend! 你好世界",
        "--max-tokens",
        "8",
        "--json",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    // BOS, then the published encoding.
    assert_eq!(
        json_ids(&out["prompt_ids"]),
        vec![0, 19923, 14, 22651, 4374, 1465, 721, 22, 377, 48548, 523, 3, 223, 30594, 3427]
    );
    let generated = json_ids(&out["generated_ids"]);
    let tok = V4Tokenizer::from_file(&tokenizer_path()).unwrap();
    assert_eq!(
        out["text"].as_str().unwrap(),
        tok.decode(&generated, true).unwrap()
    );
    check_greedy(dir, &json_ids(&out["prompt_ids"]), &generated);

    // Chat mode: BOS, system, user turn, assistant generation prompt.
    let run = v4(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--chat",
        "--system",
        "Be brief.",
        "--prompt",
        "hi",
        "--max-tokens",
        "3",
        "--json",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let mut expected = vec![0];
    expected.extend(tok.encode("Be brief.").unwrap());
    expected.push(128803);
    expected.extend(tok.encode("hi").unwrap());
    expected.extend([128804, 128822]);
    assert_eq!(json_ids(&out["prompt_ids"]), expected);
}

#[test]
fn chat_reads_stdin_that_is_not_a_terminal_and_reuses_the_cache() {
    let dir = v4_vocab_model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_v4"))
        .args([
            "chat",
            "--model",
            dir.to_str().unwrap(),
            "--system",
            "You are terse.",
            "--max-tokens",
            "5",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("Hello there\n\nWhat is 1+1?\n/exit\nnot read\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let turns: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("reused from the cache"))
        .collect();
    assert_eq!(turns.len(), 2, "{err}");
    assert!(turns[0].contains("(0 reused"), "{}", turns[0]);
    assert!(
        !turns[1].contains("(0 reused"),
        "the second turn re-ran the first: {}",
        turns[1]
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);

    // A turn that fails is reported; with a pipe the exit status says so.
    let mut child = Command::new(env!("CARGO_BIN_EXE_v4"))
        .args(["chat", "--model", dir.to_str().unwrap(), "--max-tokens", "2"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("bad <｜Usr｜> token\nfine\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown special token `<｜Usr｜>`"),
        "{}",
        stderr(&out)
    );
    assert_eq!(stderr(&out).matches("reused from the cache").count(), 1);

    let no_tok = v4(&["chat", "--model", tiny().to_str().unwrap()]);
    assert!(!no_tok.status.success());
    assert!(
        stderr(&no_tok).contains("no tokenizer.json"),
        "{}",
        stderr(&no_tok)
    );
}

#[test]
fn bench_infer_reports_prefill_decode_and_the_memory_bound() {
    let config = root().join("tests/fixtures/bench/v4-small.hf-config.json");
    let run = v4(&[
        "bench-infer",
        "--config",
        config.to_str().unwrap(),
        "--prompt",
        "32",
        "--generate",
        "4",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = String::from_utf8_lossy(&run.stdout);
    for needle in ["prefill:", "decode:", "memory bound:", "GB/s", "cache:"] {
        assert!(out.contains(needle), "`{needle}` missing in:\n{out}");
    }
    let run = v4(&[
        "bench-infer",
        "--config",
        config.to_str().unwrap(),
        "--contexts",
        "64,200",
        "--generate",
        "2",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = String::from_utf8_lossy(&run.stdout);
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with("64 ") || l.trim_start().starts_with("200 "))
        .collect();
    assert_eq!(rows.len(), 2, "{out}");

    // The analytic size for V4-Flash's real config, without building weights.
    let flash = root().join("tests/fixtures/deepseek-v4-flash/config.json");
    let run = v4(&[
        "bench-infer",
        "--config",
        flash.to_str().unwrap(),
        "--cache-only",
        "--contexts",
        "1048576",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(out.contains("grows by 3440 scalars/token"), "{out}");
    assert!(out.contains("1048576"), "{out}");
}
