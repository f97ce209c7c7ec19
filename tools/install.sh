#!/usr/bin/env bash
# Install ArborSeg into a virtual environment. The Dockerfile runs exactly this script, and .ci/run runs
# it on a fresh checkout, so what the image contains is what CI tests.
#
# usage: tools/install.sh VENV_DIR [--dev]
#   --dev   editable install with the test extras (developers, CI); default: a regular install (the image)
# environment:
#   ARBORSEG_TORCH=cpu      PyTorch CPU build from download.pytorch.org/whl/cpu (the image's default)
#   ARBORSEG_TORCH=cuda     PyTorch CUDA build, as published on PyPI for Linux
#   ARBORSEG_TORCH=default  whatever pip's own configuration provides (the default here)
#   PYTHON=python3          the interpreter the environment is made from
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:?usage: tools/install.sh VENV_DIR [--dev]}"
mode="${2:-}"
python="${PYTHON:-python3}"
torch_version="2.13.0"

case "${ARBORSEG_TORCH:-default}" in
  cpu) torch_source=(--index-url https://download.pytorch.org/whl/cpu) ;;
  cuda | default) torch_source=() ;;
  *) echo "install.sh: ARBORSEG_TORCH must be cpu, cuda or default (got '${ARBORSEG_TORCH}')" >&2; exit 2 ;;
esac
case "$mode" in
  "" | --dev) ;;
  *) echo "install.sh: unknown option '$mode' (only --dev)" >&2; exit 2 ;;
esac

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-cache-dir)
# torch first, from the chosen build; the package's torch==2.13.0 pin is then already satisfied
"${pip[@]}" install --quiet "torch==${torch_version}" "${torch_source[@]}"
if [ "$mode" = "--dev" ]; then
  "${pip[@]}" install --quiet -c "$root/requirements/constraints.txt" -e "$root[test]"
else
  "${pip[@]}" install --quiet -c "$root/requirements/constraints.txt" "$root"
fi
"${pip[@]}" check
"$venv/bin/arborseg" --version
