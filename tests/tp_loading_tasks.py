"""What every rank runs in the tensor-parallel loading tests (importable, so spawned ranks can
unpickle them): a transformer read sharded against the same one loaded whole and then sliced."""

from __future__ import annotations

import numpy as np
import torch
from torch.distributed.tensor import DTensor

from meshsp import ParallelConfig
from meshsp.memory import LiveBytes
from meshsp.plans.verify import local_bytes


def _tp_mesh(tp: int, **degrees):
    from rank_tasks import config_mesh

    return config_mesh(tensor_parallel_size=tp, **degrees)


def _old_path(folder: str, dtype, mesh):
    """Today's path without the loader: the whole model from ``from_pretrained``, then its plan."""
    import json

    import diffusers

    from meshsp.plans import get_plan, parallelize

    with open(f"{folder}/transformer/config.json") as f:
        cls = getattr(diffusers, json.load(f)["_class_name"])
    model = cls.from_pretrained(folder, subfolder="transformer", dtype=dtype)
    return parallelize(model, mesh, get_plan(model))


def _new_path(folder: str, dtype, mesh):
    from meshsp.loading import load_sharded_transformer
    from meshsp.plans import get_plan, parallelize

    model = load_sharded_transformer(folder, "transformer", mesh["tp"], dtype=dtype)
    return parallelize(model, mesh, get_plan(model))


def _tensors(model) -> dict:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def weights_equal(root: str, families: list[str], dtype: torch.dtype, tp: int = 2) -> dict:
    """Per family: every parameter and buffer of the model read sharded equals (values, dtype,
    placements) the one loaded whole and sliced by its plan; the differences found, the number of
    tensors compared and of those sharded."""
    mesh = _tp_mesh(tp)
    out = {}
    for family in families:
        old, new = _old_path(f"{root}/{family}", dtype, mesh), _new_path(f"{root}/{family}", dtype, mesh)
        want, got = _tensors(old), _tensors(new)
        bad = sorted(set(want) ^ set(got))
        sharded = 0
        for name, w in want.items():
            g = got.get(name)
            if g is None:
                continue
            if isinstance(w, DTensor):
                sharded += 1
                if not isinstance(g, DTensor) or g.placements != w.placements or g.shape != w.shape:
                    bad.append(f"{name}: layout")
                    continue
                w, g = w.to_local(), g.to_local()
            if g.dtype != w.dtype or g.shape != w.shape or not torch.equal(g, w):
                bad.append(f"{name}: {g.dtype} {tuple(g.shape)} vs {w.dtype} {tuple(w.shape)}")
        out[family] = {"bad": bad, "tensors": len(want), "sharded": sharded}
    return out


def load_peak(folder: str, tp: int, dtype: torch.dtype = torch.float32, old: bool = False) -> dict:
    """The peak of tensor bytes this rank materialises while loading the transformer at ``folder``
    read sharded (or, ``old``, loaded whole and then sliced by its plan), and the bytes it keeps."""
    mesh = _tp_mesh(tp)
    with LiveBytes(materialised=True) as counter:
        model = (_old_path if old else _new_path)(folder, dtype, mesh)
    return {"peak": counter.peak, "kept": local_bytes(model)}


def pipeline_equal(name: str, degrees: dict, kwargs: dict) -> dict:
    """``pipe(...)`` of the tiny pipeline ``name`` with its transformer read sharded (``load_pipeline``
    with the config) against the pipeline loaded whole, both parallelized for ``degrees``."""
    import meshsp
    from meshsp.loading import load_pipeline
    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.tp import loaded_tp_size
    from pipeline_tasks import call, load

    config = ParallelConfig(**degrees)
    outs = []
    for pipe in (load(name), load_pipeline(str(tiny_pipeline_path(name)), torch.float32, ({}, {}), {}, config)):
        pipe.set_progress_bar_config(disable=True)
        meshsp.parallelize_pipeline(pipe, config)
        outs.append(call(pipe, kwargs))
    return {"equal": bool(np.array_equal(*outs)), "diff": float(np.abs(outs[0] - outs[1]).max()),
            "loaded_tp": loaded_tp_size(pipe.transformer)}


def engine_reads_sharded(name: str, tp: int) -> dict:
    """The engine's rank at ``tensor_parallel_size=tp``: its transformer is never loaded whole
    (the class's ``from_pretrained`` raises while the rank loads) and holds its tp part."""
    import diffusers

    from meshsp.engine import _Runner
    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.tp import loaded_tp_size

    cls = getattr(diffusers, diffusers.DiffusionPipeline.load_config(str(tiny_pipeline_path(name)))["transformer"][1])

    def whole(*args, **kwargs):
        raise AssertionError(f"{cls.__name__}.from_pretrained was called: the transformer was loaded whole")

    assert "from_pretrained" not in cls.__dict__, cls  # inherited from ModelMixin, restored by the del below
    cls.from_pretrained = classmethod(lambda c, *a, **k: whole(*a, **k))  # this class, this test only
    try:
        runner = _Runner(name, ParallelConfig(tensor_parallel_size=tp))
    finally:
        del cls.from_pretrained  # ModelMixin's again
    model = runner.pipe.transformer
    return {"loaded_tp": loaded_tp_size(model), "bytes": local_bytes(model)}


def refusals(root: str) -> list[str]:
    """What applying a plan to a transformer read sharded refuses: another tp degree in
    ``parallelize_pipeline``, another layout of one of its parameters; and a HeadShardedNorm applied
    twice."""
    import meshsp
    from meshsp.loading import load_pipeline, load_sharded_transformer
    from meshsp.pipelines import tiny_pipeline_path
    from meshsp.plans import get_plan, parallelize
    from meshsp.tp import HeadShardedNorm, PackedColwiseParallel

    messages = []
    pipe = load_pipeline(str(tiny_pipeline_path("tiny-qwen-image")), torch.float32, ({}, {}), {},
                         ParallelConfig(tensor_parallel_size=2))
    try:
        meshsp.parallelize_pipeline(pipe, ParallelConfig(ulysses_degree=2))
    except ValueError as exc:
        messages.append(str(exc))
    mesh = _tp_mesh(2)
    model = load_sharded_transformer(f"{root}/flux", "transformer", mesh["tp"])
    plan = get_plan(model)
    plan.tp["transformer_blocks.*.attn.to_q"] = PackedColwiseParallel([1, 1])
    try:
        parallelize(model, mesh, plan)
    except ValueError as exc:
        messages.append(str(exc))
    norm = torch.nn.RMSNorm(32, eps=1e-6)
    HeadShardedNorm()._apply(norm, mesh["tp"])
    try:  # torch's own styles refuse a second distribute_module; this one refuses on its own
        HeadShardedNorm()._apply(norm, mesh["tp"])
    except ValueError as exc:
        messages.append(str(exc))
    return messages
