#!/usr/bin/env bash
# The GPU check, run on a GPU machine from the kit scripts/build-cuda.sh makes (no Rust, no
# network there). Writes its log to ${OUT:-.}/gpu-check.log. Under 8 minutes on an H200.
#  1. builds random models with the shapes of all-MiniLM-L6-v2 and all-mpnet-base-v2;
#  2. checks that CPU and CUDA give the same embeddings from the same binary;
#  3. trains MPNet with a micro-batch far too large for the card, so that real CUDA OOMs happen,
#     and shows the run recovering (events.jsonl).
#   bash gpu-check.sh [KIT_DIR]
set -euo pipefail
kit=$(cd "${1:-$(dirname "${BASH_SOURCE[0]}")}" && pwd)
out=${OUT:-$PWD}
work=$(mktemp -d)
exec > >(tee "$out/gpu-check.log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# cuBLAS, cuRAND and NVRTC from the machine's Python CUDA packages.
libs=$(python3 - <<'PY'
import importlib, os
out = []
for m in ["nvidia.cublas", "nvidia.curand", "nvidia.cuda_nvrtc", "nvidia.cuda_runtime", "nvidia.cu13"]:
    try:
        p = importlib.import_module(m).__path__[0]
        for sub in ("lib", "lib64"):
            if os.path.isdir(os.path.join(p, sub)): out.append(os.path.join(p, sub))
    except Exception:
        pass
print(":".join(out))
PY
)
export LD_LIBRARY_PATH=$libs:${LD_LIBRARY_PATH:-}
xz -dkc "$kit/st-tune.xz" > "$work/st-tune" && chmod +x "$work/st-tune"
bin=$work/st-tune

echo "== 1-2. random full-size models: CPU and CUDA embeddings"
for m in all-MiniLM-L6-v2 all-mpnet-base-v2; do
  "$bin" random-model --like "$kit/$m" --output "$work/$m" --seed 1
  for d in cpu cuda; do
    /usr/bin/time -f "$m $d: %e s" "$bin" encode --model "$work/$m" --input "$kit/sentences.txt" \
      --output "$work/$m.$d.jsonl" --device "$d"
  done
  python3 - "$work/$m.cpu.jsonl" "$work/$m.cuda.jsonl" <<'PY'
import json, sys
a = [json.loads(l)["embedding"] for l in open(sys.argv[1])]
b = [json.loads(l)["embedding"] for l in open(sys.argv[2])]
d = max(abs(x - y) for u, v in zip(a, b) for x, y in zip(u, v))
print(f"{sys.argv[1]}: max abs diff cpu vs cuda {d:.3e}", "OK" if d <= 1e-4 else "MISMATCH")
PY
done

echo "== 3. MPNet, 1024 rows of 512 tokens per step, micro-batch 1024: real CUDA OOMs"
python3 - "$work/long.csv" <<'PY'
import sys, random
random.seed(0)
words = "the a cat dog man woman plane guitar red blue big small runs sits plays flies".split()
with open(sys.argv[1], "w") as f:
    f.write("sentence1,sentence2,score\n")
    for i in range(2048):
        f.write(" ".join(random.choices(words, k=600)) + "," + " ".join(random.choices(words, k=600)) + f",{random.random():.3f}\n")
PY
cat > "$work/oom.toml" <<TOML
[model]
path = "$work/all-mpnet-base-v2"
device = "cuda"
max_seq_length = 512
[data]
train = "$work/long.csv"
[train]
loss = "cosent"
batch_size = 1024
micro_batch_size = 1024
max_steps = 3
log_steps = 1
[memory]
regrow_after = 2
[output]
dir = "$work/oom-run"
TOML
/usr/bin/time -f "OOM run: %e s" "$bin" train --config "$work/oom.toml" || echo "train exited with $?"
echo "-- events.jsonl"; cat "$work/oom-run/events.jsonl" || true
echo "-- metrics.jsonl"; cat "$work/oom-run/metrics.jsonl" || true
