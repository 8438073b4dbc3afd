"""A plan checked on real ranks: the parallel forward of a tiny instance equals the single-device one.

``verify(cls, plan)`` spawns gloo ranks (``meshsp.launch.WorkerPool``) for each layout and runs
``parity`` on every rank: the tiny random-weight instance of ``cls`` (``meshsp.zoo``) with and
without the plan (applied through torch's ``parallelize_module``), on an odd token grid, batch 2,
padded text. ``meshsp plan --infer`` and the coverage tests use it.
"""

from __future__ import annotations

import torch

__all__ = ["parity", "verify"]

LAYOUTS = ((1, 2), (2, 1), (2, 2))  # (ring, ulysses): U2, R2, U2xR2


def grid_for(cls: str) -> dict:
    from meshsp.zoo import ZOO

    entry = ZOO[cls]
    return dict(h=3, w=5, frames=2 if entry.video else 1, txt=7, batch=2, text_pad=2 if entry.text_mask else 0)


def parity(cls: str, ring: int, ulysses: int, plan_dict: dict | None = None, *, mode: str = "advanced_uaa",
           heads: int | None = 3, grid: dict | None = None, tol: float = 1e-5) -> dict:
    """On one rank: single-device vs parallel output of tiny ``cls`` (plan: ``plan_dict`` or
    ``get_plan``); raises if they differ or the forward did not communicate. Returns the max
    difference, the output scale and this rank's share of the attention's query tokens."""
    from torch.distributed.tensor.parallel import parallelize_module

    from meshsp.bench import sp_mesh
    from meshsp.ops import record_comm
    from meshsp.plans import Plan, get_plan
    from meshsp.zoo import build, inputs_for, output_of

    grid = grid or grid_for(cls)
    model = build(cls, heads=heads)
    with torch.no_grad():
        expected = output_of(model, model(**inputs_for(model, **grid)))
    plan = Plan.from_dict(plan_dict, ulysses_mode=mode) if plan_dict else get_plan(model, ulysses_mode=mode)
    parallelize_module(model, sp_mesh(ring, ulysses), plan)
    with torch.no_grad(), record_comm() as stats:
        out = output_of(model, model(**inputs_for(model, **grid)))
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, atol=tol * max(scale, 1.0), rtol=tol,
                               msg=lambda m: f"{cls} R{ring}xU{ulysses} {mode} {grid}: {m}")
    communicated = (stats.calls["all_to_all"] > 0) == (ulysses > 1) and (stats.calls["p2p"] > 0) == (ring > 1)
    assert communicated, f"{cls} R{ring}xU{ulysses}: the forward did not run sequence-parallel: {dict(stats.calls)}"
    local, total = plan.state.attention_tokens
    return {"diff": (out - expected).abs().max().item(), "scale": scale, "share": local / total}


def verify(cls: str, plan, layouts=LAYOUTS, timeout: float = 300.0) -> list[str]:
    """Run ``parity`` for each (ring, ulysses) layout on spawned gloo ranks; one line per layout."""
    from meshsp.launch import WorkerPool

    lines = []
    for ring, ulysses in layouts:
        with WorkerPool(ring * ulysses) as pool:
            results = pool.run(parity, cls, ring, ulysses, plan.to_dict(), timeout=timeout)
        diff = max(r["diff"] for r in results)
        lines.append(f"R{ring}xU{ulysses}: equal to the single-device output (max diff {diff:.1e}, output scale "
                     f"{results[0]['scale']:.2f}); attention shares per rank {[round(r['share'], 2) for r in results]}")
    return lines
