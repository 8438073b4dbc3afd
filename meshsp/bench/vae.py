"""``meshsp bench vae``: the VAE decode split across 2 and 4 ranks vs one process, and a whole
request with and without it, in one run.

Each VAE is built from its real-size config with seeded random weights (no download): the FLUX.1
``AutoencoderKL`` (SD3's has the same shape: 16 latent channels, blocks 128-256-512-512) and the
causal video VAEs of Qwen-Image and Wan2.1 (``meshsp.memory.FAMILIES`` names the classes and
configs). Image VAEs decode one square image per size; Wan decodes a short clip. For each case:

* the decode time of one process (a 1-rank pool) and of the split decode (``meshsp.vae``) on 2 and
  4 ranks, the slowest rank, one thread per rank, median of ``repeats`` after a small warm-up;
* each rank's peak activation memory during the timed decode (the rise of ``VmHWM``, as in
  ``meshsp.bench.perf``), relative to one process; the weights are whole on every rank;
* the bytes each rank sends per decode (halo rows, norm statistics, Ring attention, the gather);
* the largest ``|split - whole|`` over the output, the split decodes against the 1-process one.

Every pool's workers start with ``MALLOC_MMAP_THRESHOLD_=65536`` so freed tensors leave the
resident set. The timings come from the same decodes: the activations that dominate a real VAE's
decode (hundreds of MB at full resolution) are above glibc's 32 MiB ceiling for its dynamic
threshold and are mmapped in any worker.

Defaults: Flux and Qwen-Image at 512² and 1024², Wan 5 frames at 480x272, one timed decode per case
(one fp32 decode at 1024² takes 1.5-2 minutes on one core): about 13 minutes on 2 cores.

Then a whole request: ``Engine(e2e_model, ParallelConfig(ulysses_degree=2))`` with the VAE split
(``vae_parallel=True``) and whole, both engines up at once and their requests interleaved.

With fewer cores than ranks (4 ranks on 2 cores) the 4-rank time measures oversubscription, not
speedup; its memory per rank is still what 4 ranks hold.

Example::

    rows = run(("flux",), sizes=(512,), repeats=1)
    rows[0]["speedup_2"], rows[0]["mem_ratio_2"], rows[0]["max_diff"]
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import os
import statistics
import time

import torch
import torch.distributed as dist

from meshsp.bench import sp_mesh
from meshsp.bench.models import median_max, peak_activation_mb
from meshsp.bench.perf import _mmap_pool
from meshsp.memory import FAMILIES

__all__ = ["VAES", "cases", "decode_stats", "latent_shape", "request_seconds", "run"]

VAES = {"flux": "Flux/SD3 AutoencoderKL", "qwen-image": "Qwen-Image VAE", "wan": "Wan2.1 VAE"}
WORLDS = (2, 4)
SPATIAL, TEMPORAL = 8, 4  # every VAE here: 8x in height and width; the video VAEs 4x in time
PROMPT = "a lighthouse on a cliff at dusk"


def cases(vaes: tuple[str, ...], sizes: tuple[int, ...], frames: int, clip: tuple[int, int]) -> list[tuple]:
    """``(vae, frames, height, width)`` in pixels: image VAEs at each square size, video VAEs the clip."""
    for name in vaes:
        if name not in VAES:
            raise ValueError(f"unknown VAE {name!r}; known: {sorted(VAES)}")
    if frames < 1 or (frames - 1) % TEMPORAL:
        raise ValueError(f"frames must be 1 + a multiple of {TEMPORAL} (the video VAEs' 4x in time); got {frames}.")
    out = [(n, 1, s, s) for n in vaes if not FAMILIES[n].video for s in sizes]
    out += [(n, frames, clip[1], clip[0]) for n in vaes if FAMILIES[n].video]
    for name, _, height, width in out:
        if height % SPATIAL or width % SPATIAL or height // SPATIAL < max(WORLDS):
            raise ValueError(f"{name}: {width}x{height} must be multiples of {SPATIAL} with at least "
                             f"{SPATIAL * max(WORLDS)} rows (a latent row per rank).")
    return out


def latent_shape(vae: torch.nn.Module, frames: int, height: int, width: int) -> tuple[int, ...]:
    """[B, C, H, W] for ``AutoencoderKL``, [B, C, T, H, W] for the video VAEs."""
    rows, cols = height // SPATIAL, width // SPATIAL
    if hasattr(vae.config, "latent_channels"):
        return (1, vae.config.latent_channels, rows, cols)
    return (1, vae.config.z_dim, (frames - 1) // TEMPORAL + 1, rows, cols)


@functools.lru_cache(maxsize=1)  # one VAE per worker at a time: the cases run VAE by VAE
def _vae(name: str, world: int) -> torch.nn.Module:
    from meshsp.vae import parallelize_vae

    spec = FAMILIES[name]
    torch.manual_seed(0)  # the same weights on every rank and in every pool
    vae = getattr(importlib.import_module("diffusers"), spec.vae)(**spec.vae_config).eval()
    return parallelize_vae(vae, sp_mesh(1, world)) if world > 1 else vae


def decode_stats(name: str, frames: int, height: int, width: int, repeats: int) -> dict:
    """This rank's decode ``times``, peak activation MB (the largest over repeats), bytes sent in the
    last decode and, on rank 0, the decoded output."""
    from meshsp.ops.comm import record_comm

    vae = _vae(name, dist.get_world_size())
    torch.manual_seed(1)
    z = torch.randn(latent_shape(vae, frames, height, width))
    times, peaks, out = [], [], []

    def decode() -> None:
        t0 = time.perf_counter()
        out.append(vae.decode(z).sample)
        times.append(time.perf_counter() - t0)

    with torch.no_grad():
        vae.decode(z[..., :8, :8])  # warm-up: kernels and process groups, not the full size
        for _ in range(repeats):
            out.clear()
            dist.barrier()
            with record_comm() as comm:
                peaks.append(peak_activation_mb(decode))
    weights = sum(p.numel() * p.element_size() for p in vae.parameters())
    return {"times": times, "memory_mb": max(peaks), "weights_mb": weights / 2**20, "latent": tuple(z.shape),
            "bytes": sum(v for k, v in comm.bytes_sent.items() if k != "consensus"),
            "out": out[0] if dist.get_rank() == 0 else None}


def run(vaes: tuple[str, ...] = tuple(VAES), sizes: tuple[int, ...] = (512, 1024), frames: int = 5,
        clip: tuple[int, int] = (480, 272), repeats: int = 1, e2e_model: str = "tiny-qwen-image",
        e2e_size: int = 1024, e2e_steps: int = 2, e2e_repeats: int = 3) -> list[dict]:
    """One row per case (see ``cases``): times, speedups, per-rank peak MB and ratios, bytes sent,
    and ``max_diff``; then one ``"e2e"`` row with the request time split and whole. Prints a table."""
    todo = cases(vaes, sizes, frames, clip)
    cores = os.cpu_count() or 1
    print(f"VAE decode, real-size configs with random weights, fp32, 1 thread per rank, gloo, median of "
          f"{repeats}; {cores} cores" + (f": {max(WORLDS)} ranks oversubscribe them, so the 4-rank time "
                                        "is not a speedup (its memory is per rank)" if cores < max(WORLDS) else ""))
    print(f"{'VAE':<23} {'frames x size':>14} {'1 proc':>8} {'2 ranks':>15} {'4 ranks':>15} {'1 proc MB':>9} "
          f"{'2-rank MB':>13} {'4-rank MB':>13} {'sent MB 2/4':>11} {'max diff':>8}", flush=True)
    rows = []
    with contextlib.ExitStack() as stack:
        pools = {world: stack.enter_context(_mmap_pool(world)) for world in (1, *WORLDS)}
        for case in todo:
            rows.append(_row(case, repeats, pools))
            _print(rows[-1])
    if e2e_model:
        rows.append(request_seconds(e2e_model, e2e_size, e2e_steps, e2e_repeats))
    return rows


def _row(case: tuple, repeats: int, pools: dict) -> dict:
    name, frames, height, width = case
    whole = pools[1].run(decode_stats, *case, repeats, timeout=3600)[0]
    row = {"vae": name, "frames": frames, "height": height, "width": width, "latent": whole["latent"],
           "single_s": median_max([whole]), "single_mb": whole["memory_mb"], "weights_mb": whole["weights_mb"],
           "max_diff": 0.0}
    for world in WORLDS:
        res = pools[world].run(decode_stats, *case, repeats, timeout=3600)
        row[f"split_{world}_s"] = median_max(res)
        row[f"speedup_{world}"] = row["single_s"] / row[f"split_{world}_s"]
        row[f"mb_{world}"] = max(r["memory_mb"] for r in res)
        row[f"mem_ratio_{world}"] = row[f"mb_{world}"] / row["single_mb"] if row["single_mb"] > 0 else math.nan
        row[f"bytes_{world}"] = max(r["bytes"] for r in res)
        row["max_diff"] = max(row["max_diff"], (res[0]["out"] - whole["out"]).abs().max().item())
    return row


def request_seconds(model: str, size: int, steps: int, repeats: int) -> dict:
    """Median request time of ``model`` at ``size``x``size`` on U2 with the VAE split and whole."""
    from meshsp.config import ParallelConfig
    from meshsp.engine import Engine, SamplingParams

    params = SamplingParams(num_inference_steps=steps, width=size, height=size)
    config = ParallelConfig(ulysses_degree=2, ulysses_mode="advanced_uaa")
    with Engine(model, config, vae_parallel=True) as split, Engine(model, config, vae_parallel=False) as whole:
        engines = {"split": split, "whole": whole}
        times: dict[str, list[float]] = {k: [] for k in engines}
        for engine in engines.values():
            engine.generate(PROMPT, params)  # warm-up
        for _ in range(repeats):
            for key, engine in engines.items():
                engine.generate(PROMPT, params)
                times[key].append(engine.last_seconds)
        row = {"vae": "e2e", "model": model, "size": size, "steps": steps, "vae_ranks": split.vae_ranks,
               **{f"{k}_s": statistics.median(v) for k, v in times.items()}}
    row["speedup"] = row["whole_s"] / row["split_s"]
    print(f"whole request, {model} {size}x{size}, {steps} steps, U2, median of {repeats} interleaved: VAE split "
          f"over {row['vae_ranks']} ranks {row['split_s']:.3f}s, whole on each rank {row['whole_s']:.3f}s "
          f"({row['speedup']:.2f}x)", flush=True)
    return row


def _print(row: dict) -> None:
    case = f"{row['frames']} x {row['width']}x{row['height']}"
    split = [f"{row[f'split_{w}_s']:.2f}s {row[f'speedup_{w}']:.2f}x" for w in WORLDS]
    mem = [f"{row[f'mb_{w}']:.0f} {row[f'mem_ratio_{w}']:.2f}x" for w in WORLDS]
    sent = "/".join(f"{row[f'bytes_{w}'] / 2**20:.0f}" for w in WORLDS)
    print(f"{VAES[row['vae']]:<23} {case:>14} {row['single_s']:7.2f}s {split[0]:>15} {split[1]:>15} "
          f"{row['single_mb']:9.0f} {mem[0]:>13} {mem[1]:>13} {sent:>11} {row['max_diff']:8.1e}", flush=True)
