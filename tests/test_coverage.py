"""Coverage of every transformer class diffusers exports: shipped, converted, inferred or refused.

Each class with a plan runs at toy width on gloo ranks in U2, R2 and U2xR2 (``advanced_uaa``, odd
token grid and text length, batch 2, 3 heads), through torch's own ``parallelize_module``, and must
equal the single-device output with its attention run on about 1/P of the query tokens. Each
refused class must be refused with a ``ValueError`` that says why.
"""

import pytest

from meshsp.plans import get_plan
from meshsp.plans.coverage import coverage
from meshsp.plans.verify import parity
from meshsp.zoo import NOT_DIT, ZOO, build

TABLE = coverage()
COVERED = sorted(c for c, row in TABLE.items() if row.status != "refused")
REFUSED = sorted(c for c, row in TABLE.items() if row.status == "refused" and c not in NOT_DIT)
LAYOUTS = {"U2": (2, 1, 2), "R2": (2, 2, 1), "U2xR2": (4, 2, 2)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cls", COVERED)
def test_covered_class_parity(pools, cls, layout):
    world, ring, ulysses = LAYOUTS[layout]
    results = pools(world).run(parity, cls, ring, ulysses)
    shares = [res["share"] for res in results]
    # Every query token attended on exactly one rank; no rank did more than 1.5x its part (uneven
    # shards of a 15-token image and a 7-token text).
    assert abs(sum(shares) - 1.0) < 1e-9 and max(shares) <= 1.5 / world, shares


@pytest.mark.parametrize("cls", REFUSED)
def test_refused_class_says_why(cls):
    with pytest.raises(ValueError, match=f"no meshsp plan for {cls}: .*(inference|_cp_plan|tiny config)"):
        get_plan(build(cls) if cls in ZOO else None)


def test_coverage_goal():
    """At least 58 of the 62 diffusion transformers (the 65 exports less 3 that are not DiTs)."""
    dits = [c for c in TABLE if c not in NOT_DIT]
    assert len(dits) == 62, len(dits)
    assert len(COVERED) >= 58, (len(COVERED), REFUSED)


@pytest.mark.parametrize("cls", ["FluxTransformer2DModel", "CogView4Transformer2DModel"])
def test_a_sequence_shorter_than_the_ranks_is_refused_on_every_rank(pools, cls):
    """Model code that cannot run on an empty shard would fail on one rank and hang the others."""
    import rank_tasks

    msgs = pools(4).run(rank_tasks.raises, "short_sequence", cls, timeout=120)
    assert len(set(msgs)) == 1 and "would hold none" in msgs[0], msgs


EMPTY_OK = ["CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel", "SD3Transformer2DModel",
            "WanTransformer3DModel", "ZImageTransformer2DModel"]


@pytest.mark.parametrize("layout", [(1, 4), (4, 1), (2, 2)], ids=["U4", "R4", "U2xR2"])
@pytest.mark.parametrize("cls", EMPTY_OK)
def test_plans_that_declare_empty_shards_run_on_them(pools, cls, layout):
    from meshsp.plans import load_plan

    assert load_plan(cls).state.empty_shards
    assert len(pools(4).run(__import__("rank_tasks").empty_shard_parity, cls, *layout, timeout=120)) == 4
