#!/usr/bin/env bash
# Build st-tune with candle's CUDA backend on a machine without a GPU, and pack what the GPU
# check needs into dist/gpu-kit (well under the 64 MiB a device call may carry):
#   st-tune (stripped, xz-compressed), scripts/gpu-check.sh, the tokenizer and config files of
#   both models (the weights are made random there), the test sentences.
# CUDA 13.0's compiler, headers and libraries come from PyPI, pinned to 13.0.* because the GPU
# machines run driver 580 (CUDA 13.0), which refuses PTX from a newer compiler. Compute
# capability 90 (H100/H200) is set by hand: there is no GPU here to ask.
# Not part of CI. Usage: scripts/build-cuda.sh   (needs scripts/fetch-weights.sh first)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv=${ST_TUNE_CUDA_VENV:-$repo/.cuda-venv}
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-crt==13.0.*' \
    'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' 'nvidia-nvvm==13.0.*'
fi
# The 13.0 wheels put the whole toolkit (bin, include, lib, nvvm) under nvidia/cu13.
home=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
[[ -e $home/lib64 ]] || ln -s lib "$home/lib64"
export CUDA_HOME=$home CUDA_PATH=$home CUDA_ROOT=$home PATH=$home/bin:$PATH CUDA_COMPUTE_CAP=90
export LIBRARY_PATH=$home/lib:${LIBRARY_PATH:-}
nvcc --version | tail -2
cargo build --release --features cuda --target-dir target/cuda
kit=dist/gpu-kit
rm -rf "$kit" && mkdir -p "$kit"
strip -o "$kit/st-tune" target/cuda/release/st-tune
xz -T2 -9 "$kit/st-tune"
cp scripts/gpu-check.sh tests/fixtures/sentences.txt "$kit/"
for m in all-MiniLM-L6-v2 all-mpnet-base-v2; do
  mkdir -p "$kit/$m/1_Pooling"
  for f in config.json modules.json sentence_bert_config.json tokenizer.json tokenizer_config.json \
           special_tokens_map.json vocab.txt 1_Pooling/config.json; do
    [[ -e .weights/$m/$f ]] && cp ".weights/$m/$f" "$kit/$m/$f"
  done
done
du -sh "$kit"
