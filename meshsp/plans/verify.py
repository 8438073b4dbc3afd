"""A plan checked on real ranks: the parallel forward of a tiny instance equals the single-device one.

``verify(cls, plan)`` spawns gloo ranks (``meshsp.launch.WorkerPool``) for each layout and runs
``parity`` on every rank: the tiny random-weight instance of ``cls`` (``meshsp.zoo``) with and
without the plan (applied through torch's ``parallelize_module``), on an odd token grid, batch 2,
padded text. A layout is ``(ring, ulysses)`` or ``(ring, ulysses, tp)``; with ``tp > 1`` the plan's
``tp`` section runs too, and parity also checks that the parameters were sharded and that TP's
all-reduces ran. ``meshsp plan --infer`` and the coverage tests use it.
"""

from __future__ import annotations

import torch

__all__ = ["compare", "compare_gradients", "gradient_parity", "local_bytes", "parity", "verify"]

LAYOUTS = ((1, 2), (2, 1), (2, 2))  # (ring, ulysses): U2, R2, U2xR2


def grid_for(cls: str) -> dict:
    from meshsp.zoo import ZOO

    entry = ZOO[cls]
    grid = dict(h=3, w=5, frames=2 if entry.video else 1, txt=7, batch=2, text_pad=2 if entry.text_mask else 0)
    return {**grid, **entry.grid}


def local_bytes(model: torch.nn.Module) -> int:
    """The bytes of parameters and buffers this rank holds (a DTensor's local shard)."""
    from torch.distributed.tensor import DTensor

    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in [*model.parameters(), *model.buffers()])


def compare(build, forward, apply, *, where: str, ring: int, ulysses: int, tp: int = 1, tol: float = 1e-5,
            whole_tokens=False) -> dict:
    """The check every parity run makes on one rank: ``forward(model)`` of a model from ``build()``
    (seeded: the same weights each time) before and after ``apply(model)`` parallelizes a fresh one.
    Raises unless the outputs agree within ``tol`` of the output scale and the parallel forward
    communicated as the ``ring x ulysses x tp`` layout says (an untouched model would match too),
    and unless tensor parallelism (only) left this rank less than the whole model. With
    ``whole_tokens`` (a plan whose attention runs on gathered inputs: ``WholeTokens``; a bool, or a
    callable asked after ``apply``) the SP
    communication expected is all-gathers instead of all-to-alls and ring passes. Returns the max
    difference, the scale, the calls and bytes sent, the parallel model and its bytes.

    Example::

        compare(lambda: build(cls, heads=3), lambda m: output_of(m, m(**inputs)),
                lambda m: parallelize_module(m, mesh, plan), where=cls, ring=1, ulysses=2)
    """
    from meshsp.ops import record_comm

    reference = build()
    with torch.no_grad():
        expected = forward(reference)
    model = build()  # fresh: some forwards fill buffers lazily
    full = local_bytes(model)
    apply(model)
    mine = local_bytes(model)
    with torch.no_grad(), record_comm() as stats:
        out = forward(model)
    scale = expected.abs().max().item()
    torch.testing.assert_close(out, expected, atol=tol * max(scale, 1.0), rtol=tol, msg=lambda m: f"{where}: {m}")
    calls = stats.calls
    # softmax attention moves tokens (all-to-all, ring P2P); linear attention all-reduces its token
    # sums on each axis (meshsp.linear); whole-token attention all-gathers (meshsp.whole_tokens)
    whole_tokens = whole_tokens() if callable(whole_tokens) else whole_tokens
    ulysses_ran = calls["all_to_all"] + calls["linear_ulysses"] > 0
    ring_ran = calls["p2p"] + calls["linear_ring"] > 0
    sp_ran = ((calls["all_gather"] > 0) == (ring * ulysses > 1) if whole_tokens
              else ulysses_ran == (ulysses > 1) and ring_ran == (ring > 1))
    communicated = sp_ran and (calls["tp_all_reduce"] > 0) == (tp > 1)
    assert communicated, f"{where}: the forward did not run as the layout says: {dict(calls)}"
    assert (mine < full) == (tp > 1), f"{where}: {mine} of {full} parameter and buffer bytes on this rank"
    return {"diff": (out - expected).abs().max().item(), "scale": scale, "calls": dict(calls),
            "bytes": dict(stats.bytes_sent), "model": model, "param_bytes": mine, "full_param_bytes": full}


def _gradients(model: torch.nn.Module, like: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Every parameter's gradient as this rank holds it (a tp-sharded one: its local part; none:
    zeros); with ``like`` (whole gradients by name), the parts of those this rank holds instead."""
    from torch.distributed.tensor import DTensor

    from meshsp.tp import tp_slice

    out = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            if like is not None:
                part = tp_slice(module, name)
                out[key] = like[key] if part is None else part[0].take(like[key], part[1])
                continue
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            out[key] = g.to_local() if isinstance(g, DTensor) else g
    return out


def compare_gradients(build, forward, apply, *, mesh, where: str, tol: float = 1e-9) -> dict:
    """The backward check every gradient-parity run makes on one rank: the loss ``sum(out * w)`` of
    ``forward(model)`` (``w`` seeded, the same on every rank) backpropagated through a model from
    ``build()`` and through a fresh one parallelized by ``apply(model)`` on ``mesh``. Every rank
    computes the whole loss; under meshsp's convention (``meshsp.ops.adjoint``) each parameter's
    gradient summed over the SP ranks is ``sp`` times the single-device one, which is what FSDP's
    mean over the data x sequence ranks relies on. Raises unless that holds for every parameter
    within ``tol`` of the gradients' scale. Returns the largest difference, the scale, the number of
    parameters and the forward and backward communication.

    Example::

        compare_gradients(lambda: build(cls).double(), lambda m: output_of(m, m(**inputs)),
                          lambda m: parallelize(m, mesh, get_plan(m)), mesh=mesh, where=cls)
    """
    import torch.distributed as dist

    from meshsp.ops import record_comm
    from meshsp.styles import SPMesh

    reference = build()
    out = forward(reference)
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(out.dtype)
    (out * weight).sum().backward()
    whole = _gradients(reference)
    model = build()
    apply(model)
    with record_comm() as stats:
        parallel_out = forward(model)
        (parallel_out * weight).sum().backward()
    torch.testing.assert_close(parallel_out.detach(), out.detach(), msg=lambda m: f"{where} forward: {m}")
    sp = SPMesh(mesh)
    mine = _gradients(model)
    names = list(mine)
    expected = torch.cat([g.reshape(-1) for g in _gradients(model, like=whole).values()])
    got = torch.cat([mine[n].reshape(-1) for n in names])
    for group in (sp.ulysses_group, sp.ring_group):
        if group is not None:
            dist.all_reduce(got, group=group)
    got = got / (sp.ring * sp.ulysses)
    scale = expected.abs().max().item()
    diff = (got - expected).abs()
    if not bool((diff <= tol * max(scale, 1.0)).all()):
        per_param = [d.max().item() if d.numel() else 0.0 for d in diff.split([mine[n].numel() for n in names])]
        worst = sorted(range(len(names)), key=lambda i: -per_param[i])[:3]
        raise AssertionError(f"{where}: parameter gradients differ from one device's: largest "
                             f"{diff.max().item():.3e} (scale {scale:.3e}), worst parameters "
                             f"{[(names[i], f'{per_param[i]:.1e}') for i in worst]}; "
                             f"the outputs differ by {(parallel_out - out).abs().max().item():.3e}")
    return {"diff": diff.max().item(), "scale": scale, "params": len(names),
            "forward_diff": (parallel_out - out).abs().max().item(), "calls": dict(stats.calls),
            "bytes": dict(stats.bytes_sent)}


def gradient_parity(cls: str, ring: int, ulysses: int, *, tp: int = 1, mode: str = "advanced_uaa",
                    heads: int | None = 3, grid: dict | None = None, tol: float = 1e-9) -> dict:
    """On one rank: every parameter's gradient of tiny ``cls`` in float64 with its plan on a
    ring x ulysses x tp mesh against one device's (``compare_gradients``).

    Example::

        pool.run(gradient_parity, "FluxTransformer2DModel", 1, 2)   # on 2 gloo ranks
    """
    from meshsp.bench import sp_mesh
    from meshsp.plans import get_plan, parallelize
    from meshsp.zoo import build, inputs_for, output_of

    grid = grid or grid_for(cls)
    mesh = sp_mesh(ring, ulysses, tp)

    def double(v):
        if isinstance(v, dict):
            return {k: double(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return type(v)(double(x) for x in v)
        return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v

    def forward(model):
        return output_of(model, model(**{k: double(v) for k, v in inputs_for(model, **grid).items()}))

    return compare_gradients(lambda: build(cls, heads=heads).double(), forward,
                             lambda m: parallelize(m, mesh, get_plan(m, ulysses_mode=mode)), mesh=mesh,
                             where=f"{cls} gradients R{ring}xU{ulysses}xTP{tp} {mode} {grid}", tol=tol)


def parity(cls: str, ring: int, ulysses: int, plan_dict: dict | None = None, *, tp: int = 1,
           mode: str = "advanced_uaa", heads: int | None = 3, grid: dict | None = None, tol: float = 1e-5) -> dict:
    """On one rank: single-device vs parallel output of tiny ``cls`` (plan: ``plan_dict`` or
    ``get_plan``) on a ring x ulysses x tp mesh (``compare``). Returns the max difference, the
    output scale, this rank's share of the attention's query tokens (1.0 without SP) and of the
    parameter and buffer bytes.

    Example::

        pool.run(parity, "PixArtTransformer2DModel", 1, 2, tp=2, heads=4)   # on 4 gloo ranks
    """
    from torch.distributed.tensor.parallel import parallelize_module

    from meshsp.bench import sp_mesh
    from meshsp.plans import Plan, get_plan
    from meshsp.zoo import build, inputs_for, output_of

    grid = grid or grid_for(cls)
    plans = []

    def apply(model):
        plans.append(Plan.from_dict(plan_dict, ulysses_mode=mode) if plan_dict else get_plan(model, ulysses_mode=mode))
        parallelize_module(model, sp_mesh(ring, ulysses, tp), plans[0])

    from meshsp.whole_tokens import WholeTokens

    whole = lambda: any(isinstance(style, WholeTokens) for style in plans[0].values())  # noqa: E731 - after apply
    result = compare(lambda: build(cls, heads=heads), lambda m: output_of(m, m(**inputs_for(m, **grid))), apply,
                     where=f"{cls} R{ring}xU{ulysses}xTP{tp} {mode} {grid}", ring=ring, ulysses=ulysses, tp=tp, tol=tol,
                     whole_tokens=whole)
    local, total = plans[0].state.attention_tokens
    return {"diff": result["diff"], "scale": result["scale"], "share": local / total if total else 1.0,
            "param_share": result["param_bytes"] / result["full_param_bytes"]}


def verify(cls: str, plan, layouts=LAYOUTS, timeout: float = 300.0, **kwargs) -> list[str]:
    """Run ``parity`` for each ``(ring, ulysses)`` or ``(ring, ulysses, tp)`` layout on spawned gloo
    ranks (one pool per world size); one line per layout. ``kwargs`` go to ``parity`` (``heads``, ``mode``, ...).

    Example::

        verify("PixArtTransformer2DModel", plan, layouts=[(1, 2), (1, 1, 2)], heads=4)
    """
    import contextlib

    from meshsp.launch import WorkerPool

    lines = []
    with contextlib.ExitStack() as stack:
        pools: dict[int, WorkerPool] = {}
        for layout in layouts:
            ring, ulysses, tp = (*layout, 1) if len(layout) == 2 else layout
            world = ring * ulysses * tp
            if world not in pools:
                pools[world] = stack.enter_context(WorkerPool(world))
            results = pools[world].run(parity, cls, ring, ulysses, plan.to_dict(), tp=tp, timeout=timeout, **kwargs)
            diff = max(r["diff"] for r in results)
            name = f"R{ring}xU{ulysses}" + (f"xTP{tp}" if tp > 1 else "")
            line = (f"{name}: equal to the single-device output (max diff {diff:.1e}, output scale "
                    f"{results[0]['scale']:.2f}); attention shares per rank {[round(r['share'], 2) for r in results]}")
            if tp > 1:
                line += f"; parameter and buffer bytes per rank {results[0]['param_share']:.2f} of the model's"
            lines.append(line)
    return lines
