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
each element is copied once on the way out (the head split itself) and not by the exchange on the
way in. (``ulysses_attention`` then copies each arrived chunk head-major, the layout the kernels
run fastest on, and frees the receive buffer before the kernel runs.) The output goes back the same
way: it is sent token-major (as it lies when the kernel wrote it so, else after one copy), and the
receiver writes each source's heads once, straight into the ``[B, s, H, Dv]`` memory that the
model's ``transpose(1, 2).flatten(2)`` reads without a copy.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from meshsp.ops.comm import all_to_all, wait
from meshsp.placements import HeadSplit
from meshsp.placements.sequence import balanced_sizes

__all__ = ["scatter_heads", "gather_heads", "ulysses_attention", "ulysses_attention_backward", "head_chunks", "pipeline_min_bytes", "pipeline_setting"]


CHUNKS = 2  # head chunks of the pipelined exchange (ulysses_attention)
# Pipelining pays one more collective's latency each way for hiding one chunk's transfer, and it
# halves the exchange buffers alive at a time (lower peak memory). Below a size of local q, k, v
# per rank the latency wins. On gloo that is 1 MiB (measured: a toy Flux forward with ~0.2 MB per
# attention ran 13.8 ms unchunked vs 17.5 ms chunked; with ~3 MB, chunking cut the peak activation
# memory per rank from 0.65x to 0.53x of one process at the same speed). NCCL moves 1 MiB over
# NVLink in a few microseconds, less than a collective's launch latency: its default is 16 MiB, an
# estimate from link speeds, not yet measured on GPUs. ``MESHSP_ULYSSES_PIPELINE_MIN_BYTES`` sets
# it for every backend (the same value on every rank, or ranks would issue different collectives).
PIPELINE_MIN_BYTES = {"gloo": 1 << 20, "nccl": 16 << 20}
PIPELINE_MIN_BYTES_ENV = "MESHSP_ULYSSES_PIPELINE_MIN_BYTES"


def pipeline_setting() -> str:
    """The environment's pipelining setting as text, for the ranks' agreement on their inputs
    (``meshsp.ops.consensus.agree``): ranks with different settings would issue different collectives."""
    return f"{PIPELINE_MIN_BYTES_ENV}={os.environ.get(PIPELINE_MIN_BYTES_ENV)}"


def pipeline_min_bytes(group: dist.ProcessGroup) -> int:
    """Bytes of local q, k, v per rank from which Ulysses alone pipelines its exchange: the
    environment's setting, else the group backend's default (gloo's for a backend not listed)."""
    setting = os.environ.get(PIPELINE_MIN_BYTES_ENV)
    if setting is None:
        return PIPELINE_MIN_BYTES.get(dist.get_backend(group), PIPELINE_MIN_BYTES["gloo"])
    try:
        value = int(setting)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"{PIPELINE_MIN_BYTES_ENV}={setting!r} must be a whole number of bytes >= 0 "
                         "(0 pipelines every exchange); unset it for the backend's default.")
    return value


def head_chunks(heads: HeadSplit, chunks: int = CHUNKS) -> list[tuple[tuple, tuple]]:
    """(q_ranges, kv_ranges) per chunk: every rank's heads cut into ``chunks`` balanced parts.

    One chunk (the whole split) when a rank owns fewer than ``chunks`` K/V heads or when the split
    cuts through a GQA group (``HeadSplit.kv_index``).
    """
    ranks = range(heads.ulysses)
    if chunks < 2 or any(heads.kv_index(r) is not None or heads.kv_count(r) < chunks for r in ranks):
        return [(heads.q_ranges, heads.kv_ranges)]
    group = heads.q_heads // heads.kv_heads
    out = []
    for c in range(chunks):
        kv = []
        for lo, hi in heads.kv_ranges:
            sizes = balanced_sizes(hi - lo, chunks)
            start = lo + sum(sizes[:c])
            kv.append((start, start + sizes[c]))
        out.append((tuple((group * lo, group * hi) for lo, hi in kv), tuple(kv)))
    return out


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_Bs: torch.Tensor | None,
    *,
    group: dist.ProcessGroup,
    heads: HeadSplit,
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    attend: Callable,
    chunks: int = CHUNKS,
    keep: list | None = None,
) -> torch.Tensor:
    """Ulysses around ``attend(q, k, v, mask, heads) -> out`` (own heads — global query heads
    ``heads = (lo, hi)`` —, whole chunk), pipelined over
    head chunks: chunk c+1's exchange and chunk c-1's return travel while chunk c is computed.
    At most two chunks' exchanges are alive at a time, so the pipeline holds less than one
    unchunked exchange.

    Shapes as ``scatter_heads`` in and ``gather_heads`` out; the mask travels once, with chunk 0.
    ``attend`` returns (out, lse); with ``keep`` (a list) what the backward needs is appended to it:
    per chunk its own-head q, k, v, out and lse, then the chunk's key mask (if any).
    """
    plan = head_chunks(heads, chunks)
    me = dist.get_rank(group)
    result = q.new_empty(q.shape[0], q_lens[me], heads.q_heads, v.shape[-1])

    def post(c: int, mask):
        q_ranges, kv_ranges = plan[c]
        return _scatter(q, k, v, mask, group=group, q_ranges=q_ranges, kv_ranges=kv_ranges,
                        q_lens=q_lens, kv_lens=kv_lens)

    pending, returns, mask_out = post(0, mask_Bs), [], None
    for c in range(len(plan)):
        q_c, k_c, v_c, m = pending()  # chunk c has arrived and its send buffer is free ...
        mask_out = m if c == 0 else mask_out
        pending = post(c + 1, None) if c + 1 < len(plan) else None  # ... before chunk c+1's is made
        # On CPU, head-major copies, which its kernel runs fastest on (the receive buffer dies here,
        # before the kernel allocates its own work space); the CUDA kernels read the strided views.
        if keep is not None:  # kept for the backward: tensors of their own (not views of one buffer)
            q_c, k_c, v_c = (t.clone(memory_format=torch.contiguous_format) for t in (q_c, k_c, v_c))
        elif q_c.device.type == "cpu":
            q_c, k_c, v_c = q_c.contiguous(), k_c.contiguous(), v_c.contiguous()
        out_c, lse_c = attend(q_c, k_c, v_c, mask_out, plan[c][0][me])
        if keep is not None:
            keep.extend([q_c, k_c, v_c, out_c, lse_c])
        returns.append(_gather(out_c, group, plan[c][0], q_lens, result))
        del q_c, k_c, v_c, out_c
    for finish in returns:
        finish()
    if keep is not None and mask_out is not None:
        keep.append(mask_out.clone())
    return result.transpose(1, 2)


def ulysses_attention_backward(
    dout: torch.Tensor,
    saved: Sequence[torch.Tensor],
    *,
    group: dist.ProcessGroup,
    heads: HeadSplit,
    q_lens: Sequence[int],
    kv_lens: Sequence[int],
    attend_backward: Callable,
    chunks: int,
    shapes: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of ``ulysses_attention`` (called with ``chunks`` and ``keep=saved``): ``dout``
    [B, H, s_q, Dv] goes to the heads' ranks as the queries went, ``attend_backward(q, k, v, mask,
    out, dout, lse, heads) -> (dq, dk, dv)`` runs per chunk, and the gradients come back as q, k and v
    came (K/V heads that several ranks read — a cut GQA group — are summed). ``shapes`` are q's, k's
    and v's local shapes. Returns (dq, dk, dv) in ``dout``'s dtype, laid out as the forward's output.
    Bytes: the forward's exchange of q, k, v and out, in the other direction."""
    plan = head_chunks(heads, chunks)
    me = dist.get_rank(group)
    (b, h, sq, d), (_, hk, skv, _), dv_ = shapes[0], shapes[1], shapes[2][-1]
    mask = saved[5 * len(plan)] if len(saved) > 5 * len(plan) else None
    dq = dout.new_empty(b, sq, h, d)
    dk = dout.new_zeros(b, skv, hk, d)
    dv = dout.new_zeros(b, skv, hk, dv_)

    def post(c: int):
        return _exchange([dout], [plan[c][0]], q_lens, group)

    pending, returns = post(0), []
    for c in range(len(plan)):
        (dout_c,) = pending()
        pending = post(c + 1) if c + 1 < len(plan) else None
        q_c, k_c, v_c, out_c, lse_c = saved[5 * c : 5 * c + 5]
        if dout_c.device.type == "cpu":
            dout_c = dout_c.contiguous()
        dq_c, dk_c, dv_c = attend_backward(q_c, k_c, v_c, mask, out_c, dout_c, lse_c, plan[c][0][me])
        q_ranges, kv_ranges = plan[c]
        returns += [_gather(dq_c.to(dout.dtype), group, q_ranges, q_lens, dq),
                    _gather(dk_c.to(dout.dtype), group, kv_ranges, kv_lens, dk, add=True),
                    _gather(dv_c.to(dout.dtype), group, kv_ranges, kv_lens, dv, add=True)]
    for finish in returns:
        finish()
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


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
    return _scatter(q, k, v, mask_Bs, group=group, q_ranges=heads.q_ranges, kv_ranges=heads.kv_ranges,
                    q_lens=q_lens, kv_lens=kv_lens)()


def _scatter(q, k, v, mask_Bs, *, group, q_ranges, kv_ranges, q_lens, kv_lens) -> Callable:
    """Post the exchange of ``scatter_heads`` for the given head ranges; returns its ``finish()``."""
    kv, kv_r = [k, v], [kv_ranges, kv_ranges]
    if mask_Bs is not None:  # the mask bit rides along as one more "head" of size 1
        kv.append(mask_Bs.to(q.dtype)[:, None, :, None])
        kv_r.append(((0, 1),) * len(kv_lens))
    if list(q_lens) == list(kv_lens):
        parts = _exchange([q, *kv], [q_ranges, *kv_r], q_lens, group)
    else:
        q_only, kv_only = _exchange([q], [q_ranges], q_lens, group), _exchange(kv, kv_r, kv_lens, group)
        parts = lambda: q_only() + kv_only()  # noqa: E731

    def finish():
        q_out, k_out, v_out, *mask_out = parts()
        return q_out, k_out, v_out, (mask_out[0][:, 0, :, 0] > 0.5) if mask_out else None

    return finish


def _exchange(tensors, ranges, lens, group) -> Callable[[], list[torch.Tensor]]:
    """Token-major all-to-all of head slices: ``tensors[i]`` is [B, H_i, s, D_i], ``ranges[i][dst]``
    the heads it sends to ``dst``. Posts the exchange; ``finish()`` returns each tensor's own heads
    of the chunk, [B, h_i, S, D_i], as views of the one receive buffer."""
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
    buf = all_to_all(send, send_counts, [n * b * width(me) for n in lens], group, wait=False)

    def finish():
        received = wait(buf).view(total, b, width(me))
        return [view.permute(1, 2, 0, 3) for *_, view in columns(received, me, total)]

    return finish


def gather_heads(
    out: torch.Tensor, *, group: dist.ProcessGroup, heads: HeadSplit, q_lens: Sequence[int]
) -> torch.Tensor:
    """out [B, h, S_q, Dv] (own heads, whole chunk) -> [B, H, s_q, Dv] (all heads, own shard).

    The result is a ``[B, s_q, H, Dv]`` tensor seen through ``transpose(1, 2)``.
    """
    s = q_lens[dist.get_rank(group)]
    result = out.new_empty(out.shape[0], s, heads.q_heads, out.shape[-1])
    _gather(out, group, heads.q_ranges, q_lens, result)()
    return result.transpose(1, 2)


def _gather(out, group, q_ranges, q_lens, result, add: bool = False) -> Callable[[], None]:
    """Post the return of ``out`` [B, h, S_q, Dv]; ``finish()`` writes every source's heads
    (``q_ranges[src]``) into ``result`` [B, s_q, H, Dv] (adds them, with ``add``)."""
    me = dist.get_rank(group)
    b, h, _, dv = out.shape
    s = q_lens[me]
    send = out.permute(2, 0, 1, 3).reshape(-1)  # token-major; a view when the kernel wrote it so
    recv_counts = [s * b * (hi - lo) * dv for lo, hi in q_ranges]
    flat = all_to_all(send, [n * b * h * dv for n in q_lens], recv_counts, group, wait=False)

    def finish():
        for (lo, hi), piece in zip(q_ranges, wait(flat).split(recv_counts)):
            view = piece.view(s, b, hi - lo, dv).transpose(0, 1)
            result[:, :, lo:hi].add_(view) if add else result[:, :, lo:hi].copy_(view)

    return finish
