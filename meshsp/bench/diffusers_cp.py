"""Time a forward of a tiny diffusers transformer under diffusers' *own* context parallelism.

This is the baseline to compare meshsp's sequence parallelism against: the model is parallelized
with ``model.enable_parallelism(config=ContextParallelConfig(...))`` (diffusers'
``_modeling_parallel.py`` / ``hooks/context_parallel.py``), which splits the sequence with the
model's ``_cp_plan`` hooks and runs attention through the ``native`` attention backend's
templated Ulysses / ring paths.

:func:`time_diffusers_cp` runs on every rank of an already-initialised process group (e.g. via
:class:`meshsp.launch.WorkerPool`); all ranks form one context-parallel group::

    with WorkerPool(2) as pool:
        per_rank = pool.run(time_diffusers_cp, "flux", 8, dict(h=16, w=16, txt=32), {}, 3, "ulysses")

CPU / gloo caveat: diffusers computes the rank's device as
``torch.device(accelerator_type, rank % torch.accelerator.device_count())``, which divides by zero
on a machine with no accelerator. While setting up and running the parallel model this module
therefore patches ``torch.accelerator.device_count`` to return 1 (scoped with
``unittest.mock.patch``; only where it would otherwise return 0, and only in the calling process).
The ``("ring", "ulysses")`` device mesh is the benchmarks' shared one (``meshsp.bench.sp_mesh``:
one per mesh shape for the life of the worker, so meshsp and diffusers run on the same groups),
passed as ``ContextParallelConfig(mesh=...)``. Forwards are called
with ``return_dict=False``: the split hook diffusers puts on the root module of flux and wan
rejects a ``Transformer2DModelOutput`` (diffusers' pipelines call their transformer that way too).

Observed with diffusers 0.42.1 / torch 2.13 CPU / gloo, 2 ranks: Ulysses runs for flux,
qwen-image and wan (max |diff| vs one process <= ~4e-7 in fp32); ring fails in the first
attention with ``ValueError: Native attention does not support return_lse=True`` (the ring
merge needs a log-sum-exp that the ``native`` SDPA backend, the only CP-capable backend on CPU,
does not return).
"""

from __future__ import annotations

import contextlib
import time
from unittest import mock

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import AsyncCollectiveTensor

from meshsp.bench import sp_mesh
from meshsp.tiny import build_transformer, make_inputs, output_tensor

__all__ = ["MODES", "time_diffusers_cp"]

#: Supported ``mode`` values and the ContextParallelConfig degree each one sets to the world size.
MODES = {"ulysses": "ulysses_degree", "ring": "ring_degree"}

def _accelerator_count_at_least_one():
    """Patch ``torch.accelerator.device_count`` to 1 if there is no accelerator, else do nothing."""
    if torch.accelerator.device_count() > 0:
        return contextlib.nullcontext()
    return mock.patch.object(torch.accelerator, "device_count", return_value=1)


def _error_text(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank (keeps ranks in step after a local failure)."""
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def _forward(model, inputs) -> torch.Tensor:
    """One forward's output sample, with any pending output all-gather waited for (timed in full)."""
    out = output_tensor(model(**inputs))
    return out.wait() if isinstance(out, AsyncCollectiveTensor) else out


def time_diffusers_cp(family: str, heads: int, shapes: dict, overrides: dict, repeats: int, mode: str) -> dict:
    """Time ``repeats`` forwards of ``family`` parallelized with diffusers' native context parallelism.

    Runs on every rank of the default process group (all ranks must call it with the same
    arguments); the context-parallel degree is the world size.

    Steps: build the seeded model (``meshsp.tiny.build_transformer(family, heads=heads,
    **overrides)``) and inputs (``meshsp.tiny.make_inputs(family, model, **shapes)``); compute the
    single-device reference output on this rank; call ``model.enable_parallelism(config=
    ContextParallelConfig(<mode>_degree=world, mesh=...))`` on the same model; warm up once (its
    output gives ``max_abs_diff``); then time ``repeats`` forwards, each preceded by
    ``dist.barrier()``, all under ``torch.no_grad()``.

    Without an accelerator, ``torch.accelerator.device_count`` is patched to return 1 around the
    parallel setup and forwards (see the module docstring); nothing is patched outside this call.

    mode: ``"ulysses"`` or ``"ring"``.

    Returns ``{"times": [per-forward seconds on this rank], "max_abs_diff": float vs the
    single-device output computed on this rank, "error": None}``, or ``{"times": None,
    "max_abs_diff": None, "error": "<ExceptionType>: <first line of message>"}`` if diffusers
    cannot run it (an error on another rank only is reported as such).
    """
    from diffusers import ContextParallelConfig

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {sorted(MODES)}")
    world = dist.get_world_size()
    ring, ulysses = (world, 1) if mode == "ring" else (1, world)

    model = build_transformer(family, heads=heads, **overrides)
    # Tuple output: the CP split hook on the root module ("" in flux's / wan's `_cp_plan`) rejects a
    # `Transformer2DModelOutput` in its post-forward, so diffusers' own pipelines call with this too.
    inputs = {**make_inputs(family, model, **shapes), "return_dict": False}

    with torch.no_grad():
        reference = output_tensor(model(**inputs)).clone()

    error = None
    with _accelerator_count_at_least_one():
        try:
            config = ContextParallelConfig(**{MODES[mode]: world}, mesh=sp_mesh(ring, ulysses))
            model.enable_parallelism(config=config)
            with torch.no_grad():
                out = _forward(model, inputs)  # warm-up, also the accuracy check
            max_abs_diff = (out.float() - reference.float()).abs().max().item()
        except Exception as exc:  # diffusers cannot run this family/mode: report it, keep ranks in step
            error = _error_text(exc)
        if not _all_ok(error is None):
            return {"times": None, "max_abs_diff": None,
                    "error": error or "error on another rank (this rank ran the warm-up)"}

        times = []
        with torch.no_grad():
            for _ in range(repeats):
                dist.barrier()
                t0 = time.perf_counter()
                _forward(model, inputs)
                times.append(time.perf_counter() - t0)
    return {"times": times, "max_abs_diff": max_abs_diff, "error": None}
