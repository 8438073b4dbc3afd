"""Expert-choice MoE routing under sequence parallelism: the top-k over the whole sequence.

In expert-choice routing (Zhou et al., 2022) every expert takes the ``k = ceil(factor * S / E)``
tokens of a sample with the highest affinity: ``torch.topk(affinity_BES, k, dim=-1)`` over *all* S
tokens. On a rank's shard the model computes ``k`` from its local length and picks among its own
tokens only, so the choice (and the output) differs from one device's. ``ExpertChoiceTopK`` makes
that top-k exact inside the module a plan names:

* ``torch.topk`` over the token dim: the affinities are all-gathered over the SP axes
  (``(P - 1) / P`` of ``[B, E, S]`` per rank, counted as ``all_gather`` in ``record_comm``), the
  global top-k is taken with ``k`` from the whole sequence — the same call on the same tensor as on
  one device, so ties break the same way — and each rank keeps the selected tokens it holds, in
  top-k order, as local indices ``[B, E, C]`` with ``C`` the most any (sample, expert) keeps here.
  Shorter rows are padded with one of this rank's selected tokens;
* ``Tensor.gather`` with those indices (the gate values): zero at the pads, so a pad adds nothing
  to a token's gate sum and its routed output is scaled by 0;
* the experts child (``experts``) is called with per-expert row counts the model computed from its
  own ``k``: each count ``c`` becomes ``c / k * C``, the rows the selection really holds.

A rank computes its own selected tokens (plus pads: at most the imbalance of the selection over
the ranks), not the whole sequence's. Reading ``C`` is one host sync per routed layer.
Legend: B batch, E experts, S / s whole / local tokens, K global capacity, C local width.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode

from meshsp.ops.consensus import agree
from meshsp.placements import SeqLayout
from meshsp.styles import SPMesh, _Bound, scope_mode
from meshsp.whole_tokens import gather_tokens

__all__ = ["ExpertChoiceTopK", "Selection", "own_selection"]


@dataclass
class Selection:
    """This rank's part of a global top-k: local ``indices`` [..., C], ``pad`` [..., C] (True where a
    row is shorter than C), and the capacity ``k`` the model asked for on its shard."""

    indices: torch.Tensor
    pad: torch.Tensor
    k: int


def own_selection(top_values, top_indices, offset: int, length: int):
    """The entries of a global top-k (last dim, global token positions) whose tokens lie in
    ``[offset, offset + length)``, kept in top-k order and moved to local positions.

    Returns ``(values, indices, pad)``, each ``[..., C]``: ``C`` is the most entries any row keeps;
    a shorter row is padded with value 0 and the index of a token this rank selected in the same
    row, else in the same leading (batch) index, else 0 — a pad must point at a token some expert
    chose, whose gate sum is positive (the model divides by it plus 1e-12, which is 0 in fp16).

    Example::

        own_selection(torch.tensor([[.9, .8, .7]]), torch.tensor([[5, 1, 4]]), 3, 3)
        # values [[.9, .7]], indices [[2, 1]], pad [[False, False]]
    """
    mine = (top_indices >= offset) & (top_indices < offset + length)
    counts = mine.sum(-1)
    width = int(counts.max()) if counts.numel() else 0  # the result's shape: a host read
    order = torch.sort((~mine).to(torch.uint8), dim=-1, stable=True).indices[..., :width]
    indices = top_indices.gather(-1, order) - offset
    values = top_values.gather(-1, order)
    pad = torch.arange(width, device=counts.device) >= counts[..., None]
    if width:
        first, has = indices[..., :1], counts > 0  # a token each row selected, where it selected one
        per_row = first.reshape(first.shape[0], -1) if first.dim() > 1 else first.reshape(1, -1)  # [B, rows]
        row_has = has.reshape(per_row.shape)
        pick = per_row.gather(-1, row_has.to(torch.uint8).argmax(-1, keepdim=True))  # the batch's first such row
        fallback = torch.where(row_has.any(-1, keepdim=True), pick, 0).expand_as(per_row).reshape(first.shape)
        indices = torch.where(pad, torch.where(has[..., None], first, fallback), indices)
        values = values.masked_fill(pad, 0)
    return values, indices, pad


def _capacity(factor: float, tokens: int, experts: int, minimum: int) -> int:
    return max(minimum, math.ceil(factor * tokens / experts))  # the order of operations matters: floats


class _GlobalTopK(TorchFunctionMode):
    def __init__(self, style: ExpertChoiceTopK, sp: SPMesh, module: nn.Module) -> None:
        super().__init__()
        self.style, self.sp, self.module = style, sp, module
        self.selection: Selection | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.topk or func is torch.Tensor.topk:
            return self.style.topk(self, *args, **kwargs)
        if func is torch.gather or func is torch.Tensor.gather:
            index = kwargs.get("index", args[2] if len(args) > 2 else None)
            if self.selection is not None and index is self.selection.indices:
                return func(*args, **kwargs).masked_fill(self.selection.pad, 0)
        return func(*args, **kwargs)


class ExpertChoiceTopK(_Bound):
    """Expert-choice routing inside this module takes its top-k over the whole sequence.

    ``capacity`` is the rule the module's own code applies, ``max(minimum, ceil(factor * S / experts))``:
    ``factor`` and ``experts`` are numbers or names of the module's attributes (``minimum``: 1). It is
    checked against the ``k`` the model passes for its local length, then applied to the whole
    length. ``experts`` names the child the module calls with ``(rows, rows_per_expert)``. A module
    the plan's path selects that has no such child (a dense layer of the same stack) runs as it is;
    a top-k inside it raises. The tokens must be one sequence sharded as meshsp shards it.

    Example::

        {"transformer_blocks.*.img_mlp": ExpertChoiceTopK(
            capacity={"factor": "capacity_factor", "experts": "num_experts"}, experts="experts")}
    """

    def __init__(self, capacity: Mapping, experts: str = "experts") -> None:
        super().__init__()
        unknown = set(capacity) - {"factor", "experts", "minimum"}
        if unknown or not {"factor", "experts"} <= set(capacity):
            raise ValueError(f"ExpertChoiceTopK capacity needs 'factor' and 'experts' (numbers or attribute names) "
                             f"and may have 'minimum'; got {dict(capacity)}.")
        self.capacity = dict(capacity)
        self.experts = experts
        self._agreed: set[tuple] = set()

    def _rule(self, module: nn.Module) -> tuple[float, int, int]:
        def value(name: str):
            spec = self.capacity.get(name, 1 if name == "minimum" else None)
            if isinstance(spec, str):
                if not hasattr(module, spec):
                    raise ValueError(f"plan '{self.key}': {type(module).__name__} has no attribute {spec!r} for the "
                                     f"capacity's {name}; fix the plan's capacity.")
                return getattr(module, spec)
            return spec

        return float(value("factor")), int(value("experts")), int(value("minimum"))

    @torch.compiler.disable
    def topk(self, mode: _GlobalTopK, input, k, dim=-1, largest=True, sorted=True, *, out=None):
        where = f"plan '{self.key}'"
        if out is not None or not isinstance(k, int):
            raise ValueError(f"{where}: a top-k over the tokens takes an int k and no out=; got k={k!r}.")
        if getattr(mode.module, self.experts, None) is None:
            raise ValueError(f"{where}: {type(mode.module).__name__} calls torch.topk but has no '{self.experts}' child "
                             "for routed rows; name the module that holds the experts, or the child in 'experts'.")
        dim = dim % input.dim()
        sp = mode.sp
        lens = self.state.rank_lens(sp, f"{self.key}:topk", (input.shape[dim],))
        layout = SeqLayout(tuple(tuple(n[0] for n in row) for row in lens))
        factor, experts, minimum = self._rule(mode.module)
        self._check(sp, where, layout, k, (factor, experts, minimum), input.shape[dim])
        whole = gather_tokens(sp, input.movedim(dim, -1), -1, layout)
        top = torch.topk(whole, _capacity(factor, layout.total, experts, minimum), dim=-1, largest=largest,
                         sorted=sorted)
        values, indices, pad = own_selection(top.values, top.indices, layout.offset(sp.r, sp.u), input.shape[dim])
        values, indices, pad = (t.movedim(-1, dim) for t in (values, indices, pad))
        mode.selection = Selection(indices, pad, k)
        return torch.return_types.topk((values, indices))

    def _check(self, sp: SPMesh, where: str, layout: SeqLayout, k: int, rule: tuple, local: int) -> None:
        """The model's k for its shard must be the declared rule's; the tokens one contiguous sequence.
        Agreed across ranks once per (lengths, k, rule): whether it holds can depend on the shard."""
        key = (layout.lens, k, rule)
        if key in self._agreed:
            return
        error = None
        whole = SeqLayout.from_global(layout.total, ring=layout.ring, ulysses=layout.ulysses)
        if whole.lens != layout.lens:
            error = (f"{where}: the routed tokens must be one sequence sharded as meshsp shards it (local lengths "
                     f"{whole.lens}); the ranks hold {layout.lens}.")
        elif k != _capacity(rule[0], local, rule[1], rule[2]):
            error = (f"{where}: the model asked for k={k} of its {local} tokens, but the plan's capacity rule "
                     f"max({rule[2]}, ceil({rule[0]} * {local} / {rule[1]})) gives {_capacity(rule[0], local, rule[1], rule[2])}; "
                     "fix the plan's capacity to the model's.")
        agree(where, f"expert-choice top-k {layout.lens} {rule}", error, (sp.ulysses_group, sp.ring_group), sp.device)
        self._agreed.add(key)

    def _experts_hook(self, current: list):
        @torch.compiler.disable
        def pre_hook(mod, args, kwargs):
            selection = current[-1].selection if current else None
            if selection is None:
                raise ValueError(f"plan '{self.key}': '{self.experts}' ran before an expert-choice top-k in this "
                                 "forward; ExpertChoiceTopK needs the top-k first.")
            args = list(args)
            counts = args[1] if len(args) > 1 else kwargs["num_tokens_per_expert"]
            width = selection.indices.shape[-1]
            if bool((counts % selection.k).any()):
                raise ValueError(f"plan '{self.key}': rows per expert {counts.tolist()} are not multiples of the "
                                 f"model's k={selection.k}; ExpertChoiceTopK cannot resize them.")
            counts = counts // selection.k * width
            rows = args[0] if args else kwargs["x"]
            if int(counts.sum()) != rows.shape[0]:
                raise ValueError(f"plan '{self.key}': {rows.shape[0]} routed rows but {int(counts.sum())} by the "
                                 "selection; the module does not route the top-k's indices to its experts.")
            if len(args) > 1:
                args[1] = counts
            else:
                kwargs["num_tokens_per_expert"] = counts
            return tuple(args), kwargs

        return pre_hook

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        sp = SPMesh(device_mesh)
        experts = getattr(module, self.experts, None)
        current: list[_GlobalTopK] = []  # the routing of the forward in progress

        def make_mode(args):
            current.append(_GlobalTopK(self, sp, module))
            return current[-1]

        if experts is not None:
            self._rule(module)  # the capacity's attributes exist: checked before any forward
            experts.register_forward_pre_hook(self._experts_hook(current), with_kwargs=True)
        scope_mode(module, make_mode)
        module.register_forward_hook(lambda mod, args, output: current.pop() and None, always_call=True)
        return module

