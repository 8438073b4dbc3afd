"""Tensor-parallel plan entries for a diffusers transformer: from its ``_tp_plan``, or recognised.

``tp_entries(model)`` returns ``{module_path: style}`` for the plan's ``tp`` section:

* a class with a diffusers ``_tp_plan`` (Flux, Flux2, Qwen-Image) keeps it as written ("colwise"
  -> ``ColwiseParallel``, "rowwise" -> ``RowwiseParallel``, diffusers' packed markers -> meshsp's
  packed styles), plus ``LocalHeads`` on every attention module whose projections it shards;
* otherwise the blocks are recognised module by module. An attention module (an int ``heads`` and
  ``to_q`` / ``to_k`` / ``to_v`` ``Linear``s) gets its q/k/v projections (and ``add_*_proj``)
  column-wise, ``to_out.0`` / ``to_add_out`` row-wise, ``HeadShardedNorm`` on q/k norms that span
  all heads and ``LocalHeads``. One without an output projection (Flux-style single blocks) is
  sharded only when its block has ``proj_mlp`` and a ``proj_out`` over the attention output and
  the MLP concatenated (packed row-wise). Feed-forwards: diffusers' ``FeedForward`` (GELU up
  projection column-wise, GEGLU / SwiGLU packed, ``net.2`` row-wise), the gated triples ``w1`` /
  ``w3`` -> ``w2``, ``gate`` / ``up`` -> ``down`` and ``gate_proj`` / ``up_proj`` -> ``down_proj``
  (beside no norm over their hidden width), and the pairs ``linear_in`` -> ``linear_out`` and
  ``in_layer`` -> ``out_layer`` (a width ``d`` back to ``d``, nothing with weights between them).

Anything not recognised stays replicated, which is always correct. Left whole, and why:

* an attention module with a ``Linear`` of unknown role, or a norm over features other than one
  head's or all heads' (what it mixes is unknown);
* grouped-query attention (k/v projections narrower than q): ``tp`` would have to divide the
  key/value heads, a count no sharded width states, and a ``tp`` that splits a key/value head
  passes every width check;
* an attention without ``to_add_out`` whose siblings (the same attribute of blocks of one class)
  have one: the blocks run one forward, which reads the second stream's attention output there
  too, unprojected (EasyAnimate's non-MMDiT blocks) — it would leave holding this rank's heads only.

Modulation (AdaLN) and embedding layers stay replicated, as in diffusers' own plans. RoPE tables
with a heads dimension (Mochi's, LTX-2's) are not visible here: such a class ships a ``tp`` section
with ``ShardFeatures`` on its RoPE module.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch.nn as nn
from torch.distributed.tensor import Replicate

from meshsp.tp import (ColwiseParallel, HeadShardedNorm, LocalHeads, PackedColwiseParallel, PackedRowwiseParallel,
                       RowwiseParallel, _norm_features)

__all__ = ["tp_entries"]

_QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")
_NORMS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")
_GATED = (("w1", "w3", "w2"), ("gate", "up", "down"), ("gate_proj", "up_proj", "down_proj"))  # (gate, up, down)
_PLAIN = (("linear_in", "linear_out"), ("in_layer", "out_layer"))  # (up, down)


def tp_entries(model: nn.Module) -> dict[str, object]:
    """The ``tp`` entries for ``model`` (``*`` where every block of a list has the same entry).

    Example::

        entries = tp_entries(transformer)   # {"blocks.*.attn1.to_q": ColwiseParallel(), ...}
    """
    tp_plan = getattr(model, "_tp_plan", None)
    entries = _from_tp_plan(model, tp_plan) if tp_plan else _recognise(model)
    entries.update(_modulations(model))
    return _collapse(model, entries)


def _modulations(model: nn.Module) -> dict[str, object]:
    """AdaLN modulation projections (the ``linear`` of an ``AdaLayerNorm*`` / ``*LayerNormZero``,
    the ``Linear`` of an ``*_mod`` or ``adaLN_modulation`` sequence): column-wise with the output
    all-gathered. They read the per-sample conditioning, so the gather is ``B x k·d`` numbers,
    while their weights are a third of Flux's and Qwen-Image's transformer."""
    out = {}
    for name, module in model.named_modules():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        kind = type(owner).__name__
        adaln = child == "linear" and ("AdaLayerNorm" in kind or kind.endswith("LayerNormZero"))
        sequence = isinstance(owner, nn.Sequential) and (parent.endswith("_mod") or parent.endswith("adaLN_modulation"))
        if isinstance(module, nn.Linear) and (adaln or sequence) and module.out_features >= 2 * module.in_features:
            out[name] = ColwiseParallel(output_layouts=Replicate())
    return out


def _from_tp_plan(model: nn.Module, tp_plan: dict) -> dict[str, object]:
    from diffusers.hooks.tensor_parallel import PackedColwiseParallel as Col, PackedRowwiseParallel as Row

    from meshsp.plans import match_path

    entries: dict[str, object] = {}
    for key, style in tp_plan.items():
        for path in match_path(model, key):
            if style == "colwise":
                entries[path] = ColwiseParallel()
            elif style == "rowwise":
                entries[path] = RowwiseParallel()
            elif isinstance(style, Col):
                entries[path] = PackedColwiseParallel(style.blocks)
            elif isinstance(style, Row):
                entries[path] = PackedRowwiseParallel(style.blocks)
            else:
                raise ValueError(f"{type(model).__name__}._tp_plan['{key}'] = {style!r}: not a style meshsp knows.")
    for name, module in model.named_modules():
        if _is_attention(module) and any(p.startswith(f"{name}.") for p in entries):
            entries[name] = LocalHeads()
    return entries


def _is_attention(module: nn.Module) -> bool:
    return isinstance(getattr(module, "heads", None), int) and (
        isinstance(getattr(module, "to_q", None), nn.Linear) or hasattr(module, "to_qkv_mlp_proj"))


def _recognise(model: nn.Module) -> dict[str, object]:
    entries: dict[str, object] = {}
    modules = dict(model.named_modules())
    attentions = {name: m for name, m in modules.items() if _is_attention(m)}
    unprojected = _unprojected_second_streams(modules, attentions)
    for name, module in modules.items():
        if name in attentions:
            if name not in unprojected:
                entries.update(_attention(name, module, modules[name.rpartition(".")[0]]))
        else:
            entries.update(_feed_forward(name, module))
    return entries


def _has_add_out(attn: nn.Module) -> bool:
    return isinstance(getattr(attn, "to_add_out", None), nn.Linear)


def _unprojected_second_streams(modules: dict[str, nn.Module], attentions: dict[str, nn.Module]) -> set[str]:
    """Attentions without ``to_add_out`` among siblings (same block class, same attribute) with one,
    whose second stream's output is used (not ``context_pre_only``)."""
    siblings: dict[tuple, list[str]] = defaultdict(list)
    for name in attentions:
        parent, _, attr = name.rpartition(".")
        siblings[(type(modules[parent]), attr)].append(name)
    out: set[str] = set()
    for names in siblings.values():
        if any(_has_add_out(attentions[n]) for n in names):
            out.update(n for n in names if not _has_add_out(attentions[n])
                       and not getattr(attentions[n], "context_pre_only", False))
    return out


def _attention(path: str, attn: nn.Module, parent: nn.Module) -> dict[str, object]:
    children = dict(attn.named_children())
    if not isinstance(children.get("to_q"), nn.Linear):
        return {}  # a fused projection with no _tp_plan saying how it is packed
    inner, heads = attn.to_q.out_features, attn.heads
    projections = {n: children[n] for n in _QKV if isinstance(children.get(n), nn.Linear)}
    if any(p.out_features != inner for p in projections.values()):
        return {}  # grouped-query attention: tp would have to divide the key/value heads
    out: dict[str, object] = {f"{path}.{n}": ColwiseParallel() for n in projections}
    known = set(_QKV) | set(_NORMS) | {"to_out", "to_add_out"}
    for name, child in children.items():
        if name in known:
            continue
        if any(isinstance(m, nn.Linear) for m in child.modules()) or _norm_features(child):
            return {}  # a projection (or norm) whose role is unknown: leave this attention whole
    for name in _NORMS:
        norm = children.get(name)
        if norm is None or not any(True for _ in norm.parameters()):
            continue
        features = _norm_features(norm)
        if features == inner and heads > 1:
            out[f"{path}.{name}"] = HeadShardedNorm()
        elif features != inner // heads and getattr(norm, "normalized_shape", (None,))[-1] != inner // heads:
            return {}
    to_out = children.get("to_out")
    if isinstance(to_out, nn.ModuleList) and isinstance(to_out[0], nn.Linear):
        out[f"{path}.to_out.0"] = RowwiseParallel()
    elif isinstance(to_out, nn.Linear):
        out[f"{path}.to_out"] = RowwiseParallel()
    elif to_out is None:
        single = _single_block(parent, inner)
        if not single:
            return {}
        prefix = path.rpartition(".")[0]
        out.update({f"{prefix}.{k}" if prefix else k: v for k, v in single.items()})
    else:
        return {}
    if isinstance(children.get("to_add_out"), nn.Linear):
        out[f"{path}.to_add_out"] = RowwiseParallel()
    elif any(n.startswith("add_") for n in children) and not getattr(attn, "context_pre_only", False):
        return {}  # a second stream with no output projection of its own, whose output is used
    out[path] = LocalHeads()
    return out


def _single_block(block: nn.Module, inner: int) -> dict[str, object]:
    """``proj_mlp`` column-wise and ``proj_out`` over [attention, MLP] packed row-wise, if the block has them."""
    mlp, proj_out = getattr(block, "proj_mlp", None), getattr(block, "proj_out", None)
    if not (isinstance(mlp, nn.Linear) and isinstance(proj_out, nn.Linear)
            and proj_out.in_features == inner + mlp.out_features):
        return {}
    unit = math.gcd(inner, mlp.out_features)  # proportions, as a plan for any width writes them
    return {"proj_mlp": ColwiseParallel(), "proj_out": PackedRowwiseParallel([inner // unit, mlp.out_features // unit])}


def _feed_forward(path: str, module: nn.Module) -> dict[str, object]:
    def at(name):
        return f"{path}.{name}" if path else name

    net = getattr(module, "net", None)
    if isinstance(net, nn.ModuleList) and len(net) >= 3 and isinstance(net[2], nn.Linear):
        act, down = net[0], net[2]
        proj = getattr(act, "proj", None)
        if not (isinstance(proj, nn.Linear) and _weightless_besides(act, {"proj"})):
            return {}
        gated = type(act).__name__ in ("GEGLU", "SwiGLU")
        if proj.out_features != down.in_features * (2 if gated else 1):
            return {}
        return {at("net.0.proj"): PackedColwiseParallel([1, 1]) if gated else ColwiseParallel(),
                at("net.2"): RowwiseParallel()}
    children = dict(module.named_children())
    linears = {n: c for n, c in children.items() if isinstance(c, nn.Linear)}
    for gate, up, down in _GATED:
        if not {gate, up, down} <= set(linears):
            continue
        g, u, d = linears[gate], linears[up], linears[down]
        if _widths(g, d) == _widths(u, d) == 1 and not _normalises(module, d.in_features):
            return {at(gate): ColwiseParallel(), at(up): ColwiseParallel(), at(down): RowwiseParallel()}
    for up, down in _PLAIN:
        if {up, down} <= set(linears) and len(linears) == 2 and _weightless_besides(module, {up, down}):
            ratio = _widths(linears[up], linears[down])
            if ratio == 2:
                return {at(up): PackedColwiseParallel([1, 1]), at(down): RowwiseParallel()}
            if ratio == 1:
                return {at(up): ColwiseParallel(), at(down): RowwiseParallel()}
    return {}


def _widths(up: nn.Linear, down: nn.Linear) -> int | None:
    """``up``'s output width over ``down``'s input width, for a pair that maps ``d`` back to ``d``."""
    if up.in_features != down.out_features or up.out_features % down.in_features:
        return None
    return up.out_features // down.in_features


def _normalises(module: nn.Module, width: int) -> bool:
    """A child norm over ``width`` features (the hidden width of a gated triple it may sit between)."""
    for child in module.children():
        shape = getattr(child, "normalized_shape", None) or getattr(child, "dim", None)
        shape = (shape,) if isinstance(shape, int) else tuple(shape or ())
        widths = {*shape[-1:], *(p.shape[-1] for p in child.parameters() if p.ndim)}
        if "Norm" in type(child).__name__ and width in widths:
            return True
    return False


def _weightless_besides(module: nn.Module, names: set[str]) -> bool:
    """Every child but ``names`` has no parameters (activations, dropout): nothing mixes features."""
    return all(not any(True for _ in c.parameters()) for n, c in module.named_children() if n not in names)


def _star_first(path: str) -> str:
    """``blocks.3.attn.to_out.0`` -> ``blocks.*.attn.to_out.0``: the block index a wildcard."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            parts[i] = "*"
            break
    return ".".join(parts)


def _spec(style) -> tuple:
    return type(style).__name__, tuple(getattr(style, "blocks", None) or ()), getattr(style, "gathered", False)


def _collapse(model: nn.Module, entries: dict[str, object]) -> dict[str, object]:
    """Concrete paths -> ``*`` paths where every module the star selects has the same entry."""
    from meshsp.plans import match_path

    out: dict[str, object] = {}
    for path, style in entries.items():
        general = _star_first(path)
        if general in out:
            continue
        members = match_path(model, general)
        if general != path and all(m in entries and _spec(entries[m]) == _spec(style) for m in members):
            out[general] = style
        else:
            out[path] = style
    return out
