"""``meshsp bench cache``: request time without a step cache vs with each cache kind, and how far
each one's image is from the image without a cache and from one process's image with the same cache.

One run, on ``ulysses`` spawned gloo ranks (default 2, ``advanced_uaa``, one thread per rank), with a
tiny pipeline (default tiny Qwen-Image at 768x768, 20 steps: 2304 image tokens, where its
transformer is ~98% of the work up to the latents). For ``none`` and each kind of
``meshsp.cache.CACHE_KINDS``:

* ``seconds``: median over ``repeats`` requests (after a warm-up; the kinds interleaved) of the
  pipeline call up to the latents (text encoding and the denoising loop). The VAE decode, the same
  with and without a cache, is left out: at these sizes it would hide what the cache changes.
  ``speedup`` is ``none``'s seconds over the kind's;
* ``skipped`` / ``calls``: per request, the cached modules' forwards answered from the cache and all
  of them (``StepCache.counts``); ``agree``: the agreement collectives per request per rank;
* ``latent_diff``: the max abs difference of the final latents from one process's with the same
  cache, over their scale (the exactness of the parallel cache; fp32 noise is ~1e-7);
  ``latent_diff_none``: the same from the parallel latents without a cache (what the cache changes);
* ``pixel_diff_none`` / ``pixel_diff_single``: the max pixel difference (of 255) of the decoded
  image from the parallel image without a cache (what the cache costs in quality), and from one
  process's image with the same cache (what parallelism changes: 0 or 1).

The options are ``DEFAULT_OPTIONS`` unless given: chosen so the tiny random-weight model skips some
steps (its first block's residual changes ~40% per step, far more than a trained model's, hence the
high first-block threshold); MagCache's ratios are calibrated on one process first
(``calibrate=True``), as its documentation says to do. A kind the pipeline's transformer cannot use
(SeaCache outside Wan) gets a row with the reason and no numbers.

Example::

    rows = run(size=512, steps=10, repeats=2)
    print(format_rows(rows))
"""

from __future__ import annotations

import contextlib
import io
import statistics
import time

import torch

__all__ = ["DEFAULT_OPTIONS", "format_rows", "run"]

DEFAULT_OPTIONS: dict[str, dict] = {
    "first-block": {"threshold": 0.4},
    "taylorseer": {"taylor_factors_dtype": torch.float32},
    "mag": {},  # mag_ratios: calibrated on one process in the run
    "pab": {},
    "faster": {},
    "sea": {},
}
PROMPT = "a lighthouse on a cliff at dusk"


def run(model: str = "tiny-qwen-image", *, size: int = 768, steps: int = 20, repeats: int = 3, ulysses: int = 2,
        ulysses_mode: str = "advanced_uaa", kinds: tuple[str, ...] | None = None,
        options: dict[str, dict] | None = None) -> list[dict]:
    """One row for no cache and one per cache kind (see the module doc)."""
    from meshsp.cache import CACHE_KINDS
    from meshsp.engine import resolve_model
    from meshsp.launch import WorkerPool

    kinds = tuple(kinds if kinds is not None else CACHE_KINDS)
    unknown = sorted(set(kinds) - set(CACHE_KINDS))
    if unknown:
        raise ValueError(f"unknown cache kind(s) {unknown}; known: {list(CACHE_KINDS)}.")
    merged = {k: dict(DEFAULT_OPTIONS.get(k, {}), **(options or {}).get(k, {})) for k in kinds}
    path = resolve_model(model)  # build an embedded pipeline here, before the ranks start
    with WorkerPool(ulysses) as pool:
        rows = pool.run(_worker, path, size, steps, repeats, ulysses, ulysses_mode, kinds, merged, timeout=3600)[0]
    for row in rows:
        row["model"] = model
    return rows


def _worker(path: str, size: int, steps: int, repeats: int, ulysses: int, mode: str, kinds: tuple[str, ...],
            options: dict[str, dict]) -> list[dict]:
    import numpy as np
    from diffusers import DiffusionPipeline

    from meshsp.config import ParallelConfig
    from meshsp.mesh import init_sp_mesh
    from meshsp.ops.comm import record_comm
    from meshsp.plans import parallelize

    pipe = DiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=PROMPT, num_inference_steps=steps, width=size, height=size)

    def request(output_type: str):
        out = pipe(**call, output_type=output_type, generator=torch.Generator().manual_seed(0))
        return out.frames if hasattr(out, "frames") else out.images

    rows = {kind: {"cache": kind, "size": size, "steps": steps, "ulysses": ulysses} for kind in ("none", *kinds)}
    if "mag" in kinds and "mag_ratios" not in options["mag"]:
        options["mag"]["mag_ratios"] = _calibrate_mag(pipe, steps, request)
    single = {}  # one process: each kind's latents and image
    for kind in rows:
        try:
            with _cached(pipe, kind, None, options, steps):
                single[kind] = (request("latent"), np.asarray(request("np")))
        except ValueError as exc:
            rows[kind]["note"] = str(exc)
    mesh = init_sp_mesh(ParallelConfig(ulysses_degree=ulysses, ulysses_mode=mode))
    parallelize(pipe.transformer, mesh, ulysses_mode=mode)
    times: dict[str, list[float]] = {kind: [] for kind in single}
    for repeat in range(repeats + 1):  # the first round warms up
        for kind in single:
            with _cached(pipe, kind, mesh, options, steps):
                t0 = time.perf_counter()
                request("latent")
                if repeat:
                    times[kind].append(time.perf_counter() - t0)
    images, latents_of = {}, {}
    for kind in single:
        with _cached(pipe, kind, mesh, options, steps) as cache, record_comm() as stats:
            latents = request("latent")
            counts = cache.counts if cache is not None else {"calls": 0, "computed": 0, "skipped": 0}
        want = single[kind][0]
        latents_of[kind] = latents
        rows[kind].update(seconds=statistics.median(times[kind]), agree=stats.calls["cache_agree"], **counts,
                          latent_diff=(latents - want).abs().max().item() / max(want.abs().max().item(), 1.0))
        if kind != "none":
            rows[kind]["options"] = _printable(options[kind])
        with _cached(pipe, kind, mesh, options, steps):
            images[kind] = np.asarray(request("np"))
    for kind in single:
        rows[kind]["speedup"] = rows["none"]["seconds"] / rows[kind]["seconds"]
        none = latents_of["none"]
        rows[kind]["latent_diff_none"] = (latents_of[kind] - none).abs().max().item() / max(none.abs().max().item(), 1.0)
        rows[kind]["pixel_diff_none"] = _pixel_diff(images[kind], images["none"])
        rows[kind]["pixel_diff_single"] = _pixel_diff(images[kind], single[kind][1])
    return list(rows.values())


@contextlib.contextmanager
def _cached(pipe, kind: str, mesh, options: dict, steps: int):
    """``kind``'s cache on the pipeline for the block (a transformer holds one cache at a time);
    ``none``: no cache."""
    from meshsp.cache import enable_pipeline_cache

    if kind == "none":
        yield None
        return
    cache = enable_pipeline_cache(pipe, kind, mesh, options[kind])
    cache.prepare(steps)
    try:
        yield cache
    finally:
        cache.remove()


def _calibrate_mag(pipe, steps: int, request) -> list[float]:
    """MagCache's ratios for this pipeline and step count, from diffusers' calibration on one process
    (its tail hook's per-step ratio of the "cond" branch, recorded; the printout it ends with is
    swallowed)."""
    ratios: list[float] = []
    with _cached(pipe, "mag", None, {"mag": {"calibrate": True}}, steps):
        for module in pipe.transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            hook = registry.hooks.get("mag_cache_block_hook") if registry is not None else None
            if hook is not None and hook.is_tail:
                perform = hook._perform_calibration_step

                def record(state, residual, hook=hook, perform=perform):
                    perform(state, residual)
                    if hook.state_manager.context.name == "cond":
                        ratios.append(state.calibration_ratios[-1])

                hook._perform_calibration_step = record
        with contextlib.redirect_stdout(io.StringIO()):
            request("latent")
    return ratios


def _pixel_diff(a, b) -> int:
    import numpy as np

    return int(np.abs(np.round(np.asarray(a, dtype=np.float64) * 255) - np.round(np.asarray(b, dtype=np.float64) * 255)).max())


def _printable(options: dict) -> str:
    shown = {k: (f"[{len(v)} ratios]" if k == "mag_ratios" else str(v).removeprefix("torch.")) for k, v in options.items()}
    return ", ".join(f"{k}={v}" for k, v in shown.items())


def format_rows(rows: list[dict]) -> str:
    """The rows as a table, one line per cache kind."""
    head = (f"{'cache':<12} {'seconds':>8} {'speedup':>8} {'skipped':>9} {'agree':>6} {'latents vs 1 proc':>17} "
            f"{'vs none':>8} {'px vs 1 proc':>12} {'vs none':>8}  options")
    lines = [head]
    for r in rows:
        if "seconds" not in r:
            lines.append(f"{r['cache']:<12} refused: {r.get('note', '')}")
            continue
        skipped = f"{r['skipped']}/{r['calls']}" if r["calls"] else "-"
        lines.append(f"{r['cache']:<12} {r['seconds']:>8.3f} {r['speedup']:>7.2f}x {skipped:>9} {r['agree']:>6} "
                     f"{r['latent_diff']:>17.1e} {r['latent_diff_none']:>8.1e} {r['pixel_diff_single']:>12} "
                     f"{r['pixel_diff_none']:>8}  {r.get('options', '')}")
    return "\n".join(lines)
