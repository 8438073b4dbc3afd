"""``meshsp bench models --real-width``: each family at its published width, SP-2 vs 1 process.

The toy benchmarks (``bench models``, ``bench perf``) run 8 heads of 16; this one builds each
transformer with the real model's widths — hidden size, heads x head dim, MLP/FFN width, text and
joint dims — and one block of each stack kind (seeded random weights, no download), at a few
thousand tokens, in float32 and bfloat16 (weights and inputs cast, the class's
``_keep_in_fp32_modules`` kept in float32 as ``from_pretrained(torch_dtype=...)`` does). For each
family and dtype it reports, in one run:

* the forward time, median of ``repeats`` after a warm-up, of 1 process (a 1-rank pool) and of U2
  and R2 (a 2-rank pool, ``advanced_uaa`` plans), one thread per rank, and the speedups;
* the peak activation memory of one forward per rank (the larger rank) relative to 1 process,
  measured in workers of their own started with ``MALLOC_MMAP_THRESHOLD_=65536`` (see
  ``meshsp.bench.perf``).

Default size: 2048 image tokens (a 32x64 grid; video 2 frames of 32x32) plus 256 text tokens,
Flux, Qwen-Image and Wan, median of 3. At real width the linears dominate: one fp32 forward of one
Wan 14B block on 2048 tokens takes ~8 s on one core of this project's CPU (bf16 ~2.5 s, AMX), and
building the ~0.55 B random weights takes ~4 s per worker call, so the three families fit in about
12 minutes; 4096 tokens would take ~2.5x longer. The other six families run on request.

Example::

    rows = run_real_width(["flux", "qwen-image", "wan"], dtypes=("float32", "bfloat16"), tokens=2048)
    rows[0]["U2_mem_ratio"]  # per-rank peak activation memory of U2 / 1 process
"""

from __future__ import annotations

import importlib
import math

import torch

from meshsp.bench.models import VIDEO, _overrides, measure, median_max
from meshsp.bench.perf import _mmap_pool
from meshsp.launch import WorkerPool
from meshsp.tiny import FAMILIES, make_inputs

__all__ = ["REAL_WIDTH", "build_real_width", "real_shapes", "run_real_width"]

# Changes to each diffusers class's defaults. The defaults are the published config of the model
# named in the comment except where a width is set here; every stack is cut to one block.
REAL_WIDTH: dict[str, dict] = {
    "flux": dict(num_layers=1, num_single_layers=1),  # FLUX.1: 24 x 128 (3072), MLP 12288, T5 4096
    "flux2": dict(num_layers=1, num_single_layers=1),  # FLUX.2-dev: 48 x 128 (6144), MLP 18432, text 15360
    "qwen-image": dict(num_layers=1),  # Qwen-Image: 24 x 128 (3072), MLP 12288, text 3584
    "z-image": dict(n_layers=1, n_refiner_layers=1),  # Z-Image: 30 x 128 (3840), caption 2560
    "wan": dict(num_layers=1),  # Wan2.1 T2V 14B: 40 x 128 (5120), FFN 13824, text 4096
    "sd3": dict(num_layers=1, num_attention_heads=24, caption_projection_dim=1536,  # SD3 medium:
                pos_embed_max_size=192),  # 24 x 64 (1536); the class defaults are 18 x 64
    "ltx": dict(num_layers=1),  # LTX-Video: 32 x 64 (2048), caption 4096
    "hunyuan-video": dict(num_layers=1, num_single_layers=1, num_refiner_layers=1),  # 24 x 128, text 4096
    "cogvideox": dict(num_layers=1),  # CogVideoX-2B: 30 x 64 (1920), text 4096
}
# Latent side per token side: HunyuanVideo patchifies 2x2, which make_inputs' latents do not assume.
LATENT_PER_TOKEN = {"hunyuan-video": 2}
# CogVideoX's text length and positional grid are sequence lengths: they follow the shapes.
SEQUENCE_KEYS = {"cogvideox": ("max_text_seq_length", "sample_height", "sample_width", "sample_frames")}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def real_shapes(family: str, tokens: int, txt: int) -> dict:
    """``make_inputs`` shapes for ``tokens`` image tokens (video: 2 frames) and ``txt`` text tokens."""
    frames = 2 if family in VIDEO else 1
    per_frame = tokens // frames
    h = max(d for d in range(1, math.isqrt(per_frame) + 1) if per_frame % d == 0)
    if frames * per_frame != tokens or per_frame // h > 4 * h:
        raise ValueError(f"{family}: {tokens} image tokens do not make {frames} near-square frame(s); "
                         f"pick a multiple of {2 * frames} with a near-square factoring, e.g. 2048 or 4096.")
    scale = LATENT_PER_TOKEN.get(family, 1)
    shapes = dict(h=h * scale, w=per_frame // h * scale, txt=txt)
    return shapes | dict(frames=frames) if family in VIDEO else shapes


def build_real_width(family: str, dtype: str, shapes: dict) -> tuple[torch.nn.Module, dict]:
    """The seeded real-width model of ``family`` in ``dtype`` and its forward kwargs for ``shapes``."""
    config = dict(REAL_WIDTH[family])
    config.update({k: v for k, v in _overrides(family, shapes).items() if k in SEQUENCE_KEYS.get(family, ())})
    cls = getattr(importlib.import_module("diffusers"), FAMILIES[family].cls)
    torch.manual_seed(0)
    model = cls(**config).eval()
    inputs = make_inputs(family, model, **shapes)
    cast = DTYPES[dtype]
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not keep & set(name.split(".")):
                t.data = t.data.to(cast)
    inputs = {k: v.to(cast) if torch.is_tensor(v) and v.is_floating_point() else
              [t.to(cast) for t in v] if isinstance(v, list) and v and torch.is_tensor(v[0]) else v
              for k, v in inputs.items()}
    return model, inputs


def real_width_stats(family: str, dtype: str, shapes: dict, repeats: int, ring: int, ulysses: int,
                     *, memory: bool = False) -> dict:
    """One worker's times (or, with ``memory``, peak activation MB) of the real-width model."""
    model, inputs = build_real_width(family, dtype, shapes)
    return measure(model, inputs, repeats, ring, ulysses, memory=memory, count_bytes=False)


def run_real_width(families: list[str], dtypes: tuple[str, ...] = ("float32", "bfloat16"),
                   tokens: int = 2048, txt: int = 256, repeats: int = 3) -> list[dict]:
    """One row per family and dtype: times of 1 process, U2 and R2, speedups, and per-rank peak
    activation memory (MB, and as a ratio to 1 process; NaN where ``/proc/self/clear_refs`` cannot
    be written). Prints a table as it goes."""
    for family in families:
        if family not in REAL_WIDTH:
            raise ValueError(f"unknown family {family!r}; known: {sorted(REAL_WIDTH)}")
    for dtype in dtypes:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(DTYPES)}")
    shapes = {family: real_shapes(family, tokens, txt) for family in families}
    print(f"real width, 1 block per stack, {tokens} image tokens + {txt} text, 1 thread per rank, "
          f"UAA plans, median of {repeats}")
    print(f"{'model':<14} {'dtype':<9} {'1 proc':>8} {'U2':>8} {'speedup':>7} {'R2':>8} {'speedup':>7} "
          f"{'1 proc MB':>9} {'U2 mem':>6} {'R2 mem':>6}", flush=True)
    rows = []
    with WorkerPool(1) as single, WorkerPool(2) as pair, _mmap_pool(1) as single_mem, _mmap_pool(2) as pair_mem:
        for family in families:
            for dtype in dtypes:
                args = (family, dtype, shapes[family], repeats)
                row: dict = {"family": family, "dtype": dtype, "tokens": tokens, "txt": txt}
                row["single_s"] = median_max(single.run(real_width_stats, *args, 1, 1, timeout=3600))
                row["single_mb"] = single_mem.run(real_width_stats, *args, 1, 1, memory=True, timeout=3600)[0]["memory_mb"]
                for name, ring, ulysses in (("U2", 1, 2), ("R2", 2, 1)):
                    row[name] = median_max(pair.run(real_width_stats, *args, ring, ulysses, timeout=3600))
                    row[f"{name}_speedup"] = row["single_s"] / row[name]
                    res = pair_mem.run(real_width_stats, *args, ring, ulysses, memory=True, timeout=3600)
                    row[f"{name}_mb"] = max(r["memory_mb"] for r in res)
                    row[f"{name}_mem_ratio"] = row[f"{name}_mb"] / row["single_mb"] if row["single_mb"] > 0 else math.nan
                rows.append(row)
                _print(row)
    return rows


def _print(row: dict) -> None:
    print(f"{row['family']:<14} {row['dtype']:<9} {row['single_s']:7.3f}s {row['U2']:7.3f}s "
          f"{row['U2_speedup']:6.2f}x {row['R2']:7.3f}s {row['R2_speedup']:6.2f}x {row['single_mb']:9.1f} "
          f"{row['U2_mem_ratio']:5.2f}x {row['R2_mem_ratio']:5.2f}x", flush=True)
