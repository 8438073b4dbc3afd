"""Multi-rank checks: ``sp_attention`` (Ulysses, Ring, both) and whole-query attention on gloo ranks.

Shape legend: B batch, H query heads, Hk key/value heads, S global length, D / Dv head dims.

Every rank of a ``WorkerPool`` draws the same global float64 inputs, takes its shard as
``SeqLayout`` says (ring chunks outer, Ulysses pieces inner), runs the parallel op on the selftest's
device (one GPU shared by all ranks on CUDA: gloo's collectives take CUDA tensors, its P2P goes
through host copies in ``RingPass``) and compares its shard with single-device float64 attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshsp.ops.attention import sp_attention
from meshsp.ops.kernel import math_attention
from meshsp.ops.replicated import replicated_query_attention
from meshsp.placements import SeqLayout
from meshsp.selftest.kernels import draw
from meshsp.selftest.numerics import compare, sdpa_or_none

__all__ = ["DIST_CASES", "DistCase", "check_on_ranks", "rank_check"]


@dataclass(frozen=True)
class DistCase:
    """One parallel attention call. ``lens``: explicit local lengths ``[ring][ulysses]`` (else
    ``SeqLayout.from_global``); ``whole_query``: queries of length ``sq`` on every rank, keys sharded."""

    name: str
    ring: int = 1
    ulysses: int = 1
    b: int = 2
    h: int = 8
    hk: int = 4
    s: int = 77
    d: int = 64
    dv: int | None = None
    mask: bool = False
    dead_row: bool = False
    uaa: bool = True
    dtype: str = "bfloat16"
    lens: tuple[tuple[int, ...], ...] | None = None
    whole_query: bool = False
    sq: int = 33

    @property
    def world(self) -> int:
        return self.ring * self.ulysses


DIST_CASES = (
    DistCase("Ulysses U2 bf16, S 77 uneven, GQA 8/4, mask", ulysses=2, mask=True),
    DistCase("Ulysses U2 strict fp32, S 78", ulysses=2, s=78, uaa=False, dtype="float32"),
    # 3 MiB of local q, k, v per rank: the exchange is pipelined over two head chunks.
    DistCase("Ulysses U2 fp32 pipelined, S 512, D 128", ulysses=2, b=1, h=8, hk=8, s=512, d=128, dtype="float32"),
    DistCase("Ulysses U2 fp16, head dim 72 / value 40, masked row", ulysses=2, d=72, dv=40, mask=True, dead_row=True),
    DistCase("Ring R2 bf16, S 77, mask, masked row", ring=2, mask=True, dead_row=True),
    DistCase("Ring R2 fp32, an empty shard (77 / 0)", ring=2, dtype="float32", lens=((77,), (0,))),
    DistCase("whole-query W2 bf16, keys 50 / 27, mask", ulysses=2, mask=True, dead_row=True, whole_query=True,
             lens=((50, 27),)),
    DistCase("Ulysses U4 bf16, S 77, GQA 8/2 cut", ulysses=4, hk=2, mask=True),
    DistCase("Ring R4 bf16, one empty shard, mask", ring=4, mask=True, lens=((30,), (0,), (25,), (22,))),
    DistCase("hybrid R2xU2 bf16 uaa, S 77, GQA 8/2, mask", ring=2, ulysses=2, hk=2, mask=True, dead_row=True),
    DistCase("whole-query W4 (R2xU2) fp32, mask", ring=2, ulysses=2, mask=True, whole_query=True,
             dtype="float32"),
)

_MESHES: dict = {}  # per worker process: (ring, ulysses) -> groups, built once by every rank alike


def _groups(ring: int, ulysses: int):
    """(ring_group, ulysses_group, ring_rank, ulysses_rank) of this rank on a ("ring", "ulysses") mesh."""
    if (ring, ulysses) not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
        _MESHES[ring, ulysses] = (mesh["ring"].get_group(), mesh["ulysses"].get_group())
    ring_pg, ulysses_pg = _MESHES[ring, ulysses]
    return ring_pg, ulysses_pg, dist.get_rank(ring_pg), dist.get_rank(ulysses_pg)


def _device(device: str) -> torch.device:
    if device != "cuda":
        return torch.device("cpu")
    index = dist.get_rank() % torch.cuda.device_count()
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _layout(case: DistCase) -> SeqLayout:
    return SeqLayout(case.lens) if case.lens else SeqLayout.from_global(case.s, ring=case.ring, ulysses=case.ulysses)


def rank_check(case: DistCase, device: str) -> tuple[bool, str]:
    """On every rank: this rank's result against single-device float64 attention."""
    ring_pg, ulysses_pg, r, u = _groups(case.ring, case.ulysses)
    dev, dtype = _device(device), getattr(torch, case.dtype)
    layout = _layout(case)
    sq = case.sq if case.whole_query else layout.total
    q64, k64, v64, m = draw(case.name, case.b, case.h, case.hk, sq, layout.total, case.d, case.dv or case.d,
                            case.mask, case.dead_row)
    ref, ref_lse = math_attention(*(t.to(dev) for t in (q64, k64, v64)), None if m is None else m.to(dev))
    q, k, v = (t.to(dev, dtype) for t in (q64, k64, v64))
    mask = None if m is None else m.to(dev)
    base = sdpa_or_none(q, k, v, mask)
    start, n = layout.offset(r, u), layout.local(r, u)
    k_r, v_r = k[:, :, start:start + n], v[:, :, start:start + n]
    m_r = None if mask is None else mask[:, start:start + n]
    if case.whole_query:
        out = replicated_query_attention(q, k_r, v_r, m_r, groups=(ulysses_pg, ring_pg))
        rows = slice(None)
    else:
        out = sp_attention(q[:, :, start:start + n], k_r, v_r, m_r, ring_group=ring_pg, ulysses_group=ulysses_pg,
                           q_layout=layout, uaa=case.uaa)
        rows = slice(start, start + n)
    return compare(dtype, out, ref[:, :, rows], ref_lse[:, :, rows],
                   base=None if base is None else base[:, :, rows])


def check_on_ranks(pool, case: DistCase, device: str, timeout: float = 120.0) -> tuple[bool, str]:
    """Run ``case`` on every rank of ``pool``; passed if every rank passed; the detail of the first
    failing rank (else rank 0's)."""
    if pool.world_size != case.world:
        raise ValueError(f"{case.name} needs {case.world} ranks, the pool has {pool.world_size}")
    results = pool.run(rank_check, case, device, timeout=timeout)
    failing = [rank for rank, (ok, _) in enumerate(results) if not ok]
    shown = failing[0] if failing else 0
    return not failing, f"{case.world} ranks, rank {shown}: {results[shown][1]}"
