#!/usr/bin/env bash
# What freezing the lower layers saves, measured (docs/memory.md, "Freezing"): all-MiniLM-L6-v2,
# MNRL, batch 32, texts cut at 256 tokens, 2 optimizer steps (the second has AdamW state), peak
# RSS of the whole process by /usr/bin/time, for
#   nothing frozen | freeze_layers = 3 (embeddings frozen too, the default) |
#   freeze_layers = 3 with freeze_embeddings = false (warned about at the start).
# The texts are STS-B sentences of data/stsb-small strung together to pass 256 tokens.
#   scripts/bench-freeze.sh [OUT_DIR]     # default bench-out/freeze
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-bench-out/freeze}
mkdir -p "$out"
cargo build --quiet
bin=./target/debug/st-tune
out=$(cd "$out" && pwd)
python3 - "$out/long.csv" <<'PY'
import csv, sys
rows = list(csv.DictReader(open("data/stsb-small/train.csv")))
with open(sys.argv[1], "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["anchor", "positive"])
    for i in range(64):
        pick = [rows[(i * 31 + k) % len(rows)] for k in range(24)]
        w.writerow([" ".join(r["sentence1"] for r in pick), " ".join(r["sentence2"] for r in pick)])
PY
cat > "$out/run.toml" <<TOML
[model]
path = "$repo/.weights/all-MiniLM-L6-v2"
max_seq_length = 256
[data]
train = "$out/long.csv"
[train]
loss = "mnrl"
batch_size = 32
micro_batch_size = 32
max_steps = 2
[output]
checkpoint_steps = 0
TOML
run() { # NAME --set ...
  local name=$1; shift
  rm -rf "$out/$name"
  /usr/bin/time -f '%M %e' -o "$out/$name.time" "$bin" train --config "$out/run.toml" \
    --output "$out/$name" --json "$@" > "$out/$name.jsonl"
  read -r kib secs < "$out/$name.time"
  printf '%-40s peak RSS %6.0f MiB  %6.1f s\n' "$name" "$((kib / 1024))" "$secs"
}
run nothing-frozen
run freeze-3 --set train.freeze_layers=3
run freeze-3-embeddings-train --set train.freeze_layers=3 --set train.freeze_embeddings=false
