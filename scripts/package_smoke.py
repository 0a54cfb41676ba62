"""Smoke test of an installed mos (the wheel or the sdist), run by scripts/check_package.sh from a
directory outside the source tree with the fresh environment's python:

    python package_smoke.py            # the environment has no torch
    python package_smoke.py --torch    # the environment has torch (and transformers, peft)

Checks that mos comes from the environment (not a checkout), that the license ships, that the
extension finds OpenBLAS through its own RUNPATH, one forward on NumPy arrays against a gather
written here, and then either `import mos.torch` with one forward against mos.testing's reference,
or, without torch, the ImportError naming the extra to install.
"""
import argparse
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import numpy as np

import mos


def check(condition, message):
    if not condition:
        sys.exit(f"package smoke test FAILED: {message}")


def check_installed():
    location = Path(mos.__file__).resolve()
    check(Path(sys.prefix).resolve() in location.parents, f"mos imported from {location}, outside {sys.prefix}")
    dist = importlib.metadata.distribution("mixture-of-shards")
    check(dist.version == mos.__version__, f"metadata {dist.version} != mos.__version__ {mos.__version__}")
    licenses = [f for f in dist.files or () if f.name == "LICENSE"]
    check(licenses and "Apache License" in licenses[0].read_text(), "no Apache LICENSE in the installed metadata")
    version = subprocess.run([str(Path(sys.executable).parent / "mos"), "--version"], capture_output=True,
                             text=True, check=True).stdout
    check(version.startswith(f"mos {mos.__version__}"), f"`mos --version` printed {version!r}")
    print(f"installed: {location.parent} ({dist.metadata['Name']} {dist.version}); {version.strip()}")


def check_runpath():
    # A fresh process that loads the extension without `import mos` (which preloads OpenBLAS):
    # the library resolves libscipy_openblas.so through RUNPATH $ORIGIN/../scipy_openblas32/lib.
    # That holds where scipy_openblas32 sits next to mos; elsewhere (a second site directory)
    # only mos/__init__'s preload finds it.
    import scipy_openblas32

    ext = mos._C.__file__
    if Path(scipy_openblas32.__file__).resolve().parent.parent != Path(ext).resolve().parent.parent:
        print("RUNPATH: scipy_openblas32 lives in another site directory; found by the preload")
        return
    code = f"import ctypes; ctypes.CDLL({ext!r}); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    check(out.returncode == 0 and out.stdout.strip() == "ok", f"dlopen of {ext} alone failed: {out.stderr}")
    print("RUNPATH: the extension finds OpenBLAS by itself")


def gathered(pool, index, r):
    """A (r, d) from its pool: row i is the concatenation of shards index[i*l : (i+1)*l]."""
    shards = len(index) // r
    return np.stack([np.concatenate([pool[index[i * shards + j]] for j in range(shards)]) for i in range(r)])


def check_numpy_forward():
    config = mos.MoSConfig(r=4, equivalent_rank=2, shards_per_vector=2, private_rank=1)
    pool = mos.ShardPool("q_proj", d_in=16, d_out=12, n_layers=3, config=config)
    pool_a, pool_b = pool.init_values()
    pool_b = np.random.default_rng(0).standard_normal(pool_b.shape).astype(np.float32)  # B starts at 0
    index_a, index_b = pool.indices(layer=1)
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    y = mos.functional.forward(x, pool_a, index_a, pool_b, index_b, scale=2.0)
    a = gathered(pool_a, np.asarray(index_a), pool.rank)
    b = gathered(pool_b, np.asarray(index_b), pool.rank).T
    expected = 2.0 * (x.astype(np.float64) @ a.T) @ b.T
    check(np.allclose(y, expected, rtol=1e-4, atol=1e-4), f"NumPy forward differs by {np.abs(y - expected).max()}")
    print(f"numpy forward: {y.shape} matches the gather ({mos.build_info()['blas']})")


def check_torch():
    import torch

    import mos.torch
    from mos.testing import reference_forward

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 8, dtype=torch.float64, generator=g)
    pool_a = torch.randn(6, 4, dtype=torch.float64, generator=g)
    pool_b = torch.randn(6, 3, dtype=torch.float64, generator=g)
    index_a = torch.tensor([0, 3, 5, 1], dtype=torch.int32)
    index_b = torch.tensor([2, 4, 0, 1], dtype=torch.int32)
    y = mos.torch.adapter_linear(x, pool_a, index_a, pool_b, index_b, scale=0.5)
    torch.testing.assert_close(y, reference_forward(x, pool_a, index_a, pool_b, index_b, 0.5))
    print(f"torch {torch.__version__}: mos.torch.adapter_linear matches mos.testing's reference")


def check_no_torch():
    try:
        import mos.torch  # noqa: F401
    except ImportError as error:
        check("pip install 'mixture-of-shards[torch]'" in str(error), f"no extra named in: {error}")
        print(f"without torch: import mos.torch -> {type(error).__name__}: {error}")
        return
    check(False, "import mos.torch worked in an environment without torch")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--torch", action="store_true", help="the environment has torch")
    args = parser.parse_args()
    check_installed()
    check_runpath()
    check_numpy_forward()
    check_torch() if args.torch else check_no_torch()
    print("package smoke test passed")


if __name__ == "__main__":
    main()
