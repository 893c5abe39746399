#!/usr/bin/env bash
# Encode throughput and peak memory, st-tune vs the Python peer (sentence-transformers, 2 threads),
# for all-MiniLM-L6-v2 and all-mpnet-base-v2, on the 3000 STS-B validation sentences (sentence1 and
# sentence2 of every row of shared/data/stsb/validation.csv, one per line), batch 32, on CPU.
# The two run alternately, REPS times per model, in the same run; the table shows medians.
#   scripts/bench-encode.sh [REPS]      # default 3; markdown table on stdout, progress on stderr
#   BENCH_ENCODE_LIMIT=64 scripts/bench-encode.sh 1    # quick check of the script: first 64 sentences
# Timing: st-tune is timed as a whole process (load + tokenize + encode + write JSON lines), since
# it prints no timing of its own; the peer both as a whole process and encode() alone.
# Peak RSS: /usr/bin/time -f %M of each process. Needs ../shared (or ST_TUNE_SHARED), the weights
# (scripts/fetch-weights.sh) and the Python env (scripts/setup-python.sh). Run it on a quiet machine.
set -euo pipefail
shopt -s inherit_errexit

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
reps=${1:-3}
shared=${ST_TUNE_SHARED:-../shared}
weights=${ST_TUNE_WEIGHTS:-$repo/.weights}
py=$(scripts/setup-python.sh)
cargo build --quiet ${ST_TUNE_BUILD_FLAGS:-} # e.g. --no-default-features (docs/benchmarks.md, AVX2)
bin=$repo/target/debug/st-tune
work=$(mktemp -d "${TMPDIR:-/tmp}/st-tune-bench-encode.XXXXXX")
trap 'rm -rf "$work"' EXIT

sentences=$work/sentences.txt
python3 - "$shared/data/stsb/validation.csv" "$sentences" <<'EOF'
import csv, sys
with open(sys.argv[1], encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
lines = [s for r in rows for s in (r["sentence1"], r["sentence2"])]
assert all(s.strip() and "\n" not in s and "\r" not in s for s in lines)
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(lines) + "\n")
EOF
if [[ -n ${BENCH_ENCODE_LIMIT:-} ]]; then
  head -n "$BENCH_ENCODE_LIMIT" "$sentences" > "$sentences.head" && mv "$sentences.head" "$sentences"
fi
n=$(wc -l < "$sentences")

# The peer: SentenceTransformer.encode, batch 32, 2 torch threads; prints the seconds of encode() alone
# and saves the embeddings (.npy) for the agreement check.
cat > "$work/peer.py" <<'EOF'
import sys, time
import numpy as np, torch
torch.set_num_threads(2)
from sentence_transformers import SentenceTransformer
model_dir, src, dst = sys.argv[1:4]
sents = open(src, encoding="utf-8").read().splitlines()
m = SentenceTransformer(model_dir, device="cpu")
t = time.perf_counter()
emb = m.encode(sents, batch_size=32, convert_to_numpy=True)
print(f"{time.perf_counter() - t:.3f}")
np.save(dst, emb)
EOF

# run LABEL CMD...: run CMD under /usr/bin/time; record wall seconds and peak RSS (KiB) in $work/LABEL.*
run() {
  local label=$1; shift
  local t0 t1
  t0=$(date +%s.%N)
  OMP_NUM_THREADS=2 MKL_NUM_THREADS=2 RAYON_NUM_THREADS=2 \
    /usr/bin/time -f %M -o "$work/$label.rss" "$@" > "$work/$label.stdout" 2> "$work/$label.stderr" \
    || { echo "failed: $*" >&2; cat "$work/$label.stderr" >&2; exit 1; }
  t1=$(date +%s.%N)
  echo "$t0 $t1" | awk '{printf "%.3f\n", $2 - $1}' > "$work/$label.wall"
}

models=(all-MiniLM-L6-v2 all-mpnet-base-v2)
load_start=$(cut -d' ' -f1 /proc/loadavg)
for model in "${models[@]}"; do
  for ((r = 1; r <= reps; r++)); do
    echo "$model rep $r/$reps: st-tune" >&2
    run "st-$model-$r" "$bin" encode --model "$weights/$model" --input "$sentences" \
      --output "$work/st-$model.jsonl" --batch-size 32
    echo "$model rep $r/$reps: peer" >&2
    run "py-$model-$r" "$py" "$work/peer.py" "$weights/$model" "$sentences" "$work/py-$model.npy"
  done
done

load_end=$(cut -d' ' -f1 /proc/loadavg)

# Medians, and how far st-tune's embeddings are from the peer's (last repetition of each).
"$py" - "$work" "$reps" "$n" "$(nproc) cores, load average $load_start at the start, $load_end at the end" \
  "${models[@]}" <<'EOF'
import json, statistics, sys
from pathlib import Path
import numpy as np
work, reps, n, machine, models = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
num = lambda p: float(p.read_text().strip())
med = lambda xs: statistics.median(xs)
print(f"Encoding {n} STS-B validation sentences (sentence1 and sentence2 of each row), CPU, batch 32, "
      f"2 threads; median of {reps} alternating runs ({machine}).\n")
print("| model | tool | encode s | sentences/s | process wall s | sentences/s (process) | peak RSS MiB | max abs diff vs peer |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for m in models:
    ref = np.load(work / f"py-{m}.npy").astype(np.float64)
    got = np.array([json.loads(l)["embedding"] for l in (work / f"st-{m}.jsonl").open()], dtype=np.float64)
    diff = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("nan")
    for tool, pre in (("st-tune", "st"), ("sentence-transformers", "py")):
        wall = med([num(work / f"{pre}-{m}-{r}.wall") for r in range(1, reps + 1)])
        rss = med([num(work / f"{pre}-{m}-{r}.rss") for r in range(1, reps + 1)]) / 1024
        if pre == "py":
            enc = med([num(work / f"{pre}-{m}-{r}.stdout") for r in range(1, reps + 1)])
            enc_s, rate, d = f"{enc:.2f}", f"{n / enc:.0f}", ""
        else:
            enc_s, rate, d = "n/a¹", "n/a¹", f"{diff:.1e}"
        print(f"| {m} | {tool} | {enc_s} | {rate} | {wall:.2f} | {n / wall:.0f} | {rss:.0f} | {d} |")
print("\n¹ st-tune prints no timing of its own: its figures are for the whole process (start, load, "
      "tokenize, encode, write JSON lines), to compare with the peer's whole-process column.")
EOF
