"""Step caching that every rank of a parallel forward agrees on, with diffusers' own cache hooks.

diffusers 0.42 ships its step caches as hooks (``diffusers.hooks``): FirstBlockCache, TaylorSeer,
MagCache, Pyramid Attention Broadcast, FasterCache, SeaCache. Each decides per forward whether to
run a set of modules or answer them from a cache. meshsp applies them unchanged with
``transformer.enable_cache(config)`` and then adjusts, on the registered hook instances of this one
transformer only, the decisions that sequence sharding would change:

* **Decisions from tensors** (``first-block``). FirstBlockCache compares the first block's residual
  with the previous step's: ``mean|r - r_prev| / mean|r_prev|``. On a sequence shard that ratio is
  the shard's own, so ranks would take different branches (a hang in the next collective, or a wrong
  image). meshsp replaces the hook's decision method with one that sends the two sums (float64) of
  its shard to every rank of the forward group in **one tiny all-gather** and adds up the table in
  rank order. The ratio of the sums over all shards is the single-device ratio (the element counts
  cancel), and since every rank reduces the same gathered bits in the same order, every rank gets
  the same value and so the same branch: the all-gather is both the exact statistic and the
  agreement. Tensor-parallel ranks hold the same (replicated) hidden states; only the rows of tp
  coordinate 0 are summed, so a shard is counted once.
* **Decisions from a replicated tensor** (``sea``). SeaCache's indicator is computed from the
  transformer's *input* latents, which are whole on every rank (meshsp shards after the patch
  embedding), so every rank computes the single-device statistic itself. One tiny all-gather of the
  decision bit checks that they agree; should they not (non-deterministic kernels), every rank runs
  the blocks and restarts its trajectory, as diffusers' own distributed SeaCache path does.
* **Decisions from the step schedule** (``taylorseer``, ``mag``, ``pab``, ``faster``): step
  counters, timesteps and fixed ratios, the same on every rank. Their cached values are per token
  (residuals, Taylor factors, attention outputs), so on a shard they are that shard of the
  single-device values. No collective.

The forward group is the ranks that compute one forward together: the ``ring`` x ``ulysses`` x
``tp`` axes of the mesh, one group per ``cfg`` half. With CFG parallel the two halves run different
branches ("cond" on one, "uncond" on the other, each inside diffusers' ``cache_context``), and the
caches above keep their state per ``cache_context`` name: in one process the "cond" decisions only
ever see "cond" tensors and the "uncond" decisions "uncond" tensors. Each half therefore computes
exactly the decisions one process computes for its branch; agreeing across halves would *change*
them. ``pab`` and ``faster`` keep one state for both branches (one process lets the "uncond" call
reuse what the "cond" call cached), which a half that never runs the other branch cannot reproduce:
they are refused with a ``cfg`` axis.

Collectives are counted as ``"cache_agree"`` in ``meshsp.ops.record_comm``: one per forward for
``first-block`` (from the second step of each branch) and ``sea``, none for the others.

Example::

    mesh = init_sp_mesh(ParallelConfig(ulysses_degree=2))
    parallelize(pipe.transformer, mesh)
    cache = enable_pipeline_cache(pipe, "first-block", mesh, {"threshold": 0.1})
    cache.prepare(num_inference_steps=28)
    image = pipe("a cat", num_inference_steps=28).images[0]
    cache.counts   # {"calls": ..., "computed": ..., "skipped": ...}
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from meshsp.ops.comm import _count

__all__ = ["BATCH_WIDE_CACHES", "CACHE_KINDS", "PipelineCache", "StepCache", "cache_config", "check_batching", "check_cache", "check_pipeline_cache",
           "enable_cache", "enable_pipeline_cache"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Kind:
    """One diffusers cache as meshsp offers it."""

    config: str               # the diffusers.hooks config class
    hooks: tuple[str, ...]    # names its hooks are registered under
    per_branch: bool          # state kept per cache_context name (cond / uncond)
    timestep: bool = False    # needs current_timestep_callback
    defaults: tuple = ()      # (option, value) meshsp sets unless given


# Attention modules named attn, attn1, attn2 (Wan's are attn1/attn2, which diffusers' TaylorSeer
# patterns "^blocks.*attn" do not match: it would hook nothing there).
_TAYLORSEER_IDENTIFIERS = ("^blocks.*attn\\d*", "^transformer_blocks.*attn\\d*", "^single_transformer_blocks.*attn\\d*",
                           "^temporal_transformer_blocks.*attn\\d*")

_KINDS: dict[str, _Kind] = {
    # decision from tensors: made exact and agreed (_agree_first_block)
    "first-block": _Kind("FirstBlockCacheConfig", ("fbc_leader_block_hook", "fbc_block_hook"), True),
    # decisions from the step schedule
    "taylorseer": _Kind("TaylorSeerCacheConfig", ("taylorseer_cache",), True,
                        defaults=(("cache_identifiers", list(_TAYLORSEER_IDENTIFIERS)),)),
    "mag": _Kind("MagCacheConfig", ("mag_cache_leader_block_hook", "mag_cache_block_hook"), True),
    "pab": _Kind("PyramidAttentionBroadcastConfig", ("pyramid_attention_broadcast",), False, True,
                 defaults=(("spatial_attention_block_skip_range", 2),)),
    "faster": _Kind("FasterCacheConfig", ("faster_cache_denoiser", "faster_cache_block"), False, True,
                    defaults=(("is_guidance_distilled", True),)),
    # decision from the whole input latents every rank holds: agreed (_agree_sea)
    "sea": _Kind("SeaCacheConfig", ("sea_cache_root", "sea_cache_leader_block", "sea_cache_block",
                                    "sea_cache_post_norm"), True),
}

# Integer options that count steps or blocks: 0 would divide by zero or never run.
_AT_LEAST_ONE = {"cache_interval", "max_order", "num_inference_steps", "spatial_attention_block_skip_range",
                 "temporal_attention_block_skip_range", "cross_attention_block_skip_range",
                 "unconditional_batch_skip_range"}

#: CLI names of the step caches meshsp runs under every parallel mode (``--cache``).
CACHE_KINDS: tuple[str, ...] = tuple(_KINDS)

_NOT_OFFERED = {
    "text-kv": "diffusers' TextKVCacheConfig is not a step cache (it reuses NucleusMoE-Image's text keys and values, "
               "lossless) and meshsp has no plan for that model",
    "layer-skip": "diffusers' LayerSkipConfig is a guidance technique, not a step cache",
}


def _config_class(kind: str):
    import diffusers.hooks

    return getattr(diffusers.hooks, _KINDS[kind].config)


def _check_kind(kind: str) -> _Kind:
    if kind in _NOT_OFFERED:
        raise ValueError(f"cache kind {kind!r} is not offered: {_NOT_OFFERED[kind]}. Use one of {list(CACHE_KINDS)}.")
    if kind not in _KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; known: {list(CACHE_KINDS)}.")
    return _KINDS[kind]


def cache_config(kind: str, **options):
    """The diffusers config meshsp applies for ``kind`` and ``options`` (``None`` values dropped).

    This is what a single process applies with ``transformer.enable_cache(config)`` to get the
    reference that the parallel run equals.

    Example::

        cache_config("first-block", threshold=0.1)   # FirstBlockCacheConfig(threshold=0.1)
    """
    spec = _check_kind(kind)
    cls = _config_class(kind)
    options = {k: v for k, v in options.items() if v is not None}
    given = set(options)
    fields = sorted(f.name for f in dataclasses.fields(cls) if not f.name.startswith("_"))
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(f"cache kind {kind!r} ({cls.__name__}) takes no option(s) {unknown}; its options are {fields}.")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, value in options.items():
        numeric = isinstance(defaults[name], (int, float)) and not isinstance(defaults[name], bool)
        if numeric or name in _AT_LEAST_ONE:
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            integer = isinstance(defaults[name], int) or name in _AT_LEAST_ONE
            low = 1 if name in _AT_LEAST_ONE else 0
            if not number or value < low or integer and not isinstance(value, int):
                want = f"an integer >= {low}" if integer else "a non-negative number"
                raise ValueError(f"cache kind {kind!r}: {name} must be {want}, got {value!r}.")
    if kind == "faster" and options.get("is_guidance_distilled") is False:
        raise ValueError(
            "cache kind 'faster' with is_guidance_distilled=False skips the unconditional branch by splitting a "
            "batch of concatenated uncond/cond inputs, which the pipelines meshsp runs do not build (they call the "
            "transformer once per branch, cache_context 'cond'/'uncond'). Leave is_guidance_distilled unset "
            "(meshsp runs FasterCache's attention reuse only) or use another kind.")
    if spec.timestep and not callable(options.get("current_timestep_callback")):
        raise ValueError(
            f"cache kind {kind!r} needs current_timestep_callback, a function returning the denoising loop's current "
            "timestep; enable_pipeline_cache passes the pipeline's current_timestep.")
    for name, value in spec.defaults:
        options.setdefault(name, value)
    if kind == "pab" and any(options.get(f"{a}_attention_block_skip_range") for a in ("temporal", "cross")) \
            and "spatial_attention_block_skip_range" not in given:
        options.pop("spatial_attention_block_skip_range")  # the default only when no skip range is given
    if kind == "mag":
        options.setdefault("num_inference_steps", len(options["mag_ratios"]) if options.get("mag_ratios") is not None
                           else 28)
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"cache kind {kind!r}: {exc}") from exc


# Caches whose skip decision is one statistic over the whole batch: a request's image would depend on its batch-mates.
BATCH_WIDE_CACHES = ("first-block", "sea")


def check_batching(batch_size: int, kind: str | None) -> None:
    """Refuse more than one request per batch with a step cache that decides from the whole batch
    (``BATCH_WIDE_CACHES``): the engine for each batch, the server for its ``--max-batch-size``.

    Example::

        check_batching(4, "first-block")   # ValueError: ... decides from the whole batch ...
    """
    if batch_size > 1 and kind in BATCH_WIDE_CACHES:
        raise ValueError(f"the {kind!r} step cache decides from the whole batch's tensors, so a request's images would "
                         f"depend on what it is batched with (batches of up to {batch_size}); run requests one at a "
                         "time (--max-batch-size 1), or use a per-token cache ('taylorseer', 'mag', 'pab', 'faster').")


def check_cache(kind: str, options: Mapping | None = None, parallel_config=None) -> None:
    """Raise the ``ValueError`` ``enable_pipeline_cache`` would raise for the kind, the options and the
    degrees of ``parallel_config`` (a ``ParallelConfig``; None: one process), without a model or a
    process group: a launcher's check before it starts ranks. The checks that need the model
    (SeaCache outside Wan, MagCache without ratios, nothing to hook) run when the cache is enabled.

    Example::

        check_cache("pab", {}, ParallelConfig(cfg_degree=2))   # ValueError: ... one state for 'cond' and 'uncond' ...
    """
    spec = _check_kind(kind)
    options = {k: v for k, v in dict(options or {}).items() if v is not None}
    if spec.timestep:
        options.setdefault("current_timestep_callback", lambda: math.inf)
    if kind == "mag" and options.get("mag_ratios") is None and not options.get("calibrate"):
        options["mag_ratios"] = [1.0]  # the model's (diffusers has Flux's); checked when the cache is enabled
    c = parallel_config
    axes = {} if c is None else {"cfg": c.cfg_degree, "ring": c.ring_degree, "ulysses": c.ulysses_degree,
                                 "tp": c.tensor_parallel_size}
    _check_axes(kind, spec, cache_config(kind, **options), axes)


class _ForwardGroup:
    """The ranks that compute one forward together, and the one collective a decision costs.

    Ranks are in flattened (ring, ulysses, tp) order: tp innermost, so the rows of tp coordinate 0
    (every ``tp``-th) hold the distinct sequence shards.
    """

    def __init__(self, group: dist.ProcessGroup, tp: int) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.tp = tp
        nccl = "nccl" in str(dist.get_backend(group))
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    def _gather(self, local: torch.Tensor) -> torch.Tensor:
        _count("cache_agree", local.numel() * local.element_size() * (self.size - 1))
        table = funcol.wait_tensor(funcol.all_gather_single(local.to(self.device).contiguous(), 0, self.group))
        return table.view(self.size, -1)

    def sum_shards(self, local: torch.Tensor) -> torch.Tensor:
        """The sum over the distinct shards of ``local`` ([k] float64), bit-identical on every rank."""
        return self._gather(local)[:: self.tp].sum(0)

    def vote(self, flag: bool) -> tuple[bool, bool]:
        """(any rank says True, the ranks disagree)."""
        votes = self._gather(torch.tensor([int(flag)], dtype=torch.int32))
        return bool(votes.any()), bool(votes.any() and not votes.all())


def _mesh_axes(mesh: DeviceMesh) -> dict[str, int]:
    names = mesh.mesh_dim_names or ()
    return {name: mesh[name].size() for name in names}


def _forward_group(where) -> _ForwardGroup | None:
    """The forward group of a mesh (its ring, ulysses and tp axes) or a process group as given."""
    if where is None:
        return None
    if isinstance(where, dist.ProcessGroup):
        return _ForwardGroup(where, 1) if dist.get_world_size(where) > 1 else None
    axes = _mesh_axes(where)
    shared = [a for a in ("ring", "ulysses", "tp") if axes.get(a, 1) > 1]
    if not shared:
        return None
    sub = where[shared[0]] if len(shared) == 1 else where[tuple(shared)]._flatten("meshsp_cache")
    return _ForwardGroup(sub.get_group(), axes.get("tp", 1))


def _check_axes(kind: str, spec: _Kind, config, axes: Mapping[str, int]) -> None:
    """Refuse what these parallel degrees cannot run equal to one process."""
    if axes.get("cfg", 1) > 1 and not spec.per_branch:
        raise ValueError(
            f"cache kind {kind!r} keeps one state for the 'cond' and 'uncond' calls (one process lets the uncond call "
            "reuse what the cond call cached); with CFG parallel each half runs one branch only and could not equal "
            "that. Use first-block, taylorseer, mag or sea with cfg_degree=2, or cfg_degree=1 with this kind.")
    if kind == "mag" and config.calibrate and math.prod(axes.values()) > 1:
        raise ValueError(
            "cache kind 'mag' with calibrate=True measures per-token norm ratios whose mean a sequence shard "
            "cannot give, and prints them on every rank; calibrate on one process (the ratios belong to the model "
            "and scheduler, not the parallel layout), then pass mag_ratios.")
    if kind == "sea" and axes.get("tp", 1) > 1:
        raise ValueError("cache kind 'sea' runs every block of a model with DTensor (tensor-parallel) weights, so "
                         "with tensor_parallel_size > 1 it would never skip; use first-block or mag with tp.")


def _check_model(kind: str, config, transformer: nn.Module) -> None:
    """Refuse a cache this transformer would run without ever skipping."""
    if kind != "sea":
        return
    name = type(transformer).__name__
    if name == "Cosmos3OmniTransformer":
        raise ValueError("cache kind 'sea' on Cosmos3OmniTransformer synchronises over the whole world inside "
                         "diffusers; use first-block.")
    wan_t2v = name == "WanTransformer3DModel" and transformer.config.in_channels == transformer.config.out_channels
    if not wan_t2v and config.raw_vision_callback is None:
        raise ValueError(
            f"cache kind 'sea' needs the generated latents from the transformer's inputs; diffusers has an adapter "
            f"for Wan text-to-video only and would never skip on {name} (it runs 'fail-open'). Pass "
            "raw_vision_callback, or use first-block.")


class _Counter:
    """Calls of the modules a cache hook wraps, and how many of them ran the module."""

    def __init__(self) -> None:
        self.calls = 0
        self.computed = 0
        self._wrapped: list = []

    def watch(self, fn_ref) -> None:
        forward, original = fn_ref.forward, fn_ref.original_forward

        def counted_forward(*args, **kwargs):
            self.calls += 1
            return forward(*args, **kwargs)

        def counted_original(*args, **kwargs):
            self.computed += 1
            return original(*args, **kwargs)

        fn_ref.forward, fn_ref.original_forward = counted_forward, counted_original
        self._wrapped.append((fn_ref, forward, original))

    def unwatch(self) -> None:
        for fn_ref, forward, original in self._wrapped:
            fn_ref.forward, fn_ref.original_forward = forward, original
        self._wrapped = []


def _registered(transformer: nn.Module, names: tuple[str, ...]) -> list:
    """The cache hooks of ``names`` registered on ``transformer`` and its submodules."""
    found = []
    for module in transformer.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            found += [hook for name, hook in registry.hooks.items() if name in names]
    return found


def _agree_first_block(hook, group: _ForwardGroup) -> None:
    """FBCHeadBlockHook's decision from the whole residual, the same on every rank (module docstring)."""

    @torch.compiler.disable
    def should_compute(residual: torch.Tensor) -> bool:
        prev = hook.state_manager.get_state().head_block_residual
        if prev is None:  # the first step of a branch: the same on every rank, nothing to compare
            return True
        local = torch.stack([(residual - prev).abs().sum(dtype=torch.float64), prev.abs().sum(dtype=torch.float64)])
        diff, base = group.sum_shards(local)
        return bool(diff / base > hook.threshold)

    hook._should_compute_remaining_blocks = should_compute


def _agree_sea(shared_state, group: _ForwardGroup) -> None:
    """SeaCache's gate, checked to be the same on every rank of the forward group."""
    resolve = shared_state.resolve_gate

    def resolve_gate(state, metadata, indicator, config) -> bool:
        should_compute = resolve(state, metadata, indicator, config)
        agreed, disagreed = group.vote(should_compute)
        if disagreed:
            logger.warning("SeaCache decisions differed across the ranks of one forward at step %s; every rank "
                           "computes and restarts its cache trajectory.", metadata.step_index)
            state.reset_trajectory()
        return agreed

    shared_state.resolve_gate = resolve_gate


class StepCache:
    """One transformer's step cache: its diffusers config, hooks, forward group and counters.

    ``counts``: calls of the modules the cache wraps since the last ``reset_counts()``, how many ran
    (``computed``) and how many were answered from the cache (``skipped``).
    """

    def __init__(self, transformer: nn.Module, kind: str, config, group: _ForwardGroup | None) -> None:
        self.transformer = transformer
        self.kind = kind
        self.config = config
        self.group = group
        self._mag_ratios = config.mag_ratios.clone() if kind == "mag" and config.mag_ratios is not None else None
        self._counter = _Counter()
        hooks = _registered(transformer, _KINDS[kind].hooks)
        for hook in hooks:
            if hook.fn_ref.original_forward is not None:  # a hook that can answer for its module
                self._counter.watch(hook.fn_ref)
            if group is not None and kind == "first-block" and hasattr(hook, "_should_compute_remaining_blocks"):
                _agree_first_block(hook, group)
        if group is not None and kind == "sea":
            for shared in {id(h.shared_state): h.shared_state for h in hooks}.values():
                _agree_sea(shared, group)

    @property
    def counts(self) -> dict[str, int]:
        c = self._counter
        return {"calls": c.calls, "computed": c.computed, "skipped": c.calls - c.computed}

    def reset_counts(self) -> None:
        self._counter.calls = self._counter.computed = 0

    def prepare(self, num_inference_steps: int) -> None:
        """Set the request's step count where the cache needs it (MagCache's ratio schedule)."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}.")
        if self.kind == "mag":
            from diffusers.hooks.mag_cache import nearest_interp

            self.config.num_inference_steps = num_inference_steps
            if self._mag_ratios is not None:
                self.config.mag_ratios = nearest_interp(self._mag_ratios, num_inference_steps)

    def remove(self) -> None:
        """Take the cache off the transformer (diffusers' ``disable_cache``)."""
        self._counter.unwatch()
        self.transformer.disable_cache()


def enable_cache(transformer: nn.Module, kind: str, mesh: DeviceMesh | dist.ProcessGroup | None = None,
                 **options) -> StepCache:
    """Apply diffusers' ``kind`` cache to ``transformer`` so that every rank of ``mesh`` takes the same branches.

    ``mesh``: meshsp's mesh (its ``ring``, ``ulysses`` and ``tp`` axes share one forward, ``cfg``
    halves run their own branch), a process group whose ranks each hold a distinct sequence shard,
    or None in a single process (diffusers' hooks exactly as they are). ``options``: fields of the
    kind's diffusers config (``threshold``, ...). Every check runs before any collective.

    Example::

        cache = enable_cache(transformer, "first-block", mesh, threshold=0.1)
    """
    if isinstance(mesh, DeviceMesh):
        axes = _mesh_axes(mesh)
    else:
        axes = {"group": dist.get_world_size(mesh)} if mesh is not None else {}
    spec, config = _checked(transformer, kind, axes, options)
    transformer.enable_cache(config)
    if not _registered(transformer, spec.hooks):
        transformer.disable_cache()
        raise ValueError(f"cache kind {kind!r} found no module of {type(transformer).__name__} to cache with {config!r}; "
                         "name its blocks or attention modules in the kind's identifier options, or use first-block.")
    return StepCache(transformer, kind, config, _forward_group(mesh))


def _checked(transformer: nn.Module, kind: str, axes: Mapping[str, int], options: dict):
    """(the kind, its diffusers config) for ``transformer`` on a mesh of ``axes``; every refusal
    ``enable_cache`` makes before it registers a hook, without registering one."""
    spec = _check_kind(kind)
    if not hasattr(transformer, "enable_cache"):
        raise ValueError(f"{type(transformer).__name__} has no diffusers cache support (CacheMixin); use no cache.")
    if transformer.is_cache_enabled:
        raise ValueError(f"{type(transformer).__name__} already has a cache ({type(transformer._cache_config).__name__});"
                         " remove it first (StepCache.remove()).")
    if kind == "mag" and options.get("mag_ratios") is None and not options.get("calibrate"):
        if type(transformer).__name__ != "FluxTransformer2DModel":
            raise ValueError(
                f"cache kind 'mag' needs mag_ratios for {type(transformer).__name__} (diffusers ships them for Flux "
                "only): run MagCacheConfig(calibrate=True) once on one process and pass the ratios it prints.")
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        options["mag_ratios"] = FLUX_MAG_RATIOS
    config = cache_config(kind, **options)
    _check_axes(kind, spec, config, axes)
    _check_model(kind, config, transformer)
    return spec, config


class PipelineCache:
    """The step caches of a pipeline's transformers (``transformer``, Wan 2.2's ``transformer_2``)."""

    def __init__(self, caches: dict[str, StepCache]) -> None:
        self.caches = caches

    @property
    def counts(self) -> dict[str, int]:
        out = {"calls": 0, "computed": 0, "skipped": 0}
        for cache in self.caches.values():
            for key, value in cache.counts.items():
                out[key] += value
        return out

    def reset_counts(self) -> None:
        for cache in self.caches.values():
            cache.reset_counts()

    def reset_state(self) -> None:
        """Forget what the caches hold (diffusers does this only at the end of a call that
        succeeded; a call that failed or was stopped part-way would leave its state to the next)."""
        for cache in self.caches.values():
            cache.transformer._reset_stateful_cache()

    def prepare(self, num_inference_steps: int) -> None:
        for cache in self.caches.values():
            cache.prepare(num_inference_steps)

    def remove(self) -> None:
        for cache in self.caches.values():
            cache.remove()


def enable_pipeline_cache(pipe, kind: str, mesh: DeviceMesh | None = None,
                          options: Mapping | None = None) -> PipelineCache:
    """``enable_cache`` on each of ``pipe``'s transformers, the timestep read from the pipeline.

    Call ``prepare(num_inference_steps)`` before each request (MagCache follows the step count);
    diffusers pipelines reset the caches' state at the end of every call that succeeds, and
    ``reset_state()`` does it after one that did not.

    Example::

        cache = enable_pipeline_cache(pipe, "first-block", mesh, {"threshold": 0.1})
    """
    options, models = _pipeline_models(pipe, kind, options)
    caches: dict[str, StepCache] = {}
    try:
        for name, model in models.items():
            caches[name] = enable_cache(model, kind, mesh, **options)
    except BaseException:
        for cache in caches.values():
            cache.remove()
        raise
    return PipelineCache(caches)


def _pipeline_models(pipe, kind: str, options: Mapping | None) -> tuple[dict, dict[str, nn.Module]]:
    options = {k: v for k, v in dict(options or {}).items() if v is not None}
    _check_kind(kind)
    if _KINDS[kind].timestep:
        options.setdefault("current_timestep_callback", _current_timestep(pipe))
    models = {name: getattr(pipe, name) for name in ("transformer", "transformer_2")
              if isinstance(getattr(pipe, name, None), nn.Module)}
    if not models:
        raise ValueError(f"{type(pipe).__name__} has no transformer to cache.")
    return options, models


def check_pipeline_cache(pipe, kind: str, options: Mapping | None, axes: Mapping[str, int]) -> None:
    """Raise the ``ValueError`` ``enable_pipeline_cache`` would raise for ``pipe`` on a mesh of
    ``axes`` (``{"cfg": 2, "ulysses": 2}``), registering nothing: ``parallelize_pipeline`` checks the
    cache with everything else before it changes the pipeline or builds a mesh.

    Example::

        check_pipeline_cache(pipe, "sea", {}, {"tp": 2})   # ValueError: ... tensor_parallel_size > 1 ...
    """
    options, models = _pipeline_models(pipe, kind, options)
    for model in models.values():
        _checked(model, kind, axes, dict(options))


def _current_timestep(pipe) -> Callable[[], float]:
    def current_timestep() -> float:
        t = pipe.current_timestep
        return float(t) if t is not None else math.inf

    return current_timestep
