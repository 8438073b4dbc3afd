"""ExpertChoiceTopK: expert-choice MoE routing over a sharded sequence equals the whole sequence's
(diffusers' NucleusMoE-Image layer, float64, on gloo ranks), ties included; the affinities are the
one thing gathered; a capacity rule that is not the model's is refused on every rank."""

import pytest
import torch

import moe_tasks
from meshsp.expert_choice import ExpertChoiceTopK, own_selection

CASES = [
    dict(B=2, S=13, D=8, E=4, cf=2.0),  # uneven shards; k = 7 of 13
    dict(B=2, S=13, D=8, E=4, cf=2.0, ties=True),  # every affinity equal: tie-breaking decides alone
    dict(B=1, S=11, D=8, E=2, cf=1.5, sigmoid=True),  # sigmoid scores; an expert takes 9 of 11 tokens
    dict(B=2, S=3, D=8, E=3, cf=1.0, seed=3),  # a 4-rank layout leaves one rank no token
]
DEGREES = [(2, 1, 2), (2, 2, 1), (4, 2, 2), (4, 1, 4)]


@pytest.mark.parametrize("world,ring,ulysses", DEGREES, ids=[f"R{r}xU{u}" for _, r, u in DEGREES])
def test_sharded_routing_equals_whole_sequence(pools, world, ring, ulysses):
    per_rank = pools(world).run(moe_tasks.moe_parity, ring, ulysses, CASES)
    for i, case in enumerate(CASES):
        results = [r[i] for r in per_rank]
        # One all-gather of the [B, E, s] affinities per routed layer, padded to the longest shard.
        per_rank_bytes = case["B"] * case["E"] * -(-case["S"] // world) * 8 * (world - 1)
        assert all(r["gather_bytes"] == per_rank_bytes and r["gathers"] == 1 for r in results), results
        # The same layer on a shard without the style picks other tokens (or cannot run): the check can fail.
        assert max(r["naive_diff"] for r in results) > 1e-3, results


def test_a_capacity_rule_that_is_not_the_models_is_refused_on_every_rank(pools):
    msgs = pools(2).run(moe_tasks.raises, "bad_capacity", 1, 2, timeout=120)
    assert len(set(msgs)) == 1 and "capacity rule" in msgs[0] and "k=" in msgs[0], msgs


def test_own_selection_keeps_top_k_order_and_pads_with_a_selected_token():
    values = torch.tensor([[[0.9, 0.8, 0.7, 0.6]], [[0.5, 0.4, 0.3, 0.2]]], dtype=torch.float64)
    indices = torch.tensor([[[5, 1, 4, 3]], [[0, 1, 2, 6]]])
    v, i, pad = own_selection(values, indices, 3, 3)  # this rank holds tokens 3, 4, 5
    assert i.tolist() == [[[2, 1, 0]], [[0, 0, 0]]] and pad.tolist() == [[[False] * 3], [[True] * 3]]
    assert v.tolist() == [[[0.9, 0.7, 0.6]], [[0.0, 0.0, 0.0]]]
    v, i, pad = own_selection(values, indices, 6, 2)  # tokens 6, 7: only batch 1 selected one
    assert i.tolist() == [[[0]], [[0]]] and pad.tolist() == [[[True]], [[False]]]


def test_capacity_needs_factor_and_experts():
    with pytest.raises(ValueError, match="needs 'factor' and 'experts'"):
        ExpertChoiceTopK({"factor": 2.0})
