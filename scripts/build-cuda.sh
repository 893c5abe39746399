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
nv=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]) + "/nvidia")')
# The wheels spread the toolkit over several folders; gather them into one CUDA_HOME.
home=$repo/target/cuda-home
rm -rf "$home" && mkdir -p "$home/bin" "$home/include" "$home/lib64"
for d in "$nv"/*/; do
  [[ -d $d/bin ]] && cp -rs "$d"/bin/. "$home/bin/" 2>/dev/null || true
  [[ -d $d/include ]] && cp -rs "$d"/include/. "$home/include/" 2>/dev/null || true
  [[ -d $d/lib ]] && cp -rs "$d"/lib/. "$home/lib64/" 2>/dev/null || true
done
[[ -d $nv/cu13/nvvm ]] && ln -sfn "$nv/cu13/nvvm" "$home/nvvm"
[[ -d $nv/nvvm ]] && ln -sfn "$nv/nvvm" "$home/nvvm"
( cd "$home/lib64" && for f in libcudart.so.*; do [[ -e $f ]] && ln -sf "$f" libcudart.so; done )
export CUDA_HOME=$home CUDA_PATH=$home PATH=$home/bin:$PATH CUDA_COMPUTE_CAP=90
export LIBRARY_PATH=$home/lib64:${LIBRARY_PATH:-}
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
