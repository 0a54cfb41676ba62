#!/usr/bin/env bash
# Fills .whl/ (or the directory given) with the wheels benchmarks/gpu_check.sh installs on the GPU
# machine, which has CPython 3.12 and no package index: the ones the build needs and that machine's
# image lacks or has too old. Versions are requirements-dev.txt's pins.
#   scipy-openblas32   the CPU BLAS the extension links (DESIGN.md section 3)
#   setuptools         >= 77 for pyproject's `license = "..."` string
# Then carry .whl with the tree and run benchmarks/gpu_check.sh there; check first with
# `benchmarks/gpu_check.sh --dry-run`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${1:-.whl}
pin() { grep -E "^$1==" requirements-dev.txt | head -1; }
mkdir -p "$DEST"
rm -f "$DEST"/scipy_openblas32-*.whl "$DEST"/setuptools-*.whl  # one version of each
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    --dest "$DEST" "$(pin scipy-openblas32)" "$(pin setuptools)"
ls -l "$DEST"
