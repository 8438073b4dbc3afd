"""Plans for transformers nobody wrote one for, inferred from three traced forwards and verified.

How (``infer_plan``):

1. Trace the model (``meshsp.plans.trace``) at a base token grid, with more image tokens, and with
   more text tokens; name what every boundary tensor's dims follow (image, text, joint, other).
2. Attention whose queries and keys follow the image tokens (or the joint sequence) is
   sequence-parallel; a stream left whole (text, audio) attending to the sharded tokens is routed
   with its queries whole (``queries="replicated"``); attention over text alone, or cross-attention
   from image to text, stays local.
3. The ``ModuleList``s holding that attention are the block stacks. Each stack is sharded at its
   first block — the inputs that flow from block to block (hidden streams) — and at every block for
   the inputs the model hands each block (RoPE tables, masks, per-token modulation); its last block's
   sequence outputs are gathered. Text is sharded only in stacks whose attention is joint; a joint
   side input of a block with separate image and text streams is sharded per segment.
4. Verify by simulating every rank of U2, U3 and R2xU2 in this process (``meshsp.plans.simulate``:
   float64, attention replaced by a token-local stand-in, so each rank's shard must equal the slice
   of the unsharded run exactly, whatever the model does between shard and gather). Work across the
   sequence outside attention (convolutions over the token grid, pooling, token-count arguments)
   shows up as a mismatch or an error there, and the model is refused with what was found. Exact multi-rank parity is the job of
   ``meshsp plan --infer`` and the coverage tests, on real ranks.

Everything here runs on one process: no collectives.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch.nn as nn

from meshsp.plans.simulate import InferenceError, simulate
from meshsp.plans.trace import Trace, kind_of, trace
from meshsp.styles import GatherSequence, ParallelAttention, SeqDim, ShardSequence

__all__ = ["InferenceError", "infer_plan", "simulate"]

# A base grid, then more image tokens, then more text tokens. Odd token counts (15 image tokens per
# frame, 7 text tokens), so that no count coincides with another size in the model.
_BASE = dict(h=3, w=5, frames=2, txt=7, batch=2, text_pad=0)


def _grids(square: bool, text_mask: bool) -> tuple[dict, dict, dict]:
    """Batch 2 and padded text (where the model takes a text mask), so that masks show up."""
    base = dict(_BASE, w=3 if square else 5, text_pad=2 if text_mask else 0)
    return base, dict(base, h=5, w=5 if square else base["w"]), dict(base, txt=10)


@dataclass
class _Stack:
    path: str          # the ModuleList, e.g. "transformer_blocks"
    blocks: list[str]  # its children's names in call order
    joint: bool        # text is part of its sequence-parallel attention


def _tokens(grid: dict, video: bool) -> tuple[int, int]:
    return grid["h"] * grid["w"] * (grid["frames"] if video else 1), grid["txt"]


def _stack_of(model: nn.Module, name: str) -> tuple[str, str] | None:
    """(ModuleList path, block name) of the outermost ModuleList holding module ``name``."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if isinstance(model.get_submodule(parent), nn.ModuleList) and parts[i].isdigit():
            return parent, ".".join(parts[: i + 1])
    return None


def _pattern(name: str, stack: str) -> str:
    """``transformer_blocks.3.attn`` -> ``transformer_blocks.*.attn``."""
    rest = name[len(stack) + 1:]
    return f"{stack}.*.{rest.split('.', 1)[1]}" if "." in rest else f"{stack}.*"


class _Traces:
    """The three traces of one model, aligned call by call."""

    def __init__(self, model: nn.Module, make_inputs: Callable[..., dict], video: bool, square: bool = False,
                 text_mask: bool = False) -> None:
        self.runs: list[Trace] = []
        self.grids = _grids(square, text_mask)
        for grid in self.grids:
            img, txt = _tokens(grid, video)
            self.runs.append(trace(model, make_inputs(model, **grid), img_tokens=img, txt_tokens=txt))
        base, more_img, more_txt = self.runs
        names = [[c.name for c in run.calls] + [a.module for a in run.attention] for run in self.runs]
        if names[0] != names[1] or names[0] != names[2]:
            raise InferenceError(f"{type(model).__name__}: its module calls change with the token count "
                                 "(control flow depends on the sequence length); no plan can be inferred.")
        self.d_img = more_img.img_tokens - base.img_tokens
        self.d_txt = more_txt.txt_tokens - base.txt_tokens
        self.min_img = self.d_img // (_BASE["frames"] if video else 1)

    def kind(self, shapes: tuple[tuple[int, ...], ...]) -> tuple[str | None, int | None]:
        return kind_of(*shapes, self.d_img, self.d_txt, self.min_img)

    def slot_kinds(self, index: int, side: str) -> dict[str, list[tuple[str | None, int | None]]]:
        """{slot: [(kind, dim) per tensor of the slot]} of call ``index``'s inputs or outputs."""
        calls = [run.calls[index] for run in self.runs]
        out = {}
        for key, described in getattr(calls[0], side).items():
            others = [getattr(c, side).get(key) for c in calls[1:]]
            if not described:
                continue
            if any(o is None or len(o) != len(described) for o in others):
                out[key] = [("other", None)]
                continue
            out[key] = [(None, None) if d is None or o1 is None or o2 is None else self.kind((d[0], o1[0], o2[0]))
                        for d, o1, o2 in zip(described, *others)]
        return out

    def attention_kinds(self) -> list[tuple[str, str | None, str | None]]:
        """(module, query kind, key kind) of each attention call of the base run."""
        rows = []
        for calls in zip(*(run.attention for run in self.runs)):
            q = self.kind(tuple(c.q[-2:-1] for c in calls))[0]
            k = self.kind(tuple(c.k[-2:-1] for c in calls))[0]
            rows.append((calls[0].module, q, k))
        return rows


def _find_stacks(model: nn.Module, traces: _Traces) -> tuple[list[_Stack], set[str], set[str]]:
    """The block stacks holding sequence-parallel attention, the attention modules to route, and
    those of them whose queries stay whole (``ParallelAttention(queries="replicated")``)."""
    name = type(model).__name__
    routed, local, replicated, text_queries = set(), set(), set(), set()
    stacks: dict[str, _Stack] = {}
    seq = ("img", "joint")
    seen = []
    for module, q, k in traces.attention_kinds():
        seen.append(f"{module}: queries {q or 'fixed'}, keys {k or 'fixed'}")
        if q in seq and k in seq:
            routed.add(module)  # queries and keys over the sharded sequence (keys may add the text)
        elif q in (None, "txt") and k in seq:
            routed.add(module)  # a stream left whole attending to the sharded tokens
            replicated.add(module)
            if q == "txt":
                text_queries.add(module)
        elif q in ("img", "joint") and k in (None, "txt"):
            local.add(module)  # cross-attention to text (or to a fixed set of tokens): stays local
        elif q in (None, "txt") and k in (None, "txt"):
            local.add(module)  # attention over text (or fixed tokens) only
        else:
            raise InferenceError(f"{name}: attention in '{module}' has queries following {q or 'no'} tokens and "
                                 f"keys following {k or 'no'} tokens; meshsp routes attention whose queries "
                                 "and keys are the same sharded sequence, and leaves text-only and "
                                 "image-to-text attention local.")
    if replicated and not routed - replicated:
        raise InferenceError(f"{name}: attention {sorted(replicated)} reads the image tokens as keys, but no "
                             "attention runs over them as queries; nothing shards them.")
    if routed & local:
        raise InferenceError(f"{name}: modules {sorted(routed & local)} run both sequence-parallel and local attention.")
    if not routed:
        raise InferenceError(f"{name}: no F.scaled_dot_product_attention call has queries and keys that follow "
                             f"the image tokens (seen: {sorted(set(seen)) or 'none'}); the model attends another "
                             "way (linear attention, its own kernel) or over a padded fixed length.")
    order = [c.name for c in traces.runs[0].calls]
    for module in sorted(routed - replicated, key=lambda m: order.index(m)):
        found = _stack_of(model, module)
        if found is None:
            raise InferenceError(f"{name}: sequence-parallel attention '{module}' is not inside a block stack "
                                 "(a ModuleList); the plan shards at block boundaries.")
        path, _ = found
        kinds = {kind for m, q, k in traces.attention_kinds() if m == module for kind in (q, k)}
        if path not in stacks:
            blocks = list(dict.fromkeys(n for n in order if re.fullmatch(rf"{re.escape(path)}\.\d+", n)))
            last = f"{path}.{len(model.get_submodule(path)) - 1}"
            if blocks[0] != f"{path}.0" or blocks[-1] != last:
                raise InferenceError(f"{name}: the blocks of '{path}' run from '{blocks[0]}' to '{blocks[-1]}', not "
                                     f"from '{path}.0' to '{last}'; the plan shards at the first and gathers after the last.")
            stacks[path] = _Stack(path, blocks, False)
        stacks[path].joint |= "joint" in kinds
    for module in text_queries:  # text is sharded in a joint stack: its queries are too
        if stacks.get((_stack_of(model, module) or ("",))[0], _Stack("", [], False)).joint:
            replicated.discard(module)
    for module in replicated:
        if (_stack_of(model, module) or ("",))[0] not in stacks:
            raise InferenceError(f"{name}: attention '{module}' reads the sharded tokens as keys from outside "
                                 "the block stacks that shard them.")
    return list(stacks.values()), routed, replicated


def _block_calls(traces: _Traces, block: str) -> list[int]:
    return [i for i, c in enumerate(traces.runs[0].calls) if c.name == block]


def _flowing(traces: _Traces, stack: _Stack, sharded: dict) -> set[str]:
    """Inputs that carry a stream through the stack (a new tensor at each block), as opposed to
    side inputs the model hands every block unchanged (RoPE tables, masks)."""
    calls = [_block_calls(traces, b)[0] for b in stack.blocks]
    base = traces.runs[0].calls
    if len(calls) < 2:  # one block: an input flows if the block returns a tensor of its shape
        outs = {d[0] for ds in base[calls[0]].outputs.values() for d in ds if d}
        return {k for k in sharded if len(sharded[k]) == 1 and base[calls[0]].inputs[k][0][0] in outs}
    flowing = set()
    for key in sharded:
        ptrs = [tuple(d[1] if d else None for d in base[c].inputs.get(key, [])) for c in calls]
        if len(sharded[key]) == 1 and len(set(ptrs)) == len(ptrs):
            flowing.add(key)
        elif len(set(ptrs)) != 1:
            raise InferenceError(f"{stack.path}: input '{key}' is the same tensor for some blocks and a new one "
                                 "for others; no plan can be inferred.")
    return flowing


def _element_spec(name: str, where: str, key: str, kind: str | None, dim: int | None, joint: bool, shape):
    """How one tensor at a block boundary is sharded: its dim, or ``None`` to leave it whole."""
    if kind is None or (kind == "txt" and not joint):
        return None
    if kind == "other":
        raise InferenceError(f"{name}: input '{key}' of '{where}' (shape {shape}) changes with the token grid "
                             "but not as a sequence of tokens (a grid dim, a pairwise mask, padding or "
                             "pooling); it cannot be sharded.")
    if kind == "joint" and not joint:
        raise InferenceError(f"{name}: '{where}' takes '{key}' over image and text tokens but its attention "
                             "runs over the image tokens only.")
    return dim


def _stack_entries(model: nn.Module, traces: _Traces, stack: _Stack, joint_first: str) -> dict:
    """Plan entries for one stack: shard at block 0 / every block, gather after the last."""
    name = type(model).__name__
    first = _block_calls(traces, stack.blocks[0])[0]
    shapes = traces.runs[0].calls[first].inputs
    shard: dict[str, list] = {}  # slot -> [(kind, dim or None) per tensor]
    for key, elements in traces.slot_kinds(first, "inputs").items():
        dims = [_element_spec(name, stack.blocks[0], key, kind, dim, stack.joint, (shapes[key][i] or ((),))[0])
                for i, (kind, dim) in enumerate(elements)]
        if any(d is not None for d in dims):
            shard[key] = [(kind if d is not None else None, d) for (kind, _), d in zip(elements, dims)]
    flowing = _flowing(traces, stack, shard)
    streams: dict[str, str] = {}
    for key, els in shard.items():
        if key in flowing and len(els) == 1:
            if els[0][0] in streams:
                raise InferenceError(f"{name}: '{stack.blocks[0]}' takes two {els[0][0]} streams ('{streams[els[0][0]]}', "
                                     f"'{key}'); which one a joint table follows is ambiguous.")
            streams[els[0][0]] = key

    def spec(kind, dim, ndim):
        """The traced rank is declared: a tensor of another rank in another mode of the model (a
        per-frame modulation that is per-sample at other settings) passes through."""
        if dim is None:
            return None
        if kind == "joint" and "img" in streams and "txt" in streams:  # [img | txt] of separate streams
            img_key = f"{stack.path}.0:{streams['img']}"
            return SeqDim(dim, ndim, (img_key, None) if joint_first == "img" else (None, img_key))
        return SeqDim(dim, ndim)

    first_in, every_in = {}, {}
    for key, elements in shard.items():
        specs = [spec(kind, dim, len(shapes[key][i][0]) if shapes[key][i] else None) for i, (kind, dim) in enumerate(elements)]
        grouped = key in traces.runs[0].calls[first].grouped
        value = specs[0] if not grouped or len(set(map(str, specs))) == 1 else specs
        (first_in if key in flowing else every_in)[key] = value
    entries: dict[str, object] = {}
    if first_in:
        entries[f"{stack.path}.0"] = ShardSequence(inputs=first_in)
    if every_in:
        entries[f"{stack.path}.*"] = ShardSequence(inputs=every_in)
    last = _block_calls(traces, stack.blocks[-1])[-1]
    outs = {}
    for i, elements in traces.slot_kinds(last, "outputs").items():
        kind, dim = elements[0]
        if len(elements) == 1 and (kind == "img" or (kind in ("txt", "joint") and stack.joint)):
            outs[i] = dim
    if not outs:
        raise InferenceError(f"{name}: the last block of '{stack.path}' returns no tensor that follows the tokens.")
    entries[f"{stack.path}.-1"] = GatherSequence(outputs=outs)
    return entries


def _candidates(model: nn.Module, traces: _Traces):
    """Plans to try, most likely first: each stack's joint side inputs image-first or text-first."""
    from meshsp.plans import Plan

    stacks, routed, replicated = _find_stacks(model, traces)
    by_stack: dict[str, set[str]] = {}
    for module in routed:
        path, _ = _stack_of(model, module)
        by_stack.setdefault(path, set()).add(module)
    orders = [("img", "txt") if stack.joint else ("img",) for stack in stacks]
    for choice in itertools.product(*orders):
        styles: dict[str, object] = {}
        for stack, order in zip(stacks, choice):
            entries = _stack_entries(model, traces, stack, order)
            gather = entries.pop(f"{stack.path}.-1")
            styles.update(entries)
            for pattern in sorted({_pattern(m, stack.path) for m in by_stack[stack.path]}):
                whole = {m in replicated for m in by_stack[stack.path] if _pattern(m, stack.path) == pattern}
                if len(whole) > 1:
                    raise InferenceError(f"{type(model).__name__}: '{pattern}' has sharded queries in some blocks "
                                         "and whole ones in others.")
                styles[pattern] = ParallelAttention(queries="replicated" if whole.pop() else "sharded")
            styles[f"{stack.path}.-1"] = gather
        yield Plan(styles, model=type(model).__name__)


def infer_plan(model: nn.Module, make_inputs: Callable[..., dict] | None = None, *, ulysses_mode: str = "strict",
               video: bool | None = None, verify: bool = True):
    """Infer a plan for ``model`` from traced forwards, verified by simulating every rank.

    ``make_inputs(model, *, h, w, frames, txt, batch, text_pad)`` builds forward kwargs for a token
    grid (default: the model's ``meshsp.zoo`` entry). Raises ``InferenceError`` (a ``ValueError``)
    naming what was found when no plan can be inferred.

    Example::

        plan = meshsp.plans.infer_plan(meshsp.zoo.build("SanaTransformer2DModel"))
        print(plan.to_yaml())
    """
    from meshsp.plans import Plan
    from meshsp.zoo import ZOO, inputs_for

    name = type(model).__name__
    entry = ZOO.get(name)
    if make_inputs is None:
        if entry is None:
            raise InferenceError(f"{name}: no example inputs; pass make_inputs(model, *, h, w, frames, txt, batch, "
                                 "text_pad) that builds its forward kwargs for a token grid.")
        make_inputs = lambda m, **grid: inputs_for(m, **grid)  # noqa: E731
    video = entry.video if video is None and entry is not None else bool(video)
    model = model.eval()
    traces = _Traces(model, make_inputs, video, bool(entry and entry.square), bool(entry and entry.text_mask))
    failures = []
    for plan in _candidates(model, traces):
        if not verify:
            return Plan.from_dict(plan.to_dict(), ulysses_mode=ulysses_mode)
        try:
            simulate(model, plan, make_inputs(model, **traces.grids[0]))
        except InferenceError as exc:
            failures.append(str(exc))
            continue
        return Plan.from_dict(plan.to_dict(), ulysses_mode=ulysses_mode)
    raise InferenceError(f"{name}: no inferred plan runs like the unsharded model; " + " | ".join(failures))
