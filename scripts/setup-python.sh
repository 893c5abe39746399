#!/usr/bin/env bash
# Make the Python environment that generates and checks st-tune's reference data
# (scripts/make_fixtures.py, scripts/check_roundtrip.py, the peer scripts), and print its python.
#   PY=$(scripts/setup-python.sh)
# Creates <repo>/.venv with the pins in scripts/requirements-python.txt, or reuses it. Idempotent and
# quiet: pip runs only when the requirements file changed since the last successful install.
# If ST_TUNE_PYTHON_VENV names an existing venv it is used as it is (never modified), e.g. a shared
# one that is already installed; it only has to import the packages.
# Note: torch from PyPI is the CUDA build (several GB); the registries reachable here have no CPU-only one.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
req=$repo/scripts/requirements-python.txt

if [[ -n ${ST_TUNE_PYTHON_VENV:-} && -x $ST_TUNE_PYTHON_VENV/bin/python ]]; then
  py=$ST_TUNE_PYTHON_VENV/bin/python
  "$py" -c 'import importlib.util as u, sys; sys.exit(not all(map(u.find_spec, ["sentence_transformers", "torch", "scipy", "safetensors"])))' \
    || { echo "ST_TUNE_PYTHON_VENV=$ST_TUNE_PYTHON_VENV lacks packages of $req" >&2; exit 1; }
  echo "$py"
  exit 0
fi

venv=$repo/.venv
stamp=$venv/.requirements-installed   # copy of the requirements last installed successfully
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
if ! cmp -s "$req" "$stamp"; then
  echo "installing $req into $venv (first time: several minutes)" >&2
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" >&2
  cp "$req" "$stamp"
fi
echo "$venv/bin/python"
