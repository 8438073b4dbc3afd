"""Property-based parity: generated shapes, degrees, modes and masks vs single-device attention."""

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rank_tasks
from meshsp.ops.ulysses import head_chunks
from meshsp.placements import HeadSplit, SeqLayout

DEGREES = [(1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (4, 1), (2, 2)]  # (ring, ulysses), world <= 4
LENGTHS = st.one_of(st.sampled_from([1, 2, 3, 5, 7, 11, 13, 17, 31, 37, 61]), st.integers(1, 72))
STATS: collections.Counter = collections.Counter()


@st.composite
def cases(draw):
    ring, ulysses = draw(st.sampled_from(DEGREES))
    kv_heads = draw(st.sampled_from([1, 2, 3, 5, 7]))
    heads = kv_heads * draw(st.integers(1, 3))
    sq = draw(LENGTHS)
    skv = draw(st.one_of(st.just(sq), LENGTHS))
    density = draw(st.sampled_from([None, 0.1, 0.5, 0.9, 1.0]))
    strict_ok = (heads % ulysses == 0 and kv_heads % ulysses == 0 and all(
        len(set(row)) == 1 for n in (sq, skv) for row in SeqLayout.from_global(n, ring=ring, ulysses=ulysses).lens))
    mode = draw(st.sampled_from(["strict", "advanced_uaa"])) if strict_ok else "advanced_uaa"
    return dict(ring=ring, ulysses=ulysses, mode=mode, B=draw(st.integers(1, 3)), H=heads, Hk=kv_heads,
                D=draw(st.sampled_from([1, 3, 7, 8, 16, 33, 64])), Sq=sq, Skv=skv,
                mask=density is not None, density=density or 0.5, seed=draw(st.integers(0, 2**16)),
                pipeline=draw(st.booleans()))


@settings(max_examples=220, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_generated_cases_match_single_device(pools, case):
    world = case["ring"] * case["ulysses"]
    errors = pools(world).run(rank_tasks.dtensor_parity, [case], timeout=60)  # asserts on every rank
    STATS["cases"] += 1
    STATS[f"R{case['ring']}xU{case['ulysses']}"] += 1
    STATS[case["mode"]] += 1
    STATS["masked"] += case["mask"]
    STATS["uneven heads"] += case["H"] % case["ulysses"] != 0
    STATS["empty shards"] += min(case["Sq"], case["Skv"]) < world
    STATS["gqa"] += case["H"] != case["Hk"]
    # the pipelined exchange really ran: Ulysses alone, and a head split that yields several chunks
    STATS["pipelined"] += (case["pipeline"] and case["ring"] == 1
                           and len(head_chunks(HeadSplit(case["H"], case["Hk"], case["ulysses"]))) > 1)
    STATS["max error"] = max(STATS["max error"], max(e for errs in errors for e in errs) * 1e15)


def test_fuzz_ran_enough_cases():
    print("fuzz statistics:", dict(STATS), "(max error in units of 1e-15)")
    if STATS["cases"] == 0:
        pytest.fail("the generated-case test did not run first")
    assert STATS["cases"] >= 200
    assert all(STATS[f"R{r}xU{u}"] > 0 for r, u in DEGREES)
    assert STATS["strict"] > 0 and STATS["advanced_uaa"] > 0 and STATS["masked"] > 0
    assert all(STATS[k] > 0 for k in ("uneven heads", "empty shards", "gqa", "pipelined")), dict(STATS)
    assert STATS["max error"] < 1000  # 1e-12 in float64
