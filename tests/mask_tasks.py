"""Rank-side checks of SP attention under masks beyond key padding (tests/test_masks.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import meshsp
from meshsp import SeqLayout, shard_sequence
from meshsp.ops import record_comm
from meshsp.ops.masks import SegmentMask
from rank_tasks import make_inputs, mesh_for, per_case, value_error


def _segments(case: dict, b: int, s: int, g: torch.Generator) -> torch.Tensor:
    """Segment ids in runs of random lengths (documents), ``case["G"]`` segments."""
    ids = torch.empty(b, s, dtype=torch.long)
    for i in range(b):
        cuts = sorted(torch.randint(0, s + 1, (case["G"] - 1,), generator=g).tolist())
        edges = [0, *cuts, s]
        for seg in range(case["G"]):
            ids[i, edges[seg] : edges[seg + 1]] = seg
    return ids


def make_mask(case: dict, q: torch.Tensor, k: torch.Tensor):
    """(what the parallel call gets as attn_mask, is_causal, the dense mask for the reference)."""
    g = torch.Generator().manual_seed(case.get("seed", 0) + 99)
    b, h, s_q, s_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    kind = case["kind"]
    if kind == "causal":
        return None, True, None
    if kind == "segment":  # block-diagonal documents, key padding as a segment nobody attends
        gs = case["G"]
        ids = torch.arange(s_q).expand(b, -1) * gs // s_q if case.get("aligned") else _segments(case, b, s_q, g)
        kv_ids = _segments(case, b, s_k, g) if s_k != s_q else None  # cross attention: keys' own ids
        allow = torch.rand(gs, gs, generator=g) < 0.6 if case.get("rule") else torch.eye(gs, dtype=torch.bool)
        causal = torch.rand(gs, gs, generator=g) < 0.5 if case.get("causal") else False
        bias = torch.randn(gs, gs, generator=g, dtype=torch.float64) if case.get("bias") else None
        mask = SegmentMask(ids, kv_segments=kv_ids, allow=allow, causal=causal, bias=bias)
        return mask, False, mask.dense()
    if kind == "outer":  # Chroma: a float 0/1 outer product of a token mask, added to the scores
        m = (torch.rand(b, s_q, generator=g) < 0.7).double()
        dense = (m[:, :, None] * m[:, None, :])[:, None].to(q.dtype)
        return dense, False, dense
    if kind == "bool":  # random pairwise boolean, per head if asked; some rows fully masked
        heads = h if case.get("per_head") else 1
        dense = torch.rand(b, heads, s_q, s_k, generator=g) < 0.5
        dense[..., : min(2, s_q), :] = False
        return dense, False, dense
    if kind == "additive":
        dense = torch.randn(1, 1, s_q, s_k, generator=g, dtype=q.dtype)
        return dense, False, dense
    raise ValueError(kind)


def masked_parity(cases: list[dict]) -> list[dict]:
    return per_case(_masked_parity, cases)


def _masked_parity(case: dict) -> dict:
    mesh = mesh_for(case["ring"], case["ulysses"])
    q, k, v, _ = make_inputs(case)
    mask, causal, dense = make_mask(case, q, k)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, is_causal=causal,
                                              enable_gqa=q.shape[1] != k.shape[1])
    balance = case.get("balance", "contiguous")
    dq, dk, dv = (shard_sequence(t, mesh, 2, balance) for t in (q, k, v))
    if case.get("sharded_mask"):  # rows sharded like the queries; columns in the DTensors' order
        order = SeqLayout.from_global(k.shape[2], ring=case["ring"], ulysses=case["ulysses"], balance=balance).order()
        mask = shard_sequence(mask.expand(q.shape[0], -1, -1, -1).index_select(3, order), mesh, 2, balance)
    with record_comm() as stats, meshsp.sequence_parallel_attention(case.get("mode", "advanced_uaa"), balance):
        got = F.scaled_dot_product_attention(dq, dk, dv, attn_mask=mask, is_causal=causal,
                                             enable_gqa=q.shape[1] != k.shape[1])
    want = shard_sequence(expected, mesh, 2, balance).to_local()
    if q.dtype in (torch.bfloat16, torch.float16):  # no worse than one process in the same dtype
        exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal,
                                               attn_mask=None if dense is None else dense if dense.dtype == torch.bool
                                               else dense.double(), enable_gqa=q.shape[1] != k.shape[1])
        exact = shard_sequence(exact, mesh, 2, balance).to_local()
        parallel, single = ((t.double() - exact).abs().max().item() if t.numel() else 0.0 for t in (got.to_local(), want))
        assert parallel <= 1.5 * single + 1e-3, (case, parallel, single)
        return {"bytes": dict(stats.bytes_sent), "calls": dict(stats.calls), "scores": stats.scores}
    tol = 1e-12 if q.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got.to_local(), want, atol=tol, rtol=tol, msg=lambda m: f"{case}: {m}")
    return {"bytes": dict(stats.bytes_sent), "calls": dict(stats.calls), "scores": stats.scores}


def bad_mask(kind: str, ring: int, ulysses: int) -> str:
    """The ValueError a bad mask raises (the same on every rank)."""
    return value_error(_bad_mask, kind, ring, ulysses)


def _bad_mask(kind: str, ring: int, ulysses: int) -> None:
    mesh = mesh_for(ring, ulysses)
    q = torch.randn(1, 2, 8, 4, dtype=torch.float64)
    dq = shard_sequence(q, mesh, 2)
    mask = {"causal_and_mask": torch.ones(1, 1, 8, 8, dtype=torch.bool),
            "shape": torch.ones(1, 1, 7, 8, dtype=torch.bool),
            "segment_ids": SegmentMask(torch.zeros(1, 9, dtype=torch.long))}[kind]
    with meshsp.sequence_parallel_attention("advanced_uaa"):
        F.scaled_dot_product_attention(dq, dq, dq, attn_mask=mask, is_causal=kind == "causal_and_mask")


class _Attention(torch.nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads, self.qkv, self.out = heads, torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x, mask=None):
        b, s, _ = x.shape
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.out(o.transpose(1, 2).flatten(2))


class _Block(torch.nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.attn, self.mlp = _Attention(width, heads), torch.nn.Linear(width, width)

    def forward(self, x, mask=None):
        x = x + self.attn(x, mask)
        return x + torch.tanh(self.mlp(x))


class CausalToy(torch.nn.Module):
    """Two blocks of causal (or whole-sequence-masked) self-attention over one token stream."""

    def __init__(self, width: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(width, heads) for _ in range(2))

    def forward(self, x, mask=None):
        for block in self.blocks:
            x = block(x, mask)
        return x


def plan_parity(ring: int, ulysses: int, balance: str, masked: bool, s: int = 23) -> dict:
    """A causal (or dense-masked) toy model through torch's parallelize_module with a meshsp plan
    whose ParallelAttention declares masks='global', in ``balance``: equal to one process."""
    from torch.distributed.tensor.parallel import parallelize_module

    from meshsp.plans import Plan
    from meshsp.styles import GatherSequence, ParallelAttention, ShardSequence

    torch.manual_seed(0)
    model = CausalToy().double()
    x = torch.randn(2, s, 16, dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(2, 1, s, s, generator=torch.Generator().manual_seed(1)) < 0.6
        mask[..., 0] = True
    expected = model(x, mask)
    plan = Plan({"blocks.0": ShardSequence({"x": 1}), "blocks.*.attn": ParallelAttention(masks="global"),
                 "blocks.1": GatherSequence({0: 1})}, ulysses_mode="advanced_uaa", balance=balance)
    parallelize_module(model, mesh_for(ring, ulysses), plan)
    with record_comm() as stats:
        got = model(x, mask)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    return {"scores": stats.scores, "p2p": stats.bytes_sent.get("p2p", 0)}
