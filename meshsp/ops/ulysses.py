"""Ulysses: all-to-all between sequence shards and head shards over the ``ulysses`` axis.

Shape legend: B batch, H query heads, Hk key/value heads, s local sequence length of one rank,
S the concatenation of the group's shards (the ring chunk), D head dim (Dv for values), U the
group size; h / hk the heads one rank owns after the exchange.

Before attention each rank holds every head of its sequence shard; after ``scatter_heads`` it holds
its own heads (``HeadSplit``) of the whole chunk. Q, K, V and the key-padding mask travel in one
fused collective; split sizes may differ per rank (uneven heads or lengths: ``advanced_uaa``), so
nothing is padded and no padded compute happens. ``gather_heads`` is the inverse for the output.

The wire format is token-major: what a rank sends to rank ``dst`` is ``[s, B, W_dst]``, where a
token's row holds, side by side, its ``h_dst`` query heads, ``hk_dst`` key heads, ``hk_dst`` value
heads (and its mask bit). ``W_dst`` depends only on the receiver, so the receive buffer of rank
``dst`` is one ``[S, B, W_dst]`` tensor across all sources and q, k, v are strided *views* of it:
each element is copied once on the way out (the head split itself) and never on the way in. The
output goes back the same way: the attention kernel writes it token-major, so for B = 1 it is sent
as it lies, and the receiver writes each source's heads once, straight into the ``[B, s, H, Dv]``
memory that the model's ``transpose(1, 2).flatten(2)`` reads without a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from meshsp.ops.comm import all_to_all
from meshsp.placements import HeadSplit

__all__ = ["scatter_heads", "gather_heads"]


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

    Returns (q [B, h, S_q, D], k [B, hk, S_kv, D], v [B, hk, S_kv, Dv], mask [B, S_kv] or None);
    q, k and v are views of the receive buffer. Queries and keys laid out alike (self-attention)
    share one exchange; otherwise queries go in a second one.
    """
    kv = [k, v]
    kv_ranges = [heads.kv_ranges, heads.kv_ranges]
    if mask_Bs is not None:  # the mask bit rides along as one more "head" of size 1
        kv.append(mask_Bs.to(q.dtype)[:, None, :, None])
        kv_ranges.append(((0, 1),) * len(kv_lens))
    if list(q_lens) == list(kv_lens):
        q_out, k_out, v_out, *mask_out = _exchange([q, *kv], [heads.q_ranges, *kv_ranges], q_lens, group)
    else:
        (q_out,) = _exchange([q], [heads.q_ranges], q_lens, group)
        k_out, v_out, *mask_out = _exchange(kv, kv_ranges, kv_lens, group)
    return q_out, k_out, v_out, (mask_out[0][:, 0, :, 0] > 0.5) if mask_out else None


def _exchange(tensors, ranges, lens, group) -> list[torch.Tensor]:
    """Token-major all-to-all of head slices: ``tensors[i]`` is [B, H_i, s, D_i], ``ranges[i][dst]``
    the heads it sends to ``dst``. Returns each tensor's own heads of the chunk, [B, h_i, S, D_i],
    as views of the one receive buffer."""
    me, size = dist.get_rank(group), len(lens)
    b, s = tensors[0].shape[0], tensors[0].shape[2]

    def width(rank: int) -> int:
        return sum((r[rank][1] - r[rank][0]) * t.shape[-1] for t, r in zip(tensors, ranges))

    def columns(row: torch.Tensor, rank: int, tokens: int):
        """Each tensor's heads inside a token-major ``row`` [tokens, B, width(rank)]."""
        col = 0
        for t, r in zip(tensors, ranges):
            lo, hi = r[rank]
            n = (hi - lo) * t.shape[-1]
            yield t, lo, hi, row[..., col : col + n].view(tokens, b, hi - lo, t.shape[-1])
            col += n

    send_counts = [s * b * width(dst) for dst in range(size)]
    send = tensors[0].new_empty(sum(send_counts))
    for dst, piece in enumerate(send.split(send_counts)):
        for t, lo, hi, view in columns(piece.view(s, b, width(dst)), dst, s):
            view.copy_(t[:, lo:hi].permute(2, 0, 1, 3))
    total = sum(lens)
    buf = all_to_all(send, send_counts, [n * b * width(me) for n in lens], group)
    return [view.permute(1, 2, 0, 3) for *_, view in columns(buf.view(total, b, width(me)), me, total)]


def gather_heads(
    out: torch.Tensor, *, group: dist.ProcessGroup, heads: HeadSplit, q_lens: Sequence[int]
) -> torch.Tensor:
    """out [B, h, S_q, Dv] (own heads, whole chunk) -> [B, H, s_q, Dv] (all heads, own shard).

    The result is a ``[B, s_q, H, Dv]`` tensor seen through ``transpose(1, 2)``.
    """
    me = dist.get_rank(group)
    b, h, _, dv = out.shape
    s = q_lens[me]
    send = out.permute(2, 0, 1, 3).reshape(-1)  # token-major; a view when the kernel wrote it so
    recv_counts = [s * b * heads.q_count(src) * dv for src in range(len(q_lens))]
    flat = all_to_all(send, [n * b * h * dv for n in q_lens], recv_counts, group)
    result = out.new_empty(b, s, heads.q_heads, dv)
    for src, piece in enumerate(flat.split(recv_counts)):
        lo, hi = heads.q_ranges[src]
        result[:, :, lo:hi].copy_(piece.view(s, b, hi - lo, dv).transpose(0, 1))
    return result.transpose(1, 2)
