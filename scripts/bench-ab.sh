#!/usr/bin/env bash
# Two st-tune binaries on the same machine, alternating, to check that a change does not slow
# CPU training or encode: the first 400 rows of STS-B train (CoSENT, batch 16, MiniLM and MPNet)
# and the encode of the 3000 STS-B validation sentences (MiniLM). Prints the median of REPS runs.
#   scripts/bench-ab.sh OLD_BIN NEW_BIN [REPS]     # e.g. a worktree of the old commit's binary
# Extra environment (e.g. ST_TUNE_ENGINE=portable) applies to both. Needs ../shared and .weights.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
old=$1 new=$2 reps=${3:-3}
shared=${ST_TUNE_SHARED:-../shared}
work=$(mktemp -d "${TMPDIR:-/tmp}/st-tune-ab.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 - "$shared/data/stsb/validation.csv" "$work/sentences.txt" <<'PY'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1], encoding="utf-8", newline="")))
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(s for r in rows for s in (r["sentence1"], r["sentence2"])) + "\n")
PY
# train BIN MODEL: samples/s of the training loop (the run's summary); configs/stsb.toml's
# settings, without a dev file.
cat > "$work/ab.toml" <<TOML
[data]
train = "$shared/data/stsb/train.csv"
limit = 400
[train]
loss = "cosent"
batch_size = 16
lr = 2e-5
warmup_ratio = 0.1
weight_decay = 0.01
max_grad_norm = 1.0
seed = 42
[output]
checkpoint_steps = 0
TOML
train() {
  rm -rf "$work/run"
  "$1" train --config "$work/ab.toml" --json --set "model.path=\"$repo/.weights/$2\"" \
    --set "model.max_seq_length=128" --set "output.dir=\"$work/run\"" |
    python3 -c 'import json,sys; print([json.loads(l) for l in sys.stdin if "summary" in l][-1]["data"]["samples_per_s"])'
}
# encode BIN: sentences/s of the whole process.
encode() {
  local t0=$EPOCHREALTIME
  "$1" encode --model .weights/all-MiniLM-L6-v2 --input "$work/sentences.txt" --output "$work/e.jsonl" --batch-size 32
  python3 -c "print($(wc -l < "$work/sentences.txt") / ($EPOCHREALTIME - $t0))"
}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for job in "train all-MiniLM-L6-v2" "train all-mpnet-base-v2" "encode"; do
  : > "$work/old" && : > "$work/new"
  for _ in $(seq "$reps"); do
    read -r fn arg <<< "$job"
    $fn "$old" ${arg:+"$arg"} >> "$work/old"
    $fn "$new" ${arg:+"$arg"} >> "$work/new"
  done
  printf '%-30s old %8.1f  new %8.1f  (per s, median of %d)\n' "$job" "$(median < "$work/old")" "$(median < "$work/new")" "$reps"
done
