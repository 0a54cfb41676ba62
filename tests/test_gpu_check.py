"""The prepared GPU check, dry-run here: scripts/gpu_wheels.sh fetches a wheel set that resolves for
the GPU machine's CPython 3.12 without an index, and benchmarks/gpu_check.sh --dry-run finds the
wheels, the files its steps run and step timeouts that fit in 7 minutes; a wheel for another Python
makes the dry run fail."""
import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run(args, wheels):
    env = dict(os.environ, PYTHON=sys.executable, WHEEL_DIR=str(wheels))
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheels(tmp_path_factory):
    dest = tmp_path_factory.mktemp("whl")
    done = run(["scripts/gpu_wheels.sh", str(dest)], dest)
    assert done.returncode == 0, done.stdout + done.stderr
    return dest


def test_wheel_set_has_one_wheel_of_each_build_need(wheels):
    names = sorted(p.name.split("-")[0] for p in wheels.glob("*.whl"))
    assert names == ["scipy_openblas32", "setuptools"]
    setuptools = next(wheels.glob("setuptools-*.whl")).name.split("-")[1]
    assert int(setuptools.split(".")[0]) >= 77


def test_dry_run_passes_with_the_fetched_wheels(wheels):
    done = run(["benchmarks/gpu_check.sh", "--dry-run"], wheels)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "dry run OK: 2 wheels resolve" in done.stdout
    total = int(done.stdout.split(" s (limit 420 s)")[0].rsplit("= ", 1)[1])
    assert total < 420


def test_dry_run_fails_on_a_wheel_for_another_python(wheels, tmp_path):
    for wheel in wheels.glob("*.whl"):
        shutil.copy(wheel, tmp_path)
    shutil.copy(next(wheels.glob("setuptools-*.whl")), tmp_path / "extra-1.0-cp311-cp311-manylinux_2_17_x86_64.whl")
    done = run(["benchmarks/gpu_check.sh", "--dry-run"], tmp_path)
    assert done.returncode != 0
    assert "do not resolve for CPython 3.12" in done.stdout


def test_dry_run_fails_without_wheels(tmp_path):
    done = run(["benchmarks/gpu_check.sh", "--dry-run"], tmp_path)
    assert done.returncode != 0
    assert "no wheels in" in done.stdout


def test_dry_run_names_a_sanitizer_filter_for_every_kernel(wheels):
    kernels = set()
    for path in (ROOT / "cuda").glob("*.cu"):
        kernels |= set(re.findall(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?(\w+)\s*\(",
                                  path.read_text()))
    assert len(kernels) >= 7
    done = run(["benchmarks/gpu_check.sh", "--dry-run"], wheels)
    assert done.returncode == 0, done.stdout + done.stderr
    line = next(l for l in done.stdout.splitlines() if l.startswith("sanitizer kernel filters:"))
    filters = {word.removeprefix("kns=") for word in line.split() if word.startswith("kns=")}
    assert filters == {f"{len(k)}{k}" for k in kernels}


def test_dry_run_fails_when_no_kernel_is_found(wheels, tmp_path):
    env_run = subprocess.run(["benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, capture_output=True,
                             text=True, timeout=300,
                             env=dict(os.environ, PYTHON=sys.executable, WHEEL_DIR=str(wheels),
                                      CUDA_SOURCES=str(tmp_path)))
    assert env_run.returncode != 0
    assert "no __global__ kernel found" in env_run.stdout


def test_every_graph_capture_test_is_left_out_of_the_sanitizer_steps():
    """memcheck runs with torch's caching allocator off, where allocating inside a capture fails;
    gpu_check.sh leaves tests named *graph* out of it, so every test that captures must be so named."""
    script = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    assert 'SANITIZED_TESTS="cuda and not graph"' in script and '-k "$SANITIZED_TESTS"' in script
    capturing = []
    for path in (ROOT / "tests").rglob("test_*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                body = ast.get_source_segment(text, node)
                if "cuda.graph(" in body or "CUDAGraph(" in body:
                    capturing.append(node.name)
                    assert "graph" in node.name, f"{path.name}::{node.name} captures a CUDA graph"
    assert len(capturing) >= 5
