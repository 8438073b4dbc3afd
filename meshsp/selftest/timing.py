"""Kernel timings: ``local_attention`` against ``F.scaled_dot_product_attention``, same inputs.

Information, not a check: the median of a few calls after one warm-up, on CUDA between
``torch.cuda.synchronize()`` calls.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from meshsp.ops.kernel import local_attention
from meshsp.selftest.kernels import route_label

__all__ = ["TIMINGS", "time_kernel"]

# (name, dtype, masked): unmasked bf16 takes the flash kernel on CUDA, a mask the memory-efficient one.
TIMINGS = (("flash bf16", torch.bfloat16, False), ("masked bf16", torch.bfloat16, True),
           ("fp32", torch.float32, False))


def _shape(device: str) -> tuple[int, int, int, int]:
    return (1, 24, 8192, 128) if device == "cuda" else (1, 8, 1024, 64)


def _median_s(fn, device: str, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times[1:])[repeats // 2]


def time_kernel(dtype: torch.dtype, masked: bool, device: str, repeats: int = 5) -> dict:
    """Median ms of both at [B, H, S, D] (larger on CUDA); with ``masked``, the last 10% of keys
    masked (a padded text). Returns shape, kernel, meshsp_ms, sdpa_ms, ratio (meshsp / SDPA)."""
    b, h, s, d = _shape(device)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, generator=g).to(device=device, dtype=dtype) for _ in range(3))
    mask = (torch.arange(s) < s - s // 10).expand(b, s).to(device) if masked else None
    sdpa_mask = None if mask is None else mask[:, None, None, :]
    mine = _median_s(lambda: local_attention(q, k, v, mask), device, repeats)
    sdpa = _median_s(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask), device, repeats)
    return {"shape": [b, h, s, d], "dtype": str(dtype).removeprefix("torch."), "masked": masked,
            "kernel": route_label(device, dtype, d, d, masked), "meshsp_ms": round(mine * 1e3, 3),
            "sdpa_ms": round(sdpa * 1e3, 3), "ratio": round(mine / sdpa, 3)}
