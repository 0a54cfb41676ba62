#!/usr/bin/env bash
# One GPU check: build with CUDA (warnings as errors), run the CUDA tests, then time on the GPU
# (CUDA events, medians) and print one table. Meant to finish within 8 minutes on an H100/H200.
#   usage: benchmarks/gpu_check.sh            (from the repository root, torch with CUDA installed)
# Wheels the build needs (scipy-openblas32, and nvidia-cublas if the toolkit lacks cuBLAS) may be
# pre-installed or placed in ./.whl (installed from there without an index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps .whl/*.whl
fi
MOS_CUDA=1 $PY -m pip install -q --no-build-isolation --no-deps -e .
$PY -c "import mos, torch; assert mos.build_info()['cuda'] and torch.cuda.is_available(); print(mos.build_info(), torch.cuda.get_device_name())"
# every device-parametrized test, cuda included (core ops, CUDA-only checks, torch layer)
timeout 300 $PY -m pytest -q -x tests -k "cuda" -p no:cacheprovider
timeout 180 $PY benchmarks/gpu_bench.py "$@"
# serving: batched many-adapter forward vs PEFT mixed batches, decode bandwidth, skewed vs single adapter
timeout 150 $PY benchmarks/bench_serving.py --device cuda --adapters 1 64 512 --runs 10
