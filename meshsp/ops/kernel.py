"""The local attention kernel: ``(out, lse)`` on one device, with a real log-sum-exp.

Shape legend: B batch, H query heads, Hk key/value heads, G = H // Hk, Sq / Sk local query / key
lengths, D head dim of queries and keys, Dv of values; P a head dim padded for a kernel.

Every algorithm (ring merge, hybrid, whole-query) needs the per-row log-sum-exp of the scores, in
float32 at least. ``route`` picks the kernel from what a call is (device, compute capability,
dtype, head dims, mask) — a small table, tested on its own:

==================  ===========================================================================
kernel              taken for
==================  ===========================================================================
``cpu-flash``       every CPU call (``_scaled_dot_product_flash_attention_for_cpu``, any dtype)
``cuda-flash``      CUDA, bf16 / fp16, no mask, compute capability 8.0+, padded head dim <= 256
``cuda-efficient``  other CUDA calls the memory-efficient kernel takes: masks, fp32, head dims
                    above 256, capability below 8.0 (fp16 / fp32; bf16 needs 8.0)
``math``            float64 on CUDA, bf16 below capability 8.0, other devices: explicit scores
                    in float32 (float64 for float64), query rows in chunks of bounded memory
==================  ===========================================================================

Head dims a kernel cannot take are padded with zeros, which changes no score and no output: q and
k to the kernel's alignment (8 for flash; the memory-efficient kernel's GEMM alignment), v to its
own; where a kernel needs one head dim for q, k and v (flash, CPU), all three to the larger. The
softmax scale stays the original ``D ** -0.5``; the output is sliced back to ``Dv``.

Conventions the merge relies on: a row whose keys are all masked (or an empty key shard) has
``lse = -inf`` and ``out = 0``; zero-length query shards give empty outputs without calling a kernel
(the CPU kernel crashes on them). Nothing here synchronises with the host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshsp.ops.comm import count_scores

__all__ = ["KernelRoute", "local_attention", "math_attention", "route"]

_NEG_INF = float("-inf")
_HALF = (torch.float16, torch.bfloat16)
_FLASH_MAX_HEAD_DIM = 256
MATH_CHUNK_BYTES = 256 << 20  # float32 scores alive at a time on the math path


@dataclass(frozen=True)
class KernelRoute:
    """The kernel a call runs on and the head dims it runs at (padded with zeros where larger)."""

    kernel: str
    head_dim: int
    value_dim: int


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _efficient_alignment(dtype: torch.dtype, capability: tuple[int, int]) -> int:
    """The memory-efficient kernel's head-dim alignment (torch's ``minimum_gemm_alignment``):
    tensor cores from 7.0 for halves and 8.0 for fp32 want 128-bit rows; 4 elements from 8.0."""
    half = dtype in _HALF
    tensor_cores = capability[0] >= 8 or (capability[0] >= 7 and half)
    alignment = 4 if capability[0] >= 8 else 1
    return max(alignment, 128 // (16 if half else 32)) if tensor_cores else alignment


def route(device_type: str, dtype: torch.dtype, head_dim: int, value_dim: int, masked: bool,
          capability: tuple[int, int] | None = None) -> KernelRoute:
    """The kernel ``local_attention`` runs for such a call; pure (``capability`` is the CUDA
    device's compute capability, read from the device when None).

    Example::

        route("cuda", torch.bfloat16, 72, 72, masked=False, capability=(9, 0))
        # KernelRoute(kernel='cuda-flash', head_dim=72, value_dim=72)
        route("cuda", torch.bfloat16, 100, 100, masked=False, capability=(9, 0))
        # KernelRoute(kernel='cuda-flash', head_dim=104, value_dim=104)
    """
    widest = max(head_dim, value_dim)
    if device_type == "cpu":
        return KernelRoute("cpu-flash", widest, widest)
    if device_type != "cuda" or dtype == torch.float64:
        return KernelRoute("math", head_dim, value_dim)
    capability = capability or (0, 0)
    if dtype in _HALF and not masked and capability[0] >= 8 and _round_up(widest, 8) <= _FLASH_MAX_HEAD_DIM:
        padded = _round_up(widest, 8)
        return KernelRoute("cuda-flash", padded, padded)
    if dtype == torch.bfloat16 and capability[0] < 8:
        return KernelRoute("math", head_dim, value_dim)  # no fused bf16 kernel before Ampere
    a = _efficient_alignment(dtype, capability)
    return KernelRoute("cuda-efficient", _round_up(head_dim, a), _round_up(value_dim, a))


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def route_for(q: torch.Tensor, v: torch.Tensor, masked: bool) -> KernelRoute:
    """``route`` for these tensors."""
    cap = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device()) \
        if q.device.type == "cuda" else None
    return route(q.device.type, q.dtype, q.shape[-1], v.shape[-1], masked, cap)


def _pad(t: torch.Tensor, size: int) -> torch.Tensor:
    return t if t.shape[-1] == size else F.pad(t, (0, size - t.shape[-1]))


def _last_dim_unit_stride(t: torch.Tensor) -> torch.Tensor:
    """The fused kernels take any layout whose last dim is dense (a token-major view included)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _fold_groups(q_BHSD: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, Sq, D] -> [B, Hk, G*Sq, D]: each K/V head serves its G query heads as longer rows."""
    b, h, s, d = q_BHSD.shape
    return q_BHSD if h == kv_heads else q_BHSD.reshape(b, kv_heads, (h // kv_heads) * s, d)


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, Hk, S, D] -> [B, heads, S, D]: each K/V head repeated for its query heads (a copy)."""
    return t if t.shape[1] == heads else t.repeat_interleave(heads // t.shape[1], dim=1)


def _dense_additive(bias: torch.Tensor, dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
    """A pairwise mask [B|1, H|1, Sq, Sk] (bool: True = attend, or additive) as an additive bias in
    ``dtype``, in memory ``width`` wide."""
    sk = bias.shape[-1]
    out = torch.zeros(*bias.shape[:-1], width or sk, dtype=dtype, device=bias.device)[..., :sk]
    if bias.dtype == torch.bool:
        return out.masked_fill_(~bias, _NEG_INF)
    return out.copy_(bias)


def _additive(mask_BSk: torch.Tensor, dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
    """Boolean key-padding mask (True = attend) -> additive bias [B, 1, 1, Sk], in memory ``width``
    wide (the memory-efficient kernel wants a bias whose rows are 16-aligned)."""
    b, sk = mask_BSk.shape
    bias = torch.zeros(b, 1, 1, width or sk, dtype=dtype, device=mask_BSk.device)[..., :sk]
    return bias.masked_fill_(~mask_BSk[:, None, None, :], _NEG_INF)


def math_attention(q, k, v, mask_BSk=None, scale=None, causal=False, bias=None):
    """Reference attention by explicit scores in the inputs' dtype; any device. Returns (out, lse).
    (The selftest's float64 reference; calls in other dtypes route to ``_math_kernel``.)"""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask_BSk is not None:
        scores = scores.masked_fill(~mask_BSk[:, None, None, :], _NEG_INF)
    if bias is not None:
        scores = scores.masked_fill(~bias, _NEG_INF) if bias.dtype == torch.bool else scores + bias.to(scores.dtype)
    if causal:
        later = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(later, _NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(probs.to(v.dtype), v), lse


def _math_kernel(q, k, v, mask_BSk, scale, causal=False, bias=None):
    """Explicit scores in float32 (float64 for float64) over chunks of query rows, so that no more
    than ``MATH_CHUNK_BYTES`` of scores live at a time; out in q's dtype, lse float32 / float64."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    b, h, sq, _ = q.shape
    rows = max(1, MATH_CHUNK_BYTES // max(1, b * h * k.shape[2] * 8))
    k, v = k.to(acc), v.to(acc)
    outs, lses = [], []
    for start in range(0, sq, rows):
        rows_bias = None if bias is None else bias[:, :, start:start + rows]
        if causal:  # rows from ``start`` of a square causal block: keys after each row's index are masked
            later = torch.ones(min(rows, sq - start), k.shape[2], dtype=torch.bool, device=q.device).triu(1 + start)
            rows_bias = ~later[None, None]
        out, lse = math_attention(q[:, :, start:start + rows].to(acc), k, v, mask_BSk, scale, bias=rows_bias)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _cpu_kernel(q, k, v, mask_BSk, scale, causal=False, bias=None):
    # The CPU kernel runs ~3% faster on head-major memory than on token-major views (measured at
    # S=8192, D=64), which pays for the copy.
    if bias is not None:  # a pairwise mask has rows per query head: no folding of query groups
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=_dense_additive(bias, q.dtype), scale=scale)
    if causal and q.shape[1] != k.shape[1]:  # folded rows would break the causal diagonal
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
    q_fold = _fold_groups(q, k.shape[1]).contiguous()
    mask = None if mask_BSk is None else _additive(mask_BSk, q.dtype)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q_fold, k.contiguous(), v.contiguous(), is_causal=causal, attn_mask=mask, scale=scale
    )
    return out, lse


def _cuda_flash(q, k, v, mask_BSk, scale, causal=False, bias=None):
    if causal and q.shape[1] != k.shape[1]:
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
    q_fold = _last_dim_unit_stride(_fold_groups(q, k.shape[1]))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        q_fold, _last_dim_unit_stride(k), _last_dim_unit_stride(v), is_causal=causal, scale=scale
    )[:2]
    return out, lse


def _cuda_efficient(q, k, v, mask_BSk, scale, causal=False, bias=None):
    if (causal or bias is not None) and q.shape[1] != k.shape[1]:
        k, v = _repeat_heads(k, q.shape[1]), _repeat_heads(v, q.shape[1])
    q_fold = _last_dim_unit_stride(_fold_groups(q, k.shape[1]))
    b, hk, sk = k.shape[0], k.shape[1], k.shape[2]
    if bias is not None:
        bias = _dense_additive(bias, q.dtype, _round_up(sk, 16)).expand(b, hk, q_fold.shape[2], sk)
    elif mask_BSk is not None:
        bias = _additive(mask_BSk, q.dtype, _round_up(sk, 16)).expand(b, hk, q_fold.shape[2], sk)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
        q_fold, _last_dim_unit_stride(k), _last_dim_unit_stride(v), bias, True, is_causal=causal, scale=scale
    )[:2]
    return out, lse[..., : q_fold.shape[2]]  # the kernel pads lse rows to a multiple of 32


_KERNELS = {"cpu-flash": _cpu_kernel, "cuda-flash": _cuda_flash, "cuda-efficient": _cuda_efficient}


def run_route(chosen: KernelRoute, q, k, v, mask_BSk=None, scale=None, causal=False, bias=None):
    """Run ``chosen`` (as ``route`` returns it) on non-empty inputs: pad, call, slice back.
    Returns (out [B, H, Sq, Dv], lse [B, H, Sq]) as the kernel gives them."""
    b, h, sq, d = q.shape
    dv = v.shape[-1]
    scale = d ** -0.5 if scale is None else scale
    if chosen.kernel == "math":
        return _math_kernel(q, k, v, mask_BSk, scale, causal, bias)
    q, k, v = _pad(q, chosen.head_dim), _pad(k, chosen.head_dim), _pad(v, chosen.value_dim)
    out, lse = _KERNELS[chosen.kernel](q, k, v, mask_BSk, scale, causal, bias)
    return out.reshape(b, h, sq, chosen.value_dim)[..., :dv], lse.reshape(b, h, sq)


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_BSk: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    causal: bool = False,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q [B, H, Sq, D] over k [B, Hk, Sk, D], v [B, Hk, Sk, Dv] -> (out [B, H, Sq, Dv],
    lse [B, H, Sq]).

    ``mask_BSk`` is a boolean key-padding mask (True = attend); ``bias`` a pairwise mask
    [B|1, H|1, Sq, Sk] (bool, True = attend, or additive); ``causal``: query i sees keys j <= i
    (top-left aligned, as SDPA's ``is_causal``). ``lse`` is float32, or float64 for float64 inputs.
    The kernel is ``route``'s.

    Example::

        out, lse = local_attention(q, k, v, mask_BSk=text_mask)
    """
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if sq == 0 or sk == 0 or h == 0:
        out = q.new_zeros(b, h, sq, v.shape[-1])
        return out, torch.full((b, h, sq), _NEG_INF, dtype=lse_dtype, device=q.device)
    count_scores(b * h * (sq * (sq + 1) // 2 if causal else sq * sk))
    masked = mask_BSk is not None or bias is not None
    out, lse = run_route(route_for(q, v, masked), q, k, v, mask_BSk, scale, causal, bias)
    lse = lse.to(lse_dtype)
    if bias is not None:  # rows with no key left: -inf and 0, as for key padding below
        keep = bias if bias.dtype == torch.bool else ~torch.isneginf(bias)
        empty = ~keep.any(dim=-1).expand(b, h, sq)
        lse = lse.masked_fill_(empty, _NEG_INF)
        out = out.masked_fill_(empty[..., None], 0.0)
    if mask_BSk is not None:
        # Fully masked rows: the fused kernels report lse = 0 (or NaN) with a zero (or NaN)
        # output; make them -inf and 0 so that merging with other key blocks gives them no weight.
        # In place: both are the kernel's fresh outputs (no copy of the output per call).
        empty_B = ~mask_BSk.any(dim=-1)
        lse = lse.masked_fill_(empty_B[:, None, None], _NEG_INF)
        out = out.masked_fill_(empty_B[:, None, None, None], 0.0)
    return out, lse


# Representative calls for the routing table the docs print (meshsp selftest --routes).
ROUTE_EXAMPLES = (
    ("cpu", None, torch.bfloat16, 128, 128, False),
    ("cpu", None, torch.float32, 40, 40, True),
    ("cpu", None, torch.float32, 64, 32, False),
    ("cuda", (9, 0), torch.bfloat16, 128, 128, False),
    ("cuda", (9, 0), torch.bfloat16, 100, 100, False),
    ("cuda", (9, 0), torch.float16, 6, 6, False),
    ("cuda", (9, 0), torch.bfloat16, 192, 128, False),
    ("cuda", (9, 0), torch.bfloat16, 320, 320, False),
    ("cuda", (9, 0), torch.bfloat16, 128, 128, True),
    ("cuda", (9, 0), torch.bfloat16, 100, 100, True),
    ("cuda", (9, 0), torch.float32, 128, 128, False),
    ("cuda", (9, 0), torch.float32, 6, 6, True),
    ("cuda", (9, 0), torch.float32, 64, 30, True),
    ("cuda", (7, 5), torch.float16, 128, 128, False),
    ("cuda", (7, 5), torch.float32, 6, 6, False),
    ("cuda", (7, 5), torch.bfloat16, 128, 128, False),
    ("cuda", (9, 0), torch.float64, 64, 64, False),
)


def routes_markdown() -> str:
    """``ROUTE_EXAMPLES`` through ``route``, as a markdown table."""
    rows = ["| device | capability | dtype | D | Dv | mask | kernel | runs at D, Dv |", "|---|---|---|---|---|---|---|---|"]
    for device, cap, dtype, d, dv, masked in ROUTE_EXAMPLES:
        r = route(device, dtype, d, dv, masked, cap)
        padded = f"{r.head_dim}, {r.value_dim}" + (" (padded)" if (r.head_dim, r.value_dim) != (d, dv) else "")
        rows.append(f"| {device} | {'.'.join(map(str, cap)) if cap else '-'} | {str(dtype).removeprefix('torch.')} "
                    f"| {d} | {dv} | {'yes' if masked else 'no'} | `{r.kernel}` | {padded} |")
    return "\n".join(rows)
