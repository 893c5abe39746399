#!/usr/bin/env bash
# MPNet (all-mpnet-base-v2) CoSENT training speed, st-tune against the Python peer's
# st_step_bench.py, batch 16 on data/stsb-small, in the same run, alternating, REPS times
# (docs/benchmarks.md). The peer reports the median of 10 steps after 3 warm-up steps; st-tune
# runs 13 steps logging each one, and is given both ways: the median of its last 10 steps (the
# peer's method) and its whole 13-step loop (whose first step is the epoch's longest batch and
# allocates the AdamW state).
#   scripts/bench-mpnet.sh [REPS] [f32|bf16 ...]   # default: 2 reps, f32 and bf16
# Needs ../shared (or ST_TUNE_SHARED), the weights (scripts/fetch-weights.sh), the Python env
# (scripts/setup-python.sh) and jq. Prints one line per rep and precision.
set -euo pipefail
shopt -s inherit_errexit
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
reps=${1:-2}
shift $(($# > 0 ? 1 : 0))
precisions=("$@")
[[ ${#precisions[@]} -gt 0 ]] || precisions=(f32 bf16)
shared=${ST_TUNE_SHARED:-../shared}
model=.weights/all-mpnet-base-v2
py=$(scripts/setup-python.sh)
cargo build --quiet ${ST_TUNE_BUILD_FLAGS:-} # e.g. --no-default-features (docs/benchmarks.md, AVX2)
work=$(mktemp -d "${TMPDIR:-/tmp}/st-tune-bench-mpnet.XXXXXX")
trap 'rm -rf "$work"' EXIT
config=$work/train.toml
grep -v '^dev' configs/quickstart.toml > "$config" # the training loop alone: no evaluation

for rep in $(seq "$reps"); do
  for p in "${precisions[@]}"; do
    rm -rf "$work/run"
    ./target/debug/st-tune train --config "$config" --json --set "model.path=$model" \
      --set train.max_steps=13 --set train.log_steps=1 --set "train.precision=$p" \
      --set output.checkpoint_steps=0 --set "output.dir=$work/run" > "$work/st.jsonl"
    steady=$(jq -r 'select(.event == "step") | .data.samples_per_s' "$work/st.jsonl" | tail -n 10 |
      sort -g | awk '{ v[NR] = $1 } END { printf "%.2f", (v[5] + v[6]) / 2 }')
    whole=$(jq -r 'select(.event == "summary") | .data.samples_per_s' "$work/st.jsonl")
    flags=()
    [[ $p == bf16 ]] && flags+=(--bf16)
    peer=$("$py" "$shared/peer/st_step_bench.py" "$model" data/stsb-small/train.csv \
      --loss cosent --batch 16 --steps 10 "${flags[@]}" 2> /dev/null | tail -n 1 | jq -r .samples_per_s)
    printf 'rep %s %s: st-tune %s samples/s (median of steps 4-13), %.2f (whole loop); peer %s; ratio %.2f (%.2f)\n' \
      "$rep" "$p" "$steady" "$whole" "$peer" "$(echo "$steady / $peer" | bc -l)" "$(echo "$whole / $peer" | bc -l)"
  done
done
