"""``meshsp bench models``: transformer forward time, SP-2 (U2, R2) vs 1 process, one run.

Each family is built at toy width but long sequence (default: a 64x64 token grid — 64x32 x 2 frames
for video — and 256 text tokens), 8 heads of 16, fp32, one thread per rank. The 1-process time is
taken in a 1-rank pool, the SP times in a 2-rank pool started alongside it (so the 1-process
forward runs while the other two workers idle).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.distributed as dist

from meshsp.bench import sp_mesh
from meshsp.launch import WorkerPool
from meshsp.ops.comm import record_comm
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
def _shapes(family: str, grid: int, txt: int) -> dict:
    if family in VIDEO:
        return dict(h=grid, w=grid // 2, frames=2, txt=txt)
    return dict(h=grid, w=grid, txt=txt)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def peak_activation_mb(fn) -> float:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set
    except OSError:
        return float("nan")
    base = _rss_kb("VmRSS:")
    fn()
    return (_rss_kb("VmHWM:") - base) / 1024


def forward_stats(family, heads, shapes, repeats, ring, ulysses, *, plan=False, compile=False, memory=False, tp=1):
    """Times (this rank) and bytes sent in one forward, or with ``memory`` the peak activation MB
    of one forward. Plan at degree 1 if plan."""
    model = build_transformer(family, heads=heads, **_overrides(family, shapes))
    inputs = make_inputs(family, model, **shapes)
    return measure(model, inputs, repeats, ring, ulysses, plan=plan, compile=compile, memory=memory, tp=tp)


def measure(model, inputs: dict, repeats: int, ring: int, ulysses: int, *, plan: bool = False,
            compile: bool = False, memory: bool = False, count_bytes: bool = True, tp: int = 1) -> dict:
    """Parallelize ``model`` on this worker's ``ring x ulysses`` mesh (or leave it whole), warm up,
    then time ``repeats`` forwards (``{"times", "bytes"}``) or, with ``memory``, return the peak
    activation MB of one forward (``{"memory_mb"}``). ``count_bytes=False`` skips the extra
    forward that counts the bytes sent (``bytes`` is then empty)."""
    from meshsp.plans import parallelize

    if plan or ring * ulysses * tp > 1:
        parallelize(model, sp_mesh(ring, ulysses, tp), ulysses_mode="advanced_uaa")
    params_mb = sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in model.parameters()) / 2**20
    fn = torch.compile(model) if compile else model
    with torch.no_grad():
        fn(**inputs)  # warm-up (and compilation)
        if memory:
            return {"memory_mb": peak_activation_mb(lambda: fn(**inputs))}
        with record_comm() as stats:
            if count_bytes:
                fn(**inputs)
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            fn(**inputs)
            times.append(time.perf_counter() - t0)
    return {"times": times, "bytes": dict(stats.bytes_sent), "params_mb": params_mb}


def median_max(per_rank: list[dict]) -> float:
    return statistics.median(max(ts) for ts in zip(*(r["times"] for r in per_rank)))


def run(families: list[str], grid: int = 64, txt: int = 256, heads: int = 8, repeats: int = 3) -> list[dict]:
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    rows = []
    with WorkerPool(1) as single_pool, WorkerPool(2) as pool:
        for family in families:
            shapes = _shapes(family, grid, txt)
            single = median_max(single_pool.run(forward_stats, family, heads, shapes, repeats, 1, 1, timeout=1800))
            row = {"family": family, "tokens": shapes["h"] * shapes["w"] * shapes.get("frames", 1), "single_s": single}
            for name, ring, ulysses in (("U2", 1, 2), ("R2", 2, 1)):
                row[name] = median_max(pool.run(forward_stats, family, heads, shapes, repeats, ring, ulysses,
                                                timeout=1800))
            rows.append(row)
            print(f"{family:<14} {row['tokens']:>6} img tokens  1 proc {single:7.3f} s   "
                  f"U2 {row['U2']:7.3f} s ({single / row['U2']:.2f}x)   R2 {row['R2']:7.3f} s ({single / row['R2']:.2f}x)",
                  flush=True)
    return rows
