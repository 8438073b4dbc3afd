"""Attention of whole queries over sharded keys: every rank's partial merged by an all-reduce.

Shape legend: B batch, H query heads, Hk key/value heads, Sq query length (the same on every rank:
the queries are not sharded), Sk this rank's key length (any, zero included), D / Dv head dims.

A stream that is not sharded (an audio track, a few learned tokens) attending to the sharded video
tokens (LTX-2's video-to-audio attention, Kandinsky 6's audio-video attention): each rank computes
its queries over its own keys, then the partials merge exactly as ring attention merges them,
``out = sum_r exp(lse_r - lse) * out_r`` with ``lse = logsumexp_r lse_r`` — as two all-reduces per
SP axis (the max of ``lse``, then the weighted outputs and weights in one buffer). Every rank ends
with the whole output. Bytes per axis: the ``lse`` and the output, ``B*H*Sq*(Dv+2)`` elements; the
backward all-reduces the output's gradient, ``B*H*Sq*Dv`` elements per axis.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from meshsp.ops.comm import _count
from meshsp.ops.kernel import local_attention
from meshsp.ops.kernel_backward import local_attention_backward

__all__ = ["replicated_query_attention"]


def _all_reduce(t: torch.Tensor, op: str, group: dist.ProcessGroup) -> torch.Tensor:
    _count("all_reduce", t.numel() * t.element_size())
    return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), op, group))


def _merged(q, k, v, mask_BSk, groups, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of q over every rank's keys, in the kernel's accumulation dtype."""
    out, lse = local_attention(q, k, v, mask_BSk, scale)
    acc = out.to(lse.dtype)
    for group in groups:
        top = _all_reduce(lse, "max", group)
        safe = torch.where(torch.isneginf(top), 0.0, top)
        weight = torch.exp(lse - safe)  # 0 where this rank had no keys (lse = -inf)
        packed = _all_reduce(torch.cat([acc * weight[..., None], weight[..., None]], dim=-1), "sum", group)
        total = packed[..., -1:]
        acc = torch.where(total > 0, packed[..., :-1] / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
        lse = torch.where(total[..., 0] > 0, safe + torch.log(total[..., 0]), float("-inf"))
    return acc, lse


class _WholeQuery(torch.autograd.Function):
    """The backward: every rank's output is the same tensor, so the adjoint first sums the ranks'
    output gradients (one all-reduce per axis, of the output's size); then each rank differentiates
    its own key block against the whole attention's out and lse (``local_attention_backward``): its
    share of dq, and the gradients of its own keys and values."""

    @staticmethod
    def forward(ctx, q, k, v, mask_BSk, groups, scale):
        acc, lse = _merged(q, k, v, mask_BSk, groups, scale)
        ctx.save_for_backward(q, k, v, mask_BSk, acc, lse)
        ctx.groups, ctx.scale = groups, scale
        return acc.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mask_BSk, acc, lse = ctx.saved_tensors
        for group in ctx.groups:
            dout = _all_reduce(dout, "sum", group)
        dq, dk, dv = local_attention_backward(q, k, v, acc, dout, lse, mask_BSk, ctx.scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def replicated_query_attention(q, k, v, mask_BSk=None, *, groups, scale=None) -> torch.Tensor:
    """q [B, H, Sq, D] (whole, equal on every rank) over this rank's k, v [B, Hk, Sk, D] -> [B, H, Sq, Dv].

    ``groups``: the process groups of the SP axes (``None`` entries skipped); the result is the
    attention over every rank's keys, on every rank. Differentiable (``_WholeQuery``).

    Example::

        out = replicated_query_attention(audio_q, video_k, video_v, groups=(ulysses_group, ring_group))
    """
    groups = tuple(g for g in groups if g is not None)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _WholeQuery.apply(q, k, v, mask_BSk, groups, scale)
    acc, _ = _merged(q, k, v, mask_BSk, groups, scale)
    return acc.to(q.dtype)
