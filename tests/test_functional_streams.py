"""The stream mos.functional names to CUDA producers, checked here without a GPU: tensors offered
as CUDA device 0 (CudaLabelled, see test_cuda_labelled.py) record the stream the binding passes
to their __dlpack__, and every call then fails at the CUDA runtime, before any launch.

A producer orders its pending writes before the consumer's stream only when it is told that
stream, and torch's Tensor.__dlpack__ takes a Python int only."""
import numpy as np
import pytest

from mos import functional as F

from test_cuda_labelled import CUDA_RUNTIME_ERROR, STREAM, CudaLabelled, Problem

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a GPU is visible: relabelled host memory must not reach it")

LEGACY_DEFAULT_STREAM = 1  # as DLPack spells it


def call(op, p, **stream):
    """Runs one mos.functional op on CUDA-labelled tensors; returns the producers it was given."""
    lab = CudaLabelled
    pool_a, index_a = lab(p.pool_a), lab(p.index_a)
    if op == "assemble":
        given = [pool_a, index_a]
        run = lambda: F.assemble(pool_a, index_a, p.r, **stream)  # noqa: E731
    elif op == "scatter_add":
        rows = lab(p.rows)
        given = [pool_a, rows, index_a]
        run = lambda: F.scatter_add(pool_a, rows, index_a, **stream)  # noqa: E731
    else:
        x, pool_b, index_b = lab(p.x), lab(p.pool_b), lab(p.index_b)
        ws = lab(p.linear_workspace(False))
        given = [x, pool_a, index_a, pool_b, index_b, ws]
        run = lambda: F.forward(x, pool_a, index_a, pool_b, index_b, 0.5, workspace=ws, **stream)  # noqa: E731
    with pytest.raises(RuntimeError, match=CUDA_RUNTIME_ERROR):
        run()
    return given


OPS = ["assemble", "scatter_add", "forward"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("integer", [np.int64, np.int32, np.uint64])
def test_a_numpy_integer_stream_reaches_producers_as_a_python_int(op, integer):
    for producer in call(op, Problem(torch.float32), stream=integer(STREAM)):
        assert producer.streams == [STREAM]
        assert type(producer.streams[0]) is int


@pytest.mark.parametrize("op", OPS)
def test_without_a_stream_producers_are_told_the_legacy_default_stream(op):
    """The core then launches on the legacy default stream; a producer that is not told so would
    leave its pending writes unordered with the launch."""
    for producer in call(op, Problem(torch.float32)):
        assert producer.streams == [LEGACY_DEFAULT_STREAM]



def test_the_binding_without_a_stream_tells_producers_the_legacy_default_stream():
    """mos._C called directly with stream=None launches on the legacy default stream, and says so
    to every CUDA producer, as mos.functional does."""
    from mos import _C

    p = Problem(torch.float32)
    pool_a, index_a = CudaLabelled(p.pool_a), CudaLabelled(p.index_a)
    out = CudaLabelled(p.pool_a.new_zeros((p.index_a.shape[0], p.pool_a.shape[1])))
    with pytest.raises(RuntimeError, match=CUDA_RUNTIME_ERROR):
        _C.assemble(out, pool_a, index_a)
    for producer in (out, pool_a, index_a):
        assert producer.streams == [LEGACY_DEFAULT_STREAM]
