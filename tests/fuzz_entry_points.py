"""The differential fuzz of mos/testing/fuzz_cases.py under hypothesis. Not collected by the suite:
tests/test_fuzz.py runs it in a child process, so that a crash fails that test instead of
killing the run. MOS_FUZZ_EXAMPLES sets the number of cases (one call each)."""
import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mos.testing.fuzz_cases as fc

EXAMPLES = int(os.environ.get("MOS_FUZZ_EXAMPLES", "1500"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_every_entry_point_matches_the_reference_or_names_the_bad_argument(data):
    outcome = fc.run_case(fc.draw_case(fc.HypothesisDraw(data)))
    assert outcome.kind == "ok", fc.describe(outcome)
