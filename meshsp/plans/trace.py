"""What a model's tensors look like at its module boundaries, and which of their dims follow the tokens.

``trace`` runs one forward with hooks on every module and records, per module call, the shape and
storage of each tensor argument and output, and every ``F.scaled_dot_product_attention`` call with
the attention module that made it. ``kinds`` compares the traces of three forwards — a base grid,
more image tokens, more text tokens — and names what each dim follows:

* ``"img"``: grows with the image tokens (``h * w * frames``; or ``h * w`` per frame), whatever
  the offset (register tokens) or the extra tokens that scale with the grid (reference latents);
* ``"txt"``: grows with the text tokens (by at least as many);
* ``"joint"``: with both (a concatenated ``[img | txt]`` sequence, in either order);
* ``"other"``: changes in another way (a dim of the token grid, a padded or pooled length): not a
  sequence that can be sharded.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["AttentionCall", "Call", "Trace", "kind_of", "trace"]


@dataclass
class Call:
    """One module call: tensors by argument name (or output index), each a list of (shape, data_ptr)."""

    name: str
    inputs: dict[str, list[tuple[tuple[int, ...], int]]] = field(default_factory=dict)
    outputs: dict[int, list[tuple[tuple[int, ...], int]]] = field(default_factory=dict)
    grouped: set[str] = field(default_factory=set)  # inputs passed as a tuple or list of tensors


@dataclass
class AttentionCall:
    module: str  # the innermost attention module (one with a ``processor``), else the caller
    q: tuple[int, ...]
    k: tuple[int, ...]


@dataclass
class Trace:
    calls: list[Call]
    attention: list[AttentionCall]
    img_tokens: int
    txt_tokens: int
    _keep: list = field(default_factory=list, repr=False)  # tensors kept alive so data_ptrs stay unique


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else ()
    return next((t for t in map(_first_tensor, items) if t is not None), None)


def _describe(value, keep: list) -> list:
    """[(shape, data_ptr)] of a tensor, or of each element of a tuple, list or dict of them (a nested
    tuple by its first tensor, ``None`` for an element holding none); ``[]`` for anything else."""
    if isinstance(value, torch.Tensor):
        keep.append(value)
        return [(tuple(value.shape), value.data_ptr() if value.numel() else 0)]
    items = list(value.values()) if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    firsts = [_first_tensor(v) for v in items]
    keep.extend(t for t in firsts if t is not None)
    if not any(t is not None for t in firsts):
        return []
    return [None if t is None else (tuple(t.shape), t.data_ptr() if t.numel() else 0) for t in firsts]


class _Attention(TorchFunctionMode):
    def __init__(self, stack: list[str], attn_names: set[str], out: list[AttentionCall]) -> None:
        super().__init__()
        self.stack, self.attn_names, self.out = stack, attn_names, out

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            owner = next((n for n in reversed(self.stack) if n in self.attn_names), self.stack[-1] if self.stack else "")
            self.out.append(AttentionCall(owner, tuple(q.shape), tuple(k.shape)))
        return func(*args, **kwargs)


def trace(model: nn.Module, inputs: dict, *, img_tokens: int, txt_tokens: int) -> Trace:
    """Run ``model(**inputs)`` once and record every module call and attention call."""
    calls: list[Call] = []
    attention: list[AttentionCall] = []
    keep: list = []
    stack: list[str] = []
    open_calls: dict[str, list[Call]] = {}
    attn_names = {n for n, m in model.named_modules() if hasattr(m, "processor")}
    handles = []
    for name, module in model.named_modules():
        params = [p for p in inspect.signature(module.forward).parameters]

        def pre(mod, args, kwargs, name=name, params=params):
            call = Call(name)
            named = [(params[i] if i < len(params) else str(i), v) for i, v in enumerate(args)]
            for key, value in named + list(kwargs.items()):
                call.inputs[key] = _describe(value, keep)
                if isinstance(value, (list, tuple, dict)):
                    call.grouped.add(key)
            calls.append(call)
            stack.append(name)
            open_calls.setdefault(name, []).append(call)

        def post(mod, args, kwargs, output, name=name):
            call = open_calls[name].pop()
            items = [output] if isinstance(output, torch.Tensor) else list(output) if isinstance(output, (tuple, list)) \
                else [output.sample] if hasattr(output, "sample") else []
            for i, value in enumerate(items):
                described = _describe(value, keep)
                if described:
                    call.outputs[i] = described
            stack.pop()

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad(), _Attention(stack, attn_names, attention):
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    return Trace(calls, attention, img_tokens, txt_tokens, keep)


def kind_of(base: tuple[int, ...], more_img: tuple[int, ...], more_txt: tuple[int, ...],
            d_img: int, d_txt: int, min_img: int | None = None) -> tuple[str | None, int | None]:
    """The sequence kind of a tensor from its shapes in the three runs, and its dim (``None`` if none).

    A dim follows the image tokens if it grows by at least ``min_img`` (default ``d_img``) when the
    image tokens grow by ``d_img``: a video model's per-frame sequence grows by ``d_img / frames``,
    and extra tokens that scale with the grid (reference or history latents) make it grow faster.
    A dim of the grid itself grows by less. A dim that follows the text grows by at least ``d_txt``.
    A tensor with two such dims, or one that changes in another way, is ``"other"``.
    """
    if not (len(base) == len(more_img) == len(more_txt)):
        return "other", None
    min_img = d_img if min_img is None else min_img
    found = []
    for dim, (b, i, t) in enumerate(zip(base, more_img, more_txt)):
        di, dt = i - b, t - b
        if di == 0 and dt == 0:
            continue
        img, txt = di >= min_img, dt >= d_txt
        kind = "other" if (di and not img) or (dt and not txt) else {
            (True, False): "img", (False, True): "txt", (True, True): "joint"}[(img, txt)]
        found.append((kind, dim))
    if not found:
        return None, None
    if len(found) > 1 or found[0][0] == "other":
        return "other", found[0][1]
    return found[0]
