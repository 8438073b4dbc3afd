"""Property-based gradient parity: generated shapes, degrees (U2..U4, R2..R4, U2xR2), modes, key
padding and causal layouts — every rank's q, k, v gradients vs single-device SDPA's, float64."""

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import grad_tasks
from test_fuzz import cases

STATS: collections.Counter = collections.Counter()


@st.composite
def grad_cases(draw):
    case = draw(cases())
    kind = "pad" if case["mask"] else "none"
    if draw(st.booleans()):  # causal self-attention, contiguous or zigzag
        kind, case["Skv"] = "causal", case["Sq"]
        case["balance"] = draw(st.sampled_from(["zigzag", "contiguous"]))
    return dict(case, kind=kind, mask=False)


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=grad_cases())
def test_generated_gradient_cases_match_single_device(pools, case):
    world = case["ring"] * case["ulysses"]
    results = pools(world).run(grad_tasks.grad_parity, [case], timeout=60)  # asserts on every rank
    STATS["cases"] += 1
    STATS[f"R{case['ring']}xU{case['ulysses']}"] += 1
    STATS[case["kind"] + ("-" + case["balance"] if case["kind"] == "causal" else "")] += 1
    STATS["uneven heads"] += case["H"] % case["ulysses"] != 0
    STATS["empty shards"] += min(case["Sq"], case["Skv"]) < world
    STATS["max error"] = max(STATS["max error"], max(e for (r,) in results for e in r["errors"].values()) * 1e15)


def test_gradient_fuzz_ran_enough_cases():
    print("gradient fuzz statistics:", dict(STATS), "(max error in units of 1e-15)")
    if STATS["cases"] == 0:
        pytest.fail("the generated-case test did not run first")
    assert STATS["cases"] >= 60 and STATS["max error"] < 1e3  # every case within 1e-12 (asserted per case too)
    assert all(STATS[k] > 0 for k in ("R1xU4", "R4xU1", "R2xU2", "pad", "causal-zigzag", "uneven heads"))
