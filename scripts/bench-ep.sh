#!/usr/bin/env bash
# Expert-parallel training on one machine: each rank's peak RSS (/usr/bin/time -v), the parameters it holds,
# the step rate and the share of the step spent in the all-to-all, for `mpirun -np N v4 train` against one
# process on configs/bench-v4-small.toml (v4-small from scratch, global batch B x 256 byte tokens; B = 2 for
# N <= 2, B = 4 for N = 4, each against one process on the same B). Writes docs/bench/expert-parallel-<cpu>.md.
# Run it on a quiet machine (no build running). Never in CI.
#
# Usage: scripts/bench-ep.sh [--steps S] [--out FILE]   (V4=target/release/v4, built with --features mpi)
set -euo pipefail
cd "$(dirname "$0")/.."
V4=${V4:-target/release/v4}
STEPS=6
OUT=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --steps) STEPS=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ -x $V4 ]] || { echo "no v4 binary at $V4: run cargo build --release --features mpi" >&2; exit 1; }
source scripts/cpu.sh
OUT=${OUT:-docs/bench/expert-parallel-$SLUG.md}
WORK=$(mktemp -d /tmp/bench-ep.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
CORES=$(nproc)

median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# run BATCH RANKS: one run, its per-rank logs in $WORK/B-N.*
run() {
    local b=$1 n=$2 cfg=$WORK/b$1-ep$2.toml
    sed "s#\.\./#$PWD/#; s/^batch = 2/batch = $b/; s#^dir = .*#dir = \"$WORK/ckpt\"#" configs/bench-v4-small.toml > "$cfg"
    printf '\n[parallel]\nexpert_parallel = %s\n' "$n" >> "$cfg"
    if [[ $n == 1 ]]; then
        RAYON_NUM_THREADS=$CORES /usr/bin/time -v "$V4" train "$cfg" --stop-after "$STEPS" \
            > "$WORK/$b-$n.out" 2> "$WORK/$b-$n.time.0"
    else
        # Each rank gets cores / N threads (at least one).
        mpirun -np "$n" -x RAYON_NUM_THREADS=$(( CORES / n > 0 ? CORES / n : 1 )) sh -c \
            "/usr/bin/time -v $V4 train $cfg --stop-after $STEPS 2> $WORK/$b-$n.time.\$OMPI_COMM_WORLD_RANK" \
            > "$WORK/$b-$n.out"
    fi
}

{
    echo "# Expert parallelism on one machine: memory per rank and the exchange's cost"
    echo
    echo "CPU: **$CPU**, $CORES cores, $(awk '/MemTotal/ {printf "%.0f GB", $2 / 1e6}' /proc/meminfo). Written by"
    echo "\`scripts/bench-ep.sh --steps $STEPS\` ($(date -u +%Y-%m-%d)). Model: \`configs/bench-v4-small.toml\`"
    echo "(v4-small from scratch, 8 layers, 32 experts; routed experts are 2/3 of its parameters). Peak RSS from"
    echo "\`/usr/bin/time -v\` of each rank (the largest rank shown); tokens/s the median of steps 2-$STEPS; the"
    echo "all-to-all share is rank 0's time inside the exchanges (forward and backward) over the step."
    echo
    echo "| global batch | ranks | parameters held per rank | peak RSS per rank | vs one process | tokens/s | all-to-all |"
    echo "|---|---|---|---|---|---|---|"
} > "$WORK/table.md"
for case in "2 1" "2 2" "4 1" "4 2" "4 4"; do
    set -- $case
    echo "batch $1, $2 rank(s)..." >&2
    run "$1" "$2"
    rss=$(cat "$WORK/$1-$2".time.* | awk '/Maximum resident/ {print $6}' | sort -g | tail -1)
    [[ $2 == 1 ]] && base=$rss
    held=$(sed -n 's/^rank 0 of [0-9]*: holds \([0-9]*\) parameters.*/\1/p' "$WORK/$1-$2.out")
    rate=$(awk '/^step +[0-9]+\// {split($2, s, "/"); if (s[1] >= 2) for (i = 1; i < NF; i++) if ($(i + 1) == "tokens/s") print $i}' \
        "$WORK/$1-$2.out" | median)
    share=-
    [[ $2 == 1 ]] || share=$(grep -o 'all-to-all [0-9.]*%' "$WORK/$1-$2.out" | tail -n +2 | awk '{print $2 + 0}' | median)%
    printf '| %s | %s | %s | %.2f GB | %.2fx | %s | %s |\n' "$1" "$2" "$held" "$(echo "$rss / 1000000" | bc -l)" \
        "$(echo "$rss / $base" | bc -l)" "$rate" "$share" >> "$WORK/table.md"
done
cp "$WORK/table.md" "$OUT"
cat "$OUT"
