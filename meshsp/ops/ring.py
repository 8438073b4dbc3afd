"""Ring attention over the ``ring`` axis: rotate K/V around the ring, merge blocks by log-sum-exp.

Shape legend: B batch, H query heads, Hk key/value heads, Sq local query length, Sk_i the key
length of ring rank i (uneven lengths allowed: every rank knows them all from the global shape),
D head dim.

Step t computes attention of the local queries over the K/V block that started on rank
``me - t``, while the block for step t + 1 is already in flight (one fused P2P buffer of K, V and
the key mask). Partial results merge in float32 (float64 for float64 inputs):
``out = sum_i exp(lse_i - lse) * out_i`` with ``lse = logsumexp_i lse_i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from meshsp.ops.comm import PointToPoint, RingPass
from meshsp.ops.kernel import local_attention
from meshsp.ops.kernel_backward import local_attention_backward

__all__ = ["ring_attention", "ring_attention_backward", "merge_partials"]


def merge_partials(out_a, lse_a, out_b, lse_b, *, into_a: bool = False):
    """Merge two attention partials over disjoint key sets. Rows with no keys keep lse = -inf.

    With ``into_a`` the result is written into ``out_a`` (an accumulator) and ``out_b`` is used as
    scratch, saving two temporaries of the output's size.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe)[..., None]
    w_b = torch.exp(lse_b - safe)[..., None]
    if into_a:
        return out_a.mul_(w_a).add_(out_b.to(out_a.dtype).mul_(w_b)), lse
    return out_a * w_a + out_b.to(out_a.dtype) * w_b, lse


def _kv_buffer(k, v, mask_BS):
    parts = [k.reshape(-1), v.reshape(-1)]
    if mask_BS is not None:
        parts.append(mask_BS.to(k.dtype).reshape(-1))
    return torch.cat(parts)


def _unpack(flat, b, hk, sk, d, dv, with_mask):
    n_k, n_v = b * hk * sk * d, b * hk * sk * dv
    k = flat[:n_k].view(b, hk, sk, d)
    v = flat[n_k : n_k + n_v].view(b, hk, sk, dv)
    mask = flat[n_k + n_v :].view(b, sk) > 0.5 if with_mask else None
    return k, v, mask


def ring_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_BSk: torch.Tensor | None = None,
    *,
    group: dist.ProcessGroup,
    kv_lens: Sequence[int],
    scale: float | None = None,
    attend: Callable | None = None,
    needs: Callable[[int, int], bool] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Sq, D] attends over the K/V of every ring rank. Returns (out [B, H, Sq, Dv], lse).

    ``kv_lens[i]`` is the local key length of ring rank ``i``; ``mask_BSk`` [B, Sk] is the local
    key-padding mask (True = attend), rotated with its keys. ``attend(src, q, k, v, mask)`` computes
    one block (default: ``local_attention``) and may return None for a block the mask empties;
    ``needs(src, dst)`` says whether ring rank ``dst`` attends any key of ``src``'s block (every
    rank answers alike): a block is sent on only while a rank further along its way needs it.

    Example::

        out, lse = ring_attention(q, k, v, group=mesh["ring"].get_group(), kv_lens=(5, 5, 4, 4))
    """
    size, me = dist.get_world_size(group), dist.get_rank(group)
    b, hk, _, d = k.shape
    dv = v.shape[-1]
    with_mask = mask_BSk is not None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    attend = attend or (lambda src, q, k, v, m: local_attention(q, k, v, m, scale))

    def numel(src: int) -> int:
        return b * hk * kv_lens[src] * (d + dv) + (b * kv_lens[src] if with_mask else 0)

    def wanted(src: int, at: int) -> bool:
        """Does ring rank ``at`` or a rank after it on the block's way (up to ``src - 1``) need it?"""
        return needs is None or any(needs(src, (src + j) % size) for j in range((at - src) % size, size))

    block = _kv_buffer(k, v, mask_BSk)
    if q.device.type == "cpu" or q.shape[1] != hk:
        q = q.contiguous()  # once, not at every step (the CPU kernel and grouped queries want it)
    out = lse = None
    for step in range(size):
        src = (me - step) % size
        pending = None
        if step + 1 < size:
            send = block if block is not None and wanted(src, (me + 1) % size) else block_empty(k)
            prev = (src - 1) % size
            pending = RingPass(group, send, numel(prev) if wanted(prev, me) else 0)
        part = None
        if block is not None and (needs is None or needs(src, me)):
            k_i, v_i, m_i = _unpack(block, b, hk, kv_lens[src], d, dv, with_mask)
            part = attend(src, q, k_i, v_i, m_i)
        if part is not None:
            out_i, lse_i = part
            if out is None:
                out, lse = out_i.to(acc), lse_i  # a fresh tensor the merges may write into
            else:
                out, lse = merge_partials(out, lse, out_i, lse_i, into_a=True)
        if pending is not None:
            received = pending.wait()
            block = received if wanted((src - 1) % size, me) else None
    if out is None:  # no key of any block is attended: zero rows with lse = -inf
        out = q.new_zeros(*q.shape[:3], dv, dtype=acc)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=acc, device=q.device)
    return out.to(q.dtype), lse


def _path_end(src: int, size: int, needs) -> int:
    """How many hops block ``src`` travels: the offset of the last ring rank that attends it."""
    if needs is None:
        return size - 1
    return max((j for j in range(size) if needs(src, (src + j) % size)), default=0)


def ring_attention_backward(q, k, v, out, dout, lse, mask_BSk=None, *, group, kv_lens, scale=None,
                            attend_backward=None, needs=None):
    """The gradients of ``ring_attention``: given its inputs, its ``out`` and ``lse`` and ``dout``,
    returns (dq [B, H, Sq, D], dk, dv of the local block) in float32 (float64 for float64).

    ``attend_backward(src, q, k, v, mask, out, dout, lse)`` computes one block's shares (default:
    ``local_attention_backward``), or returns None where ``attend`` returned None; ``needs`` as for
    ``ring_attention`` (the same blocks travel).

    Example::

        dq, dk, dv = ring_attention_backward(q, k, v, out, dout, lse, group=g, kv_lens=(5, 5, 4, 4))
    """
    size, me = dist.get_world_size(group), dist.get_rank(group)
    b, hk, _, d = k.shape
    dv_ = v.shape[-1]
    with_mask = mask_BSk is not None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    attend_backward = attend_backward or (
        lambda src, q, k, v, m, o, do, l: local_attention_backward(q, k, v, o, do, l, m, scale))
    ends = [_path_end(src, size, needs) for src in range(size)]

    def numel(src: int) -> int:
        return b * hk * kv_lens[src] * (d + dv_) + (b * kv_lens[src] if with_mask else 0)

    def grads(src: int) -> int:
        return b * hk * kv_lens[src] * (d + dv_)

    if q.device.type == "cpu" or q.shape[1] != hk:
        q = q.contiguous()
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    block, home = _kv_buffer(k, v, mask_BSk), None
    hop, carries, homecoming = None, False, False  # the gradient messages posted at the last step

    def arrive():
        """Wait for the last step's gradient messages: (the sum carried to this step, home)."""
        received = hop.wait() if hop is not None else []
        carried = received.pop(0) if carries else None
        return carried, (received.pop(0) if homecoming else None)

    for step in range(size):
        src = (me - step) % size
        prev = (src - 1) % size
        pending = None
        if step + 1 < size:  # the K/V hop for the next step, as the forward's
            send = block if block is not None and step + 1 <= ends[src] else block_empty(k)
            pending = RingPass(group, send, numel(prev) if step + 1 <= ends[prev] else 0)
        share = None
        if block is not None and (needs is None or needs(src, me)):
            k_i, v_i, m_i = _unpack(block, b, hk, kv_lens[src], d, dv_, with_mask)
            share = attend_backward(src, q, k_i, v_i, m_i, out, dout, lse)
        total, arrived_home = arrive()  # posted a step ago: its transfer overlapped this step's share
        home = arrived_home if arrived_home is not None else home
        if share is not None:
            dq += share[0]
            flat = torch.cat([share[1].reshape(-1), share[2].reshape(-1)])
            total = flat if total is None else total.add_(flat)
        if block is not None and total is None:
            total = torch.zeros(grads(src), dtype=acc, device=q.device)
        sends = []
        if block is not None:
            if step + 1 <= ends[src]:
                sends.append((total, (me + 1) % size))
            elif src != me:
                sends.append((total, src))  # the block's path ends here: its gradients go home
            else:
                home = total
        carries = step + 1 < size and step + 1 <= ends[prev]
        homecoming = step == ends[me] and step > 0
        recvs = ([(grads(prev), (me - 1) % size)] if carries else []) + \
            ([(grads(me), (me + step) % size)] if homecoming else [])
        hop = PointToPoint(group, sends, recvs, dq) if sends or recvs else None
        if pending is not None:
            arrived = pending.wait()
            block = arrived if step + 1 <= ends[prev] else None
    _, arrived_home = arrive()
    home = arrived_home if arrived_home is not None else home
    if home is None:
        home = torch.zeros(grads(me), dtype=acc, device=q.device)
    n_k = b * hk * kv_lens[me] * d
    return dq, home[:n_k].view(b, hk, kv_lens[me], d), home[n_k:].view(b, hk, kv_lens[me], dv_)


def block_empty(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0)
