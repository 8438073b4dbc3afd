"""Ulysses: all-to-all between sequence shards and head shards over the ``ulysses`` axis.

Shape legend: B batch, H query heads, Hk key/value heads, s local sequence length of one rank,
S the concatenation of the group's shards (the ring chunk), D head dim, U the group size.

Before attention each rank holds every head of its sequence shard; after ``scatter_heads`` it holds
its own heads (``HeadSplit``) of the whole chunk. Q, K, V and the key-padding mask travel in one
fused collective; split sizes may differ per rank (uneven heads or lengths: ``advanced_uaa``), so
nothing is padded and no padded compute happens. ``gather_heads`` is the inverse for the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from meshsp.ops.comm import all_to_all
from meshsp.placements import HeadSplit

__all__ = ["scatter_heads", "gather_heads"]


def _pack(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """One contiguous send buffer in ``like``'s dtype and device."""
    if not parts:
        return like.new_empty(0)
    return torch.cat([p.reshape(-1).to(like.dtype) for p in parts])


def scatter_heads(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_Bs: torch.Tensor | None,
    *,
    group: dist.ProcessGroup,
    heads: HeadSplit,
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
):
    """q [B, H, s_q, D], k/v [B, Hk, s_kv, D] -> this rank's heads of the whole chunk.

    Returns (q [B, h, S_q, D], k [B, hk, S_kv, D], v [B, hk, S_kv, Dv], mask [B, S_kv] or None).
    """
    me = dist.get_rank(group)
    size = len(q_lens)
    b, dq, dv = q.shape[0], q.shape[-1], v.shape[-1]
    mask_flat = None if mask_Bs is None else mask_Bs.to(q.dtype)

    sends, send_counts = [], []
    for dst in range(size):
        (q_lo, q_hi), (kv_lo, kv_hi) = heads.q_ranges[dst], heads.kv_ranges[dst]
        parts = [q[:, q_lo:q_hi], k[:, kv_lo:kv_hi], v[:, kv_lo:kv_hi]]
        if mask_flat is not None:
            parts.append(mask_flat)
        sends.extend(parts)
        send_counts.append(sum(p.numel() for p in parts))

    h, hk = heads.q_count(me), heads.kv_count(me)
    shapes = []  # per source rank: the shapes of its q, k, v (and mask) pieces
    for src in range(size):
        piece = [(b, h, q_lens[src], dq), (b, hk, kv_lens[src], dq), (b, hk, kv_lens[src], dv)]
        if mask_flat is not None:
            piece.append((b, kv_lens[src]))
        shapes.append(piece)
    recv_counts = [sum(_numel(s) for s in piece) for piece in shapes]

    flat = all_to_all(_pack(sends, q), send_counts, recv_counts, group)

    received = [[] for _ in shapes[0]]
    offset = 0
    for piece in shapes:
        for i, shape in enumerate(piece):
            n = _numel(shape)
            received[i].append(flat[offset : offset + n].view(shape))
            offset += n
    q_out = torch.cat(received[0], dim=2)
    k_out = torch.cat(received[1], dim=2)
    v_out = torch.cat(received[2], dim=2)
    mask_out = None if mask_flat is None else torch.cat(received[3], dim=1) > 0.5
    return q_out, k_out, v_out, mask_out


def gather_heads(
    out: torch.Tensor, *, group: dist.ProcessGroup, heads: HeadSplit, q_lens: Sequence[int]
) -> torch.Tensor:
    """out [B, h, S_q, Dv] (own heads, whole chunk) -> [B, H, s_q, Dv] (all heads, own shard)."""
    me = dist.get_rank(group)
    b, dv = out.shape[0], out.shape[-1]
    pieces = list(torch.split(out, list(q_lens), dim=2))
    send_counts = [p.numel() for p in pieces]
    recv_shapes = [(b, heads.q_count(src), q_lens[me], dv) for src in range(len(q_lens))]
    recv_counts = [_numel(s) for s in recv_shapes]
    flat = all_to_all(_pack(pieces, out), send_counts, recv_counts, group)
    return torch.cat([t.view(s) for t, s in zip(flat.split(recv_counts), recv_shapes)], dim=1)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
