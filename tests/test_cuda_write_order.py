"""The CUDA backward writes its outputs last (mos.h: nothing is written on failure, except when the
device itself fails between the final writes). A GPU cannot be made to fail one chosen cuBLAS call,
so this reads the order of the steps in cuda/kernels.cu's run_backward: every step that writes a
caller's tensor (dx, dpool_a, dpool_b) must come after every step that only fills the workspace.
Runs without a GPU or a CUDA build."""
import re
from pathlib import Path

KERNELS = Path(__file__).resolve().parent.parent / "cuda" / "kernels.cu"
OUTPUTS = re.compile(r"\bp->(dx|dpool_a|dpool_b)\s*,")


def steps_of(function):
    """The MOS_TRY(...) steps of `function` in kernels.cu, in source order, as text."""
    source = KERNELS.read_text()
    start = source.index(f"static mos_status {function}(")
    body = source[start:source.index("\n}\n", start)]
    return [step for step in body.split("MOS_TRY(")[1:]]


def test_backward_writes_its_outputs_after_every_workspace_step():
    steps = steps_of("run_backward")
    writes = [i for i, step in enumerate(steps) if OUTPUTS.search(step)]
    workspace_only = [i for i, step in enumerate(steps) if not OUTPUTS.search(step)]
    assert len(writes) == 3, steps  # dx += g A, and the scatters into dpool_a and dpool_b
    assert len(workspace_only) >= 5, steps  # handle, gathers of A and B^T, GEMMs for g, dA, h, dB^T
    assert max(workspace_only) < min(writes), [steps[i].split(",")[0] for i in writes]
