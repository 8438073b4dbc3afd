"""Rank-side checks of gradients through whole models (tests/test_model_grad.py)."""

from __future__ import annotations

from meshsp.plans.verify import gradient_parity

# Models whose own backward runs partly in float32 even as float64 models (Wan's ``.float()``
# around its norms and modulation; diffusers' RMSNorm, whose variance is float32 whatever the input):
# where a stream's tokens collect gradient from every rank's queries, the parallel sum rounds that
# path once per rank. The bound is float32's epsilon (of the gradients' scale); see docs/gradients.md.
FLOAT32_INSIDE = dict.fromkeys(["WanTransformer3DModel", "ZImageTransformer2DModel", "LTX2VideoTransformer3DModel",
                                "QwenImage21Transformer2DModel"], 1.2e-7)


def gradients(classes: list[str], ring: int, ulysses: int, tp: int = 1, heads: int = 3) -> dict[str, dict]:
    """``gradient_parity`` for several classes in one call: class -> its result (raises on a mismatch)."""
    return {cls: gradient_parity(cls, ring, ulysses, tp=tp, heads=heads, tol=FLOAT32_INSIDE.get(cls, 1e-9))
            for cls in classes}


def whole_query_gradients(ring: int, ulysses: int, cases: list[dict]) -> list[float]:
    """Whole queries over sharded keys (``replicated_query_attention``), float64: dq summed over
    the SP ranks and each rank's dk, dv are ``sp`` times one device's (every rank's loss counted);
    returns the largest error per case."""
    import torch
    import torch.distributed as dist

    from meshsp import SeqLayout
    from meshsp.ops.replicated import replicated_query_attention
    from rank_tasks import make_inputs, mesh_for, reference

    mesh = mesh_for(ring, ulysses)
    r, u = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    groups = (mesh["ulysses"].get_group() if ulysses > 1 else None, mesh["ring"].get_group() if ring > 1 else None)
    sp = ring * ulysses
    errors = []
    for case in cases:
        q, k, v, mask = make_inputs(case)
        w = torch.randn(q.shape[:3] + v.shape[3:], generator=torch.Generator().manual_seed(1), dtype=q.dtype)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        (reference(*leaves, mask) * w).sum().backward()
        layout = SeqLayout.from_global(k.shape[2], ring=ring, ulysses=ulysses)
        lo, n = layout.offset(r, u), layout.local(r, u)
        mine = [q.clone().requires_grad_(), k.narrow(2, lo, n).clone().requires_grad_(),
                v.narrow(2, lo, n).clone().requires_grad_()]
        out = replicated_query_attention(*mine, None if mask is None else mask.narrow(1, lo, n), groups=groups)
        (out * w).sum().backward()
        dq = mine[0].grad.clone()
        for group in groups:  # the sum over every SP rank
            if group is not None:
                dist.all_reduce(dq, group=group)
        got = [dq / sp, mine[1].grad / sp, mine[2].grad / sp]
        want = [leaves[0].grad, leaves[1].grad.narrow(2, lo, n), leaves[2].grad.narrow(2, lo, n)]
        for g, e in zip(got, want):
            torch.testing.assert_close(g, e, atol=1e-12, rtol=1e-12, msg=lambda m: f"{case}: {m}")
        errors.append(max((g - e).abs().max().item() if g.numel() else 0.0 for g, e in zip(got, want)))
    return errors


def refused_backward(cls: str, ring: int, ulysses: int) -> str:
    """The ValueError a forward with gradients raises where a plan's part has no backward."""
    import pytest
    import torch

    from meshsp.bench import sp_mesh
    from meshsp.plans import get_plan, parallelize
    from meshsp.plans.verify import grid_for
    from meshsp.zoo import build, inputs_for, output_of

    model = build(cls, heads=3)
    parallelize(model, sp_mesh(ring, ulysses), get_plan(model, ulysses_mode="advanced_uaa"))
    with torch.no_grad():
        output_of(model, model(**inputs_for(model, **grid_for(cls))))  # inference runs
    with pytest.raises(ValueError) as caught:
        output_of(model, model(**inputs_for(model, **grid_for(cls))))
    return str(caught.value)


def refused_flex_backward() -> str:
    """``flex_sp_attention`` on 2 ranks (Ulysses) with q requiring grad: the ValueError."""
    import pytest
    import torch

    from meshsp import SeqLayout
    from meshsp.ops.flex import flex_sp_attention
    from rank_tasks import mesh_for

    mesh = mesh_for(1, 2)
    layout = SeqLayout.from_global(8, ring=1, ulysses=2)
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    with torch.no_grad():
        flex_sp_attention(q, k, v, ring_group=None, ulysses_group=mesh["ulysses"].get_group(), q_layout=layout)
    with pytest.raises(ValueError) as caught:
        flex_sp_attention(q.requires_grad_(), k, v, ring_group=None, ulysses_group=mesh["ulysses"].get_group(),
                          q_layout=layout)
    return str(caught.value)
