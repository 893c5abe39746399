#!/usr/bin/env bash
# The real-model version of tests/resume.rs (docs/checkpoints.md): all-MiniLM-L6-v2, CoSENT on
# 256 rows of the shipped STS-B subset (16 steps of 16, micro-batches of 8), a checkpoint every
# 4 steps, evaluation every 8, an OOM injected at step 3. For f32 and bf16:
#   reference: the run never interrupted (and the same run without checkpoints, for their cost);
#   killed:    SIGKILL during the evaluation at step 8, then during step 10, then half-way
#              through writing checkpoint 12, then at a random moment; resumed with --resume
#              after each kill until it finishes.
# Prints whether final/model.safetensors is byte-identical to the reference's.
#   scripts/bench-resume.sh [OUT_DIR]     # default bench-out/resume
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
out=${1:-bench-out/resume}
mkdir -p "$out"
cargo build --quiet
bin=./target/debug/st-tune
export ST_TUNE_INJECT_OOM=3:forward
common=(--config configs/quickstart.toml --set data.limit=256 --set train.micro_batch_size=8
        --set train.eval_steps=8 --set output.checkpoint_steps=4 --set train.log_steps=1 --json)

for precision in f32 bf16; do
  p=(--set "train.precision=\"$precision\"")
  rm -rf "$out/$precision-"*
  start=$(date +%s.%N)
  "$bin" train "${common[@]}" "${p[@]}" --output "$out/$precision-reference" > /dev/null
  with=$(echo "$(date +%s.%N) - $start" | bc)
  start=$(date +%s.%N)
  "$bin" train "${common[@]}" "${p[@]}" --set output.checkpoint_steps=0 \
    --output "$out/$precision-no-checkpoints" > /dev/null
  without=$(echo "$(date +%s.%N) - $start" | bc)

  killed=$out/$precision-killed
  status() { "$@" > /dev/null 2>&1 && echo 0 || echo $?; }
  a=$(ST_TUNE_CRASH_AT=eval:8 status "$bin" train "${common[@]}" "${p[@]}" --output "$killed")
  b=$(ST_TUNE_CRASH_AT=step:10 status "$bin" train "${common[@]}" "${p[@]}" --output "$killed" --resume)
  c=$(ST_TUNE_CRASH_AT=checkpoint:12 status "$bin" train "${common[@]}" "${p[@]}" --output "$killed" --resume)
  # A random moment: somewhere in the first half of what is left.
  "$bin" train "${common[@]}" "${p[@]}" --output "$killed" --resume > /dev/null 2>&1 &
  sleep "$(python3 -c 'import random; print(round(random.uniform(2, 8), 2))')"
  kill -KILL $! 2> /dev/null && d=killed || d=finished
  wait $! 2> /dev/null || true
  "$bin" train "${common[@]}" "${p[@]}" --output "$killed" --resume > /dev/null
  resumes=$(grep -c '"event":"resume"' "$killed/events.jsonl" || true)
  if cmp -s "$out/$precision-reference/final/model.safetensors" "$killed/final/model.safetensors"; then
    same="byte-identical"
  else
    same="DIFFERENT"
  fi
  size=$(du -sh "$out/$precision-reference/checkpoints/step-16" | cut -f1)
  echo "$precision: exits $a, $b, $c (137 = SIGKILL), random kill: $d; $resumes resumes logged;" \
       "final weights $same to the uninterrupted run's"
  printf '%s: run with 4 checkpoints %.1f s, without %.1f s; one checkpoint %s\n' \
    "$precision" "$with" "$without" "$size"
done
