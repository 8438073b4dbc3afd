"""Plans converted from a diffusers ``_cp_plan``, checked and repaired for the instance at hand.

diffusers' plans say where inputs are split and outputs gathered; meshsp adds where attention is
routed. Upstream plans are written for one config and sometimes miss a tensor, so the conversion:

* drops entries for blocks this instance does not have (``blocks.39`` in a 2-block model) when the
  same entry with ``*`` for the index matches blocks it does have;
* routes exactly the attention whose keys the plan shards (seen on a simulated rank), not every
  attention module that is not marked cross-attention (a text refiner is not);
* simulates every rank (``meshsp.plans.infer.simulate``); a sequence the plan leaves whole — a
  RoPE table computed by a sibling module, say — is found among the root's children whose outputs
  follow the tokens and are still full length inside the sharded region, and sharded at that output;
  an output the plan shards only at a declared rank (``expected_dims``) that this config's tensor
  does not have is re-sharded at its traced dim. If the plan still does not run like the unsharded
  model, the conversion raises ``ValueError`` naming the module and tensor.

Without example inputs (a class meshsp has no tiny config for, and no ``make_inputs``) only the
first step runs, and every non-cross attention module is routed, as diffusers' own plans assume.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Mapping

import torch
import torch.nn as nn

from meshsp.styles import GatherSequence, ParallelAttention, SeqDim, ShardSequence

__all__ = ["plan_from_cp_plan"]

log = logging.getLogger(__name__)


def _is_attention(module: nn.Module) -> bool:
    return hasattr(module, "processor") and not getattr(module, "is_cross_attention", False)


def _convert(cp_plan: Mapping) -> dict[str, object]:
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    styles: dict[str, object] = {}
    for path, value in cp_plan.items():
        if isinstance(value, (ContextParallelOutput, list, tuple)) and not isinstance(value, Mapping):
            outs = value if isinstance(value, (list, tuple)) else [value]
            styles[path] = GatherSequence(outputs={i: SeqDim(o.gather_dim) for i, o in enumerate(outs)})
            continue
        inputs, outputs = {}, {}
        for key, spec in value.items():
            spec = spec[0] if isinstance(spec, (list, tuple)) else spec
            assert isinstance(spec, ContextParallelInput), spec
            target = outputs if spec.split_output else inputs
            target[key] = SeqDim(spec.split_dim, spec.expected_dims)
        styles[path] = ShardSequence(inputs=inputs or None, outputs=outputs or None)
    return styles


def _star(path: str) -> str:
    """``blocks.3.attn1`` -> ``blocks.*.attn1``: every numeric component a wildcard."""
    return ".".join("*" if part.isdigit() else part for part in path.split("."))


def _free_key(styles: Mapping, path: str) -> str:
    """``path``, or the same selection spelled another way if the plan already has that key (one
    module may take an input shard and an output gather): the last component's first letter as a
    one-letter class, ``[a]ttn1`` for ``attn1``."""
    head, _, last = path.rpartition(".")
    for n in range(len(last) + 1):
        alt = f"{head + '.' if head else ''}{''.join(f'[{c}]' for c in last[:n])}{last[n:]}"
        if alt not in styles:
            return alt
    raise AssertionError(path)


def _collapse_numbered(styles: dict[str, object]) -> dict[str, object]:
    """``blocks.0.attn1`` ... ``blocks.39.attn1`` with the same style -> one ``blocks.*.attn1``
    entry, so that a plan written for one depth applies to any."""
    def spec(style):
        return (type(style).__name__, repr(getattr(style, "inputs", None)), repr(getattr(style, "outputs", None)))

    groups: dict[tuple, list[str]] = {}
    for path, style in styles.items():
        if _star(path) != path:
            groups.setdefault((_star(path), spec(style)), []).append(path)
    out: dict[str, object] = {}
    for path, style in styles.items():
        general = _star(path)
        members = groups.get((general, spec(style)), [])
        if len(members) < 2:
            out[path] = style
        elif path == members[0]:
            out[_free_key(out, general)] = style
    return out


def _drop_static_depth(model: nn.Module, styles: dict[str, object]) -> dict[str, object]:
    """Drop ``blocks.<n>.x`` entries for blocks beyond this instance's depth (a plan for one config)."""
    from meshsp.plans import match_path

    kept = {}
    for path, style in styles.items():
        general = _star(path)
        if not match_path(model, path) and general != path and match_path(model, general):
            log.debug("_cp_plan entry '%s' names a block %s does not have; dropped", path, type(model).__name__)
            continue
        kept[path] = style
    return kept


def _route(styles: dict[str, object], names, whole_queries=()) -> None:
    """Route attention modules ``names`` (as ``*`` patterns); those in ``whole_queries`` keep their queries whole."""
    replicated = {_star(n) for n in whole_queries}
    for key in sorted({_star(n) for n in names}):
        if not isinstance(styles.get(key), ParallelAttention):
            styles[_free_key(styles, key)] = ParallelAttention("replicated" if key in replicated else "sharded")


def _sharded_keys(model: nn.Module, plan, traces, inputs: dict) -> tuple[set[str], set[str]]:
    """Attention modules whose keys the plan shards (found on a simulated rank): they must be routed;
    and those of them whose queries the plan leaves whole."""
    from meshsp.plans.simulate import InferenceError, simulate

    try:
        seen = simulate(model, plan, inputs, layouts=((1, 2),), probe=True)
    except InferenceError as exc:
        raise ValueError(f"{type(model).__name__}: its converted _cp_plan fails on a rank's shard: {exc}") from exc
    modules = [a.module for a in traces.runs[0].attention]
    if len(seen["calls"]) != len(modules):
        raise ValueError(f"{type(model).__name__}: its converted _cp_plan changes which attention runs.")
    routed, whole = set(), set()
    for module, (q, k), (q_ref, k_ref) in zip(modules, seen["calls"], seen["ref_calls"]):
        if k < k_ref:
            routed.add(module)
            if q == q_ref:
                whole.add(module)
    return routed, whole


def _unsharded_sources(model: nn.Module, plan, traces, inputs: dict) -> dict[str, dict[int, int]]:
    """Children of the root whose outputs follow the tokens but stay full length on a simulated rank."""
    from meshsp.plans.simulate import _SimSP

    base = traces.runs[0]
    targets = {n: style for p, style in plan.items() if isinstance(style, ShardSequence) for n in plan.matches(model, p)}
    resharded = {d[1] for call in base.calls if call.name in targets
                 for key in targets[call.name].inputs for d in call.inputs.get(key, []) if d}
    candidates: dict[str, dict[int, tuple[int, tuple]]] = {}
    for index, call in enumerate(base.calls):
        if "." in call.name or not call.name or isinstance(model.get_submodule(call.name), nn.ModuleList):
            continue
        if call.name in plan and not (isinstance(plan[call.name], ShardSequence) and plan[call.name].outputs):
            continue  # a module the plan already handles (an output it shards may still slip through: ndim)
        for i, elements in traces.slot_kinds(index, "outputs").items():
            kind, dim = elements[0]
            if kind in ("img", "joint") and len(elements) == 1 and call.outputs[i][0][1] not in resharded:
                candidates.setdefault(call.name, {})[i] = (dim, call.outputs[i][0][0])
    if not candidates:
        return {}
    seen: dict[str, dict[int, tuple]] = {}
    probe = copy.deepcopy(model)
    for path, style in plan.items():
        if isinstance(style, ShardSequence):
            for name in plan.matches(probe, path):
                style.install(probe.get_submodule(name), _SimSP(1, 2, 0, 0))
    for name in candidates:
        probe.get_submodule(name).register_forward_hook(
            lambda mod, args, out, name=name: seen.setdefault(name, {
                i: tuple(t.shape) for i, t in enumerate([out] if isinstance(out, torch.Tensor) else out)
                if isinstance(t, torch.Tensor)}))
    try:
        with torch.no_grad():
            probe(**inputs)
    except Exception:  # noqa: BLE001 - the shape error the missing shard causes; shapes seen so far count
        pass
    return {name: {i: dim for i, (dim, full) in outs.items() if seen.get(name, {}).get(i) == full}
            for name, outs in candidates.items() if any(seen.get(name, {}).get(i) == full for i, (_, full) in outs.items())}


def plan_from_cp_plan(model: nn.Module, *, ulysses_mode: str = "strict", make_inputs: Callable[..., dict] | None = None):
    """Convert ``model``'s diffusers ``_cp_plan``, checked (and repaired) for this instance.

    Example::

        plan = plan_from_cp_plan(transformer, ulysses_mode="advanced_uaa")
    """
    from meshsp.plans import Plan
    from meshsp.plans.infer import _Traces
    from meshsp.plans.simulate import InferenceError, simulate
    from meshsp.zoo import ZOO, build, inputs_for

    name = type(model).__name__
    cp_plan = getattr(model, "_cp_plan", None)
    if not cp_plan:
        raise ValueError(f"{name} has no _cp_plan to convert.")
    entry = ZOO.get(name)
    if make_inputs is None and entry is None:
        styles = _drop_static_depth(model, _collapse_numbered(_convert(cp_plan)))
        _route(styles, [n for n, m in model.named_modules() if n and _is_attention(m)])
        return Plan(styles, ulysses_mode=ulysses_mode, model=name)
    probe = build(name, heads=3) if entry is not None and make_inputs is None else model
    make_inputs = make_inputs or (lambda m, **grid: inputs_for(m, **grid))
    traces = _Traces(probe, make_inputs, entry.video if entry else False, bool(entry and entry.square),
                     bool(entry and entry.text_mask))
    styles = _drop_static_depth(probe, _collapse_numbered(_convert(cp_plan)))
    batch2 = make_inputs(probe, **traces.grids[0])
    missing: dict = {}
    try:
        routed = _sharded_keys(probe, Plan(dict(styles)), traces, batch2)
    except ValueError as first:
        missing = _unsharded_sources(probe, Plan(dict(styles)), traces, batch2)
        if not missing:
            raise
        for module, outs in missing.items():
            log.info("%s: its _cp_plan leaves the output of '%s' (a sequence) whole; sharded %s", name, module, outs)
        styles = {**{m: None for m in missing}, **styles}
        for m, outs in missing.items():  # merged into an entry the plan has (one whose outputs slipped through)
            old = styles[m]
            inputs = old.inputs if isinstance(old, ShardSequence) else None
            styles[m] = ShardSequence(inputs=inputs, outputs={**(old.outputs if old is not None else {}), **outs})
        try:
            routed = _sharded_keys(probe, Plan(dict(styles)), traces, batch2)
        except ValueError as second:
            raise ValueError(f"{second} (after sharding what the _cp_plan leaves whole: {missing}; before: {first})") from second
    _route(styles, *routed)
    plan = Plan(styles, model=name)
    try:
        simulate(probe, plan, batch2)
    except InferenceError as exc:
        found = f" (after sharding what it left whole: {missing})" if missing else ""
        raise ValueError(f"{name}: its converted _cp_plan does not run like the unsharded model{found}: {exc}") from exc
    return Plan.from_dict(plan.to_dict(), ulysses_mode=ulysses_mode)
