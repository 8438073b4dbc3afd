"""Linear attention on sequence shards (``meshsp.linear``) and whole-row grid shards with halo convs
(``meshsp.grid``), on gloo ranks started once per session: each against the single-device result,
with the bytes each SP axis carried checked against theory."""

import pytest

import linear_tasks

LAYOUTS = {"U2": (1, 2), "R2": (2, 1), "U2xR2": (2, 2), "U4": (1, 4), "R4": (4, 1)}


def _world(layout: str) -> int:
    ring, ulysses = LAYOUTS[layout]
    return ring * ulysses


@pytest.mark.parametrize("kind", ["float64", "sana", "video"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_linear_attention_equals_single_device_and_sends_its_state_once_per_axis(pools, kind, layout):
    ring, ulysses = LAYOUTS[layout]
    world = ring * ulysses
    # 7 tokens: uneven shards (4 + 3; 2 + 2 + 2 + 1); 8 per rank: the head dim equals the local tokens,
    # so only the taint of the all-reduced state tells the read-out matmul from the state matmul
    for tokens in (7, 8 * world):
        results = pools(world).run(linear_tasks.linear_attention, kind, ring, ulysses, tokens, timeout=120)
        assert sum(r["local_tokens"] for r in results) == tokens
        calls = 1 if kind == "sana" else 2  # the key sum rides in the state's last row, or comes apart
        for r in results:
            expected = {f"linear_{axis}": r["theory"] for axis, size in (("ulysses", ulysses), ("ring", ring)) if size > 1}
            assert r["bytes"] == expected, (tokens, r)
            assert r["calls"] == {k: calls for k in expected}, (tokens, r)


def test_an_empty_shard_still_joins_the_all_reduce(pools):
    """3 tokens on 4 ranks: the last holds none, adds zeros, and every rank gets the whole sums."""
    results = pools(4).run(linear_tasks.linear_attention, "float64", 2, 2, 3, timeout=120)
    assert [r["local_tokens"] for r in results] == [1, 1, 1, 0]
    assert all(r["bytes"] == {"linear_ulysses": r["theory"], "linear_ring": r["theory"]} for r in results)


def test_softmax_attention_under_the_linear_style_is_refused_on_every_rank(pools):
    msgs = pools(2).run(linear_tasks.raises, "not_linear", 1, 2, timeout=120)
    assert len(set(msgs)) == 1 and "made no token reduction" in msgs[0], msgs


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
@pytest.mark.parametrize("layout", ["U2", "R2", "U2xR2", "U4"])
def test_halo_conv_over_whole_rows_is_exact(pools, kind, layout):
    ring, ulysses = LAYOUTS[layout]
    for rows in (5, 9):  # uneven: 3 + 2, 2 + 1 + 1 + 1, ...
        results = pools(ring * ulysses).run(linear_tasks.halo_conv, ring, ulysses, rows, kind, timeout=120)
        assert all(r["bytes"] == {"grid_halo": r["theory"]} for r in results), results


SANA = ["SanaTransformer2DModel", "SanaVideoTransformer3DModel"]


@pytest.mark.parametrize("layout", ["U2", "R2", "U2xR2"])
@pytest.mark.parametrize("cls", SANA)
def test_sana_models_equal_single_device_with_bytes_of_theory(pools, cls, layout):
    ring, ulysses = LAYOUTS[layout]
    results = pools(ring * ulysses).run(linear_tasks.model_forward, cls, ring, ulysses, timeout=180)
    # tiny configs: 2 blocks, batch 2, 3 heads of 16; state + key sum in float32 per block and axis
    theory = 2 * 2 * 3 * 16 * 17 * 4
    for r in results:
        assert r["diff"] <= 1e-5 * max(r["scale"], 1.0), r
        for axis, size in (("ulysses", ulysses), ("ring", ring)):
            assert r["bytes"].get(f"linear_{axis}", 0) == (theory if size > 1 else 0), r
        assert r["bytes"]["grid_halo"] > 0 and "all_to_all" not in r["bytes"] and "p2p" not in r["bytes"], r


def test_sana_video_per_token_timestep_is_sliced_with_the_frames(pools):
    results = pools(2).run(linear_tasks.model_forward, SANA[1], 1, 2, None, None, True, timeout=180)
    assert all(r["diff"] <= 1e-5 * max(r["scale"], 1.0) for r in results), results


@pytest.mark.parametrize("drop", ["transformer_blocks.*.attn1", "halo"])
@pytest.mark.parametrize("cls", SANA)
def test_a_plan_without_the_sums_or_the_halo_is_wrong(pools, cls, drop):
    """Both parts matter: without the all-reduced sums, or without the halo rows, the output differs."""
    from meshsp.plans import load_plan

    plan = load_plan(cls).to_dict()
    key = drop if drop != "halo" else next(k for k in plan["plan"] if k.endswith((".conv_depth", ".conv_temp")))
    del plan["plan"][key]
    results = pools(2).run(linear_tasks.model_forward, cls, 2, 1, plan, timeout=180)
    assert max(r["diff"] for r in results) > 1e-3 * max(results[0]["scale"], 1.0), results


@pytest.mark.parametrize("cls, grid, what", [(SANA[0], dict(h=3, w=5, frames=1, txt=7, batch=2, text_pad=2), "rows"),
                                             (SANA[1], dict(h=3, w=5, frames=2, txt=7, batch=2, text_pad=2), "frames")])
def test_a_grid_with_fewer_rows_than_ranks_is_refused_on_every_rank(pools, cls, grid, what):
    msgs = pools(4).run(linear_tasks.raises, "too_few_rows", cls, 2, 2, grid, timeout=180)
    assert len(set(msgs)) == 1, msgs
    assert f"fewer than the 4 sequence-parallel ranks" in msgs[0] and f"whole {what}" in msgs[0], msgs[0]
    assert "Use at most" in msgs[0], msgs[0]


@pytest.mark.parametrize("cls", SANA)
def test_sana_plans_round_trip_through_yaml(cls):
    import yaml

    from meshsp.plans import Plan, get_plan
    from meshsp.zoo import build

    model = build(cls, heads=3)
    plan = get_plan(model)
    assert plan.source == "shipped"
    again = Plan.from_dict(yaml.safe_load(plan.to_yaml()))
    again.validate(model)
    assert again.to_dict() == plan.to_dict()


@pytest.mark.parametrize("entry, text", [
    ({"style": "ParallelLinearAttention", "inputs": {"x": 1}}, "ParallelLinearAttention takes no inputs"),
    ({"style": "GridHalo", "outputs": {0: 1}}, "GridHalo takes no inputs"),
    ({"style": "ShardGridOutputs", "inputs": {"latent": 2}, "outputs": {0: 1}}, "a list of argument names"),
    ({"style": "ShardGrid", "inputs": {"x": {"dim": 2, "flatten": True}}}, "take 'dim' and 'ndim' only"),
])
def test_linear_plan_entry_errors(entry, text):
    from meshsp.plans import Plan

    with pytest.raises(ValueError, match=text):
        Plan.from_dict({"plan": {"x": entry}})
