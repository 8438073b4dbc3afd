"""The local kernel's backward: one block's share of the gradients, given the whole attention's
output and log-sum-exp.

Shape legend as in ``meshsp.ops.kernel``: B batch, H query heads, Hk key/value heads, G = H // Hk,
Sq / Sk the block's query / key lengths, D / Dv head dims.

Attention over keys split in blocks (a ring's steps, a mask's kernel calls, the ranks of whole-query
attention) has, with the *whole* output ``O`` and log-sum-exp ``L`` of a query row,
``P_ij = exp(s_ij - L_i)`` for every key j of every block, and ``dS_ij = P_ij (dP_ij - delta_i)``
with ``delta_i = rowsum(dO_i * O_i)``. So each block's ``dq`` share, ``dk`` and ``dv`` follow from the
block's own q, k, v with the whole ``O``, ``dO`` and ``L`` — what flash attention's backward kernels
compute when they are handed those. Rows with ``L = -inf`` (no key anywhere) get ``L = +inf``: their
``P`` is 0, and they contribute nothing.

``route`` is the forward's; the backward runs the CPU flash backward on CPU and explicit scores
(float32, float64 for float64, query rows in chunks) elsewhere. Gradients come back in float32 (float64
for float64), so that shares add up without rounding to a half dtype in between.
"""

from __future__ import annotations

import torch

from meshsp.ops.kernel import (
    MATH_CHUNK_BYTES, _additive, _dense_additive, _fold_groups, _pad, _repeat_heads, route_for)

__all__ = ["local_attention_backward"]


def _finite_lse(lse: torch.Tensor) -> torch.Tensor:
    return lse.masked_fill(torch.isneginf(lse), float("inf"))


def _sum_groups(t: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, S, D] gradients of repeated K/V heads -> [B, Hk, S, D] (each head's G copies summed)."""
    b, h, s, d = t.shape
    return t if h == kv_heads else t.view(b, kv_heads, h // kv_heads, s, d).sum(2)


def _cpu_backward(q, k, v, out, dout, lse, mask_BSk, scale, causal, bias):
    b, h, sq, _ = q.shape
    hk = k.shape[1]
    repeat = bias is not None or (causal and h != hk)
    mask = None
    if bias is not None:
        mask = _dense_additive(bias, q.dtype)
    elif mask_BSk is not None:
        mask = _additive(mask_BSk, q.dtype)
    if repeat:  # per-head masks and causal diagonals: one K/V head per query head, as the forward
        k, v = _repeat_heads(k, h), _repeat_heads(v, h)
    fold = h if repeat else hk
    q_f = _fold_groups(q, fold).contiguous()
    shape = (b, fold, -1)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout.reshape(b, fold, -1, dout.shape[-1]).contiguous(), q_f, k.contiguous(), v.contiguous(),
        out.reshape(b, fold, -1, out.shape[-1]).contiguous(), lse.reshape(shape).contiguous(), 0.0, causal,
        attn_mask=mask, scale=scale)
    dq = dq.reshape(b, h, sq, q.shape[-1])
    if repeat:
        dk, dv = _sum_groups(dk, hk), _sum_groups(dv, hk)
    return dq, dk, dv


def _math_backward(q, k, v, out, dout, lse, mask_BSk, scale, causal, bias):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, sq, _ = q.shape
    hk, sk = k.shape[1], k.shape[2]
    k_h, v_h = _repeat_heads(k, h).to(acc), _repeat_heads(v, h).to(acc)
    dq = torch.empty(b, h, sq, q.shape[-1], dtype=acc, device=q.device)
    dk = torch.zeros(b, h, sk, k.shape[-1], dtype=acc, device=q.device)
    dv = torch.zeros(b, h, sk, v.shape[-1], dtype=acc, device=q.device)
    rows = max(1, MATH_CHUNK_BYTES // max(1, b * h * sk * 8))
    for start in range(0, sq, rows):
        end = min(sq, start + rows)
        q_c, o_c, do_c = (t[:, :, start:end].to(acc) for t in (q, out, dout))
        s = torch.matmul(q_c, k_h.transpose(-1, -2)) * scale
        if mask_BSk is not None:
            s = s.masked_fill(~mask_BSk[:, None, None, :], float("-inf"))
        if bias is not None:
            rows_bias = bias[:, :, start:end]
            s = s.masked_fill(~rows_bias, float("-inf")) if rows_bias.dtype == torch.bool else s + rows_bias.to(acc)
        if causal:
            later = torch.ones(end - start, sk, dtype=torch.bool, device=q.device).triu(1 + start)
            s = s.masked_fill(later, float("-inf"))
        p = torch.exp(s - lse[:, :, start:end, None].to(acc))
        dv += torch.matmul(p.transpose(-1, -2), do_c)
        dp = torch.matmul(do_c, v_h.transpose(-1, -2))
        ds = p * (dp - (do_c * o_c).sum(-1, keepdim=True))
        dq[:, :, start:end] = torch.matmul(ds, k_h) * scale
        dk += torch.matmul(ds.transpose(-1, -2), q_c) * scale
    return dq, _sum_groups(dk, hk), _sum_groups(dv, hk)


def local_attention_backward(q, k, v, out, dout, lse, mask_BSk=None, scale=None, *, causal=False, bias=None):
    """This block's share of the gradients: q [B, H, Sq, D] over k [B, Hk, Sk, D], v [B, Hk, Sk, Dv],
    where ``out`` [B, H, Sq, Dv] and ``lse`` [B, H, Sq] are the whole attention's (every key block)
    and ``dout`` the output's gradient. Masks as ``local_attention``'s. Returns (dq share, dk, dv) in
    float32 (float64 for float64).

    Example::

        dq, dk, dv = local_attention_backward(q, k_blk, v_blk, out, dout, lse)
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, sq, d = q.shape
    sk, dv_ = k.shape[2], v.shape[-1]
    if sq == 0 or sk == 0 or h == 0:
        return (q.new_zeros(q.shape, dtype=acc), k.new_zeros(k.shape, dtype=acc), v.new_zeros(v.shape, dtype=acc))
    scale = d ** -0.5 if scale is None else scale
    lse = _finite_lse(lse.to(acc))
    masked = mask_BSk is not None or bias is not None
    chosen = route_for(q, v, masked)
    if chosen.kernel != "cpu-flash":
        dq, dk, dv = _math_backward(q, k, v, out, dout, lse, mask_BSk, scale, causal, bias)
        return dq, dk, dv
    width = chosen.head_dim
    # Halves run the backward in float32: a block's shares are summed with other blocks' (ring steps,
    # ranks, mask calls), and rounding each share to bf16 first would be worse than one process.
    dtype = acc
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    dq, dk, dv = _cpu_backward(_pad(q, width), _pad(k, width), _pad(v, width), _pad(out.to(dtype), width),
                               _pad(dout.to(dtype), width), lse, mask_BSk, scale, causal, bias)
    return dq[..., :d].to(acc), dk[..., :d].to(acc), dv[..., :dv_].to(acc)
