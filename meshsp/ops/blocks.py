"""One block of masked attention: this rank's queries over one block of keys, under a pairwise mask.

Shape legend: B batch, H query heads (the rank's own after Ulysses), Hk key/value heads, Sq queries
of the block, Sk keys of the block, D / Dv head dims; "rank-major" as in ``meshsp.ops.masks``.

A ``PairMask`` is what the ops carry of a mask beyond key padding: runs and a rule (compact
masks, ``is_causal``, dense masks that compress), or the dense rows of the queries a rank
computes. ``block_attention`` turns runs into the block's kernel calls (``masks.block_calls``) and
merges their partials by log-sum-exp, or passes the dense rows' slice to the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshsp.ops.kernel import local_attention
from meshsp.ops.kernel_backward import local_attention_backward
from meshsp.ops.masks import RunMask
from meshsp.ops.ring import merge_partials

__all__ = ["PairMask", "block_attention", "block_attention_backward"]


@dataclass(frozen=True)
class PairMask:
    """``runs`` (rank-major, the whole sequence) or ``rows`` [B|1, H|1, S_q, S_k]: the dense mask
    of the queries from rank-major index ``q_start`` over every key (rank-major)."""

    runs: RunMask | None = None
    rows: torch.Tensor | None = None
    q_start: int = 0

    def needs(self, q_range: tuple[int, int], k_range: tuple[int, int]) -> bool:
        """Whether any query of ``q_range`` attends a key of ``k_range``; dense rows: always."""
        return self.runs is None or self.runs.needs(q_range, k_range)


def _calls(q, k, pair: PairMask, q0: int, k0: int):
    """[(batch slice, the block's kernel calls)] of a block under runs."""
    runs = pair.runs
    groups = [(slice(None), 0)] if runs.batch_groups == 1 else [(slice(i, i + 1), i) for i in range(q.shape[0])]
    return [(bs, runs.calls(g, (q0, q0 + q.shape[2]), (k0, k0 + k.shape[2]))) for bs, g in groups]


def _rows(pair: PairMask, q0: int, k0: int, sq: int, sk: int, heads: tuple[int, int]) -> torch.Tensor:
    rows = pair.rows[:, :, q0 - pair.q_start : q0 - pair.q_start + sq, k0 : k0 + sk]
    return rows[:, heads[0] : heads[1]] if rows.shape[1] > 1 else rows


def block_attention_backward(q, k, v, out, dout, lse, pair: PairMask, *, q0: int, k0: int,
                             heads: tuple[int, int], scale=None):
    """The block's gradient shares (dq, dk, dv; float32, float64 for float64) given the whole
    attention's ``out`` and ``lse`` — the calls ``block_attention`` made, each differentiated
    (``meshsp.ops.kernel_backward``); None where ``block_attention`` returned None."""
    sq, sk = q.shape[2], k.shape[2]
    if pair.runs is None:
        return local_attention_backward(q, k, v, out, dout, lse, None, scale, bias=_rows(pair, q0, k0, sq, sk, heads))
    plan = _calls(q, k, pair, q0, k0)
    if not any(calls for _, calls in plan):
        return None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for bs, calls in plan:
        for c in calls:
            rows, cols = slice(c.q0, c.q1), slice(c.k0, c.k1)
            g = local_attention_backward(q[bs, :, rows], k[bs, :, cols], v[bs, :, cols], out[bs, :, rows],
                                         dout[bs, :, rows], lse[bs, :, rows] - c.bias, None, scale, causal=c.causal)
            dq[bs, :, rows] += g[0]
            dk[bs, :, cols] += g[1]
            dv[bs, :, cols] += g[2]
    return dq, dk, dv


def block_attention(q, k, v, pair: PairMask, *, q0: int, k0: int, heads: tuple[int, int], scale=None):
    """q [B, H, Sq, D] (rank-major queries from ``q0``; global heads ``heads``) over k, v [B, Hk, Sk, D]
    (keys from ``k0``) -> (out [B, H, Sq, Dv], lse [B, H, Sq]), or None when no query attends a key."""
    sq, sk = q.shape[2], k.shape[2]
    if pair.runs is None:
        return local_attention(q, k, v, None, scale, bias=_rows(pair, q0, k0, sq, sk, heads))
    plan = _calls(q, k, pair, q0, k0)
    if not any(calls for _, calls in plan):
        return None
    if len(plan) == 1 and len(plan[0][1]) == 1:
        c = plan[0][1][0]
        if (c.q0, c.q1, c.k0, c.k1, c.bias) == (0, sq, 0, sk, 0.0):  # one call over the whole block
            return local_attention(q, k, v, None, scale, causal=c.causal)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_zeros(*q.shape[:3], v.shape[-1], dtype=acc)
    lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    for bs, calls in plan:
        for c in calls:
            o, l = local_attention(q[bs, :, c.q0 : c.q1], k[bs, :, c.k0 : c.k1], v[bs, :, c.k0 : c.k1], None, scale,
                                   causal=c.causal)
            if c.bias:
                l = l + c.bias  # a constant added to every score of the call shifts only its lse
            rows = out[bs, :, c.q0 : c.q1]
            _, lse[bs, :, c.q0 : c.q1] = merge_partials(rows, lse[bs, :, c.q0 : c.q1], o, l, into_a=True)
    return out.to(q.dtype), lse
