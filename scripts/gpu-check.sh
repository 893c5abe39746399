#!/usr/bin/env bash
# The GPU check: everything docs/gpu.md asks of a GPU machine, in one call of under 8 minutes,
# run from the kit scripts/build-cuda.sh makes (no Rust, no network there; python3 with torch,
# sentence-transformers, numpy and safetensors). Writes one markdown table, a row as each part
# ends, to ${OUT:-.}/gpu-check.md, and everything printed to gpu-check.log beside it.
#   bash gpu-check.sh [KIT_DIR] [--device cuda|cuda:N|cpu]
# Cheap parts first, so a cut-off call still leaves rows:
#   0. each of st-tune's `cuda` kernels against its CPU twin (`bench kernels`);
#   3. memory.limit as the driver gives it (`plan --json`, limit unset and "80%");
#   1. CPU engine against the device for random MiniLM- and MPNet-shaped models: embeddings
#      (f32), and in f32 and bf16 the losses of a 3-step training run and the weights after it
#      (gradients are compared through the weights' updates);
#   4. step time and peak memory of `bench memory` beside Python sentence-transformers
#      (gpu_peer_step.py, torch.autocast for bf16), with 5. the planner's estimate;
#   2. a run whose first micro-batch cannot fit: real OOMs, recovered, the run finishing.
# `--device cpu` stands in for CUDA on a machine without a GPU: the device side is the portable
# engine (ST_TUNE_ENGINE=portable), the one CUDA runs, sizes are small, the OOMs come from
# memory.limit and the peer runs the smallest size only. ST_TUNE_BIN replaces the kit's binary,
# PYTHON the python3 used, ST_GPU_CHECK_SECONDS (default 420) the time budget.
set -uo pipefail # not -e: a part that fails is a row of the table, and the check goes on
kit=$(dirname "${BASH_SOURCE[0]}")
device=cuda
while (($#)); do
  case $1 in
    --device) device=$2; shift 2 ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) kit=$1; shift ;;
  esac
done
kit=$(cd "$kit" && pwd)
out=${OUT:-$PWD}
mkdir -p "$out"
out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
rows=("$py" "$kit/gpu_check_rows.py")
budget=${ST_GPU_CHECK_SECONDS:-420}
started=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
table=$out/gpu-check.md
exec > >(tee "$out/gpu-check.log") 2>&1

# Runs a command under the smaller of its own limit and the time left (exit 124 when cut).
limited() {
  local s=$1 left=$((budget - ($(date +%s) - started)))
  shift
  ((left < s)) && s=$left
  if ((s < 5)); then echo "out of time, skipped: $*"; return 124; fi
  timeout "$s" "$@"
}

if [[ $device == cpu ]]; then
  dev_env=(env ST_TUNE_ENGINE=portable) # the engine CUDA runs, on this CPU
  dev_label="cpu, portable engine"
  par_rows=4 par_seq=32 shapes="4x32 8x64" peer_shapes=4x32 peer_reps=(--warmup 1 --steps 1)
  machine="$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1), $(nproc) cores"
else
  dev_env=(env)
  dev_label=$device
  par_rows=8 par_seq=64 shapes="32x128 128x256" peer_shapes=32x128,128x256 peer_reps=(--warmup 2 --steps 3)
  gpu=${device#cuda}; gpu=${gpu#:}; gpu=${gpu:-0}
  smi() { nvidia-smi -i "$gpu" --query-gpu="$1" --format=csv,noheader,nounits; }
  machine=$(smi name,memory.total,driver_version)
  nvidia-smi -i "$gpu"
  # cuBLAS, cuRAND and NVRTC from the machine's Python CUDA packages.
  libs=$("$py" - <<'PY'
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
fi
ref_env=(env -u ST_TUNE_ENGINE) # the CPU engine, the reference
if [[ -n ${ST_TUNE_BIN:-} ]]; then
  bin=$ST_TUNE_BIN
else
  xz -dkc "$kit/st-tune.xz" > "$work/st-tune" && chmod +x "$work/st-tune"
  bin=$work/st-tune
fi
{
  echo "GPU check, $(date -u '+%Y-%m-%d %H:%M UTC'), device $device: $machine; $("$bin" --version)"
  echo
  echo "| # | check | model | precision | size | st-tune on the device | reference | difference | verdict |"
  echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"
} > "$table"

echo "== 0. st-tune's cuda kernels against their CPU twins"
limited 120 "$bin" bench kernels --device "$device" --json > "$work/kernels.jsonl"
"${rows[@]}" kernels "$device" "$work/kernels.jsonl" >> "$table"

"$py" - "$work" <<'PY'
import random, sys
random.seed(0)
words = "the a cat dog man woman plane guitar red blue big small runs sits plays flies".split()
def write(path, rows, lo, hi):
    with open(path, "w") as f:
        f.write("sentence1,sentence2,score\n")
        for _ in range(rows):
            a, b = (" ".join(random.choices(words, k=random.randint(lo, hi))) for _ in "ab")
            f.write(f"{a},{b},{random.random():.3f}\n")
write(sys.argv[1] + "/pairs.csv", 64, 5, 60)
write(sys.argv[1] + "/long.csv", 1200, 600, 600)
PY
declare -A name=([all-MiniLM-L6-v2]=MiniLM [all-mpnet-base-v2]=MPNet)
for m in all-MiniLM-L6-v2 all-mpnet-base-v2; do
  "$bin" random-model --like "$kit/$m" --output "$work/$m" --seed 1
done

# config MODEL DEVICE MAX_SEQ DATA [lines of [train], then of later tables]: a training config.
config() {
  printf '[model]\npath = "%s"\ndevice = "%s"\nmax_seq_length = %s\n[data]\ntrain = "%s"\n' \
    "$work/$1" "$2" "$3" "$work/$4"
  printf '[train]\nloss = "cosent"\n'
  printf '%s\n' "${@:5}"
}

echo "== 3. memory.limit from the driver"
for limit in unset 80%; do
  cfg=$work/plan-$limit.toml
  config all-mpnet-base-v2 "$device" 128 pairs.csv "batch_size = 32" > "$cfg"
  [[ $limit != unset ]] && printf '[memory]\nlimit = "%s"\n' "$limit" >> "$cfg"
  if [[ $device == cpu ]]; then
    free=$(awk '/MemAvailable/ {print $2 / 1024}' /proc/meminfo) total=$(awk '/MemTotal/ {print $2 / 1024}' /proc/meminfo)
    src="/proc/meminfo MemAvailable"
  else
    free=$(smi memory.free) total=$(smi memory.total) src=nvidia-smi
  fi
  limited 60 "${dev_env[@]}" "$bin" plan --config "$cfg" --json | tee "$work/plan-$limit.json"
  "${rows[@]}" plan "$device" "$limit" "$work/plan-$limit.json" "$src" "$free" "$total" >> "$table"
done

echo "== 1. CPU engine against $device: embeddings, losses and weights after 3 steps"
for m in all-MiniLM-L6-v2 all-mpnet-base-v2; do
  "${ref_env[@]}" "$bin" encode --model "$work/$m" --input "$kit/sentences.txt" --output "$work/$m.ref.jsonl"
  limited 60 "${dev_env[@]}" "$bin" encode --model "$work/$m" --input "$kit/sentences.txt" \
    --output "$work/$m.dev.jsonl" --device "$device"
  "${rows[@]}" emb "${name[$m]}" "$dev_label" "$work/$m.ref.jsonl" "$work/$m.dev.jsonl" >> "$table"
  for p in f32 bf16; do
    for side in ref dev; do
      if [[ $side == ref ]]; then d=cpu e=("${ref_env[@]}"); else d=$device e=("${dev_env[@]}"); fi
      config "$m" "$d" "$par_seq" pairs.csv "batch_size = $par_rows" "max_steps = 3" "log_steps = 1" \
        "warmup_ratio = 0.0" "precision = \"$p\"" > "$work/par.toml"
      limited 120 "${e[@]}" "$bin" train --config "$work/par.toml" --output "$work/par-$m-$p-$side" \
        --set output.save_best=false --set output.checkpoint_steps=0 --json > "$work/par-$m-$p-$side.out" ||
        echo "train ($side) exited with $?"
      grep '"summary"' "$work/par-$m-$p-$side.out"
    done
    "${rows[@]}" train "${name[$m]}" "$p" "${par_rows}x$par_seq" "$device" "$work/$m" \
      "$work/par-$m-$p-ref" "$work/par-$m-$p-dev" >> "$table"
  done
done

echo "== 4-5. step time and peak memory, st-tune beside the Python peer; the planner's estimate"
for m in all-MiniLM-L6-v2 all-mpnet-base-v2; do
  for shape in $shapes; do
    for p in f32 bf16; do
      config "$m" "$device" "${shape#*x}" pairs.csv "batch_size = ${shape%x*}" > "$work/bench.toml"
      json=$work/bench-$m-$shape-$p.json
      peak=-
      if [[ $device != cpu ]]; then
        idle=$(smi memory.used)
        nvidia-smi -i "$gpu" --query-gpu=memory.used --format=csv,noheader,nounits -lms 20 > "$work/sampled" &
        sampler=$!
      fi
      limited 90 "${dev_env[@]}" "$bin" bench memory --config "$work/bench.toml" --seq "${shape#*x}" \
        --levers "$p" --json | tee "$json"
      if [[ $device != cpu ]]; then
        kill "$sampler"; wait "$sampler" 2>/dev/null
        peak=$(sort -n "$work/sampled" | tail -n 1 | awk -v idle="$idle" '$1 > 0 {print ($1 - idle) * 1048576}')
      fi
      echo "$peak" > "$json.peak"
    done
  done
  peer_idle=0
  [[ $device != cpu ]] && peer_idle=$(($(smi memory.used) * 1048576))
  limited 150 "$py" "$kit/gpu_peer_step.py" "$work/$m" --device "$device" --shapes "$peer_shapes" \
    "${peer_reps[@]}" | tee "$work/peer-$m.jsonl"
  for shape in $shapes; do
    for p in f32 bf16; do
      json=$work/bench-$m-$shape-$p.json
      "${rows[@]}" step "${name[$m]}" "$p" "$shape" "$dev_label" "$json" "$(cat "$json.peak")" \
        "$work/peer-$m.jsonl" "$peer_idle" >> "$table"
    done
  done
done

echo "== 2. out of memory, recovered, the run going on"
if [[ $device == cpu ]]; then
  # No real OOM on a CPU: memory.limit raises the same error when use goes over it.
  m=all-MiniLM-L6-v2 rows_seq=(16 64) oom_limit=('[memory]' 'limit = "400MiB"' 'regrow_after = 2')
else
  # About 216 GiB estimated at micro-batch 384 (`plan`): more than any card; 96 fits 80 GiB.
  m=all-mpnet-base-v2 rows_seq=(384 512) oom_limit=('[memory]' 'regrow_after = 2')
fi
config "$m" "$device" "${rows_seq[1]}" long.csv "batch_size = ${rows_seq[0]}" \
  "micro_batch_size = ${rows_seq[0]}" "max_steps = 3" "log_steps = 1" "${oom_limit[@]}" > "$work/oom.toml"
limited 240 "${dev_env[@]}" "$bin" train --config "$work/oom.toml" --output "$work/oom-run" \
  --set output.save_best=false --set output.checkpoint_steps=0 --json > "$work/oom.out"
rc=$?
grep -v '"event":"step"' "$work/oom.out"
"${rows[@]}" oom "${name[$m]}" "${rows_seq[0]}x${rows_seq[1]}" "$device" "$work/oom-run" "$work/oom.out" "$rc" >> "$table"

mkdir -p "$out/raw" && cp "$work"/*.json "$work"/*.jsonl "$work"/*.peak "$work"/*.out "$work"/*.toml "$out/raw/"
echo "== done in $(($(date +%s) - started)) s; the table ($table):"
cat "$table"
