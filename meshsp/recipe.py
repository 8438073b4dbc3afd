"""``parallelize_pipeline``: the one recipe that makes a loaded diffusers pipeline parallel.

Every entry point runs it — the engine (``meshsp generate``, ``meshsp serve``, the examples, under
``torchrun`` or the spawned pool) and a user's own diffusers script — so every one of them gets the
same checks and the same result. In order:

1. **Check everything, change nothing.** The world size against the process group, each
   transformer's plan (``get_plan``, or one given) and its tensor-parallel widths, the CFG-parallel
   pipeline shape, the VAE's split plan, the step cache. Each check depends only on the pipeline,
   the config and the options, which every rank holds alike, so a refusal is the same
   ``ValueError`` on every rank, raised before the mesh is built or anything is sent.
2. **Apply**, on the one mesh ``("cfg", "ring", "ulysses", "tp")``: text encoders with a
   transformers tp plan sharded on ``tp``; the VAE decode and encode split across every rank; each
   transformer (Wan 2.2 has two experts) parallelized with its plan; the CFG-parallel hook on each;
   the step cache last, so its hooks wrap the parallel transformers.
3. **Per call.** The pipeline's class is swapped for a subclass of it that wraps ``__call__`` (as
   torch's FSDP2 ``fully_shard`` swaps a module's class; nothing global changes, the class keeps its
   name, ``isinstance`` and the signature hold). Before each call it turns CFG parallel on when the
   call's arguments ask for guidance (``meshsp.cfg.uses_guidance``) and sets the step cache's
   step count; after it, it checks that every 'cond' prediction got its 'uncond' partner.

Example::

    # torchrun --nproc-per-node 4 script.py
    pipe = DiffusionPipeline.from_pretrained(path)
    meshsp.parallelize_pipeline(pipe, ParallelConfig(cfg_degree=2, ulysses_degree=2, ulysses_mode="advanced_uaa"))
    image = pipe("a cat", negative_prompt="blurry", true_cfg_scale=4.0).images[0]   # on every rank
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from meshsp.config import ParallelConfig

__all__ = ["PipelineParallelism", "TRANSFORMERS", "parallelize_pipeline"]

logger = logging.getLogger(__name__)

TRANSFORMERS = ("transformer", "transformer_2")  # the denoisers a pipeline may hold (Wan 2.2: two experts)
_MESH_AXES = ("cfg", "ring", "ulysses", "tp")


@dataclass(frozen=True, kw_only=True)
class PipelineParallelism:
    """What ``parallelize_pipeline`` did to a pipeline (``pipe.meshsp``)."""

    config: ParallelConfig
    mesh: DeviceMesh | None                    # None on one process
    transformers: tuple[str, ...]              # components run with a plan
    plans: dict = field(default_factory=dict)  # component -> the Plan applied
    vae_ranks: int = 1                         # ranks the VAE decode is split across
    vae_encode_split: bool = False             # whether the VAE encode is split too
    text_encoders: tuple[str, ...] = ()        # text encoders sharded on the tp axis
    cfg_hooks: tuple = ()                      # meshsp.cfg.CfgParallelHook per transformer
    cache: object | None = None                # meshsp.cache.PipelineCache; .counts after a call


def parallelize_pipeline(pipe, config_or_mesh: ParallelConfig | DeviceMesh, *, ulysses_mode: str | None = None,
                         vae_parallel: bool = True, vae_tiling: bool = False, text_encoder_tp: bool = True,
                         cache: str | None = None, cache_options: Mapping | None = None,
                         plans: Mapping | None = None):
    """Make a loaded diffusers pipeline parallel on every rank; afterwards ``pipe(...)``, called on
    every rank, returns what one process returns.

    ``config_or_mesh``: a ``ParallelConfig`` (the process group is started if there is none, as
    ``init_sp_mesh`` does) or a mesh from ``meshsp.init_sp_mesh``. ``ulysses_mode``: with a mesh,
    ``"strict"`` (default) or ``"advanced_uaa"``; with a config, its own. ``vae_parallel``: split
    the VAE decode (and its encode, where meshsp can) across every rank; ``vae_tiling``: diffusers'
    tiled decode, its tiles shared out across the ranks (``AutoencoderKL``). ``text_encoder_tp``:
    with a ``tp`` axis, shard the text encoders that have a transformers tp plan. ``cache`` /
    ``cache_options``: one of diffusers' step caches (``meshsp.cache.CACHE_KINDS``), every rank
    taking the same branch. ``plans``: ``{component: Plan}`` in place of ``get_plan``'s.

    Load the pipeline onto this rank's device first (tensor parallelism slices weights where they
    are), or, so that no rank holds a whole transformer, with its transformers read sharded for the
    same layout (``meshsp.loading.load_sharded_transformers``, as the engine does); their plans then
    check those parameters instead of slicing them. Returns ``pipe``; ``pipe.meshsp`` (``PipelineParallelism``) records what was done.
    Everything that can be refused is refused first, with a ``ValueError`` on every rank and the
    pipeline unchanged: a pipeline with no transformer or one meshsp has no plan for, a world size
    other than the config's, a second call on the same pipeline, an option the pipeline cannot run.

    Example::

        # torchrun --nproc-per-node 4 script.py
        pipe = DiffusionPipeline.from_pretrained(path)
        meshsp.parallelize_pipeline(pipe, ParallelConfig(tensor_parallel_size=2, ulysses_degree=2,
                                                         ulysses_mode="advanced_uaa"))
        image = pipe("a cat", generator=torch.Generator().manual_seed(0)).images[0]
        if dist.get_rank() == 0:
            image.save("cat.png")
    """
    if isinstance(getattr(pipe, "meshsp", None), PipelineParallelism):
        raise ValueError(f"this {type(pipe).__name__} is already parallelized (pipe.meshsp); parallelize_pipeline "
                         "takes a freshly loaded pipeline: load it again for another layout.")
    dp = getattr(config_or_mesh, "data_parallel_size", 1)
    if dp > 1:
        raise ValueError(f"data_parallel_size={dp} is for training (meshsp train, meshsp.train); a pipeline "
                         "generates with data_parallel_size=1.")
    config, mesh = _config_and_mesh(config_or_mesh, ulysses_mode)
    models = {name: getattr(pipe, name) for name in TRANSFORMERS if isinstance(getattr(pipe, name, None), nn.Module)}
    if not models or not hasattr(pipe, "components"):
        raise ValueError(f"parallelize_pipeline takes a diffusers pipeline with a transformer ({' or '.join(TRANSFORMERS)}); "
                         f"{type(pipe).__name__} has none (UNet pipelines are not supported).")
    chosen = _checked_plans(models, config, dict(plans or {}))
    vae = _checked_vae(pipe, config, vae_parallel, vae_tiling)
    if config.cfg_degree > 1:
        from meshsp.cfg import check_cfg_pipeline

        check_cfg_pipeline(pipe)
    if cache is not None:
        from meshsp.cache import check_pipeline_cache

        check_pipeline_cache(pipe, cache, cache_options, _axes(config))
    # Checked: from here on every rank builds the mesh and changes the pipeline alike.
    if mesh is None and config.world_size > 1:
        from meshsp.mesh import init_sp_mesh

        mesh = init_sp_mesh(config)
    return _apply(pipe, config, mesh, models, chosen, vae, vae_tiling, text_encoder_tp, cache, cache_options)


def _config_and_mesh(config_or_mesh, ulysses_mode: str | None) -> tuple[ParallelConfig, DeviceMesh | None]:
    if isinstance(config_or_mesh, ParallelConfig):
        config = config_or_mesh
        if ulysses_mode is not None and ulysses_mode != config.ulysses_mode:
            raise ValueError(f"ulysses_mode={ulysses_mode!r} differs from the config's {config.ulysses_mode!r}; set it "
                             "in the ParallelConfig (ulysses_mode is for a mesh).")
        from meshsp.mesh import check_world_size

        check_world_size(config)
        return config, None
    if not isinstance(config_or_mesh, DeviceMesh):
        raise ValueError(f"parallelize_pipeline takes a meshsp.ParallelConfig or a DeviceMesh from meshsp.init_sp_mesh; "
                         f"got {type(config_or_mesh).__name__}.")
    mesh = config_or_mesh
    names = mesh.mesh_dim_names or ()
    if not names or set(names) - set(_MESH_AXES) or list(names) != [n for n in _MESH_AXES if n in names]:
        raise ValueError(f"the mesh's axes must be named from {_MESH_AXES} in that order (meshsp.init_sp_mesh builds "
                         f"one); got {names}.")
    sizes = {name: mesh[name].size() for name in names}
    config = ParallelConfig(cfg_degree=sizes.get("cfg", 1), ring_degree=sizes.get("ring", 1),
                            ulysses_degree=sizes.get("ulysses", 1), tensor_parallel_size=sizes.get("tp", 1),
                            ulysses_mode=ulysses_mode or "strict")
    return config, mesh


def _axes(config: ParallelConfig) -> dict[str, int]:
    return {"cfg": config.cfg_degree, "ring": config.ring_degree, "ulysses": config.ulysses_degree,
            "tp": config.tensor_parallel_size}


def _checked_plans(models: dict[str, nn.Module], config: ParallelConfig, given: dict) -> dict:
    """Each transformer's plan, validated against it, its tp widths checked; ``{}`` on one model rank."""
    from meshsp.plans import Plan, get_plan
    from meshsp.tp import loaded_tp_size

    unknown = sorted(set(given) - set(models))
    if unknown:
        raise ValueError(f"plans names {unknown}, which this pipeline does not have; its transformers: {sorted(models)}.")
    for name, model in models.items():
        loaded = loaded_tp_size(model)
        if loaded is not None and loaded != config.tensor_parallel_size:
            raise ValueError(f"{name} was read sharded for tensor_parallel_size={loaded} (meshsp.loading), but the "
                             f"config has tensor_parallel_size={config.tensor_parallel_size}; load it again for this "
                             "layout.")
    if config.sequence_parallel_size * config.tensor_parallel_size == 1:
        return {}
    chosen = {}
    for name, model in models.items():
        plan = given.get(name)
        if plan is None:
            plan = get_plan(model, ulysses_mode=config.ulysses_mode)
        elif not isinstance(plan, Plan):
            raise ValueError(f"plans[{name!r}] must be a meshsp Plan (get_plan, load_plan, Plan(styles)); "
                             f"got {type(plan).__name__}.")
        else:
            plan.validate(model)
        if config.tensor_parallel_size > 1:
            plan._check_tp(model, config.tensor_parallel_size)
        chosen[name] = plan
    return chosen


def _checked_vae(pipe, config: ParallelConfig, vae_parallel: bool, vae_tiling: bool):
    """The VAE's split plan (None: decoded whole), refused here if the VAE cannot be split."""
    vae = getattr(pipe, "vae", None)
    if vae_tiling and not hasattr(vae, "enable_tiling"):
        raise ValueError(f"vae_tiling=True, but {type(vae).__name__} has no tiled decode; leave vae_tiling off.")
    if not vae_parallel or config.world_size == 1:
        return None
    if vae is None:
        raise ValueError(f"{type(pipe).__name__} has no VAE to split; pass vae_parallel=False.")
    from meshsp.vae import vae_plan

    try:
        plan = vae_plan(vae)
        plan.check(vae, tiling=vae_tiling or None)
    except ValueError as exc:
        raise ValueError(f"{exc} (or pass vae_parallel=False to decode whole on every rank)") from exc
    return plan


def _apply(pipe, config: ParallelConfig, mesh: DeviceMesh | None, models: dict, plans: dict, vae_plan,
           vae_tiling: bool, text_encoder_tp: bool, cache: str | None, cache_options: Mapping | None):
    from torch.distributed.tensor.parallel import parallelize_module

    text_encoders = ()
    if config.tensor_parallel_size > 1 and text_encoder_tp:
        text_encoders = _shard_text_encoders(pipe, mesh["tp"])
    if vae_tiling:
        pipe.vae.enable_tiling()  # diffusers' tiles; shared out across the ranks by the VAE plan
    if vae_plan is not None:
        parallelize_module(pipe.vae, mesh, vae_plan)
    for name, plan in plans.items():
        parallelize_module(models[name], mesh, plan)
    hooks = ()
    if config.cfg_degree > 1:
        from meshsp.cfg import apply_cfg_parallel

        hooks = tuple(apply_cfg_parallel(model, mesh["cfg"].get_group()) for model in models.values())
    step_cache = None
    if cache is not None:  # last: the cache's hooks wrap the parallel transformers
        from meshsp.cache import enable_pipeline_cache

        step_cache = enable_pipeline_cache(pipe, cache, mesh, cache_options)
    bands = getattr(pipe.vae, "meshsp_bands", None) if vae_plan is not None else None
    record = PipelineParallelism(config=config, mesh=mesh, transformers=tuple(plans), plans=dict(plans),
                                 vae_ranks=bands.size if bands is not None else 1,
                                 vae_encode_split=bool(bands is not None and bands.encoder_split),
                                 text_encoders=text_encoders, cfg_hooks=hooks, cache=step_cache)
    base = type(pipe)
    pipe.__class__ = _parallel_class(base)
    pipe.meshsp = record
    return pipe


def _shard_text_encoders(pipe, tp_mesh: DeviceMesh) -> tuple[str, ...]:
    """Text encoders with a transformers tp plan run tensor-parallel; the others stay whole on every
    rank (said once, on rank 0)."""
    from meshsp.text_encoding import parallelize_text_encoder

    sharded = []
    for name, module in pipe.components.items():
        if name.startswith("text_encoder") and isinstance(module, nn.Module):
            why = parallelize_text_encoder(module, tp_mesh)
            if why is None:
                sharded.append(name)
            elif dist.get_rank() == 0:
                logger.info("%s stays whole on every rank: %s", name, why)
    return tuple(sharded)


_PARALLEL_CLASSES: dict[type, type] = {}


def _parallel_class(base: type) -> type:
    """``base`` with its ``__call__`` wrapped by ``_call``, made once per pipeline class. It keeps the
    name (diffusers saves a pipeline's class name in its config) and the signature."""
    cls = _PARALLEL_CLASSES.get(base)
    if cls is None:
        signature = inspect.signature(base.__call__)

        @functools.wraps(base.__call__)
        def __call__(self, *args, **kwargs):
            return _call(self, base.__call__, signature, args, kwargs)

        cls = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                            "__qualname__": base.__qualname__, "__doc__": base.__doc__})
        _PARALLEL_CLASSES[base] = cls
    return cls


def _call(pipe, call, signature: inspect.Signature, args: tuple, kwargs: dict):
    """One pipeline call with CFG parallel on when it guides, and the cache told its step count."""
    from meshsp.cfg import uses_guidance

    record: PipelineParallelism = pipe.meshsp
    bound = signature.bind(pipe, *args, **kwargs)
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    arguments.update(arguments.pop("kwargs", None) or {})
    guided = uses_guidance(pipe, arguments)
    for hook in record.cfg_hooks:
        hook.enabled = guided
    if record.cache is not None:
        steps = arguments.get("num_inference_steps")
        if isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1:
            record.cache.prepare(steps)
        record.cache.reset_counts()
    try:
        out = call(pipe, *args, **kwargs)
    except BaseException:
        if record.cache is not None:  # a call stopped part-way must not hand its state to the next
            record.cache.reset_state()
        for hook in record.cfg_hooks:  # the call's own error is the one to see
            with contextlib.suppress(ValueError):
                hook.finish()
        raise
    for hook in record.cfg_hooks:
        hook.finish()
    return out
