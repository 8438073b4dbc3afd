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
from meshsp.ops.masks import RunMask
from meshsp.ops.ring import merge_partials

__all__ = ["PairMask", "block_attention"]


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


def block_attention(q, k, v, pair: PairMask, *, q0: int, k0: int, heads: tuple[int, int], scale=None):
    """q [B, H, Sq, D] (rank-major queries from ``q0``; global heads ``heads``) over k, v [B, Hk, Sk, D]
    (keys from ``k0``) -> (out [B, H, Sq, Dv], lse [B, H, Sq]), or None when no query attends a key."""
    sq, sk = q.shape[2], k.shape[2]
    if pair.runs is None:
        rows = pair.rows[:, :, q0 - pair.q_start : q0 - pair.q_start + sq, k0 : k0 + sk]
        if rows.shape[1] > 1:
            rows = rows[:, heads[0] : heads[1]]
        return local_attention(q, k, v, None, scale, bias=rows)
    runs = pair.runs
    groups = [(slice(None), 0)] if runs.batch_groups == 1 else [(slice(i, i + 1), i) for i in range(q.shape[0])]
    plan = [(bs, runs.calls(g, (q0, q0 + sq), (k0, k0 + sk))) for bs, g in groups]
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
