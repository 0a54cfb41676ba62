#!/usr/bin/env bash
# Builds mos with -fsanitize=address,undefined into a scratch directory (the installed extension is
# left alone) and runs the core suite against it. Python itself is not instrumented, so libasan is
# preloaded and leak detection (which would report CPython's own allocations) is off; UBSan stops
# at the first report.
set -euo pipefail
cd "$(dirname "$0")/.."
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
mkdir -p "$build/lib"
cp -r mos "$build/lib/"
rm -f "$build"/lib/mos/_C*.so
MOS_SANITIZE=1 MOS_CUDA=0 .venv/bin/python setup.py -q build_ext --build-lib "$build/lib" --build-temp "$build/tmp" >/dev/null
export PYTHONPATH="$build/lib"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:quarantine_size_mb=0:thread_local_quarantine_size_kb=0
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
root=$PWD
cd "$build"  # so the source tree's own mos/ is not first on sys.path
"$root/.venv/bin/python" -c "import mos; assert mos.build_info()['sanitized'], mos.__file__"
"$root/.venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$root" "$root/tests" \
    --ignore="$root/tests/torch" "$@"
