#!/usr/bin/env bash
# Creates .venv, installs the pinned dependencies and builds mos in place (editable).
# With nvcc present, cuBLAS comes from the nvidia-cublas wheel so the CUDA back end is compiled
# and linked even on machines without a GPU. Our own builds treat warnings as errors
# (MOS_WERROR=1); a user's `pip install` does not.
set -euo pipefail
cd "$(dirname "$0")/.."
export MOS_WERROR=${MOS_WERROR:-1}
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements-dev.txt
if [ "${MOS_CUDA:-auto}" != "0" ] && { command -v nvcc >/dev/null || [ -x /usr/local/cuda/bin/nvcc ]; }; then
    .venv/bin/python -m pip install -q "nvidia-cublas==13.1.1.3"
fi
# The distribution used to be called `mos`; an editable install under that name would shadow this one.
if .venv/bin/python -m pip show mos 2>/dev/null | grep -x "Editable project location: $PWD" >/dev/null; then
    .venv/bin/python -m pip uninstall -q -y mos
fi
.venv/bin/python -m pip install -q --no-build-isolation -e .
.venv/bin/python -c "import mos; print('mos built:', mos.build_info())"
