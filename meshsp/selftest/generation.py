"""A 1-rank bf16 generation of an embedded tiny pipeline: finite pixels, the requested size."""

from __future__ import annotations

import time

__all__ = ["PIPELINES", "check_pipeline"]

PIPELINES = ("tiny-qwen-image", "tiny-flux", "tiny-wan")


def check_pipeline(name: str, device: str) -> tuple[bool, str]:
    """Two steps at 64x64 (5 frames for a video pipeline): (passed, detail)."""
    import numpy as np

    from meshsp.engine import Engine, SamplingParams

    t0 = time.perf_counter()
    with Engine(name, dtype="bfloat16", device=device) as engine:
        params = SamplingParams(num_inference_steps=2, width=64, height=64, seed=0,
                                num_frames=5 if engine.is_video else None)
        images = engine.generate("a cat", params)
    frames = images[0] if isinstance(images[0], list) else [images[0]]
    pixels = np.asarray(frames[0])
    ok = frames[0].size == (64, 64) and bool(np.isfinite(pixels).all())
    return ok, f"{len(frames)} frame(s) {frames[0].size}, {time.perf_counter() - t0:.1f} s"
