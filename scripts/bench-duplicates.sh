#!/usr/bin/env bash
# Measures what train.batch_sampler = "no_duplicates" changes on a retrieval set with repeated
# texts (docs/folders.md): all-MiniLM-L6-v2, MNRL, batch 32, 1 epoch, seed $SEED (42), trained on the pairs of
# data/stsb-small/train.csv with score >= 0.6 in both directions (sentence1 -> sentence2 and back, so
# every text is in the file twice, once as anchor and once as positive), evaluated on the same cut
# of validation.csv (NDCG@10, MRR@10, retrieval) with every other validation sentence as a distractor
# (data.corpus). Once with "default" batches, once with "no_duplicates".
#   [SEED=42] scripts/bench-duplicates.sh [WORK_DIR]
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
work=${1:-$(mktemp -d "${TMPDIR:-/tmp}/st-tune-dups.XXXXXX")}
mkdir -p "$work"
cargo build --quiet  # the dev profile is optimised (Cargo.toml)
bin=${CARGO_TARGET_DIR:-$repo/target}/debug/st-tune
python3 - "$work" <<'PY'
import csv, sys
work = sys.argv[1]
def pairs(src, both):
    rows = [r for r in csv.DictReader(open(src, encoding="utf-8")) if float(r["score"]) >= 0.6]
    out = [(r["sentence1"], r["sentence2"]) for r in rows]
    return out + [(b, a) for a, b in out] if both else out
dev = pairs("data/stsb-small/validation.csv", False)
taken = {t for pair in dev for t in pair}
others = {t for r in csv.DictReader(open("data/stsb-small/validation.csv", encoding="utf-8"))
          for t in (r["sentence1"], r["sentence2"])} - taken
open(f"{work}/corpus.txt", "w", encoding="utf-8").write("".join(t + "\n" for t in sorted(others)))
for name, src, both in (("train", "data/stsb-small/train.csv", True), ("dev", "data/stsb-small/validation.csv", False)):
    with open(f"{work}/{name}.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f); w.writerow(["anchor", "positive"]); w.writerows(pairs(src, both))
PY
for sampler in default no_duplicates; do
  "$bin" train --config configs/quickstart.toml --set model.path=.weights/all-MiniLM-L6-v2 \
    --set "data.train=$work/train.csv" --set "data.dev=$work/dev.csv" --set "data.corpus=$work/corpus.txt" --set train.loss=mnrl \
    --set train.batch_size=32 --set train.epochs=1 --set "train.seed=${SEED:-42}" \
    --set "train.batch_sampler=\"$sampler\"" --set output.checkpoint_steps=0 \
    --output "$work/$sampler" --json > "$work/$sampler.json"
  python3 -c "import json,sys; s=json.loads(open(sys.argv[1]).read().splitlines()[-1])['data']; b,a=s['dev_before'],s['dev_after']; print(f\"$sampler: {s['steps']} steps, ndcg@10 {b['ndcg@10']:.4f} -> {a['ndcg@10']:.4f}, mrr@10 {b['mrr@10']:.4f} -> {a['mrr@10']:.4f}\")" "$work/$sampler.json"
done
