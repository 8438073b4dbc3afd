"""``meshsp selftest [--device cpu|cuda]``: the local attention kernel and the tiny pipelines on one device.

1. **Kernel paths.** ``meshsp.ops.local_attention`` — the function every SP algorithm calls on its
   local shards — on each path it takes for the device (CPU: the fused CPU flash kernel, and the
   math path for value head dims that differ; CUDA: flash for unmasked bf16/fp16, memory-efficient
   for masks and fp32, math for float64), in bf16, fp16 and fp32, with key-padding masks, grouped
   queries, odd head dims and empty shards. Each output must be no further from a float64
   reference than ``F.scaled_dot_product_attention`` in the same dtype (x1.5, plus a floor of a few
   units in the dtype's last place), and its log-sum-exp must match the float64 one.
2. **Generation.** A 1-rank bf16 generation of each embedded tiny pipeline: finite, right size.
3. **Timing.** The kernel against plain SDPA at one larger shape, same dtype.

Prints one line per check and returns 0 only if all pass.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meshsp.ops.kernel import local_attention, math_attention

__all__ = ["CASES", "run"]


@dataclass(frozen=True)
class Case:
    name: str
    b: int = 2
    h: int = 4
    hk: int = 4
    sq: int = 77
    sk: int = 77
    d: int = 64
    dv: int | None = None
    mask: bool = False


CASES = (
    Case("plain"),
    Case("key-padding mask", mask=True),
    Case("GQA 8 query / 2 kv heads", h=8, hk=2),
    Case("GQA + mask, cross lengths", h=6, hk=3, sq=33, sk=91, mask=True),
    Case("odd head dim 40", d=40),
    Case("odd head dim 72, mask", d=72, mask=True),
    Case("value head dim != query's", d=64, dv=32),
    Case("empty query shard", sq=0),
    Case("empty key shard", sk=0),
    Case("one token", sq=1, sk=1),
)
_TOL_ULP = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 2 ** -23}


def _path(case: Case, dtype: torch.dtype, device: str) -> str:
    if case.sq == 0 or case.sk == 0:
        return "empty (no kernel)"
    if (case.dv or case.d) != case.d:
        return "math"
    if device == "cpu":
        return "cpu flash"
    if not case.mask and dtype in (torch.float16, torch.bfloat16) and case.d <= 256:
        return "cuda flash"
    return "cuda memory-efficient"


def _inputs(case: Case, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(zlib.crc32(case.name.encode()))  # the same inputs in every process
    q = torch.randn(case.b, case.h, case.sq, case.d, generator=g, dtype=torch.float64)
    k = torch.randn(case.b, case.hk, case.sk, case.d, generator=g, dtype=torch.float64)
    v = torch.randn(case.b, case.hk, case.sk, case.dv or case.d, generator=g, dtype=torch.float64)
    mask = None
    if case.mask and case.sk:
        mask = torch.rand(case.b, case.sk, generator=g) < 0.7
        mask[:, 0] = True
    cast = [t.to(device=device, dtype=dtype) for t in (q, k, v)]
    return (q, k, v), cast, None if mask is None else mask.to(device)


def check_kernel(case: Case, dtype: torch.dtype, device: str) -> tuple[bool, str]:
    """One case in one dtype: (passed, description)."""
    (q64, k64, v64), (q, k, v), mask = _inputs(case, dtype, device)
    ref, ref_lse = math_attention(q64, k64, v64, None if mask is None else mask.cpu())
    out, lse = local_attention(q, k, v, mask)
    if case.sq == 0 or case.sk == 0:
        ok = out.shape == ref.shape and bool((out == 0).all()) and bool(torch.isinf(lse).all() or lse.numel() == 0)
        return ok, f"shape {tuple(out.shape)}, zeros, lse -inf"
    err = (out.double().cpu() - ref).abs().max().item()
    if (case.dv or case.d) == case.d:
        sdpa_mask = None if mask is None else mask[:, None, None, :]
        base = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, enable_gqa=case.h != case.hk)
        bound = (base.double().cpu() - ref).abs().max().item()
    else:
        bound = 0.0  # no fused SDPA for differing head dims: hold the math path to the dtype's rounding
    scale = ref.abs().max().item()
    # Without SDPA to compare with, the floor alone bounds the math path: 16 units of rounding (one
    # in 40 random inputs of that case needed 9 in float32).
    allowed = 1.5 * bound + (8 if bound else 16) * _TOL_ULP[dtype] * max(scale, 1.0)
    lse_err = (lse.double().cpu() - ref_lse).abs().max().item()
    lse_allowed = 16 * _TOL_ULP[dtype] * max(ref_lse.abs().max().item(), 1.0)  # scores round in the dtype
    ok = err <= allowed and lse_err <= lse_allowed and math.isfinite(err)
    return ok, f"max err {err:.1e} (SDPA {bound:.1e}, allowed {allowed:.1e}), lse err {lse_err:.1e}"


def time_kernel(dtype: torch.dtype, device: str, s: int, repeats: int = 5) -> tuple[float, float]:
    """Median seconds of local_attention and of F.scaled_dot_product_attention at [1, 8, s, 64]."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, s, 64, generator=g).to(device=device, dtype=dtype) for _ in range(3))

    def median(fn):
        times = []
        for _ in range(repeats + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return sorted(times[1:])[repeats // 2]

    return median(lambda: local_attention(q, k, v)), median(lambda: F.scaled_dot_product_attention(q, k, v))


def check_pipeline(name: str, device: str) -> tuple[bool, str]:
    from meshsp.engine import Engine, SamplingParams

    t0 = time.perf_counter()
    with Engine(name, dtype="bfloat16", device=device) as engine:
        params = SamplingParams(num_inference_steps=2, width=64, height=64, seed=0,
                                num_frames=5 if engine.is_video else None)
        images = engine.generate("a cat", params)
    frames = images[0] if isinstance(images[0], list) else [images[0]]
    import numpy as np

    pixels = np.asarray(frames[0])
    ok = frames[0].size == (64, 64) and np.isfinite(pixels).all()
    return ok, f"{len(frames)} frame(s) {frames[0].size}, {time.perf_counter() - t0:.1f} s"


def run(device: str = "cpu", pipelines: bool = True) -> int:
    """Run every check on ``device``; print a line each; 0 if all pass."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("selftest --device cuda: no CUDA device is visible; use --device cpu.")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"selftest --device must be 'cpu' or 'cuda'; got {device!r}.")
    start = time.perf_counter()
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"meshsp selftest on {device} ({name}), torch {torch.__version__}")
    failures = 0
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for case in CASES:
            ok, text = check_kernel(case, dtype, device)
            failures += not ok
            label = str(dtype).removeprefix("torch.")
            print(f"  kernel {label:<8} {case.name:<28} [{_path(case, dtype, device)}] {text} {'OK' if ok else 'FAIL'}")
    if pipelines:
        for tiny in ("tiny-qwen-image", "tiny-flux", "tiny-wan"):
            ok, text = check_pipeline(tiny, device)
            failures += not ok
            print(f"  generate {tiny} bf16, 1 rank: {text} {'OK' if ok else 'FAIL'}")
    s = 16384 if device == "cuda" else 2048
    for dtype in (torch.bfloat16, torch.float32):
        mine, sdpa = time_kernel(dtype, device, s)
        print(f"  timing [1, 8, {s}, 64] {str(dtype).removeprefix('torch.')}: meshsp kernel {mine * 1e3:.2f} ms, "
              f"SDPA {sdpa * 1e3:.2f} ms ({sdpa / mine:.2f}x)")
    print(f"{'all checks passed' if not failures else f'{failures} check(s) FAILED'} in {time.perf_counter() - start:.0f} s")
    return 0 if not failures else 1
