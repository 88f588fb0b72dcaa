#!/usr/bin/env bash
# v4 against its peer, HF transformers + PyTorch, on this machine's CPU: prefill (all logits and last
# position), decode and the training step, run alternately in one sitting, written as a markdown table to
# docs/bench/<cpu>.md. Never in CI (it needs the ~5.6 GB peer venv and a quiet machine).
#
# Usage: scripts/bench-peers.sh [--rounds N] [--threads T] [--config HF_CONFIG] [--out FILE]
#   V4=target/release/v4 (cargo build --release), PYTHON=the venv's python with torch and
#   transformers==5.24.0 (python3 -m venv /work/hfvenv && /work/hfvenv/bin/pip install torch transformers==5.24.0).
# Like with like: both sides run the same config, the same token ids (written once here, read by both),
# the same thread count (default: all cores), fp32, and decode timed warm on both (HF: generate(N) -
# generate(1) over N - 1 tokens). On a CPU with AVX-512, v4 also runs with V4_CPU_ISA=avx2, the AVX2 path.
set -euo pipefail
cd "$(dirname "$0")/.."
V4=${V4:-target/release/v4}
PY=${PYTHON:-/work/hfvenv/bin/python}
ROUNDS=3
THREADS=$(nproc)
CONFIG=tests/fixtures/bench/v4-small.hf-config.json
OUT=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --config) CONFIG=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ -x $V4 ]] || { echo "no v4 binary at $V4: run cargo build --release" >&2; exit 1; }
"$PY" -c "import torch, transformers" 2>/dev/null || { echo "$PY lacks torch/transformers: see --help" >&2; exit 1; }

source scripts/cpu.sh
ISAS=(default)
grep -qw avx512f /proc/cpuinfo && ISAS=(default avx2)
OUT=${OUT:-docs/bench/$SLUG.md}
WORK=$(mktemp -d /tmp/bench-peers.XXXXXX)
PROMPT=512 GENERATE=64 TRAIN_BATCH=2 TRAIN_SEQ=256 TRAIN_STEPS=9
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS

# The token ids, once, for both sides: uniform over the config's vocabulary, seeded.
"$PY" - "$CONFIG" "$WORK/ids.jsonl" $(( (TRAIN_STEPS + 1) * TRAIN_BATCH * (TRAIN_SEQ + 1) + PROMPT )) <<'EOF'
import json, random, sys
vocab = json.load(open(sys.argv[1]))["vocab_size"]
rng, n = random.Random(0), int(sys.argv[3])
with open(sys.argv[2], "w") as f:
    for start in range(0, n, 512):
        f.write(json.dumps({"ids": [rng.randrange(vocab) for _ in range(min(512, n - start))]}) + "\n")
EOF
cat > "$WORK/train.toml" <<EOF
[model]
config = "$PWD/$CONFIG"
device = "cpu"
[data]
train = "$WORK/ids.jsonl"
tokenizer = "bytes"
seq_len = $TRAIN_SEQ
[optimizer]
lr = 1e-4
[schedule]
steps = $TRAIN_STEPS
warmup = 1
[training]
batch = $TRAIN_BATCH
seed = 0
[checkpoint]
dir = "$WORK/checkpoints"
interval = 1000000
EOF

run() { # run NAME COMMAND...: appends the command's output to $WORK/NAME.txt
    local name=$1
    shift
    echo "  $name" >&2
    echo "=== run" >> "$WORK/$name.txt"
    "$@" >> "$WORK/$name.txt" 2>&1 || { echo "failed: $* (see $WORK/$name.txt)" >&2; exit 1; }
}
for round in $(seq "$ROUNDS"); do
    echo "round $round/$ROUNDS" >&2
    for isa in "${ISAS[@]}"; do
        env=(); [[ $isa == default ]] || env=(V4_CPU_ISA=$isa)
        run "v4-$isa-forward" env "${env[@]}" "$V4" bench --config "$CONFIG" --seq $PROMPT --iters 3 --ids "$WORK/ids.jsonl"
        run "v4-$isa-infer" env "${env[@]}" "$V4" bench-infer --config "$CONFIG" --prompt $PROMPT \
            --generate $GENERATE --iters 3 --ids "$WORK/ids.jsonl"
        rm -rf "$WORK/checkpoints"
        run "v4-$isa-train" env "${env[@]}" "$V4" train "$WORK/train.toml"
    done
    common=(--config "$CONFIG" --threads "$THREADS" --ids "$WORK/ids.jsonl" --seq $PROMPT --iters 3)
    run hf-forward "$PY" scripts/bench-hf.py "${common[@]}" --modes forward
    run hf-infer "$PY" scripts/bench-hf.py "${common[@]}" --modes decode --generate $GENERATE
    run hf-train "$PY" scripts/bench-hf.py "${common[@]}" --modes train --train-batch $TRAIN_BATCH \
        --train-seq $TRAIN_SEQ --iters $((TRAIN_STEPS - 1))
done

mkdir -p "$(dirname "$OUT")"
python3 - "$WORK" "$OUT" "$CPU" "$THREADS" "$CONFIG" "$ROUNDS" "${ISAS[@]}" <<'EOF'
import re, statistics, subprocess, sys
from pathlib import Path

work, out, cpu, threads, config, rounds, isas = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:]
flags = open("/proc/cpuinfo").read()
avx512 = "yes" if re.search(r"\bavx512f\b", flags) else "no"

def grab(name, pattern):
    """The number pattern captures in NAME.txt, once per match (each run prints its own median once)."""
    return [float(x) for x in re.findall(pattern, (work / f"{name}.txt").read_text())]

def train_runs(name):
    """The median tokens/s of steps 2.. of each `v4 train` run in NAME.txt (step 1 warms the allocator)."""
    vals = []
    for run in (work / f"{name}.txt").read_text().split("=== run")[1:]:
        steps = [(int(s), float(v)) for s, v in re.findall(r"step\s+(\d+)/\d+ .*?([\d.]+) tokens/s", run)]
        vals += [statistics.median(v for s, v in steps if s >= 2)] if len(steps) > 1 else []
    return vals

def cell(vals):
    return f"{statistics.median(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})" if vals else "n/a"

rows = [
    ("prefill 512, all logits (tok/s)", "forward", r"forward: median .*?-> ([\d.]+) tokens/s", r"hf forward: .*?-> ([\d.]+) tokens/s"),
    ("prefill 512, last logits (tok/s)", "infer", r"prefill: .*?-> ([\d.]+) tok/s", r"hf prefill .*?-> ([\d.]+) tokens/s"),
    ("decode after 512 (tok/s)", "infer", r"decode: .*?-> ([\d.]+) tok/s", r"hf decode: .*?-> ([\d.]+) tokens/s"),
]
lines = []
for isa in isas:
    label = "v4 (best path)" if isa == "default" else f"v4 (V4_CPU_ISA={isa})"
    for title, mode, v4_re, hf_re in rows:
        v4, hf = grab(f"v4-{isa}-{mode}", v4_re), grab(f"hf-{mode}", hf_re)
        lines.append((title, label, v4, hf))
    v4 = train_runs(f"v4-{isa}-train")
    hf = grab("hf-train", r"hf train step: .*?-> ([\d.]+) tokens/s")
    lines.append(("train step 2x256 (tok/s)", label, v4, hf))
    bound = grab(f"v4-{isa}-infer", r"measured decode is ([\d.]+)% of it")
    lines.append(("decode, % of the bandwidth bound", label, bound, []))

isa_used = sorted(set(re.findall(r"cpu kernels: (\w+)", "".join(p.read_text() for p in work.glob("v4-*.txt")))))
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
with open(out + ".tmp", "w") as f:
    f.write(f"# v4 vs HF transformers + PyTorch on {cpu}\n\n")
    f.write(f"- CPU: {cpu}; AVX-512: {avx512}; threads: {threads} on both sides; v4 kernel paths run: {', '.join(isa_used)}\n")
    f.write(f"- config: `{config}`, fp32, random weights; the same token ids on both sides; {rounds} rounds, v4 and HF alternated\n")
    f.write(f"- v4 commit {rev}; written by `scripts/bench-peers.sh`. Each cell: median over rounds (range).\n\n")
    f.write("| measure | v4 path | v4 | HF | v4 / HF |\n|---|---|---|---|---|\n")
    for title, label, v4, hf in lines:
        ratio = f"{statistics.median(v4) / statistics.median(hf):.2f}" if v4 and hf else ""
        f.write(f"| {title} | {label} | {cell(v4)} | {cell(hf) if hf else ''} | {ratio} |\n")
Path(out + ".tmp").rename(out)
print(Path(out).read_text())
EOF
echo "raw outputs: $WORK" >&2
