#!/usr/bin/env bash
# Builds the sdist, then a wheel from that sdist, and repairs the wheel into a manylinux one:
#     scripts/build_wheels.sh [OUTDIR]          (default dist/)
# leaves OUTDIR/mixture_of_shards-<version>.tar.gz and
#       OUTDIR/mixture_of_shards-<version>-cp3XX-cp3XX-manylinux_2_17_x86_64.manylinux2014_x86_64.whl
# auditwheel (with patchelf) checks the symbols the extension uses against the manylinux policies
# and sets the tag. OpenBLAS is not grafted into the wheel: it comes from the scipy-openblas32
# dependency, found through the RUNPATH $ORIGIN/../scipy_openblas32/lib (setup.py). The CUDA
# runtime and cuBLAS are not grafted either: they come from the nvidia-* wheels or the system.
# The build runs without build isolation in $PYTHON's environment (default .venv, made by
# scripts/setup.sh: setuptools, numpy, scipy-openblas32, build, auditwheel, patchelf), so it needs
# no index. MOS_CUDA, MOS_CUDA_ARCHS and the other switches of setup.py apply.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-dist}
BIN=$(dirname "$PY")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# sdist, then the wheel built from the unpacked sdist (so a file missing from MANIFEST.in fails here)
"$PY" -m build --no-isolation --outdir "$work" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
grep -E "^mos: " "$work/build.log" >&2 || true   # what setup.py says about CUDA
PATH="$BIN:$PATH" "$BIN/auditwheel" repair --wheel-dir "$work/repaired" \
    --exclude libscipy_openblas.so --exclude 'libcudart.so.*' --exclude 'libcublas.so.*' \
    --exclude 'libcublasLt.so.*' "$work"/*.whl > "$work/repair.log" 2>&1 || { cat "$work/repair.log"; exit 1; }
mkdir -p "$OUT"
rm -f "$OUT"/mixture_of_shards-*
mv "$work"/*.tar.gz "$work"/repaired/*.whl "$OUT"/
ls -l "$OUT"/mixture_of_shards-*
