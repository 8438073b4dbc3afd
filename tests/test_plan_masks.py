"""Plans whose attention takes one mask over the whole sequence (Ideogram 4, OmniGen, Qwen-Image 2.1):
the runs a processor loops over become a SegmentMask of the same rule, YAML keys, refused inputs.
Each class's parity at U2, R2, U2xR2 is in tests/test_coverage.py."""

import pytest
import torch
import torch.nn.functional as F
import yaml

import plan_mask_tasks
from meshsp.attention_masks import SegmentRuns
from meshsp.plans import Plan, load_plan
from meshsp.refuse import RefuseInputs
from meshsp.styles import ParallelAttention

RUNS = SegmentRuns(runs="segments", key_valid="key_valid", mask="attention_mask", length="blocks.0:hidden_states")
MASK_PLANS = ["Ideogram4Transformer2DModel", "OmniGenTransformer2DModel", "QwenImage21Transformer2DModel"]


def _loop_over_runs(q, k, v, runs, key_valid):
    """Qwen-Image 2.1's processor (its prefill path): one SDPA per run at global indices, then the rest."""
    prefix, out = runs[-1][1] if runs else 0, []
    for start, end, causal in runs:
        mask = None
        if causal:
            n = end - start
            mask = torch.cat([torch.ones(n, start, dtype=torch.bool), torch.ones(n, n, dtype=torch.bool).tril()], 1)[None, None]
        if key_valid is not None:
            mask = key_valid[:, None, None, :end] if mask is None else mask & key_valid[:, None, None, :end]
        out.append(F.scaled_dot_product_attention(q[:, :, start:end], k[:, :, :end], v[:, :, :end], attn_mask=mask))
    rest = None if key_valid is None else key_valid[:, None, None, :]
    out.append(F.scaled_dot_product_attention(q[:, :, prefix:], k, v, attn_mask=rest))
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("runs,total,padded", [
    ([(0, 4, True), (0 + 4, 7, False), (7, 9, True)], 14, True),   # text, image, text, then the target
    ([(0, 5, True)], 5, False),                                    # a prefix only, no tail
    ([(0, 3, False), (3, 6, False)], 10, True),                    # two images side by side stay two blocks
    ([], 6, True),                                                 # no runs: everything attends everything
])
def test_runs_become_a_segment_mask_of_the_same_rule(runs, total, padded):
    g = torch.Generator().manual_seed(total)
    q, k, v = (torch.randn(2, 3, total, 8, generator=g, dtype=torch.float64) for _ in range(3))
    key_valid = None
    if padded:
        key_valid = torch.rand(2, total, generator=g) > 0.3
        key_valid[:, 0] = True  # the model's prompts are right-padded: the first token is valid
    mask = RUNS.segment_mask(runs, key_valid, total, "test")
    expected = _loop_over_runs(q, k, v, runs, key_valid)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense()), expected)


@pytest.mark.parametrize("runs,key_valid,text", [
    ([(0, 3, True), (4, 6, False)], None, "consecutive non-empty runs"),
    ([(1, 3, True)], None, "consecutive non-empty runs"),
    ([(0, 12, True)], None, "covers 12 tokens but 'blocks.0:hidden_states' has 10"),
    ([(0, 3, True)], torch.ones(2, 5, dtype=torch.bool), r"boolean \[B, 10\] over the whole sequence"),
])
def test_bad_runs_are_refused(runs, key_valid, text):
    with pytest.raises(ValueError, match=text):
        RUNS.segment_mask(runs, key_valid, 10, "test")


def test_parallel_attention_runs_need_global_masks_and_names():
    with pytest.raises(ValueError, match="declare masks='global'"):
        ParallelAttention(runs=RUNS)
    with pytest.raises(ValueError, match="'runs', 'mask' and 'length'"):
        ParallelAttention(masks="global", runs={"runs": "segments"})
    with pytest.raises(ValueError, match="takes only"):
        Plan.from_dict({"plan": {"x": {"style": "GatherSequence", "masks": "global"}}})


@pytest.mark.parametrize("cls", MASK_PLANS)
def test_mask_plans_round_trip_through_yaml(cls):
    plan = load_plan(cls)
    again = Plan.from_dict(yaml.safe_load(plan.to_yaml()))
    assert again.to_dict() == plan.to_dict()
    attention = [s for s in plan.values() if isinstance(s, ParallelAttention)]
    assert attention and all(s.masks == "global" for s in attention)


def test_refuse_inputs_names_the_argument_and_why():
    class Block(torch.nn.Module):
        def forward(self, x, cache=None):
            return x

    with pytest.raises(ValueError, match=r"has no argument\(s\) \['cach'\]"):
        RefuseInputs({"cach": "why"})._apply(Block(), None)
    block = RefuseInputs({"cache": "it holds global slices"})._apply(Block(), None)
    assert block(torch.ones(1)).item() == 1 and block(torch.ones(1), None).item() == 1
    for call in (lambda: block(torch.ones(1), cache=[1]), lambda: block(torch.ones(1), [1])):
        with pytest.raises(ValueError, match="called with cache=.*it holds global slices.*cache=None"):
            call()


@pytest.mark.parametrize("ring,ulysses", [(1, 2), (2, 1)], ids=["U2", "R2"])
def test_ideogram4_per_token_timestep(pools, ring, ulysses):
    assert len(pools(2).run(plan_mask_tasks.ideogram4_per_token_timestep, ring, ulysses)) == 2


@pytest.mark.parametrize("case,text", [
    ("kv_cache", "called with kv_cache=QwenImage21KVCache.*prefix KV cache"),
    ("flex", "'segments' is None"),
])
def test_qwen21_modes_the_plan_cannot_run_are_refused_on_every_rank(pools, case, text):
    msgs = pools(2).run(plan_mask_tasks.qwen21_refusal, case, timeout=120)
    assert len(set(msgs)) == 1, msgs
    assert __import__("re").search(text, msgs[0]), msgs[0]
