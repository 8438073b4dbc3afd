"""Rank functions for the failure tests: one rank fails while the others wait for it in a collective."""

from __future__ import annotations

import os
import time
from unittest import mock

import torch
import torch.distributed as dist

from meshsp import ParallelConfig, init_sp_mesh
from meshsp.mesh import default_device_type


KINDS = ("all_reduce", "all_to_all", "p2p")


def _wait_for(culprit: int, kind: str, group=None) -> None:
    """Block in ``kind`` (over ``group``, default the world) until ``culprit`` takes part (it never does)."""
    x = torch.ones(dist.get_world_size(group) * 2)
    if kind == "all_reduce":
        dist.all_reduce(x, group=group)
    elif kind == "all_to_all":
        dist.all_to_all_single(torch.empty_like(x), x, group=group)
    elif kind == "p2p":
        dist.recv(x, src=culprit)
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")


def fail_while_others_wait(kind: str, culprit: int, how: str = "raise") -> str:
    """``culprit`` raises (a rank-local out-of-memory) or exits; every other rank waits in ``kind``
    over the world; ``kind="mixed"``: each other rank waits in another kind, paired with ``culprit``."""
    rank = dist.get_rank()
    others = [r for r in range(dist.get_world_size()) if r != culprit]
    pairs = {r: dist.new_group([r, culprit]) for r in others} if kind == "mixed" else {}  # on every rank alike
    if rank == culprit:
        if how == "exit":
            os._exit(3)
        raise RuntimeError(f"CUDA out of memory (rank {culprit} alone)")
    if kind == "mixed":
        _wait_for(culprit, KINDS[others.index(rank) % len(KINDS)], pairs[rank])
    else:
        _wait_for(culprit, kind)
    return "finished"


def fail_alone_others_finish(culprit: int) -> str:
    """``culprit`` raises; the others do not need it and finish a little later."""
    if dist.get_rank() == culprit:
        raise RuntimeError(f"rank {culprit} alone")
    time.sleep(0.3)
    return "finished"


def every_rank_raises() -> None:
    raise ValueError(f"the same refusal on rank {dist.get_rank()}")


def longer_than_collective_timeout(seconds: float) -> float:
    """Collectives around a pause longer than the process group's timeout: each collective is short."""
    x = torch.ones(1)
    dist.all_reduce(x)
    time.sleep(seconds)
    dist.all_reduce(x)
    return x.item()


def device_on_a_gpu_host() -> dict:
    """On a gloo rank that sees (mocked) GPUs: the mesh's device is still the CPU, and asking for
    CUDA on gloo is refused."""
    with mock.patch("torch.cuda.is_available", return_value=True), \
            mock.patch("torch.cuda.device_count", return_value=dist.get_world_size()):
        mesh = init_sp_mesh(ParallelConfig(ulysses_degree=dist.get_world_size()))
        try:
            init_sp_mesh(ParallelConfig(ulysses_degree=dist.get_world_size()), device_type="cuda")
            refusal = None
        except ValueError as exc:
            refusal = str(exc)
        return {"default": default_device_type(), "mesh": mesh.device_type, "refusal": refusal}
