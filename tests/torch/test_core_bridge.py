"""core_bridge, the one door from torch tensors into mos._C: what it refuses, what its handles do to
a tensor's storage, and that no other module of mos.torch (or the serving benchmark) calls the core
or borrows another module's private names."""
import ast
from pathlib import Path

import pytest
import torch

from mos.torch import core_bridge

ROOT = Path(__file__).resolve().parents[2]


def test_export_refuses_what_a_capsule_cannot_carry_as_torch_does():
    with pytest.raises(BufferError, match="Can't export tensors that require gradient"):
        core_bridge.Export(torch.ones(3, requires_grad=True))
    with pytest.raises(BufferError, match="Can't export tensors with the conjugate bit set"):
        core_bridge.Export(torch.ones(3, dtype=torch.complex64).conj())


def test_capsules_leave_the_storage_resizable_and_handles_do_not():
    """FSDP2 frees gathered parameters by resizing their storage to zero: tensors the user owns go
    over as capsules; reusable NumPy handles are for tensors the caller owns for good."""
    user = torch.ones(8)
    core_bridge.capsule(user)
    user.untyped_storage().resize_(0)
    owned = torch.ones(8)
    core_bridge.handle(owned)
    with pytest.raises(RuntimeError, match="not resizable"):
        owned.untyped_storage().resize_(0)


def test_core_supports_the_dtypes_the_cpu_kernels_have():
    assert core_bridge.core_supports(torch.ones(1, dtype=torch.float32))
    assert core_bridge.core_supports(torch.ones(1, dtype=torch.float64))
    assert not core_bridge.core_supports(torch.ones(1, dtype=torch.bfloat16))


def _imports(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield node.module or "", [a.name for a in node.names], node.level
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], 0


CALLERS = sorted((ROOT / "mos" / "torch").glob("*.py")) + [ROOT / "benchmarks" / "bench_serving.py"]


@pytest.mark.parametrize("path", CALLERS, ids=lambda p: p.name)
def test_only_core_bridge_reaches_the_core_and_no_private_name_crosses_a_file(path):
    for module, names, level in _imports(path):
        reaches_core = module in ("mos._C", "_C") or ("_C" in names and module in ("", "mos"))
        if path.name != "core_bridge.py":
            assert not reaches_core, f"{path.name} imports mos._C; go through core_bridge"
        private = [n for n in names if n.startswith("_") and n != "_C"]
        assert not private, f"{path.name} imports private names {private} from {module or '.'}"
