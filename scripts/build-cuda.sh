#!/usr/bin/env bash
# Build st-tune with candle's CUDA backend on a machine without a GPU, and pack what the GPU
# check needs into dist/gpu-kit with scripts/pack-gpu-kit.sh (well under the 64 MiB a device call
# may carry): st-tune (stripped, xz-compressed), scripts/gpu-check.sh and its helpers
# gpu_check_rows.py and gpu_peer_step.py, the tokenizer and config files of both models (the
# weights are made random there), the test sentences.
# CUDA 13.0's compiler, headers and libraries come from PyPI, pinned to 13.0.* because the GPU
# machines run driver 580 (CUDA 13.0), which refuses PTX from a newer compiler. Compute
# capability 90 (H100/H200) is set by hand: there is no GPU here to ask.
# candle links against libcuda, libcudart, libnvrtc, libcurand, libcublas and libcublasLt: all
# but libcuda come from their 13.0 wheels; libcuda belongs to the driver, which a machine without a GPU
# lacks, so the link uses a stub (every driver function cudarc declares, doing nothing) with the
# driver's soname. The binary then loads the real libraries by soname on the GPU machine.
# Not part of CI. Usage: scripts/build-cuda.sh   (needs scripts/fetch-weights.sh first)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
venv=${ST_TUNE_CUDA_VENV:-$repo/.cuda-venv}
if [[ ! -x $venv/bin/python ]]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q 'nvidia-cuda-nvcc==13.0.*' 'nvidia-cuda-crt==13.0.*' \
  'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*' 'nvidia-nvvm==13.0.*' \
  'nvidia-cublas==13.0.*' 'nvidia-curand==10.4.*' 'nvidia-cuda-nvrtc==13.0.*'
# The 13.0 wheels put the whole toolkit (bin, include, lib, nvvm) under nvidia/cu13.
home=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
[[ -e $home/lib64 ]] || ln -s lib "$home/lib64"
export CUDA_HOME=$home CUDA_PATH=$home CUDA_ROOT=$home PATH=$home/bin:$PATH CUDA_COMPUTE_CAP=90
# Link-time names (libX.so) for the wheels' versioned libraries, and the libcuda stub.
links=$repo/target/cuda/link
mkdir -p "$links"
for lib in cublas cublasLt nvrtc curand cudart; do
  ln -sf "$(ls "$home"/lib/lib$lib.so.* | head -n 1)" "$links/lib$lib.so"
done
cargo fetch --quiet
cudarc=$(sed -n '/^name = "cudarc"/{n;s/version = "\(.*\)"/\1/p}' Cargo.lock)
driver_sys=$(ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/"cudarc-$cudarc"/src/driver/sys/mod.rs | head -n 1)
grep -o 'pub unsafe fn cu[A-Za-z0-9_]*' "$driver_sys" | sort -u |
  sed 's/pub unsafe fn \(.*\)/void \1(void) {}/' > "$links/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$links/libcuda.so" "$links/cuda_stub.c"
export LIBRARY_PATH=$links:$home/lib:${LIBRARY_PATH:-}
nvcc --version | tail -2
cargo build --release --features cuda --target-dir target/cuda
scripts/pack-gpu-kit.sh target/cuda/release/st-tune dist/gpu-kit
