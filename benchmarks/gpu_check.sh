#!/usr/bin/env bash
# The one GPU check: build with CUDA, run every CUDA test, memcheck and racecheck the kernels, time
# the GPU benchmarks, and print one results table last. Every step runs whatever the others did,
# under its own timeout; the timeouts add up to under 7 minutes. Made for a machine without a
# package index: the wheels the build needs come from ./.whl (scripts/gpu_wheels.sh fills it).
#
#   benchmarks/gpu_check.sh OUTDIR            run it (from any directory); OUTDIR gets log.txt,
#                                             results.md and each step's own log
#   benchmarks/gpu_check.sh --dry-run [OUTDIR]  check the plan here, without a GPU: the wheels in
#                                             .whl resolve for CPython 3.12 manylinux x86_64, the
#                                             files each step runs exist, the timeouts fit, the
#                                             sanitizer filters name mos's kernels, and a step that
#                                             times out is reported as such
#
# The sanitizer steps instrument mos's kernels only (--kernel-name, one filter per __global__ kernel
# of cuda/*.cu): instrumenting every torch and cuBLAS kernel took most of their time. They leave out
# tests named *graph*: with torch's caching allocator off, allocating inside a capture fails.
#
# Environment: PYTHON (default python3), WHEEL_DIR (default .whl), MOS_COMMIT (the commit to stamp
# on the results, when the tree travels without .git), MOS_CUDA_ARCHS (default 90: sm_90 only).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=${WHEEL_DIR:-.whl}
PY_VERSION=3.12
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64)
# Step timeouts in seconds: with the kill grace of each, under 420 s (7 minutes) in all.
T_BUILD=90 T_TESTS=100 T_MEMCHECK=95 T_RACECHECK=30 T_BENCH=70
KILL_AFTER=2  # seconds between a timeout's TERM and its KILL
CORE_CUDA_TESTS=(tests/test_cuda_ops.py tests/test_serving_ops.py)
SANITIZED_TESTS="cuda and not graph"  # pytest -k of the memcheck step: no graph captures
CUDA_SOURCES=${CUDA_SOURCES:-cuda}

dry_run=0
if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
OUT=${1:-}
if [ -z "$OUT" ]; then
    if [ $dry_run = 1 ]; then OUT=$(mktemp -d); else echo "usage: $0 [--dry-run] OUTDIR" >&2; exit 2; fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SCRATCH=$(mktemp -d)  # OUTDIR keeps to a few files; the rest lives here
trap 'rm -rf "$SCRATCH"' EXIT
SITE=$SCRATCH/site  # the carried wheels are installed here, never into the image's environment

total=$((T_BUILD + T_TESTS + T_MEMCHECK + T_RACECHECK + T_BENCH + 5 * KILL_AFTER))

LOG=$OUT/log.txt
RESULTS=$OUT/results.md
: >"$LOG"
STEPS=()
log() { echo "$@" | tee -a "$LOG"; }

# step NAME TIMEOUT CMD...: runs CMD (a program or one of the exported functions below) with a
# timeout, its output into OUT/NAME.log and the full log; records the outcome for the table and
# never stops the script.
step() {
    local name=$1 limit=$2
    shift 2
    log ""
    log "=== $name (timeout ${limit}s): $*"
    local start=$SECONDS rc
    timeout --kill-after="$KILL_AFTER" "$limit" bash -c '"$@"' "$name" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    cat "$OUT/$name.log" >>"$LOG"
    local took=$((SECONDS - start)) verdict=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict="TIMED OUT"; elif [ "$rc" != 0 ]; then verdict="FAILED (exit $rc)"; fi
    STEPS+=("| $name | $verdict | ${took}s | $(summary "$OUT/$name.log") |")
    log "=== $name: $verdict after ${took}s"
}

# A step's last pytest summary line and sanitizer summary line, joined; else its last line.
summary() {
    local found
    found=$({ grep -E "^=* *[0-9]+ (passed|failed|skipped|errors?|deselected)" "$1" | tail -1
              grep -E "(ERROR|RACECHECK) SUMMARY" "$1" | tail -1; })
    [ -n "$found" ] || found=$(grep -v '^[[:space:]]*$' "$1" | tail -1 | cut -c1-160)
    echo "$found" | sed 's/=//g; s/|/\//g; s/^ *//; s/ *$//' | paste -sd ';' -
}

dry_run_checks() {
    local ok=0
    echo "step timeouts: build $T_BUILD + tests $T_TESTS + memcheck $T_MEMCHECK + racecheck" \
         "$T_RACECHECK + benchmarks $T_BENCH + 5 x $KILL_AFTER s kill grace = $total s (limit 420 s)"
    [ "$total" -lt 420 ] || { echo "FAIL: the step timeouts add up to $total s >= 420 s"; ok=1; }
    shopt -s nullglob
    local wheels=("$WHEELS"/*.whl)
    [ ${#wheels[@]} -gt 0 ] || { echo "FAIL: no wheels in $WHEELS (run scripts/gpu_wheels.sh)"; return 1; }
    for name in scipy_openblas32 setuptools; do
        local found=("$WHEELS"/"$name"-*.whl)
        [ ${#found[@]} = 1 ] || { echo "FAIL: expected one $name wheel in $WHEELS, found ${#found[@]}"; ok=1; }
    done
    # The set must install for the GPU machine's Python without an index, dependencies included.
    local platform_args=()
    for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
    if ! "$PY" -m pip install --dry-run --quiet --no-index --find-links "$WHEELS" --only-binary=:all: \
            --python-version "$PY_VERSION" --implementation cp "${platform_args[@]}" \
            --target "$SCRATCH/dry-run-target" "${wheels[@]}"; then
        echo "FAIL: the wheels in $WHEELS do not resolve for CPython $PY_VERSION manylinux x86_64"; ok=1
    fi
    local setuptools_version
    setuptools_version=$(basename "$WHEELS"/setuptools-*.whl | cut -d- -f2)
    [ "${setuptools_version%%.*}" -ge 77 ] 2>/dev/null ||
        { echo "FAIL: setuptools $setuptools_version is older than 77 (pyproject's license string)"; ok=1; }
    for f in setup.py benchmarks/gpu_bench.py benchmarks/gpu_grouped_calls.py "${CORE_CUDA_TESTS[@]}"; do
        [ -f "$f" ] || { echo "FAIL: $f is missing"; ok=1; }
    done
    "$PY" -m py_compile benchmarks/gpu_bench.py benchmarks/gpu_grouped_calls.py || ok=1
    local filters
    filters=$(kernel_filters) || ok=1
    [ -n "$filters" ] || { echo "FAIL: no __global__ kernel found in $CUDA_SOURCES/*.cu"; ok=1; }
    echo "sanitizer kernel filters:" $filters
    # A step past its timeout must read TIMED OUT in the results table, a failing one FAILED.
    step selftest-timeout 1 sleep 30 >/dev/null
    step selftest-failure 10 false >/dev/null
    case "${STEPS[0]}" in *"| TIMED OUT |"*) ;; *) echo "FAIL: a timed-out step reads: ${STEPS[0]}"; ok=1;; esac
    case "${STEPS[1]}" in *"| FAILED (exit 1) |"*) ;; *) echo "FAIL: a failed step reads: ${STEPS[1]}"; ok=1;; esac
    STEPS=()
    [ $ok = 0 ] && echo "dry run OK: ${#wheels[@]} wheels resolve, steps and files in place"
    return $ok
}

# One compute-sanitizer filter per __global__ kernel of cuda/*.cu: kns= its name as the Itanium
# mangling spells it (length, then name), a substring of its mangled name and of no torch kernel's.
kernel_filters() {
    "$PY" - "$CUDA_SOURCES" <<'PYEOF'
import pathlib, re, sys
pattern = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(")
names = sorted({name for path in pathlib.Path(sys.argv[1]).glob("*.cu")
                for name in pattern.findall(path.read_text())})
print(" ".join(f"--kernel-name kns={len(name)}{name}" for name in names))
PYEOF
}

if [ $dry_run = 1 ]; then
    dry_run_checks
    exit $?
fi

install_and_build() {
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl || return
    rm -f mos/_C*.so
    MOS_CUDA=1 MOS_CUDA_ARCHS=${MOS_CUDA_ARCHS:-90} "$PY" setup.py -q build_ext --inplace || return
    "$PY" -c "import mos, torch; info = mos.build_info(); print(info, torch.__version__, \
torch.cuda.get_device_name()); assert info['cuda'] and torch.cuda.is_available()"
}

# compute-sanitizer TOOL CMD...: exit 3 when the tool reports an error. torch's caching allocator
# is off so memcheck sees each tensor's own bounds.
sanitizer() {
    local tool=$1 exe
    shift
    exe=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer 2>/dev/null) ||
        { echo "compute-sanitizer not found (PATH, \$CUDA_HOME/bin)"; return 127; }
    local filters usage
    filters=$(kernel_filters) || return
    # Toolkits before --kernel-name spelled the same filters --kernel-regex.
    usage=$("$exe" --help 2>&1)
    [[ $usage == *--kernel-name* ]] || filters=${filters//--kernel-name/--kernel-regex}
    echo "instrumenting mos's kernels only: $filters"
    # shellcheck disable=SC2086  # one word per filter
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$exe" --tool "$tool" $filters --error-exitcode 3 --print-limit 20 "$@"
}

export -f install_and_build sanitizer kernel_filters
export PY WHEELS SITE CUDA_SOURCES
export MOS_COMMIT=${MOS_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo "unknown (set MOS_COMMIT)")}
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
log "gpu_check: $(date -u +%FT%TZ), commit $MOS_COMMIT"
log "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"

step build "$T_BUILD" install_and_build
step tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests -k cuda --maxfail=30 -rfE --durations=10
step memcheck "$T_MEMCHECK" sanitizer memcheck "$PY" -m pytest -q -p no:cacheprovider \
    "${CORE_CUDA_TESTS[@]}" -k "$SANITIZED_TESTS" --maxfail=30 -rfE
step racecheck "$T_RACECHECK" sanitizer racecheck --racecheck-report hazard "$PY" benchmarks/gpu_grouped_calls.py
step benchmarks "$T_BENCH" "$PY" benchmarks/gpu_bench.py --out "$SCRATCH/bench.md"

{
    if [ -s "$SCRATCH/bench.md" ]; then cat "$SCRATCH/bench.md"; else echo "## GPU"; echo ""; echo "(no benchmark table: see benchmarks.log)"; fi
    echo ""
    echo "### gpu_check steps ($(date -u +%F), commit $MOS_COMMIT)"
    echo ""
    echo "| step | result | time | summary |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${STEPS[@]}"
} >"$RESULTS"
log ""
log "=== results ($RESULTS)"
cat "$RESULTS" | tee -a "$LOG"
