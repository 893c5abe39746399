#!/usr/bin/env bash
# Training speed of st-tune builds against the Python peer, interleaved on the same machine
# (docs/benchmarks.md): MiniLM, CoSENT, batch 16, the quickstart rows. Each round runs every
# st-tune binary (20 optimizer steps of the quickstart config, its `samples_per_s`) and then the
# peer (`st_step_bench.py`: median of 20 steps after 3 warm-up ones); prints each run and the
# medians over the rounds. Needs ../shared (peer scripts) and the Python env.
#   scripts/bench-step.sh [ROUNDS] [ST_TUNE_BINARY ...]   # default: 3 rounds, target/debug/st-tune
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
rounds=${1:-3}
shift || true
bins=("$@")
((${#bins[@]})) || bins=(target/debug/st-tune)
shared=${ST_TUNE_SHARED:-../shared}
py=$(scripts/setup-python.sh)
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

for ((r = 1; r <= rounds; r++)); do
  for b in "${bins[@]}"; do
    rm -rf "$out/run"
    s=$("$b" train --config configs/quickstart.toml --json --set train.max_steps=20 \
      --set "output.dir=$out/run" | jq -r 'select(.event == "summary") | .data.samples_per_s')
    echo "round $r $b samples/s $s" | tee -a "$out/log"
  done
  s=$("$py" "$shared/peer/st_step_bench.py" .weights/all-MiniLM-L6-v2 data/stsb-small/train.csv \
    --loss cosent --batch 16 --steps 20 2>/dev/null | jq -r '"\(.samples_per_s) threads \(.threads)"')
  echo "round $r peer samples/s $s" | tee -a "$out/log"
done

echo "medians over $rounds rounds (samples/s):"
for name in "${bins[@]}" peer; do
  grep " $name samples/s " "$out/log" | awk '{print $5}' | sort -g |
    awk -v n="$name" '{v[NR] = $1} END {m = NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2; printf "  %s %.2f\n", n, m}'
done
