"""``ParallelStyle``s that make a diffusers transformer sequence-parallel without editing it.

In the vocabulary of ``torch.distributed.tensor.parallel.style``:

* ``ShardSequence`` slices named inputs (or outputs) of a module along their sequence dim at the
  module boundary: each rank keeps its shard (``SeqLayout``: ``torch.chunk`` sizes, ring outer).
* ``ParallelAttention`` routes ``F.scaled_dot_product_attention`` calls made *inside* one module to
  ``meshsp::sp_attention``. The module's processor runs unchanged on local shards; the interception
  is a ``TorchFunctionMode`` entered in a forward pre-hook and left in an always-called forward hook.
* ``GatherSequence`` all-gathers outputs back to full tensors (``use_local_output``: plain tensors).

The styles of one plan share a ``PlanState``: the global lengths the shard hooks saw in this
forward, and per-rank local lengths of attention inputs. Model code concatenates shards (text and
image, say), so a rank cannot compute the others' attention lengths from its own; they are exchanged
once per (global input shapes, module) and cached, so steady-state forwards exchange nothing.

Under ``torch.compile`` the hooks and the routing run eagerly (``torch.compiler.disable``): their
Python bookkeeping would otherwise make dynamo recompile on every new cache entry. The model's own
layers between them compile as usual, and the attention itself is one opaque custom op.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.overrides import TorchFunctionMode

from meshsp.config import ULYSSES_MODES
from meshsp.attention_masks import SegmentRuns, global_pairs, is_local_pairwise, local_pairs, outer_diagonal
from meshsp.ops.attention import sp_attention
from meshsp.ops.blocks import PairMask
from meshsp.ops.masks import SegmentMask, segment_runs
from meshsp.ops.adjoint import gather
from meshsp.ops.consensus import agree, describe
from meshsp.ops.flex import RoutesFlex, hand_masks_over, is_flex_call, plan_flex
from meshsp.ops.replicated import replicated_query_attention
from meshsp.ops.ulysses import pipeline_setting
from meshsp.placements import SeqLayout

__all__ = ["CheckInputs", "GatherSequence", "ParallelAttention", "PlanState", "SeqDim", "ShardSequence", "scope_mode"]

_MASK_FLOOR = -1.0e4  # additive masks: 0 keeps a key, <= this drops it (exp underflows to 0 in fp32)


@dataclass(frozen=True)
class SeqDim:
    """Where the sequence is in one tensor.

    ``dim``: the sequence dim. ``ndim``: shard only tensors of this rank (e.g. a timestep that is
    ``[B]`` for most models and ``[B, S]`` per token for some); others pass through, by declaration.
    ``segments``: the tensor is a concatenation along ``dim`` of sequences sharded elsewhere in the
    plan (keys of ``PlanState.global_lens``; ``None`` = the remainder); each is sharded on its own.
    The remainder may instead be ``"local"``: model code built it from sharded inputs, so it is this
    rank's already and passes through (HiDream's RoPE ids: ``[image ids | zeros of the local text]``).
    ``flatten``: the sequence is dims ``dim`` to the last, flattened in order (a patch-embedding
    conv's ``[B, C, F, H, W]``); the shard comes back as ``[B, C, 1, 1, s]``, which the model's own
    ``flatten(dim)`` turns into this rank's tokens.
    ``units``: the sequence is a run of equal units (a video's frames), and each rank keeps whole
    units. Either the key of a sequence sharded earlier (``"rope:output 0"``): this one has as many
    units as that one, cut where that one was; or ``{"input": arg, "dim": d}`` for a module's output:
    as many units as the size of dim ``d`` of its forward argument ``arg``, cut as meshsp cuts a
    sequence of that many tokens (uneven counts allowed: 21 frames over 2 ranks are 11 and 10).
    """

    dim: int
    ndim: int | None = None
    segments: tuple[str | None, ...] | None = None
    flatten: bool = False
    units: str | tuple[str, int] | None = None

    def __post_init__(self) -> None:
        if sum(x not in (None, False) for x in (self.segments, self.flatten, self.units)) > 1:
            raise ValueError(f"a sequence spec takes one of 'segments', 'flatten' and 'units'; got {self}.")
        if self.segments is not None and sum(s is None or s == LOCAL for s in self.segments) > 1:
            raise ValueError(f"a sequence spec's segments may have one remainder (null or {LOCAL!r}); got {self}.")


LOCAL = "local"  # a segment this rank holds already (SeqDim.segments)
_SPEC_KEYS = ("dim", "ndim", "segments", "flatten", "units")


def _as_spec(spec) -> SeqDim | tuple[SeqDim | None, ...]:
    """A sequence spec, or a list of them (``None`` = leave alone) for a tuple value element-wise."""
    if isinstance(spec, (list, tuple)):
        return tuple(None if s is None else _as_seqdim(s) for s in spec)
    return _as_seqdim(spec)


def _as_units(units, spec) -> str | tuple[str, int] | None:
    if units is None or isinstance(units, str):
        return units
    if isinstance(units, (tuple, list)) and len(units) == 2:
        units = {"input": units[0], "dim": units[1]}
    if isinstance(units, Mapping) and set(units) == {"input", "dim"} and isinstance(units["dim"], int):
        return (str(units["input"]), int(units["dim"]))
    raise ValueError(f"a sequence spec's 'units' is the key of a sequence sharded earlier or {{input: arg, dim: d}}; "
                     f"got {dict(spec)}.")


def _as_seqdim(spec) -> SeqDim:
    if isinstance(spec, SeqDim):
        return spec
    if isinstance(spec, int) and not isinstance(spec, bool):
        return SeqDim(spec)
    if isinstance(spec, Mapping):
        unknown = set(spec) - set(_SPEC_KEYS)
        if unknown or "dim" not in spec:
            raise ValueError(f"a sequence spec needs 'dim' and may have {list(_SPEC_KEYS[1:])}; got {dict(spec)}.")
        seg = spec.get("segments")
        return SeqDim(int(spec["dim"]), spec.get("ndim"), tuple(seg) if seg is not None else None,
                      bool(spec.get("flatten", False)), _as_units(spec.get("units"), spec))
    raise ValueError(f"a sequence spec is an int dim or a mapping with 'dim'; got {spec!r}.")


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every group rank's ``t`` along dim 0 (the backward reduce-scatters: its adjoint)."""
    return gather(t, group)


class SPMesh:
    """The SP axes of a mesh: sizes, this rank's coordinates, the axis groups."""

    def __init__(self, mesh: DeviceMesh, balance: str = "contiguous") -> None:
        names = mesh.mesh_dim_names or ()
        self.balance = balance
        if "ring" not in names and "ulysses" not in names:
            raise ValueError(f"the mesh needs a 'ring' and/or 'ulysses' axis; got axes {names}.")
        self.mesh = mesh
        self.device = mesh.device_type
        self.ring = mesh["ring"].size() if "ring" in names else 1
        self.ulysses = mesh["ulysses"].size() if "ulysses" in names else 1
        self.r = mesh.get_local_rank("ring") if "ring" in names else 0
        self.u = mesh.get_local_rank("ulysses") if "ulysses" in names else 0
        self.ring_group = mesh["ring"].get_group() if self.ring > 1 else None
        self.ulysses_group = mesh["ulysses"].get_group() if self.ulysses > 1 else None

    def layout(self, n: int) -> SeqLayout:
        return SeqLayout.from_global(n, ring=self.ring, ulysses=self.ulysses, balance=self.balance)

    def shard(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        layout = self.layout(t.shape[dim])
        if layout.balance != "contiguous":  # a zigzag shard is two pieces of the sequence
            return t.index_select(dim, layout.local_index(self.r, self.u).to(t.device))
        return t.narrow(dim, layout.offset(self.r, self.u), layout.local(self.r, self.u))

    def all_gather(self, t: torch.Tensor) -> list[list[torch.Tensor]]:
        """Everyone's ``t`` (padded to equal shapes by the caller) as ``[ring][ulysses]``."""
        rows = [t]
        if self.ulysses_group is not None:
            rows = list(_all_gather(t, self.ulysses_group).chunk(self.ulysses))
        row = torch.stack(rows)
        grid = [row]
        if self.ring_group is not None:
            grid = list(_all_gather(row, self.ring_group).chunk(self.ring))
        return [[g[u] for u in range(self.ulysses)] for g in grid]


class PlanState:
    """What the styles of one plan share (one per plan; nothing global)."""

    def __init__(self, ulysses_mode: str = "strict", empty_shards: bool = False, balance: str = "contiguous") -> None:
        if ulysses_mode not in ULYSSES_MODES:
            raise ValueError(f"ulysses_mode must be one of {ULYSSES_MODES}, got {ulysses_mode!r}.")
        self.ulysses_mode = ulysses_mode
        self.balance = balance
        # Whether the model's own code runs on a rank that holds none of a sequence's tokens.
        self.empty_shards = empty_shards
        self.global_lens: dict[str, int] = {}
        # How many units a sequence was cut in (SeqDim.units): its length for a plain shard.
        self.unit_counts: dict[str, int] = {}
        # Query tokens this rank attended over and the whole sequences', summed over SP attention
        # calls: the share of the work this rank did (about 1 / SP degree when the plan shards).
        self.attention_tokens = [0, 0]
        self.grid = None  # the token-grid split of the current forward (meshsp.grid.ShardGrid)
        self._lens: dict[tuple, list[list[tuple[int, ...]]]] = {}
        self._masks: dict[int, tuple] = {}  # id(mask) -> (weak reference, signature, bool mask)

    @property
    def uaa(self) -> bool:
        return self.ulysses_mode == "advanced_uaa"

    def key_mask(self, attn_mask, query, key, convert) -> torch.Tensor | None:
        """The boolean [B, S_k] key-padding mask ``convert()`` makes of ``attn_mask``, once per mask
        tensor: a model passes the same mask to every block, and its checks (an additive mask's
        values, a per-head mask's heads) read the values on the host — a sync, and for shard-dependent
        checks a collective, that would otherwise run in every layer. Every rank runs the same model
        code, so all of them hit or miss together. Keyed by the tensor itself (a weak reference, so a
        freed mask's reused id never matches) and its version (so an in-place edit is seen)."""
        if attn_mask is None:
            return None
        signature = (getattr(attn_mask, "_version", 0), tuple(query.shape[:2]), tuple(key.shape))
        hit = self._masks.get(id(attn_mask))
        if hit is not None and hit[0]() is attn_mask and hit[1] == signature:
            return hit[2]
        mask = convert()
        if len(self._masks) > 64:
            self._masks = {i: e for i, e in self._masks.items() if e[0]() is not None}
        self._masks[id(attn_mask)] = (weakref.ref(attn_mask), signature, mask)
        return mask

    def rank_lens(self, sp: SPMesh, where: str, local: tuple[int, ...]) -> list[list[tuple[int, ...]]]:
        """Every SP rank's ``local`` tuple, ``[ring][ulysses]``; exchanged once per input shapes.

        The key holds the global lengths the plan's shard hooks recorded (every sharded tensor's
        full length, segmented ones included); local lengths follow from those and from shapes
        every rank shares (``CheckInputs`` checks the inputs agree), so all ranks hit or miss the
        cache together (a miss is a collective).
        """
        key = (tuple(sorted(self.global_lens.items())), where, local)
        if key not in self._lens:
            if len(self._lens) > 4096:
                self._lens.clear()
            mine = torch.tensor(local, dtype=torch.int64, device=sp.device)
            self._lens[key] = [[tuple(x.tolist()) for x in row] for row in sp.all_gather(mine)]
        return self._lens[key]


class _Bound(ParallelStyle):
    """A style that knows its plan key and shares its plan's state."""

    def __init__(self) -> None:
        self.state = PlanState()
        self.key = "?"

    def bind(self, state: PlanState, key: str) -> None:
        self.state, self.key = state, key


def _positions(module: nn.Module) -> dict[str, int]:
    params = list(inspect.signature(module.forward).parameters)
    return {name: i for i, name in enumerate(params)}


class ShardSequence(_Bound):
    """Slice inputs and/or outputs of a module along the sequence; keep this rank's shard.

    ``inputs`` maps a forward argument (name, or positional index) to its sequence dim (or a
    ``SeqDim``); tuple/list values are sharded element-wise; absent or ``None`` arguments are left
    alone. ``outputs`` maps an output index (0 for a module that returns one tensor) likewise.

    Example::

        ShardSequence(inputs={"hidden_states": 1, "img_ids": 0})
        ShardSequence(outputs={0: 1, 1: 1})          # a RoPE module returning (cos, sin)
    """

    def __init__(self, inputs: Mapping | None = None, outputs: Mapping | None = None) -> None:
        super().__init__()
        if not inputs and not outputs:
            raise ValueError("ShardSequence needs 'inputs' and/or 'outputs' to shard.")
        self.inputs = {k: _as_spec(v) for k, v in (inputs or {}).items()}
        self.outputs = {int(k): _as_spec(v) for k, v in (outputs or {}).items()}

    def _shard_value(self, sp: SPMesh, value, spec, name: str, copy: bool = False, inputs: Mapping | None = None):
        """This rank's shard of ``value``: a view, or with ``copy`` a tensor of its own (so that a
        module output nobody else holds, such as a RoPE table, is freed whole). ``inputs``: the
        module's forward arguments by name, for an output spec's ``units: {input, dim}``."""
        if value is None:
            return None
        again = lambda v, s, n: self._shard_value(sp, v, s, n, copy, inputs)  # noqa: E731
        if isinstance(spec, tuple):  # one spec per element of a tuple value
            if isinstance(value, dict):
                return dict(zip(value, again(tuple(value.values()), spec, name)))
            if not isinstance(value, (list, tuple)) or len(value) != len(spec):
                raise ValueError(f"plan '{self.key}': '{name}' has element-wise specs {len(spec)} but is "
                                 f"{type(value).__name__}{'' if not isinstance(value, (list, tuple)) else f' of {len(value)}'}.")
            return type(value)(v if sp_ is None else again(v, sp_, f"{name}[{i}]")
                               for i, (v, sp_) in enumerate(zip(value, spec)))
        if isinstance(value, (list, tuple)):
            return type(value)(again(v, spec, name) for v in value)
        if isinstance(value, dict):
            return {k: again(v, spec, f"{name}[{k!r}]") for k, v in value.items()}
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"plan '{self.key}': '{name}' is a {type(value).__name__}, not a tensor to shard.")
        if spec.ndim is not None and value.dim() != spec.ndim:
            return value  # declared: only tensors of rank `ndim` carry a sequence dim
        if not -value.dim() <= spec.dim < value.dim():
            raise ValueError(
                f"plan '{self.key}': cannot shard '{name}' of shape {tuple(value.shape)} along dim "
                f"{spec.dim}; fix the plan's dim (or declare 'ndim' if other ranks are expected)."
            )
        if spec.segments is not None:
            return self._shard_segments(sp, value, spec, name)  # a new tensor already
        dim = spec.dim % value.dim()
        seq = value.flatten(dim) if spec.flatten else value
        n = seq.shape[dim]
        units = n if spec.units is None else self._unit_count(spec.units, n, name, inputs)
        self.state.global_lens[f"{self.key}:{name}"] = n
        self.state.unit_counts[f"{self.key}:{name}"] = units
        self._require_tokens(sp, units, name, "tokens" if spec.units is None else "units (whole frames, say)")
        layout, size = sp.layout(units), n // units if units else 0
        if layout.balance != "contiguous":  # a zigzag shard is two pieces of the units
            index = layout.local_index(sp.r, sp.u).to(seq.device)
            index = (index[:, None] * size + torch.arange(size, device=seq.device)).flatten()
            shard = seq.index_select(dim, index)
        else:
            shard = seq.narrow(dim, layout.offset(sp.r, sp.u) * size, layout.local(sp.r, sp.u) * size)
        if spec.flatten:  # back to the tensor's rank: [B, C, 1, 1, s]
            shard = shard.reshape(*shard.shape[:dim], *[1] * (value.dim() - dim - 1), shard.shape[dim])
        return shard.clone() if copy else shard

    def _unit_count(self, units, n: int, name: str, inputs: Mapping | None) -> int:
        """How many equal units (``SeqDim.units``) the ``n`` tokens of ``name`` are."""
        if isinstance(units, str):
            count = self.state.unit_counts.get(units)
            if count is None:
                raise ValueError(f"plan '{self.key}': '{name}' is cut in the units of {units!r}, which no shard "
                                 f"recorded earlier in the forward (recorded: {sorted(self.state.unit_counts)}).")
        else:
            arg, d = units
            source = (inputs or {}).get(arg)
            if not isinstance(source, torch.Tensor) or not -source.dim() <= d < source.dim():
                raise ValueError(f"plan '{self.key}': '{name}' takes its units from dim {d} of input '{arg}', but "
                                 f"that input is {None if source is None else tuple(getattr(source, 'shape', ()))}; "
                                 "units from an input are for a module's outputs.")
            count = source.shape[d]
        if (count == 0 and n) or (count and n % count):
            raise ValueError(f"plan '{self.key}': '{name}' has {n} tokens, not a whole number of its {count} units "
                             f"({units!r}); fix the plan's units.")
        return count

    def _shard_segments(self, sp: SPMesh, value, spec: SeqDim, name: str):
        total = value.shape[spec.dim]
        known = [self.state.global_lens.get(s) if s not in (None, LOCAL) else None for s in spec.segments]
        missing = [s for s, n in zip(spec.segments, known) if s not in (None, LOCAL) and n is None]
        if missing:
            raise ValueError(
                f"plan '{self.key}': segments {spec.segments} of '{name}' need lengths recorded earlier "
                f"in the forward (missing: {missing}; recorded: {sorted(self.state.global_lens)})."
            )
        rest = total - sum(n for n in known if n is not None)
        sizes = [rest if n is None else n for n in known]
        if rest < 0 or (rest and len(known) == sum(n is not None for n in known)):
            raise ValueError(f"plan '{self.key}': segments {dict(zip(spec.segments, sizes))} do not add up to "
                             f"'{name}' length {total}.")
        if LOCAL not in spec.segments:  # with a local segment the global length is not known here
            self.state.global_lens[f"{self.key}:{name}"] = total
        self._require_tokens(sp, total - (rest if LOCAL in spec.segments else 0), name)
        parts = torch.split(value, sizes, dim=spec.dim)
        return torch.cat([p if s == LOCAL else sp.shard(p, spec.dim) for p, s in zip(parts, spec.segments)],
                         dim=spec.dim)

    def _require_tokens(self, sp: SPMesh, n: int, name: str, what: str = "tokens") -> None:
        """Refuse, on every rank alike (the layout follows from the global length), a sequence that
        would leave a rank without tokens, unless the plan says the model's code runs on empty shards:
        one rank failing inside the model would leave the others waiting in a collective."""
        if self.state.empty_shards or n == 0:
            return
        layout = sp.layout(n)
        if min(layout.local(r, u) for r in range(sp.ring) for u in range(sp.ulysses)) == 0:
            raise ValueError(
                f"plan '{self.key}': '{name}' has {n} {what}, so some of the {sp.ring * sp.ulysses} sequence-parallel "
                "ranks would hold none, and this model's code is not known to run on an empty shard. Use fewer "
                "ranks or a larger size (or longer prompt); a plan verified on empty shards says 'empty_shards: true'."
            )

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return self.install(module, SPMesh(device_mesh, self.state.balance))

    def install(self, module: nn.Module, sp: SPMesh) -> nn.Module:
        """Wire the hooks for ``sp`` (an ``SPMesh``: a real mesh's, or a simulated rank's)."""
        positions = _positions(module)
        for key in self.inputs:
            if isinstance(key, str) and key not in positions:
                raise ValueError(
                    f"plan '{self.key}': {type(module).__name__}.forward has no argument '{key}'; "
                    f"its arguments are {list(positions)}."
                )

        def named(args, kwargs) -> dict:  # the forward's arguments by name, as the caller passed them
            return {**{name: args[i] for name, i in positions.items() if i < len(args)}, **kwargs}

        if self.inputs:

            @torch.compiler.disable  # bookkeeping stays eager: no recompiles under torch.compile

            def pre_hook(mod, args, kwargs):
                given, args = named(args, kwargs), list(args)
                for key, spec in self.inputs.items():
                    pos = key if isinstance(key, int) else positions[key]
                    if isinstance(key, str) and key in kwargs:
                        kwargs[key] = self._shard_value(sp, kwargs[key], spec, key, inputs=given)
                    elif pos < len(args):
                        args[pos] = self._shard_value(sp, args[pos], spec, str(key), inputs=given)
                return tuple(args), kwargs

            module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if self.outputs:

            @torch.compiler.disable  # bookkeeping stays eager: no recompiles under torch.compile

            def post_hook(mod, args, kwargs, output):
                given = named(args, kwargs)
                if isinstance(output, torch.Tensor):
                    return (self._shard_value(sp, output, self.outputs[0], "output 0", copy=True, inputs=given)
                            if 0 in self.outputs else output)
                out = list(output)
                for idx, spec in self.outputs.items():
                    out[idx] = self._shard_value(sp, out[idx], spec, f"output {idx}", copy=True, inputs=given)
                return type(output)(out)

            module.register_forward_hook(post_hook, with_kwargs=True)
        return module


class GatherSequence(_Bound):
    """All-gather outputs of a module along the sequence back to full tensors on every rank.

    Example::

        GatherSequence(outputs={0: 1})   # proj_out: [B, s_local, C] -> [B, S, C]
    """

    def __init__(self, outputs: Mapping | None = None) -> None:
        super().__init__()
        self.outputs = {int(k): _as_seqdim(v) for k, v in (outputs or {0: 1}).items()}

    def _gather(self, sp: SPMesh, t: torch.Tensor, dim: int, idx: int) -> torch.Tensor:
        lens = self.state.rank_lens(sp, f"{self.key}:gather{idx}", (t.shape[dim],))
        longest = max(n for row in lens for (n,) in row)
        if longest > t.shape[dim]:  # uneven shards: pad to the longest for the all-gather
            t = F.pad(t, [0, 0] * (t.dim() - 1 - dim % t.dim()) + [0, longest - t.shape[dim]])
        grid = sp.all_gather(t)
        pieces = [grid[r][u].narrow(dim, 0, lens[r][u][0]) for r in range(sp.ring) for u in range(sp.ulysses)]
        whole = torch.cat(pieces, dim=dim)
        if sp.balance != "contiguous":  # rank-major is the layout's order: put the tokens back
            order = sp.layout(whole.shape[dim]).order()
            whole = whole.index_select(dim, torch.argsort(order).to(whole.device))
        return whole

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        sp = SPMesh(device_mesh, self.state.balance)

        @torch.compiler.disable  # bookkeeping stays eager: no recompiles under torch.compile

        def post_hook(mod, args, output):
            if isinstance(output, torch.Tensor):
                return self._gather(sp, output, self.outputs[0].dim, 0)
            out = list(output)
            for idx, spec in self.outputs.items():
                out[idx] = self._gather(sp, out[idx], spec.dim, idx)
            return type(output)(out)

        module.register_forward_hook(post_hook)
        return module


class CheckInputs(ParallelStyle):
    """Before a module's forward, all SP ranks agree that they were given the same inputs.

    One 16-byte all-gather per SP axis and forward (``meshsp.ops.consensus.agree``): inputs that
    differ between ranks (another sequence length or batch on one rank) raise the same
    ``ValueError`` on every rank, naming the differing shapes, instead of deadlocking later.
    ``meshsp.parallelize`` puts it on the model's root, ahead of the plan's own hooks; with tensor
    parallelism the ``tp`` ranks agree too (``tp_group``).
    """

    def __init__(self, tp_group=None) -> None:
        super().__init__()
        self.tp_group = tp_group

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        names = device_mesh.mesh_dim_names or ()
        groups = (None, None)
        if "ring" in names or "ulysses" in names:
            sp = SPMesh(device_mesh)
            groups = (sp.ulysses_group, sp.ring_group)
        groups += (self.tp_group,)
        name = type(module).__name__
        device = device_mesh.device_type

        @torch.compiler.disable  # bookkeeping stays eager: no recompiles under torch.compile

        def pre_hook(mod, args, kwargs):
            agree(f"{name}.forward", f"args {describe(args)}; kwargs {describe(kwargs)}; {pipeline_setting()}", None,
                  groups, device)

        module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
        return module


def _rank_major(sp: SPMesh, local_BS: torch.Tensor, layout: SeqLayout) -> torch.Tensor:
    """Every SP rank's per-token values [B, s] (its local order) -> [B, S] rank-major."""
    most = max(max(row) for row in layout.lens)
    padded = F.pad(local_BS, (0, most - local_BS.shape[1]))
    grid = sp.all_gather(padded)
    return torch.cat([grid[r][u][:, :n] for r, row in enumerate(layout.lens) for u, n in enumerate(row)], dim=1)


def _plain_key_padding(mask, key) -> bool:
    """A boolean [B, 1, 1, S_k] or [B, S_k] mask: valid on every rank by its shape alone."""
    if mask is None:
        return True
    shape = tuple(mask.shape)
    return mask.dtype == torch.bool and (shape in ((key.shape[0], key.shape[2]),)
                                         or (mask.dim() == 4 and shape[1:3] == (1, 1) and shape[3] == key.shape[2]))


def _key_padding(mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, where: str) -> torch.Tensor | None:
    """A key-padding mask [B, 1|H, 1, S_k] (bool, or additive 0 / <= -1e4) -> bool [B, S_k]."""
    if mask is None:
        return None
    b, s_k = k.shape[0], k.shape[2]
    if mask.dim() == 2 and tuple(mask.shape) == (b, s_k):
        mask = mask[:, None, None, :]
    ok_shape = mask.dim() == 4 and mask.shape[0] in (1, b) and mask.shape[1] in (1, q.shape[1]) \
        and mask.shape[2] == 1 and mask.shape[3] == s_k
    if not ok_shape:
        raise ValueError(
            f"{where}: sequence-parallel attention supports key-padding masks [B, 1 or H, 1, S_k] = "
            f"[{b}, 1, 1, {s_k}]; got shape {tuple(mask.shape)}. Masks over query rows cannot be sharded."
        )
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask <= _MASK_FLOOR)).all()):
            raise ValueError(f"{where}: additive masks must hold 0 (keep) or <= {_MASK_FLOOR} (drop) only.")
        mask = mask == 0
    if mask.shape[1] > 1 and not bool((mask == mask[:, :1]).all()):
        raise ValueError(f"{where}: a per-head key mask must be the same for every head.")
    return mask[:, 0, 0, :].expand(b, s_k)


def check_call(where: str, query, key, dropout_p: float, is_causal: bool, enable_gqa: bool,
               masks: str = "local") -> None:
    """The SDPA arguments SP attention takes (shared with plan simulation, ``meshsp.plans.infer``)."""
    if dropout_p != 0.0:
        raise ValueError(f"{where}: dropout_p={dropout_p}; SP attention runs without dropout (inference).")
    if is_causal and masks != "global":
        raise ValueError(f"{where}: is_causal=True needs the plan to declare the attention's tokens one sequence "
                         "(ParallelAttention(masks='global')): causal positions are global token indices.")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"{where}: {query.shape[1]} query vs {key.shape[1]} key heads without enable_gqa=True.")


def scope_mode(module: nn.Module, make_mode) -> None:
    """For each forward of ``module``, enter the ``TorchFunctionMode`` that ``make_mode(args)``
    returns (None: none) in a forward pre-hook and leave it in an always-called forward hook, an
    exception in the forward included: the interception never outlives that forward.

    Example::

        scope_mode(block, lambda args: MyMode())   # MyMode sees only block's forward
    """
    modes: list[TorchFunctionMode | None] = []

    @torch.compiler.disable  # bookkeeping stays eager: no recompiles under torch.compile
    def enter(mod, args):
        mode = make_mode(args)
        if mode is not None:
            mode.__enter__()
        modes.append(mode)

    @torch.compiler.disable
    def leave(mod, args, output):
        mode = modes.pop() if modes else None
        if mode is not None:
            mode.__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


class _RouteAttention(RoutesFlex, TorchFunctionMode):
    def __init__(self, style: ParallelAttention, sp: SPMesh) -> None:
        super().__init__()
        self.style, self.sp = style, sp

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_flex_call(func):  # flex_attention's operator (meshsp.ops.flex)
            return plan_flex(self.style, self.sp, args, kwargs, torch.compiler.is_compiling())
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        return self.style.attention(self.sp, *args, **kwargs)


class ParallelAttention(_Bound):
    """Run every ``F.scaled_dot_product_attention`` inside this module as SP attention.

    q/k/v are the module's local shards ``[B, H, s, D]``; the output is this rank's shard of the
    exact result. With ``queries="replicated"`` the queries are whole on every rank (a stream the
    plan does not shard) and only the keys and values are sharded: the output is whole too
    (``meshsp.ops.replicated``). ``masks="global"``: the attention's tokens are one sequence and its
    masks cover all of it in global order (``meshsp.attention_masks``). ``runs``: the module's call
    carries runs that its processor loops over at global indices (a ``SegmentRuns``, or its mapping);
    a forward pre-hook hands the call one ``SegmentMask`` of them instead (needs ``masks="global"``).
    Parameters, buffers and the attention processor are untouched.

    Example::

        {"transformer_blocks.*.attn": ParallelAttention(),
         "transformer_blocks.*.video_to_audio_attn": ParallelAttention(queries="replicated")}
    """

    QUERIES = ("sharded", "replicated")
    MASKS = ("local", "global")

    def __init__(self, queries: str = "sharded", masks: str = "local", runs: SegmentRuns | Mapping | None = None) -> None:
        super().__init__()
        if queries not in self.QUERIES:
            raise ValueError(f"ParallelAttention queries must be one of {self.QUERIES}; got {queries!r}.")
        if masks not in self.MASKS:
            raise ValueError(f"ParallelAttention masks must be one of {self.MASKS}; got {masks!r}.")
        if masks == "global" and queries == "replicated":
            raise ValueError("ParallelAttention(masks='global') shards its queries; it takes queries='sharded'.")
        self.runs = SegmentRuns.from_spec(runs) if runs is not None else None
        if self.runs is not None and masks != "global":
            raise ValueError("ParallelAttention 'runs' give a mask over the whole sequence in global order; "
                             "declare masks='global' with them.")
        self.queries, self.masks = queries, masks
        self._run_masks: dict = {}  # the last SegmentMask made of runs, and what it was made of

    @torch.compiler.disable
    def attention(self, sp: SPMesh, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                  scale=None, enable_gqa=False):
        where = f"plan '{self.key}'"
        check_call(where, query, key, dropout_p, is_causal, enable_gqa, self.masks)
        lens = self.state.rank_lens(sp, self.key, (query.shape[2], key.shape[2]))
        if self.queries == "replicated":
            mask = self.state.key_mask(attn_mask, query, key, lambda: self._key_mask(sp, attn_mask, query, key, where))
            q_lens = sorted({n[0] for row in lens for n in row})
            if len(q_lens) > 1:  # every rank sees the same exchanged lengths: all raise together
                raise ValueError(f"{where}: queries='replicated' but the ranks hold {q_lens} query tokens: the queries "
                                 "are sharded; route this attention with queries='sharded'.")
            return replicated_query_attention(query, key, value, mask, groups=(sp.ulysses_group, sp.ring_group),
                                              scale=scale)
        q_layout = SeqLayout(tuple(tuple(n[0] for n in row) for row in lens))
        kv_layout = SeqLayout(tuple(tuple(n[1] for n in row) for row in lens))
        if self.masks == "global":
            q_layout, kv_layout = self._one_sequence(q_layout, where), self._one_sequence(kv_layout, where)
        mask = None if is_causal else self.state.key_mask(
            attn_mask, query, key, lambda: self._mask(sp, attn_mask, query, key, where, q_layout, kv_layout))
        if is_causal:
            mask = global_pairs(None, True, q_layout, kv_layout, sp.r, where)
        pair = mask if isinstance(mask, PairMask) else None
        self.state.attention_tokens[0] += query.shape[2]
        self.state.attention_tokens[1] += q_layout.total
        return sp_attention(
            query, key, value, None if pair is not None else mask, ring_group=sp.ring_group,
            ulysses_group=sp.ulysses_group, q_layout=q_layout, kv_layout=kv_layout, uaa=self.state.uaa,
            scale=scale, pair=pair,
            validate=False,  # CheckInputs agreed on the model's inputs at the start of the forward
        )

    def _one_sequence(self, layout: SeqLayout, where: str) -> SeqLayout:
        """With masks='global' the attention's tokens must be one sequence sharded as meshsp shards it."""
        whole = SeqLayout.from_global(layout.total, ring=layout.ring, ulysses=layout.ulysses,
                                      balance=self.state.balance)
        if whole.lens != layout.lens:  # the exchanged lengths: the same on every rank
            raise ValueError(f"{where}: masks='global' needs this attention's tokens to be one sequence sharded "
                             f"as meshsp shards it (local lengths {whole.lens}), but the ranks hold {layout.lens}; "
                             "a concatenation of separately sharded streams takes masks built from local tokens.")
        return whole

    def _mask(self, sp: SPMesh, attn_mask, query, key, where, q_layout, kv_layout):
        """A key-padding mask (bool [B, s_k]) or a ``PairMask``; agreed across ranks where a check
        depends on this rank's values."""
        if attn_mask is None:
            return None
        if isinstance(attn_mask, SegmentMask):
            if self.masks != "global":
                raise ValueError(f"{where}: a SegmentMask compares global token positions; declare this attention "
                                 "masks='global' (its tokens one sequence).")
            attn_mask.check(query.shape[0], q_layout.total, kv_layout.total)
            return PairMask(runs=segment_runs(attn_mask, q_layout.order(), kv_layout.order()))
        if self.masks == "global" and not _plain_key_padding(attn_mask, key):
            return global_pairs(attn_mask, False, q_layout, kv_layout, sp.r, where)
        if not is_local_pairwise(attn_mask, query, key):
            return self._key_mask(sp, attn_mask, query, key, where)
        diagonal, error = None, None
        try:
            diagonal = outer_diagonal(attn_mask, where)
        except ValueError as exc:
            error = str(exc)
        agree(where, "attention mask", error, (sp.ulysses_group, sp.ring_group), sp.device)
        if q_layout.lens != kv_layout.lens:
            raise ValueError(f"{where}: a pairwise mask over local tokens needs queries and keys to be the same "
                             f"tokens; the ranks hold {q_layout.lens} queries and {kv_layout.lens} keys.")
        return local_pairs(_rank_major(sp, diagonal.expand(query.shape[0], -1), q_layout), attn_mask.dtype == torch.bool)

    @staticmethod
    def _key_mask(sp: SPMesh, attn_mask, query, key, where: str) -> torch.Tensor | None:
        if _plain_key_padding(attn_mask, key):
            return _key_padding(attn_mask, query, key, where)
        # Checks on mask values or query-row shapes depend on each rank's shard: agree on them so
        # that a failure raises on every rank instead of leaving the others in a collective.
        mask, error = None, None
        try:
            mask = _key_padding(attn_mask, query, key, where)
        except ValueError as exc:
            error = str(exc)
        agree(where, "attention mask", error, (sp.ulysses_group, sp.ring_group), sp.device)
        return mask

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        sp = SPMesh(device_mesh, self.state.balance)
        hand_masks_over(module)  # flex_attention BlockMasks made for the whole sequence (meshsp.ops.flex)
        if self.runs is not None:
            positions = _positions(module)
            if self.runs.runs not in positions and not any(
                    p.kind is p.VAR_KEYWORD for p in inspect.signature(module.forward).parameters.values()):
                raise ValueError(f"plan '{self.key}': {type(module).__name__}.forward takes no '{self.runs.runs}'; "
                                 f"its arguments are {list(positions)}.")

            @torch.compiler.disable  # bookkeeping stays eager: no recompiles under torch.compile
            def runs_to_mask(mod, args, kwargs):
                return args, self.runs.rewrite(kwargs, self.state.global_lens, f"plan '{self.key}'", self._run_masks)

            module.register_forward_pre_hook(runs_to_mask, with_kwargs=True)
        scope_mode(module, lambda args: _RouteAttention(self, sp))
        return module
