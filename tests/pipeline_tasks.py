"""What every rank runs in the ``parallelize_pipeline`` tests: a tiny diffusers pipeline loaded
through ``from_pretrained``, made parallel with the one public call, then called as a user calls it."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

import meshsp
from meshsp.ops import record_comm

_PIPES: dict = {}


def load(name: str):
    """The tiny pipeline ``name`` as a user loads it (``DiffusionPipeline.from_pretrained``)."""
    from diffusers import DiffusionPipeline

    from meshsp.pipelines import tiny_pipeline_path

    pipe = DiffusionPipeline.from_pretrained(str(tiny_pipeline_path(name)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call(pipe, kwargs: dict) -> np.ndarray:
    """The pipeline's own call; the decoded output as float32 numpy (frames for video)."""
    kwargs = dict(kwargs)
    seed = kwargs.pop("seed", 0)
    out = pipe(**kwargs, output_type="np", generator=torch.Generator().manual_seed(seed))
    return np.asarray(out.frames if hasattr(out, "frames") else out.images, dtype=np.float32)


def parallel_call(name: str, degrees: dict, kwargs: dict, options: dict | None = None) -> dict:
    """On every rank: load, ``parallelize_pipeline``, call; this rank's output and what was done."""
    pipe = load(name)
    meshsp.parallelize_pipeline(pipe, meshsp.ParallelConfig(**degrees), **(options or {}))
    with record_comm() as stats:
        out = call(pipe, kwargs)
    record = pipe.meshsp
    return {"out": out, "transformers": record.transformers, "vae_ranks": record.vae_ranks,
            "vae_encode_split": record.vae_encode_split,
            "text_encoders": record.text_encoders, "cfg": len(record.cfg_hooks),
            "cache": dict(record.cache.counts) if record.cache is not None else None,
            "sent": dict(stats.calls), "class": type(pipe).__name__}


def refusal(name: str, case: str) -> dict:
    """On every rank: one bad input to ``parallelize_pipeline``; the error, and that the pipeline was
    left as it was loaded (same class, no hook anywhere) and still parallelizes and runs after."""
    pipe = load(name)
    hooks_before = _hook_count(pipe)
    config = meshsp.ParallelConfig(ulysses_degree=2, ring_degree=2, ulysses_mode="advanced_uaa")
    kwargs: dict = {}
    if case == "world":
        config = meshsp.ParallelConfig(ulysses_degree=2)
    elif case == "no-plan":
        from meshsp.zoo import build

        pipe.transformer = build("SanaWMTransformer3DModel", heads=3)
    elif case == "tiling":
        kwargs = {"vae_tiling": True}
    elif case == "cache":
        config = meshsp.ParallelConfig(cfg_degree=2, ulysses_degree=2, ulysses_mode="advanced_uaa")
        kwargs = {"cache": "pab"}
    elif case == "tp":
        config = meshsp.ParallelConfig(tensor_parallel_size=4)
    elif case == "second":
        meshsp.parallelize_pipeline(pipe, config)
        hooks_before = _hook_count(pipe)
    elif case == "not-a-pipeline":
        pipe = pipe.transformer
    try:
        meshsp.parallelize_pipeline(pipe, config, **kwargs)
    except ValueError as exc:
        error = str(exc)
    else:
        return {"error": None}
    untouched = _hook_count(pipe) == hooks_before and (case == "second" or not hasattr(pipe, "meshsp"))
    dist.barrier()  # every rank got here: nothing hangs
    return {"error": error, "untouched": untouched}


def cfg_missing_uncond() -> list[str]:
    """CFG parallel on a transformer that gets 'cond' calls with no 'uncond' partner (a pipeline whose
    guidance was misjudged): cfg rank 1 answered with a placeholder, so both ranks must refuse, at
    the next 'cond' call and at the end of a pipeline call (``finish``), and carry on after."""
    from meshsp.cfg import apply_cfg_parallel
    from meshsp.tiny import build_transformer, make_inputs

    mesh = meshsp.init_sp_mesh(meshsp.ParallelConfig(cfg_degree=2))
    model = build_transformer("qwen-image")
    hook = apply_cfg_parallel(model, mesh["cfg"].get_group())
    inputs = make_inputs("qwen-image", model)
    errors = []
    with torch.no_grad():
        for calls in (2, 1):
            try:
                for _ in range(calls):
                    with model.cache_context("cond"):
                        model(**inputs)
                hook.finish()
            except ValueError as exc:
                errors.append(str(exc))
        with model.cache_context("cond"):  # a guided step after: the hook works again
            cond = model(**inputs).sample
        with model.cache_context("uncond"):
            model(**inputs)
        hook.finish()
    hook.enabled = False
    with torch.no_grad():
        torch.testing.assert_close(cond, model(**inputs).sample)
    return errors


def _hook_count(pipe) -> int:
    import torch.nn as nn

    modules = [pipe] if isinstance(pipe, nn.Module) else [m for m in pipe.components.values() if isinstance(m, nn.Module)]
    return sum(len(getattr(m, d)) for top in modules for m in top.modules()
               for d in ("_forward_pre_hooks", "_forward_hooks")) + sum(
        hasattr(m, "_diffusers_hook") for top in modules for m in top.modules())
