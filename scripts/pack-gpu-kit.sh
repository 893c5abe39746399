#!/usr/bin/env bash
# Pack what the GPU check needs into a kit folder (well under the 64 MiB a device call may
# carry): the st-tune binary (stripped, xz-compressed), scripts/gpu-check.sh with its two Python
# helpers, the tokenizer and config files of both models (the weights are made random there),
# the test sentences. scripts/build-cuda.sh calls it with the CUDA build; any build packs a kit
# to try the check with `--device cpu`.
#   scripts/pack-gpu-kit.sh BINARY [KIT_DIR, default dist/gpu-kit]   (needs scripts/fetch-weights.sh first)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bin=$(realpath "${1:?usage: pack-gpu-kit.sh BINARY [KIT_DIR]}")
kit=${2:-$repo/dist/gpu-kit}
rm -rf "$kit" && mkdir -p "$kit"
kit=$(cd "$kit" && pwd)
cd "$repo"
strip -o "$kit/st-tune" "$bin"
xz -T2 -9 "$kit/st-tune"
cp scripts/gpu-check.sh scripts/gpu_check_rows.py scripts/gpu_peer_step.py tests/fixtures/sentences.txt "$kit/"
for m in all-MiniLM-L6-v2 all-mpnet-base-v2; do
  mkdir -p "$kit/$m/1_Pooling"
  for f in config.json modules.json sentence_bert_config.json tokenizer.json tokenizer_config.json \
           special_tokens_map.json vocab.txt 1_Pooling/config.json; do
    [[ -e .weights/$m/$f ]] && cp ".weights/$m/$f" "$kit/$m/$f"
  done
done
du -sh "$kit"
