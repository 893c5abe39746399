#!/usr/bin/env bash
# The retrieval recipe (configs/retrieval.toml) in st-tune and in Python sentence-transformers
# (scripts/recipe_retrieval.py), one after the other on this machine: NDCG@10 before and after,
# mining seconds, training samples/s and peak RSS of each (docs/benchmarks.md).
#   scripts/bench-recipe.sh [WORK_DIR]
# Needs the weights (scripts/fetch-weights.sh --minilm-only) and the Python env with the extra
# packages named at the top of scripts/recipe_retrieval.py (PYLIB, default /tmp/recipe-pylib).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/st-tune-recipe.XXXXXX")}
mkdir -p "$work"
cargo build --quiet # the dev profile is optimised (Cargo.toml)
bin=${CARGO_TARGET_DIR:-$repo/target}/debug/st-tune
model=.weights/all-MiniLM-L6-v2
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee "$work/load"

t0=$(date +%s.%N)
/usr/bin/time -f '%M' -o "$work/mine.maxrss_kib" "$bin" mine --model "$model" \
  --data data/stsb-retrieval/train.csv --corpus data/stsb-retrieval/corpus.txt \
  --output "$work/mined.csv" --num-negatives 1 --relative-margin 0.05 2> "$work/mine.log"
mine_s=$(echo "$(date +%s.%N) - $t0" | bc -l)
rm -rf "$work/st-tune-run"
/usr/bin/time -f '%M' -o "$work/train.maxrss_kib" "$bin" train --config configs/retrieval.toml \
  --set "data.train=$work/mined.csv" --output "$work/st-tune-run" --json > "$work/st-tune.jsonl"

PYTHONPATH=${PYLIB:-/tmp/recipe-pylib} /usr/bin/time -f '%M' -o "$work/peer.maxrss_kib" \
  .venv/bin/python -W ignore scripts/recipe_retrieval.py "$model" data/stsb-retrieval "$work/peer" \
  2> "$work/peer.log" | tail -n 1 > "$work/peer.json"
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$work/load"

st=$(jq -r 'select(.event == "summary") | .data |
  "\(.dev_before["ndcg@10"]) \(.dev_after["ndcg@10"]) \(.samples_per_s) \(.steps)"' "$work/st-tune.jsonl")
peer=$(jq -r '"\(.["ndcg@10_before"]) \(.["ndcg@10_after"]) \(.samples_per_s) \(.steps) \(.mine_s)"' "$work/peer.json")
read -r st_b st_a st_sps st_steps <<< "$st"
read -r py_b py_a py_sps py_steps py_mine <<< "$peer"
st_rss=$(( $(sort -n "$work/mine.maxrss_kib" "$work/train.maxrss_kib" | tail -n 1) / 1024 ))
py_rss=$(( $(cat "$work/peer.maxrss_kib") / 1024 ))
printf '| | NDCG@10 before | after | steps | mining s | training samples/s | peak RSS MiB |\n'
printf '| --- | --- | --- | --- | --- | --- | --- |\n'
printf '| st-tune | %.4f | %.4f | %s | %.1f | %.1f | %d |\n' "$st_b" "$st_a" "$st_steps" "$mine_s" "$st_sps" "$st_rss"
printf '| sentence-transformers | %.4f | %.4f | %s | %.1f | %.1f | %d |\n' "$py_b" "$py_a" "$py_steps" "$py_mine" "$py_sps" "$py_rss"
printf 'NDCG@10 after, st-tune - peer: %+.4f; training speed ratio %.2f\n' \
  "$(echo "$st_a - $py_a" | bc -l)" "$(echo "$st_sps / $py_sps" | bc -l)"
