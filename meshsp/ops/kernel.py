"""The local attention kernel: ``(out, lse)`` on one device, with a real log-sum-exp.

Shape legend: B batch, H query heads, Hk key/value heads, G = H // Hk, Sq / Sk local query / key
lengths, D head dim (Dv for values).

Every algorithm (ring merge, hybrid) needs the per-row log-sum-exp of the scores. The fused kernels
return it: ``_scaled_dot_product_flash_attention_for_cpu`` on CPU, the flash / memory-efficient
kernels on CUDA; float64 on CUDA (no fused kernel), value head dims that differ from the query's,
and other devices use the explicit math below.

Conventions the merge relies on: a row whose keys are all masked (or an empty key shard) has
``lse = -inf`` and ``out = 0``; zero-length query shards give empty outputs without calling a kernel
(the CPU kernel crashes on them).
"""

from __future__ import annotations

import torch

__all__ = ["local_attention", "math_attention"]

_NEG_INF = float("-inf")


def _fold_groups(q_BHSD: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, Sq, D] -> [B, Hk, G*Sq, D]: each K/V head serves its G query heads as longer rows."""
    b, h, s, d = q_BHSD.shape
    return q_BHSD.reshape(b, kv_heads, (h // kv_heads) * s, d)


def _additive(mask_BSk: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean key-padding mask (True = attend) -> additive bias [B, 1, 1, Sk]."""
    bias = torch.zeros(mask_BSk.shape, dtype=dtype, device=mask_BSk.device)
    return bias.masked_fill_(~mask_BSk, _NEG_INF)[:, None, None, :]


def math_attention(q, k, v, mask_BSk=None, scale=None):
    """Reference attention by explicit scores; any dtype, any device. Returns (out, lse)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask_BSk is not None:
        scores = scores.masked_fill(~mask_BSk[:, None, None, :], _NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(probs.to(v.dtype), v), lse


def _cpu_kernel(q, k, v, mask_BSk, scale):
    kv_heads = k.shape[1]
    # The CPU kernel runs ~3% faster on head-major memory than on token-major views (measured at
    # S=8192, D=64), which pays for the copy.
    q_fold = _fold_groups(q, kv_heads).contiguous()
    bias = None if mask_BSk is None else _additive(mask_BSk, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_fold, k.contiguous(), v.contiguous(), attn_mask=bias, scale=scale
    )
    b, h, s, _ = q.shape
    return out.reshape(b, h, s, v.shape[-1]), lse.reshape(b, h, s)


def _cuda_kernel(q, k, v, mask_BSk, scale):
    kv_heads = k.shape[1]
    q_fold = _fold_groups(q, kv_heads).contiguous()
    b, h, s, _ = q.shape
    if mask_BSk is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q_fold, k.contiguous(), v.contiguous(), scale=scale
        )[:2]
    else:
        bias = None
        if mask_BSk is not None:
            # The memory-efficient kernel wants a bias whose last dim is 16-aligned in memory.
            sk = k.shape[2]
            padded = torch.zeros(b, 1, 1, -(-sk // 16) * 16, dtype=q.dtype, device=q.device)
            padded[..., :sk] = _additive(mask_BSk, q.dtype)
            bias = padded[..., :sk].expand(b, kv_heads, q_fold.shape[2], sk)
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            q_fold, k.contiguous(), v.contiguous(), bias, True, scale=scale
        )[:2]
    lse = lse[..., : q_fold.shape[2]]  # the efficient kernel pads lse rows to a multiple of 32
    return out.reshape(b, h, s, v.shape[-1]), lse.reshape(b, h, s)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_BSk: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, Sq, D] over k, v [B, Hk, Sk, D] -> (out [B, H, Sq, Dv], lse [B, H, Sq]).

    ``mask_BSk`` is a boolean key-padding mask (True = attend). ``lse`` is float32, or float64 for
    float64 inputs.

    Example::

        out, lse = local_attention(q, k, v, mask_BSk=text_mask)
    """
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if sq == 0 or sk == 0 or h == 0:
        out = q.new_zeros(b, h, sq, v.shape[-1])
        return out, torch.full((b, h, sq), _NEG_INF, dtype=lse_dtype, device=q.device)
    if q.shape[-1] != v.shape[-1]:  # the fused kernels need one head size for q, k and v
        out, lse = math_attention(q, k, v, mask_BSk, scale)
    elif q.device.type == "cpu":
        out, lse = _cpu_kernel(q, k, v, mask_BSk, scale)
    elif q.device.type == "cuda" and q.dtype != torch.float64:
        out, lse = _cuda_kernel(q, k, v, mask_BSk, scale)
    else:
        out, lse = math_attention(q, k, v, mask_BSk, scale)
    lse = lse.to(lse_dtype)
    if mask_BSk is not None:
        # Fully masked rows: the fused kernels report lse = 0 with a zero output; make it -inf so
        # that merging with other key blocks gives such a block no weight.
        empty_B = ~mask_BSk.any(dim=-1)
        lse = lse.masked_fill(empty_B[:, None, None], _NEG_INF)
        out = out.masked_fill(empty_B[:, None, None, None], 0.0)
    return out, lse
