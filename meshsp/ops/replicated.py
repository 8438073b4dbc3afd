"""Attention of whole queries over sharded keys: every rank's partial merged by an all-reduce.

Shape legend: B batch, H query heads, Hk key/value heads, Sq query length (the same on every rank:
the queries are not sharded), Sk this rank's key length (any, zero included), D / Dv head dims.

A stream that is not sharded (an audio track, a few learned tokens) attending to the sharded video
tokens (LTX-2's video-to-audio attention, Kandinsky 6's audio-video attention): each rank computes
its queries over its own keys, then the partials merge exactly as ring attention merges them,
``out = sum_r exp(lse_r - lse) * out_r`` with ``lse = logsumexp_r lse_r`` — as two all-reduces per
SP axis (the max of ``lse``, then the weighted outputs and weights in one buffer). Every rank ends
with the whole output. Bytes per axis: the ``lse`` and the output, ``B*H*Sq*(Dv+2)`` elements.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from meshsp.ops.comm import _count
from meshsp.ops.kernel import local_attention

__all__ = ["replicated_query_attention"]


def _all_reduce(t: torch.Tensor, op: str, group: dist.ProcessGroup) -> torch.Tensor:
    _count("all_reduce", t.numel() * t.element_size())
    return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), op, group))


def replicated_query_attention(q, k, v, mask_BSk=None, *, groups, scale=None) -> torch.Tensor:
    """q [B, H, Sq, D] (whole, equal on every rank) over this rank's k, v [B, Hk, Sk, D] -> [B, H, Sq, Dv].

    ``groups``: the process groups of the SP axes (``None`` entries skipped); the result is the
    attention over every rank's keys, on every rank.

    Example::

        out = replicated_query_attention(audio_q, video_k, video_v, groups=(ulysses_group, ring_group))
    """
    out, lse = local_attention(q, k, v, mask_BSk, scale)
    acc = out.to(lse.dtype)
    for group in (g for g in groups if g is not None):
        top = _all_reduce(lse, "max", group)
        safe = torch.where(torch.isneginf(top), 0.0, top)
        weight = torch.exp(lse - safe)  # 0 where this rank had no keys (lse = -inf)
        packed = _all_reduce(torch.cat([acc * weight[..., None], weight[..., None]], dim=-1), "sum", group)
        total = packed[..., -1:]
        acc = torch.where(total > 0, packed[..., :-1] / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
        lse = torch.where(total[..., 0] > 0, safe + torch.log(total[..., 0]), float("-inf"))
    return acc.to(q.dtype)
