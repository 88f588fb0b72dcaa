#!/usr/bin/env bash
# The CUDA side of issue 5, on a machine with an NVIDIA GPU (PyTorch installed there for the peer):
#   1. parity: the tiny fixture's forward on burn-cuda against HF's logits (and against the CPU run);
#   2. a reference trace written on cuda, validated on the CPU backends (the migration workflow in
#      reverse: the file carries over, the other side re-runs and compares layer by layer);
#   3. timings: `v4 bench` on the v4-small config on cuda against HF transformers on the same GPU.
#
# Usage: scripts/device-check.sh [V4_BINARY] [OUT_DIR]
#   V4_BINARY: a v4 built with `cargo build --release --features cuda` (default target/release/v4);
#   OUT_DIR:   where the traces, reports and log go (default $OUT, else /tmp/v4-device-check).
# The binary loads libcuda and NVRTC at run time; nothing is downloaded.
# It ends with a table of the checks and exits 1 if any of them failed.
set -euo pipefail
cd "$(dirname "$0")/.."
V4=${1:-target/release/v4}
DIR=${2:-${OUT:-/tmp/v4-device-check}}
PY=${PYTHON:-python3}
FIX=tests/fixtures/v4-tiny-a
BENCH=tests/fixtures/bench/v4-small.hf-config.json
mkdir -p "$DIR"
exec > >(tee "$DIR/device-check.log") 2>&1

# Each check: "name|PASS" or "name|FAIL (why)", printed as a table at the end.
RESULTS=()
check() { # check NAME COMMAND...: runs the command, records whether it succeeded
    local name=$1
    shift
    if "$@"; then RESULTS+=("$name|PASS"); else RESULTS+=("$name|FAIL (exit $?)"); fi
}

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$V4" --version

echo "== 1. parity of the tiny fixture on cuda"
check "cuda forward runs" "$V4" forward --device cuda --model "$FIX/hf" --input "$FIX/io.safetensors" --output "$DIR/cuda-forward.safetensors"
check "cpu forward runs" "$V4" forward --device cpu --model "$FIX/hf" --input "$FIX/io.safetensors" --output "$DIR/cpu-forward.safetensors"
check "cuda logits match HF (<= 2e-5)" "$PY" - "$FIX/io.safetensors" "$DIR/cuda-forward.safetensors" "$DIR/cpu-forward.safetensors" <<'EOF'
import sys
from safetensors.numpy import load_file
hf, cuda, cpu = (load_file(p) for p in sys.argv[1:4])
for name in ["hidden.1", "hidden.2", "hidden.3", "hidden.4", "logits"]:
    d_hf = abs(cuda[name] - hf[name]).max()
    d_cpu = abs(cuda[name] - cpu[name]).max()
    print(f"{name:9s} cuda vs HF max|diff| {d_hf:.2e}   cuda vs v4 cpu {d_cpu:.2e}")
worst = abs(cuda["logits"] - hf["logits"]).max()
print("parity", "PASS" if worst <= 2e-5 else "FAIL", f"(logits max|diff| {worst:.2e}, bound 2e-5)")
sys.exit(0 if worst <= 2e-5 else 1)
EOF

echo "== 2. a reference trace on cuda, validated on the CPU backends"
check "cuda trace" "$V4" trace --device cuda --model "$FIX/hf" --input "$FIX/io.safetensors" --output "$DIR/cuda-trace.safetensors"
check "f64 golden trace" "$V4" trace --device ndarray-f64 --model "$FIX/hf" --input "$FIX/io.safetensors" --output "$DIR/golden-f64.safetensors"
check "validate cpu against the cuda trace" "$V4" validate --reference "$DIR/cuda-trace.safetensors" \
    --golden "$DIR/golden-f64.safetensors" --model "$FIX/hf" --device cpu --report-dir "$DIR/report-cpu" --top 8
check "validate npu bf16 against the cuda trace" "$V4" validate --reference "$DIR/cuda-trace.safetensors" \
    --golden "$DIR/golden-f64.safetensors" --model "$FIX/hf" --device npu --npu-config configs/npu-910b-bf16.toml \
    --report-dir "$DIR/report-npu-bf16" --top 8

echo "== 3. forward on the v4-small config: v4 on cuda vs HF transformers on the same GPU"
for i in 1 2; do
    check "v4 bench on cuda (run $i)" "$V4" bench --device cuda --config "$BENCH" --iters 10
    check "HF bench on cuda (run $i)" "$PY" scripts/bench-hf.py --device cuda --config "$BENCH" --iters 10 --threads 8
done

echo "== checks ($DIR)"
echo "| check | result |"
echo "|---|---|"
failed=0
for r in "${RESULTS[@]}"; do
    echo "| ${r%%|*} | ${r#*|} |"
    [[ ${r#*|} == PASS ]] || failed=1
done
exit $failed
