#!/usr/bin/env bash
# Quality and speed of one STS-B fine-tuning run, Python peer and st-tune on the same machine in
# the same run (docs/benchmarks.md). Needs ../shared (peer scripts, full STS-B), the weights
# (scripts/fetch-weights.sh) and the Python env (scripts/setup-python.sh).
#   scripts/bench-train.sh [OUT_DIR] [f32|bf16] [MODEL]   # default bench-out/ f32 all-MiniLM-L6-v2
#   BENCH_LIMIT=2000 scripts/bench-train.sh out bf16   # first 2000 rows: for speed only (st-tune
#   then also evaluates on the first 2000 dev rows, the peer on all of them)
# bf16: st-tune with train.precision = "bf16", the peer under torch.autocast(bfloat16) (--bf16).
# Prints one summary line: samples/s of each (training loop only), the ratio, Spearman after,
# peak RSS of each process.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-bench-out}
precision=${2:-f32}
model=.weights/${3:-all-MiniLM-L6-v2}
shared=${ST_TUNE_SHARED:-../shared}
py=$(scripts/setup-python.sh)
mkdir -p "$out"
cargo build --quiet ${ST_TUNE_BUILD_FLAGS:-} # e.g. --no-default-features (docs/benchmarks.md, AVX2)
train=$shared/data/stsb/train.csv
dev=$shared/data/stsb/validation.csv
peer_flags=() st_flags=(--set "train.precision=$precision")
[[ $precision == bf16 ]] && peer_flags+=(--bf16)
if [[ -n ${BENCH_LIMIT:-} ]]; then
  peer_flags+=(--limit "$BENCH_LIMIT") st_flags+=(--set "data.limit=$BENCH_LIMIT")
fi

echo "peer: sentence-transformers (2 threads), $precision" >&2
/usr/bin/time -f '%M' -o "$out/peer.maxrss_kib" \
  "$py" "$shared/peer/st_baseline.py" "$model" "$train" "$dev" "${peer_flags[@]}" > "$out/peer.json"
cat "$out/peer.json" >&2

echo "st-tune, $precision" >&2
rm -rf "$out/st-tune-run" # a new run, not a resumed one
/usr/bin/time -f '%M' -o "$out/st-tune.maxrss_kib" \
  ./target/debug/st-tune train --config configs/stsb.toml --json "${st_flags[@]}" \
  --set "model.path=$model" --set "data.train=$train" --set "data.dev=$dev" \
  --set "output.dir=$out/st-tune-run" > "$out/st-tune.jsonl"
tail -n 1 "$out/st-tune.jsonl" >&2

st=$(jq -r 'select(.event == "summary") | .data | "\(.samples_per_s) \(.dev_after.spearman)"' "$out/st-tune.jsonl")
peer=$(jq -r '"\(.samples_per_s) \(.dev_after)"' "$out/peer.json")
read -r st_sps st_rho <<< "$st"
read -r peer_sps peer_rho <<< "$peer"
printf '%s %s: st-tune %.1f samples/s, peer %.1f, ratio %.2f; Spearman %.4f vs %s; peak RSS %d vs %d MiB\n' \
  "$(basename "$model")" "$precision" "$st_sps" "$peer_sps" "$(echo "$st_sps / $peer_sps" | bc -l)" \
  "$st_rho" "$peer_rho" "$(($(cat "$out/st-tune.maxrss_kib") / 1024))" "$(($(cat "$out/peer.maxrss_kib") / 1024))"
