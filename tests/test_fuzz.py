"""The standing fuzz of every mos.functional and mos._C entry point (mos/testing/fuzz_cases.py), run in
a child process: valid calls must match the float64 reference, invalid ones must raise a
TypeError, ValueError or BufferError naming the argument and leave every array as it was, and a
crash fails this test. benchmarks/fuzz.py runs the same cases at scale."""
import os

import mos.testing.fuzz_cases as fc
from child import TESTS_DIR, run_child


def test_fuzz_every_entry_point_in_a_child_process():
    script = os.path.join(TESTS_DIR, "fuzz_entry_points.py")
    out = run_child(f"""
import sys, pytest
sys.exit(pytest.main(["-q", "-x", "-p", "no:cacheprovider", {script!r}]))
""", timeout=900)
    assert "1 passed" in out, out


def test_the_cases_reach_every_entry_point_and_every_kind_of_defect():
    # The draw covers what it claims: each entry point, valid and defective, and each defect kind.
    entries, kinds = set(), set()
    for seed in range(3000):
        case = fc.draw_case(fc.RandomDraw(seed))
        entries.add((case.entry, bool(case.defect)))
        kinds.add(case.defect.split()[0] if case.defect else "valid")
        if any(type(v).__module__ == "torch" for v in case.kwargs.values()):
            kinds.add("torch")
    if fc.torch is not None:
        assert "torch" in kinds
    assert {e for e, _ in entries} == set(fc.ENTRY_POINTS)
    assert all((e, True) in entries for e in fc.ENTRY_POINTS)
    assert kinds >= {"valid", "type", "none", "ndim", "dtype", "strided", "readonly", "shape", "range",
                     "repeat", "value", "columns", "missing", "keyword", "overlap", "dlpack", "size"}


def test_the_oracle_catches_a_wrong_result_and_an_unnamed_error():
    # The fuzz can fail: a result off by one element, and an error that names another argument.
    cases = (fc.draw_case(fc.RandomDraw(seed), valid_share=1.0) for seed in range(10_000))
    case = next(c for c in cases if c.entry == "_C.linear_forward" and c.kwargs["x"].shape[0] > 0)
    expect = case.expect
    case.expect = lambda result, kwargs: expect(result, dict(kwargs, y=kwargs["y"] + 1))
    assert fc.run_case(case).kind == "wrong"
    bad = fc.Case(case.entry, case.function, dict(case.kwargs, scale="1"), defect="type x", names=("x",))
    assert fc.run_case(bad).kind == "unclear"
