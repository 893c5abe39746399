#!/usr/bin/env bash
# What the OOM handler costs (docs/memory.md), on the quickstart data with all-MiniLM-L6-v2:
#  - a recovered OOM: the step that hit an injected forward OOM against the steps around it;
#  - the cached (GradCache) scheme: CoSENT, batch 16, in one pass (plain) vs micro-batches of 8
#    (cached: one extra forward pass without a graph).
#   scripts/bench-oom.sh [OUT_DIR]     # default bench-out/oom
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-bench-out/oom}
mkdir -p "$out"
cargo build --quiet
bin=./target/debug/st-tune
common=(--config configs/quickstart.toml --set data.dev=data/stsb-small/validation.csv
        --set train.max_steps=12 --set train.log_steps=1 --set data.limit=400)
# Per-step seconds from metrics.jsonl (samples_per_s of one-step windows).
steps() { python3 - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
rows = [r for r in rows if "samples_per_s" in r]
print(" ".join("%.2f" % (16 / r["samples_per_s"]) for r in rows))
PY
}
rm -rf "$out/oom" "$out/plain" "$out/cached"
ST_TUNE_INJECT_OOM=7:forward "$bin" train "${common[@]}" --output "$out/oom" --json > "$out/oom.jsonl"
"$bin" train "${common[@]}" --output "$out/plain" --json > "$out/plain.jsonl"
"$bin" train "${common[@]}" --set train.micro_batch_size=8 --output "$out/cached" --json > "$out/cached.jsonl"
echo "step seconds, OOM injected at step 7:             $(steps "$out/oom/metrics.jsonl")"
echo "step seconds, plain (one pass of 16):              $(steps "$out/plain/metrics.jsonl")"
echo "step seconds, cached (2 micro-batches of 8):       $(steps "$out/cached/metrics.jsonl")"
