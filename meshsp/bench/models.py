"""``meshsp bench models``: transformer forward time, SP-2 (U2, R2) vs 1 process, one run.

Each family is built at toy width but long sequence (default: a 64x64 token grid — 64x32 x 2 frames
for video — and 256 text tokens), 8 heads of 16, fp32, one thread per rank. The 1-process time is
taken on rank 0 of the same pool while the other rank idles.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from meshsp.config import ParallelConfig
from meshsp.launch import WorkerPool
from meshsp.tiny import FAMILIES, build_transformer, make_inputs

VIDEO = {"wan", "ltx", "hunyuan-video", "cogvideox"}


def _overrides(family: str, shapes: dict) -> dict:
    """Config changes that let a toy config take a long sequence (position tables, text length)."""
    side = max(shapes["h"], shapes["w"])
    return {
        "z-image": dict(axes_lens=[shapes["txt"] + 64, side, side]),
        "wan": dict(rope_max_seq_len=side),
        "sd3": dict(pos_embed_max_size=side, sample_size=2 * side),
        "cogvideox": dict(max_text_seq_length=shapes["txt"], sample_height=2 * shapes["h"],
                          sample_width=2 * shapes["w"], sample_frames=4 * shapes.get("frames", 1) - 3),
    }.get(family, {})
_MESHES: dict = {}


def _shapes(family: str, grid: int, txt: int) -> dict:
    if family in VIDEO:
        return dict(h=grid, w=grid // 2, frames=2, txt=txt)
    return dict(h=grid, w=grid, txt=txt)


def _forward_times(family, heads, shapes, repeats, ring, ulysses):
    from meshsp.mesh import init_sp_mesh
    from meshsp.plans import parallelize

    model = build_transformer(family, heads=heads, **_overrides(family, shapes))
    inputs = make_inputs(family, model, **shapes)
    active = True
    if ring * ulysses > 1:
        key = (ring, ulysses)
        if key not in _MESHES:
            _MESHES[key] = init_sp_mesh(ParallelConfig(ring_degree=ring, ulysses_degree=ulysses, ulysses_mode="advanced_uaa"))
        parallelize(model, _MESHES[key], ulysses_mode="advanced_uaa")
    else:
        active = dist.get_rank() == 0
    times = []
    with torch.no_grad():
        if active:
            model(**inputs)  # warm-up
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            if active:
                model(**inputs)
            times.append(time.perf_counter() - t0)
    return times if active else None


def run(families: list[str], grid: int = 64, txt: int = 256, heads: int = 8, repeats: int = 3) -> list[dict]:
    rows = []
    with WorkerPool(2, threads=1) as pool:
        for family in families:
            if family not in FAMILIES:
                raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
            shapes = _shapes(family, grid, txt)
            single = statistics.median(pool.run(_forward_times, family, heads, shapes, repeats, 1, 1, timeout=1800)[0])
            row = {"family": family, "tokens": shapes["h"] * shapes["w"] * shapes.get("frames", 1) if family in VIDEO
                   else shapes["h"] * shapes["w"], "single_s": single}
            for name, ring, ulysses in (("U2", 1, 2), ("R2", 2, 1)):
                per_rank = pool.run(_forward_times, family, heads, shapes, repeats, ring, ulysses, timeout=1800)
                row[name] = statistics.median(max(ts) for ts in zip(*per_rank))
            rows.append(row)
            print(f"{family:<14} {row['tokens']:>6} img tokens  1 proc {single:7.3f} s   "
                  f"U2 {row['U2']:7.3f} s ({single / row['U2']:.2f}x)   R2 {row['R2']:7.3f} s ({single / row['R2']:.2f}x)",
                  flush=True)
    return rows
