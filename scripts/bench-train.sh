#!/usr/bin/env bash
# Quality and speed of one STS-B fine-tuning run, Python peer and st-tune on the same machine in
# the same run (docs/benchmarks.md). Needs ../shared (peer scripts, full STS-B), the weights
# (scripts/fetch-weights.sh) and the Python env (scripts/setup-python.sh).
#   scripts/bench-train.sh [OUT_DIR]     # default bench-out/
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-bench-out}
shared=${ST_TUNE_SHARED:-../shared}
py=$(scripts/setup-python.sh)
mkdir -p "$out"
cargo build --quiet
model=.weights/all-MiniLM-L6-v2
train=$shared/data/stsb/train.csv
dev=$shared/data/stsb/validation.csv

echo "peer: sentence-transformers (2 threads)" >&2
/usr/bin/time -f '%M' -o "$out/peer.maxrss_kib" \
  "$py" "$shared/peer/st_baseline.py" "$model" "$train" "$dev" > "$out/peer.json"
cat "$out/peer.json" >&2

echo "st-tune" >&2
rm -rf "$out/st-tune-run" # a new run, not a resumed one
/usr/bin/time -f '%M' -o "$out/st-tune.maxrss_kib" \
  ./target/debug/st-tune train --config configs/stsb.toml --json \
  --set "data.train=$train" --set "data.dev=$dev" --set "output.dir=$out/st-tune-run" > "$out/st-tune.jsonl"
tail -n 1 "$out/st-tune.jsonl" >&2
