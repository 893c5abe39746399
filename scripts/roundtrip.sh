#!/usr/bin/env bash
# Proves that a model saved by st-tune loads unchanged in Python sentence-transformers and embeds
# exactly as st-tune does (max abs difference <= 1e-5, scripts/check_roundtrip.py), for both models:
#   all-MiniLM-L6-v2   trained 4 steps with configs/ci-smoke.toml
#   all-mpnet-base-v2  the same config, 1 step on 8 rows (still a train-and-save; there is no save-only
#                      command); skipped with --minilm-only or when .weights has no MPNet folder
#   xlm-roberta, roberta, distilbert, modernbert  the random-weight family fixtures (tests/fixtures/families/*/model, from
#                      scripts/make_family_fixtures.py), trained 4 steps with the same config
#   all-MiniLM-L6-v2 re-saved by the pinned sentence-transformers (6.x layout, prompts query/passage;
#                      scripts/save_st6_folder.py), trained 4 steps with data.prompts, checked with and
#                      without prompt_name="query"
# Each: st-tune train -> st-tune encode <out>/final on tests/fixtures/sentences.txt -> check_roundtrip.py.
# Needs the weights (scripts/fetch-weights.sh) and the Python env (scripts/setup-python.sh); builds
# st-tune (cargo build) so the binary is never stale.
#   scripts/roundtrip.sh [--minilm-only] [WORK_DIR]   # default: a temporary folder, removed on success
# Env: ST_TUNE_WEIGHTS (default <repo>/.weights), ST_TUNE_PYTHON_VENV (see setup-python.sh).
set -euo pipefail
shopt -s inherit_errexit

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
minilm_only=0 work=
for arg in "$@"; do
  case $arg in
    --minilm-only) minilm_only=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "roundtrip.sh: unknown option $arg" >&2; exit 2 ;;
    *) work=$arg ;;
  esac
done
weights=${ST_TUNE_WEIGHTS:-$repo/.weights}
py=$(scripts/setup-python.sh)
cargo build --quiet
bin=$repo/target/debug/st-tune
sentences=tests/fixtures/sentences.txt

if [[ -z $work ]]; then
  work=$(mktemp -d "${TMPDIR:-/tmp}/st-tune-roundtrip.XXXXXX")
  trap 'status=$?; if [[ $status == 0 ]]; then rm -rf "$work"; else echo "roundtrip: kept $work for inspection" >&2; fi' EXIT
fi
mkdir -p "$work"

# roundtrip NAME [--set KEY=VALUE ...]: train with configs/ci-smoke.toml plus the overrides, encode, check.
roundtrip() {
  local name=$1 out=$work/$1; shift
  echo "--- $name: st-tune train" >&2
  rm -rf "$out"
  # (called as `roundtrip ... || fail=1`, where set -e is off: each step returns on failure)
  local path=$weights/$name
  [[ -d $repo/tests/fixtures/families/$name ]] && path=$repo/tests/fixtures/families/$name/model
  "$bin" train --config configs/ci-smoke.toml --set "model.path=$path" "$@" --output "$out" >&2 || return
  echo "--- $name: st-tune encode" >&2
  "$bin" encode --model "$out/final" --input "$sentences" --output "$out/emb.jsonl" || return
  echo "--- $name: sentence-transformers loads $out/final" >&2
  "$py" scripts/check_roundtrip.py "$out/final" "$sentences" "$out/emb.jsonl"
}

# roundtrip_st6: the same from a folder the pinned sentence-transformers saved (6.x layout), with prompts.
roundtrip_st6() {
  local base=$work/st6-base out=$work/st6
  echo "--- all-MiniLM-L6-v2 saved by sentence-transformers 6.x: st-tune train with prompts" >&2
  rm -rf "$base" "$out"
  "$py" scripts/save_st6_folder.py "$weights/all-MiniLM-L6-v2" "$base" || return
  "$bin" train --config configs/ci-smoke.toml --set "model.path=$base" \
    --set data.prompts.sentence1=query --set data.prompts.sentence2=passage --output "$out" >&2 || return
  "$bin" encode --model "$out/final" --input "$sentences" --output "$out/emb.jsonl" || return
  "$bin" encode --model "$out/final" --input "$sentences" --prompt query --output "$out/emb-query.jsonl" || return
  echo "--- st6: sentence-transformers loads $out/final (no prompt, then prompt_name=query)" >&2
  "$py" scripts/check_roundtrip.py "$out/final" "$sentences" "$out/emb.jsonl" || return
  "$py" scripts/check_roundtrip.py "$out/final" "$sentences" "$out/emb-query.jsonl" query
}

fail=0
roundtrip all-MiniLM-L6-v2 || fail=1
roundtrip_st6 || fail=1
for family in xlm-roberta roberta distilbert modernbert; do roundtrip "$family" || fail=1; done
if [[ $minilm_only == 0 && -f $weights/all-mpnet-base-v2/model.safetensors ]]; then
  roundtrip all-mpnet-base-v2 --set train.max_steps=1 --set data.limit=8 || fail=1
elif [[ $minilm_only == 0 ]]; then
  echo "--- all-mpnet-base-v2: skipped (no $weights/all-mpnet-base-v2; scripts/fetch-weights.sh)" >&2
fi
if [[ $fail != 0 ]]; then
  echo "roundtrip: FAILED" >&2
  exit 1
fi
echo "roundtrip: ok"
