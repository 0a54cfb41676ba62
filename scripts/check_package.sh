#!/usr/bin/env bash
# The package path, as a user meets it (CI runs this after the suite, through `make test`):
#   1. scripts/build_wheels.sh: the sdist, a wheel built from it, repaired to manylinux;
#   2. the sdist installed by pip, with build isolation, into a fresh venv without torch
#      (CPU-only: MOS_CUDA=0), and the smoke test from outside the source tree;
#   3. the wheel installed into a fresh venv that sees .venv's torch, transformers and peft
#      (a .pth file, so nothing multi-GB is copied), the smoke test with torch, and the core
#      tests ($PACKAGE_TESTS) taken from the sdist, run against the installed package.
# No index is used: the build's own requirements come from .whl/package-check/, filled once
# from requirements-dev.txt's pins. Prints each install's time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
DEPS=$ROOT/.whl/package-check
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pin() { grep -E "^$1==" requirements-dev.txt | head -1; }
now() { date +%s.%N; }
took() { printf '%.1f s' "$(echo "$(now) - $1" | bc)"; }

if [ ! -f "$DEPS/.complete" ]; then
    mkdir -p "$DEPS"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DEPS" \
        "$(pin numpy)" "$(pin scipy-openblas32)" "$(pin setuptools)"
    touch "$DEPS/.complete"
fi

echo "== build: sdist, wheel from the sdist, auditwheel repair"
t=$(now)
PYTHON="$PY" scripts/build_wheels.sh "$work/dist"
echo "built in $(took "$t")"
wheel=$(ls "$work"/dist/*.whl)
sdist=$(ls "$work"/dist/*.tar.gz)
case "$(basename "$wheel")" in *manylinux*) ;; *) echo "not a manylinux wheel: $wheel"; exit 1 ;; esac
tar tzf "$sdist" > "$work/sdist.txt"
grep -q "^[^/]*/LICENSE$" "$work/sdist.txt" || { echo "no LICENSE in $sdist"; exit 1; }
cp scripts/package_smoke.py "$work/"

echo "== sdist into a fresh venv (no torch, CPU-only, build isolation from $DEPS)"
"$PY" -m venv --without-pip "$work/sdist-env"
"$PY" -m pip --python "$work/sdist-env/bin/python" install -q --no-index --find-links "$DEPS" \
    "$(pin numpy)" "$(pin scipy-openblas32)"
t=$(now)
MOS_CUDA=0 "$PY" -m pip --python "$work/sdist-env/bin/python" install -q --no-index --find-links "$DEPS" "$sdist"
echo "sdist installed in $(took "$t")"
(cd "$work" && sdist-env/bin/python package_smoke.py)

echo "== wheel into a fresh venv that sees .venv's torch"
"$PY" -m venv --without-pip "$work/wheel-env"
site=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
fresh_site=$("$work/wheel-env/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$site" > "$fresh_site/dev_venv.pth"
t=$(now)
"$PY" -m pip --python "$work/wheel-env/bin/python" install -q --no-index --no-deps --ignore-installed "$wheel"
echo "wheel installed in $(took "$t")"
(cd "$work" && wheel-env/bin/python package_smoke.py --torch)
mkdir "$work/suite" && tar xzf "$sdist" -C "$work/suite" --strip-components=1 --wildcards '*/tests/*'
tests=()
for t in ${PACKAGE_TESTS:-tests/test_functional.py tests/test_validation.py}; do if [ -e "$work/suite/$t" ]; then tests+=("$t"); fi; done
[ ${#tests[@]} -gt 0 ] || { echo "none of PACKAGE_TESTS is in the sdist"; exit 1; }
(cd "$work/suite" && "$work/wheel-env/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}" \
    | tail -1 && "$work/wheel-env/bin/python" -c "import mos; assert '$work/wheel-env' in mos.__file__")
echo "$(basename "$wheel"): $(du -k "$wheel" | cut -f1) KiB"
