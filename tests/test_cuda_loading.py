"""The CUDA back end is its own library, mos/_mos_cuda.so, which mos._C opens with dlopen when the
first CUDA tensor arrives. _C links neither the CUDA runtime nor cuBLAS; CPU work never opens the
library; a machine without what it needs keeps the CPU path and gets a CUDA error naming what is
missing; build_info() reports what was found. Each case runs in a fresh interpreter, because a
process opens the back end once."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mos

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(mos.__file__).resolve().parent
BUILT = mos.build_info()["cuda"]


def gpu_visible():
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Where a GPU is visible, host memory labelled as CUDA must not reach it: the back end is opened
# with _C.cuda_backend() there instead of a CUDA-labelled call.
GPU = gpu_visible()

# Preamble of every child: a CUDA-labelled assemble (host memory announced as CUDA device 0, which
# passes every argument check and so reaches the back end) and a CPU forward that must still work.
HELPERS = """
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from mos.testing.dlpack_producer import DL_CUDA, Producer
import mos
from mos import _C, functional as F

def cuda(array):
    return Producer(array, capsule_device=(DL_CUDA, 0), reported_device=(DL_CUDA, 0))

def cuda_call():
    pool = np.ones((4, 8), np.float32)
    _C.assemble(cuda(np.zeros((2, 8), np.float32)), cuda(pool), cuda(np.array([0, 3], np.int32)))

def cpu_forward_works():
    rng = np.random.default_rng(0)
    x, pa, pb = rng.standard_normal((3, 8)), rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    ia, ib = np.array([0, 1, 2, 3], np.int32), np.array([1, 2, 3, 4], np.int32)
    y = F.forward(x, pa, ia, pb, ib, 0.5)
    a, bt = pa[ia].reshape(2, 8), pb[ib].reshape(2, 8)  # r = 2 rows of l = 2 shards
    np.testing.assert_allclose(y, 0.5 * (x @ a.T) @ bt, rtol=1e-12)

def mapped(name):
    return any(name in line for line in open("/proc/self/maps"))
"""


def run_child(code, pythonpath=ROOT):
    script = HELPERS.format(tests=str(ROOT / "tests")) + textwrap.dedent(code)
    first = str(pythonpath).split(":")[0]  # also the working directory: `python -c` searches it first
    inherited = os.environ.get("PYTHONPATH")  # e.g. where gpu_check.sh installs its wheels
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=f"{pythonpath}:{inherited}" if inherited else str(pythonpath))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=first, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_the_core_links_neither_the_cuda_runtime_nor_cublas():
    needed = subprocess.run(["readelf", "-d", mos._C.__file__], capture_output=True, text=True,
                            check=True).stdout
    assert "(NEEDED)" in needed
    assert "cudart" not in needed and "cublas" not in needed, needed


def test_cpu_work_never_opens_the_cuda_backend():
    run_child("""
        cpu_forward_works()
        info = mos.build_info()["cuda_backend"]
        assert not info["loaded"] and info["error"] is None, info
        assert not mapped("_mos_cuda.so") and not mapped("libcublas"), "opened without a CUDA tensor"
    """)


@pytest.mark.skipif(not BUILT, reason="mos built without CUDA: there is no back end to open")
def test_a_cuda_call_opens_the_backend_and_reaches_the_cuda_runtime():
    out = run_child(f"""
        assert not mapped("_mos_cuda.so")
        if {GPU}:
            _C.cuda_backend()
            print("opened on a GPU machine")
        else:
            try:
                cuda_call()
            except RuntimeError as error:  # no GPU here: the CUDA runtime itself refuses
                print(error)
        assert mapped("_mos_cuda.so") and mapped("libcublas")
        info = mos.build_info()["cuda_backend"]
        print(info)
        assert info["loaded"] and info["error"] is None, info
        for lib in ("cudart", "cublas"):
            assert info[lib] and open(info[lib], "rb").read(4) == b"\\x7fELF", info
        assert info["driver"] == ("found" if {GPU} else info["driver"]), info
        assert info["runtime_version"] >= 12000 and info["library"].endswith("mos/_mos_cuda.so")
        cpu_forward_works()
    """)
    first = out.splitlines()[0]
    assert first == "opened on a GPU machine" or first.startswith("assemble: cudaGetDevice failed: "), out
    if "'driver_version': 0" in out:  # no driver at all: the message says so
        assert "no NVIDIA driver is installed (libcuda.so.1 was not found)" in first, out


def test_a_library_that_cannot_load_gives_a_clear_error_and_leaves_the_cpu_path(tmp_path):
    """A copy of the package whose back end is not a shared library (a broken install)."""
    copy = tmp_path / "mos"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "_mos_cuda.so"))
    (copy / "_mos_cuda.so").write_text("not a shared library\n")
    out = run_child(f"""
        assert mos.__file__.startswith({str(copy)!r}), mos.__file__
        try:
            cuda_call()
        except RuntimeError as error:
            print(error)
        try:
            _C.cuda_backend()
        except RuntimeError as error:
            print(error)
        print(mos.build_info()["cuda_backend"])
        cpu_forward_works()
    """, pythonpath=f"{tmp_path}:{ROOT / 'tests'}")
    lines = out.splitlines()
    assert lines[0].startswith(f"assemble: the CUDA back end {copy}/_mos_cuda.so could not be "
                               "loaded: "), out
    assert lines[1] == lines[0].removeprefix("assemble: "), out  # remembered, not retried
    assert "'loaded': False" in lines[2] and "could not be loaded" in lines[2], out


def test_without_the_library_a_cuda_call_says_mos_was_built_without_cuda(tmp_path):
    copy = tmp_path / "mos"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "_mos_cuda.so"))
    out = run_child("""
        assert not mos.build_info()["cuda"]
        try:
            cuda_call()
        except RuntimeError as error:
            print(error)
        cpu_forward_works()
    """, pythonpath=f"{tmp_path}:{ROOT / 'tests'}")
    assert out.splitlines()[0] == "assemble: mos was built without CUDA (MOS_CUDA=0 or no nvcc)", out


def cublas_on_the_system_path():
    import ctypes

    try:
        ctypes.CDLL("libcublas.so.13")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not BUILT, reason="mos built without CUDA: there is no back end to open")
@pytest.mark.skipif(cublas_on_the_system_path(), reason="cuBLAS is on the system's library path, "
                    "so hiding the nvidia-* wheels cannot take it away")
def test_missing_cublas_is_named_and_the_cpu_path_still_works():
    out = run_child("""
        sys.modules["nvidia"] = None  # as if no nvidia-* wheel were installed
        try:
            cuda_call()
        except RuntimeError as error:
            print(error)
        assert not mapped("_mos_cuda.so")
        cpu_forward_works()
    """)
    assert out.splitlines()[0].startswith("assemble: the CUDA back end needs cuBLAS (libcublas.so."), out
    assert "pip install nvidia-cuda-runtime nvidia-cublas" in out, out


def test_a_backend_from_another_build_is_refused(tmp_path):
    """A library whose table has another ABI number is never called (its params may differ)."""
    copy = tmp_path / "mos"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__", "_mos_cuda.so"))
    source = tmp_path / "other_build.c"
    source.write_text("static const struct { int abi; } table = {999};\n"
                      "const void *mos_cuda_backend_table(void) { return &table; }\n")
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", "-o", str(copy / "_mos_cuda.so"),
                    str(source)], check=True)
    out = run_child("""
        try:
            cuda_call()
        except RuntimeError as error:
            print(error)
        cpu_forward_works()
    """, pythonpath=f"{tmp_path}:{ROOT / 'tests'}")
    assert out.splitlines()[0] == (f"assemble: the CUDA back end {copy}/_mos_cuda.so is from another "
                                   "build of mos (rebuild mos)"), out
