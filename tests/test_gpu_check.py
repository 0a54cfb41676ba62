"""The prepared GPU check, dry-run here: scripts/gpu_wheels.sh fetches a wheel set that resolves for
the GPU machine's CPython 3.12 without an index, and benchmarks/gpu_check.sh --dry-run finds the
wheels, the files its steps run and step timeouts that fit in 7 minutes; a wheel for another Python
makes the dry run fail."""
import os
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
