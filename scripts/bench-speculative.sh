#!/usr/bin/env bash
# MTP speculative decoding against plain decoding, on the trained small V4 (tests/fixtures/v4-shakespeare-mtp)
# and held-out Shakespeare (Twelfth Night, Macbeth: tests/fixtures/data/shakespeare/valid-full.jsonl, bytes).
# For each draft count and batch size, `v4 bench-infer --speculative mtp` alternates plain greedy and
# speculative decoding of the same prompts in one sitting, checks that the outputs are identical, and reports
# both decode rates and the acceptance per draft position. Writes docs/bench/speculative-<cpu>.md. Run it on a
# quiet machine (no build running). Never in CI.
#
# Usage: scripts/bench-speculative.sh [--rounds N] [--threads T] [--out FILE]   (V4=target/release/v4)
set -euo pipefail
cd "$(dirname "$0")/.."
V4=${V4:-target/release/v4}
ROUNDS=3
THREADS=$(nproc)
OUT=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --rounds) ROUNDS=$2; shift 2 ;;
        --threads) THREADS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ -x $V4 ]] || { echo "no v4 binary at $V4: run cargo build --release" >&2; exit 1; }
source scripts/cpu.sh
OUT=${OUT:-docs/bench/speculative-$SLUG.md}
MODEL=tests/fixtures/v4-shakespeare-mtp
IDS=$(mktemp /tmp/heldout-ids.XXXXXX.jsonl)
export RAYON_NUM_THREADS=$THREADS
# The held-out scenes as byte ids, one record per scene (bench-infer cuts consecutive prompts from them).
python3 - "$IDS" <<'PY'
import json, sys
with open("tests/fixtures/data/shakespeare/valid-full.jsonl") as f, open(sys.argv[1], "w") as out:
    for line in f:
        if line.strip():
            out.write(json.dumps({"ids": list((json.loads(line)["text"] + "\n\n").encode())}) + "\n")
PY
{
    echo "# MTP speculative decoding on $CPU"
    echo
    echo "\`scripts/bench-speculative.sh --rounds $ROUNDS --threads $THREADS\`, $(date -u +%Y-%m-%d), $(nproc) cores,"
    echo "model \`$MODEL\` (trained by \`configs/shakespeare-mtp.toml\`), held-out prompts of 256 bytes from"
    echo "\`valid-full.jsonl\`, 128 tokens generated per prompt, greedy. Each row alternates plain and speculative"
    echo "decoding $ROUNDS times (median decode rates); acceptance is of the last round."
    echo
    echo "| batch | drafts | plain tok/s | speculative tok/s | speedup | acceptance | identical |"
    echo "|---|---|---|---|---|---|---|"
} > "$OUT"
for BATCH in 1 8; do
    for K in 1 2 3; do
        LOG=$("$V4" bench-infer --model "$MODEL" --ids "$IDS" --batch "$BATCH" --prompt 256 --generate 128 \
            --iters "$ROUNDS" --speculative mtp --draft-tokens "$K")
        echo "$LOG"
        LINE=$(grep '^decode' <<<"$LOG")
        PLAIN=$(sed -n 's/.*plain greedy \([0-9.]*\) tok\/s.*/\1/p' <<<"$LINE")
        FAST=$(sed -n 's/.*) \([0-9.]*\) tok\/s -> .*/\1/p' <<<"$LINE")
        SPEEDUP=$(sed -n 's/.*-> \([0-9.]*x\).*/\1/p' <<<"$LINE")
        SAME=$(sed -n 's/.*identical: \([A-Za-z]*\).*/\1/p' <<<"$LINE")
        ACC=$(sed -n 's/^acceptance (last round): accepted \(.*\)/\1/p' <<<"$LOG")
        echo "| $BATCH | $K | $PLAIN | $FAST | $SPEEDUP | $ACC | $SAME |" >> "$OUT"
    done
done
rm -f "$IDS"
echo "wrote $OUT"
