#!/usr/bin/env bash
# Training speed and peak memory of st-tune against the Python peer (shared/peer/st_step_bench.py)
# for base-size random-weight XLM-RoBERTa (768 x 12, vocab 250002), DistilBERT (768 x 6, vocab
# 30522) and ModernBERT (768 x 22, vocab 50368), in the same run, at 128 tokens a text: CoSENT, batch 16, rows of data/stsb-small made
# of eight sentences each so that every text is cut at max_seq_length = 128 (both tools then see
# the same 128 tokens, and the peer pads nothing). The models come from
# scripts/make_family_fixtures.py base (random weights, small trained tokenizers) and are kept in
# MODEL_DIR. st-tune runs STEPS+3 steps and is given as the median of its last STEPS steps (the
# peer's method: median of STEPS after 3 warm-up steps); peak RSS is /usr/bin/time's for st-tune
# and ru_maxrss for the peer (both whole processes, loading included), and st-tune's heap peak
# (its counting allocator, `peak_memory`) for the planner.
#   scripts/bench-families.sh [MODEL_DIR] [STEPS] [f32|bf16] [FAMILY ...]
#   # default: /tmp/st-tune-families, 3, f32, xlm-roberta distilbert modernbert
# SEQ=1024 BATCH=2 scripts/bench-families.sh ... measures longer texts (default 128 and 16): a
# text is then SEQ/16 sentences.
# Needs ../shared (or ST_TUNE_SHARED), the Python env (scripts/setup-python.sh), jq and GNU time.
set -euo pipefail
shopt -s inherit_errexit
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
models=${1:-/tmp/st-tune-families}
steps=${2:-3}
precision=${3:-f32}
families=("${@:4}")
seq=${SEQ:-128} batch=${BATCH:-16}
[[ ${#families[@]} == 0 ]] && families=(xlm-roberta distilbert modernbert)
shared=${ST_TUNE_SHARED:-../shared}
py=$(scripts/setup-python.sh)
cargo build --quiet
for family in "${families[@]}"; do
  [[ -f $models/$family-base/model.safetensors ]] || "$py" scripts/make_family_fixtures.py base "$models" "$family" >&2
done
work=$(mktemp -d "${TMPDIR:-/tmp}/st-tune-bench-families.XXXXXX")
trap 'rm -rf "$work"' EXIT
data=$work/train.csv
"$py" - "$data" $((seq / 16)) <<'PY'
import csv, sys
n = int(sys.argv[2])
rows = list(csv.DictReader(open("data/stsb-small/train.csv", encoding="utf-8")))
with open(sys.argv[1], "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(["sentence1", "sentence2", "score"])
    for i in range(0, len(rows) - n + 1, n):
        g = rows[i:i + n]
        w.writerow([" ".join(r["sentence1"] for r in g), " ".join(r["sentence2"] for r in g), g[0]["score"]])
PY
config=$work/train.toml
grep -v '^dev' configs/quickstart.toml > "$config"
flags=()
[[ $precision == bf16 ]] && flags+=(--bf16)
echo "load before: $(uptime)"
for family in "${families[@]}"; do
  model=$models/$family-base
  rm -rf "$work/run"
  /usr/bin/time -f %M -o "$work/rss" ./target/debug/st-tune train --config "$config" --json \
    --set "model.path=$model" --set "data.train=$data" --set model.max_seq_length=$seq --set train.batch_size=$batch \
    --set train.max_steps=$((steps + 3)) --set train.log_steps=1 --set "train.precision=$precision" \
    --set output.checkpoint_steps=0 --set "output.dir=$work/run" > "$work/st.jsonl"
  st=$(jq -r 'select(.event == "step") | .data.samples_per_s' "$work/st.jsonl" | tail -n "$steps" |
    sort -g | awk '{ v[NR] = $1 } END { n = NR; printf "%.3f", n % 2 ? v[(n + 1) / 2] : (v[n / 2] + v[n / 2 + 1]) / 2 }')
  st_rss=$(( $(cat "$work/rss") / 1024 ))
  st_heap=$(jq -r 'select(.event == "summary") | .data.peak_memory / 1048576 | floor' "$work/st.jsonl")
  peer=$("$py" "$shared/peer/st_step_bench.py" "$model" "$data" --loss cosent --batch "$batch" \
    --steps "$steps" --max-seq "$seq" "${flags[@]}" 2> /dev/null | tail -n 1)
  # samples/s from the median step time: the peer rounds its own figure to 2 digits.
  peer_sps=$(jq -r ".batch / .median_step_s" <<< "$peer")
  printf '%s %s, %s tokens, batch %s: st-tune %s samples/s, peak RSS %s MiB (heap %s MiB); peer %s samples/s, peak RSS %s MiB; speed %.2fx, memory %.2fx\n' \
    "$family" "$precision" "$seq" "$batch" "$st" "$st_rss" "$st_heap" "$(printf %.3f "$peer_sps")" "$(jq -r .peak_rss_mib <<< "$peer")" \
    "$(echo "$st / $peer_sps" | bc -l)" "$(echo "$st_rss / $(jq -r .peak_rss_mib <<< "$peer")" | bc -l)"
done
echo "load after: $(uptime)"
