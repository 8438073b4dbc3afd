"""Tensor-parallel styles: torch's ``ColwiseParallel`` / ``RowwiseParallel`` and what DiTs add to them.

A plan's ``tp`` entries run on the mesh's ``tp`` axis (``meshsp.plans.Plan``):

* ``ColwiseParallel``: torch's, sharding a ``Linear``'s output features (q/k/v, an MLP's up
  projection); the module returns this rank's slice of the features as a plain tensor — or, with
  ``output_layouts=Replicate()`` (an AdaLN modulation projection), all of them, all-gathered.
* ``RowwiseParallel``: torch's, sharding input features (an output projection); one all-reduce over
  ``tp`` per call, counted in ``record_comm`` as ``tp_all_reduce`` (a ring all-reduce sends
  ``2 (P-1) / P`` of the output's bytes per rank).
* ``PackedColwiseParallel`` / ``PackedRowwiseParallel``: a fused ``Linear`` whose features are
  blocks (a SwiGLU's gate and value halves; Flux2's q, k, v and MLP in one matrix; Flux's
  ``proj_out`` over the attention output and the MLP concatenated): every block is sharded on its
  own, so each rank holds a slice of each. ``blocks`` are proportions (``[1, 1]``) or absolute
  sizes, as diffusers' markers of the same names; ``None`` reads the ``_tp_packed_col_blocks`` /
  ``_tp_packed_row_blocks`` attribute diffusers sets on the ``Linear``.
* ``LocalHeads``: during the attention module's forward, its head-count attributes (``heads``,
  ``inner_dim``, ...) say what this rank holds (``heads / tp``), so the model's unchanged processor
  unflattens the local projections correctly; restored after every call, even a failed one.
* ``ShardFeatures``: a module whose outputs hold one value per feature of every head (LTX's RoPE
  cos / sin tables over ``heads x head_dim``) returns this rank's slice of them, as the q/k
  projections do.
* ``HeadShardedNorm``: an RMSNorm over all heads' features (Wan's and LTX's ``rms_norm_across_heads``)
  on column-sharded q or k: the sum of squares is all-reduced over ``tp`` (``B x S`` floats), the
  weight is sharded like the features.

Weights are sliced from each rank's own copy (``src_data_rank=None``): every rank must hold the same
weights before ``parallelize``, as ranks that load one checkpoint do; nothing is broadcast. What a
rank keeps of each parameter is a ``TPSlice`` (``param_slices`` of the style), the one description
both slicing a loaded parameter and reading the rank's part straight from a checkpoint
(``meshsp.loading.load_sharded_transformer``) follow; a parameter read that way is checked, not
sliced again, when the plan is applied.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel as _TorchColwise
from torch.distributed.tensor.parallel import RowwiseParallel as _TorchRowwise
from torch.distributed.tensor.parallel.style import ParallelStyle

from meshsp.ops.adjoint import all_reduce_sum
from meshsp.ops.comm import _count

__all__ = ["ColwiseParallel", "HeadShardedNorm", "LocalHeads", "PackedColwiseParallel", "PackedRowwiseParallel",
           "RowwiseParallel", "ShardFeatures", "TPSlice", "TP_STYLES", "loaded_tp_size", "param_slices", "set_shard",
           "tp_requirements", "tp_slice"]

HEAD_ATTRIBUTES = ("heads", "inner_dim", "inner_kv_dim", "kv_heads", "mlp_hidden_dim")
_LOADED = "_meshsp_loaded_shards"  # module attribute: {parameter name: (TPSlice, tp mesh)} read sharded
_SLICES = "_meshsp_tp_slices"  # module attribute: {parameter name: (TPSlice, tp mesh)} of every sharded one


@dataclass(frozen=True)
class TPSlice:
    """What one tp rank holds of a full parameter: along ``dim``, its ``1/tp`` of each block
    (``blocks``: sizes along ``dim`` that add up to it), concatenated; ``dim=None``: all of it, replicated.

    Example::

        TPSlice(1, (3072, 12288)).take(proj_out.weight, tp_mesh)   # Flux proj_out over [attention, MLP]
    """

    dim: int | None
    blocks: tuple[int, ...] = ()

    @property
    def placement(self) -> Placement:
        return Replicate() if self.dim is None else Shard(self.dim)

    def take(self, full, mesh: DeviceMesh) -> torch.Tensor:
        """This rank's part of ``full``: a tensor, or a safetensors slice (``safe_open(...).get_slice``)
        of which only that part is read. A sharded part is a tensor of its own, not a view of ``full``."""
        if self.dim is None:
            return full[...]
        rank, n = mesh.get_local_rank(), mesh.size()
        parts, offset = [], 0
        for size in self.blocks:
            start = offset + rank * (size // n)
            parts.append(full[(slice(None),) * self.dim + (slice(start, start + size // n),)])
            offset += size
        return torch.cat(parts, dim=self.dim) if len(parts) > 1 else parts[0].clone(memory_format=torch.contiguous_format)


def set_shard(module: nn.Module, name: str, local: torch.Tensor, part: TPSlice, mesh: DeviceMesh, *,
              loaded: bool = False) -> None:
    """Make ``module``'s parameter ``name`` the DTensor of this rank's ``local`` part. ``loaded``: it was
    read sharded from a checkpoint, so applying the plan later checks it instead of slicing it."""
    requires_grad = module._parameters[name].requires_grad
    module.register_parameter(name, nn.Parameter(DTensor.from_local(local, mesh, [part.placement], run_check=False),
                                                 requires_grad=requires_grad))
    module.__dict__.setdefault(_SLICES, {})[name] = (part, mesh)
    if loaded:
        module.__dict__.setdefault(_LOADED, {})[name] = (part, mesh)


def _shard_parameters(module: nn.Module, slices: dict[str, TPSlice], mesh: DeviceMesh, where: str) -> None:
    """Each parameter of ``slices`` replaced by this rank's part; one read sharded is checked instead."""
    loaded = module.__dict__.get(_LOADED, {})
    for name, part in slices.items():
        param = module._parameters[name]
        if name in loaded:
            if loaded[name] != (part, mesh):
                raise ValueError(f"{where}.{name} was loaded sharded as {loaded[name][0]} on {loaded[name][1]}, but "
                                 f"the plan shards it as {part} on {mesh}; load it with the plan and tp mesh it is "
                                 "parallelized with (meshsp.loading.load_sharded_transformer).")
            continue
        if isinstance(param, DTensor):
            raise ValueError(f"{where}.{name} is already a DTensor ({param.placements}): a tp plan was applied to it "
                             "before. Parallelize a freshly loaded model.")
        set_shard(module, name, part.take(param.detach(), mesh), part, mesh)


def param_slices(style: ParallelStyle, module: nn.Module) -> dict[str, TPSlice]:
    """``{parameter name: TPSlice}`` of what ``style`` keeps of ``module``'s parameters on each tp rank
    (empty for styles that shard none). The module may be on ``meta``.

    Example::

        param_slices(RowwiseParallel(), nn.Linear(8, 4))   # {"weight": TPSlice(1, (8,)), "bias": TPSlice(None)}
    """
    slices = getattr(style, "param_slices", None)
    if slices is None:
        raise ValueError(f"{type(style).__name__} is not one of meshsp's tp styles ({sorted(TP_STYLES)}), so what it "
                         "keeps of each parameter is not known; use the styles of meshsp.tp in the plan.")
    return slices(module)


def tp_slice(module: nn.Module, name: str) -> tuple[TPSlice, DeviceMesh] | None:
    """What this rank holds of ``module``'s parameter ``name`` and on which tp mesh; None if not sharded."""
    return module.__dict__.get(_SLICES, {}).get(name)


def loaded_tp_size(model: nn.Module) -> int | None:
    """The tp degree ``model``'s parameters were read sharded for (``meshsp.loading``); None if none were."""
    for module in model.modules():
        for _, mesh in module.__dict__.get(_LOADED, {}).values():
            return mesh.size()
    return None


def _present(module: nn.Module, names: tuple[str, ...]) -> list[str]:
    return [n for n in names if getattr(module, n, None) is not None]


def block_sizes(blocks, total: int, where: str) -> list[int]:
    """Absolute block sizes from proportions (or sizes) that must add up to a divisor of ``total``."""
    unit, rest = divmod(total, sum(blocks))
    if rest or any(int(b) != b or b < 1 for b in blocks):
        raise ValueError(f"{where}: blocks {list(blocks)} do not split {total} features into whole blocks; "
                         f"give positive proportions whose sum divides {total}.")
    return [int(b) * unit for b in blocks]


def _packed_sizes(style, module: nn.Module, dim: int, where: str) -> list[int]:
    blocks = style.blocks if style.blocks is not None else getattr(module, style.attribute, None)
    if not blocks:
        raise ValueError(f"{where}: {type(style).__name__} needs blocks (e.g. blocks: [1, 1]) or a "
                         f"'{style.attribute}' attribute on the Linear; it has neither.")
    return block_sizes(blocks, module.weight.shape[dim], where)


class ColwiseParallel(_TorchColwise):
    """torch's ``ColwiseParallel``, slicing each rank's own weights (no broadcast). With
    ``output_layouts=Replicate()`` the output features are all-gathered (an AdaLN modulation
    projection: its weights are sharded, its small per-sample output is whole on every rank); the
    all-gather is counted in ``record_comm`` as ``tp_all_gather``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.src_data_rank = None

    def param_slices(self, module: nn.Module) -> dict[str, TPSlice]:
        return {n: TPSlice(0, (module.weight.shape[0],)) for n in _present(module, ("weight", "bias"))}

    def _partition_linear_fn(self, name, module, device_mesh):
        _shard_parameters(module, self.param_slices(module), device_mesh, name or type(module).__name__)

    @property
    def gathered(self) -> bool:
        return isinstance(self.output_layouts[0], Replicate)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if isinstance(output_layouts[0], Replicate) and not isinstance(outputs.placements[0], Replicate):
            local = outputs.to_local()  # Shard -> Replicate: the all-gather, waited here
            _count("tp_all_gather", (device_mesh.size() - 1) * local.numel() * local.element_size())
            outputs = outputs.redistribute(placements=output_layouts)
        elif outputs.placements != output_layouts:  # Shard(2) vs Shard(-1): the same layout, no data moves
            outputs = outputs.redistribute(placements=output_layouts, async_op=True)
        return outputs.to_local() if use_local_output else outputs


class RowwiseParallel(_TorchRowwise):
    """torch's ``RowwiseParallel``; its output all-reduce is counted in ``record_comm``."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.src_data_rank = None

    def param_slices(self, module: nn.Module) -> dict[str, TPSlice]:
        out = {"weight": TPSlice(1, (module.weight.shape[1],))}
        if module.bias is not None:  # added once, after the all-reduce
            out["bias"] = TPSlice(None)
        return out

    def _partition_linear_fn(self, name, module, device_mesh):
        _shard_parameters(module, self.param_slices(module), device_mesh, name or type(module).__name__)

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        n = device_mesh.size()
        local = outputs.to_local()
        _count("tp_all_reduce", 2 * (n - 1) * local.numel() * local.element_size() // n)
        if outputs.placements != output_layouts:  # Partial -> Replicate: the all-reduce, waited here
            outputs = outputs.redistribute(placements=output_layouts)
        return outputs.to_local() if use_local_output else outputs


class PackedColwiseParallel(ColwiseParallel):
    """Column-wise for a fused ``Linear``: each output block sharded on its own."""

    attribute = "_tp_packed_col_blocks"

    def __init__(self, blocks: list[int] | None = None) -> None:
        super().__init__()
        self.blocks = blocks

    def param_slices(self, module: nn.Module) -> dict[str, TPSlice]:
        sizes = tuple(_packed_sizes(self, module, 0, type(module).__name__))
        return {n: TPSlice(0, sizes) for n in _present(module, ("weight", "bias"))}


class PackedRowwiseParallel(RowwiseParallel):
    """Row-wise for a ``Linear`` whose input is blocks concatenated: each block sharded on its own."""

    attribute = "_tp_packed_row_blocks"

    def __init__(self, blocks: list[int] | None = None) -> None:
        super().__init__()
        self.blocks = blocks

    def param_slices(self, module: nn.Module) -> dict[str, TPSlice]:
        out = {"weight": TPSlice(1, tuple(_packed_sizes(self, module, 1, type(module).__name__)))}
        if module.bias is not None:  # added once, after the all-reduce
            out["bias"] = TPSlice(None)
        return out


class LocalHeads(ParallelStyle):
    """The attention module's head counts are this rank's during its forward (``heads / tp``)."""

    def param_slices(self, module: nn.Module) -> dict[str, TPSlice]:
        return {}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        n = device_mesh.size()
        names = [a for a in HEAD_ATTRIBUTES if isinstance(getattr(module, a, None), int)]
        full = {a: getattr(module, a) for a in names}
        saved: list[dict] = []

        def enter(mod, args):
            saved.append({a: getattr(mod, a) for a in names})
            for a in names:
                setattr(mod, a, full[a] // n)

        def leave(mod, args, output):
            for a, value in saved.pop().items():
                setattr(mod, a, value)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave, always_call=True)
        _sum_head_norm_gradients(module, device_mesh)
        return module


def _head_norm_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The plain parameters of ``module``'s per-head norms (q/k RMSNorms over one head's features)."""
    heads, inner = getattr(module, "heads", None), getattr(module, "inner_dim", None)
    if not isinstance(heads, int) or not isinstance(inner, int) or not heads or inner % heads:
        return []
    head_dim = inner // heads
    out = []
    for child in module.children():
        params = list(child.parameters())
        if params and _norm_features(child) == head_dim and all(
                not isinstance(p, DTensor) and p.dim() == 1 and p.numel() == head_dim for p in params):
            out.extend(params)
    return out


def _sum_head_norm_gradients(module: nn.Module, device_mesh: DeviceMesh) -> None:
    """A per-head norm's weight is whole on every tp rank but each rank applies it to its own heads
    only, so each rank's gradient is a part: the whole gradient is their sum over ``tp`` (one
    all-reduce of ``head_dim`` numbers per backward, when the parameter's gradient is complete)."""
    group = device_mesh.get_group()

    def summed(grad: torch.Tensor) -> torch.Tensor:
        n = group.size()
        _count("tp_all_reduce", 2 * (n - 1) * grad.numel() * grad.element_size() // n)
        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", group))

    for param in _head_norm_parameters(module):
        param.register_hook(summed)


class ShardFeatures(ParallelStyle):
    """Slice the outputs named in ``outputs`` (index -> dim) to this rank's contiguous share of ``dim``."""

    def __init__(self, outputs: dict | None = None) -> None:
        super().__init__()
        if not outputs or any(not isinstance(i, int) or not isinstance(d, int) for i, d in outputs.items()):
            raise ValueError(f"ShardFeatures takes outputs as {{output index: dim}}, e.g. {{0: -1}}; got {outputs!r}.")
        self.outputs = dict(outputs)

    def param_slices(self, module: nn.Module) -> dict[str, TPSlice]:
        return {}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        rank, n = device_mesh.get_local_rank(), device_mesh.size()
        where = type(module).__name__

        def post_hook(mod, args, output):
            single = isinstance(output, torch.Tensor)
            values = [output] if single else list(output)
            for i, dim in self.outputs.items():
                size = values[i].shape[dim]
                if size % n:
                    raise ValueError(f"{where} output {i} has {size} features along dim {dim}, which "
                                     f"tensor_parallel_size={n} does not divide.")
                values[i] = values[i].narrow(dim, rank * (size // n), size // n)
            return values[0] if single else type(output)(values)

        module.register_forward_hook(post_hook)
        return module


def _sharded_rms_norm(module: nn.Module, group, features: int, hidden_states: torch.Tensor) -> torch.Tensor:
    # [..., features / tp], accumulated as torch.nn.RMSNorm does: float32 for 16-bit inputs
    x = hidden_states.to(torch.float64 if hidden_states.dtype == torch.float64 else torch.float32)
    squares = x.pow(2).sum(-1, keepdim=True)
    _count("tp_all_reduce", 2 * (group.size() - 1) * squares.numel() * squares.element_size() // group.size())
    # every rank's features are its own: the sum's gradient is the sum of the ranks' parts (the adjoint)
    x = x * torch.rsqrt(all_reduce_sum(squares, group) / features + module.eps)
    weight = getattr(module, "weight", None)
    if weight is not None:
        x = x * weight.to_local().to(x.dtype)
    return x.to(hidden_states.dtype)


class HeadShardedNorm(ParallelStyle):
    """An RMSNorm over every head's features, run on this rank's column-sharded features."""

    def param_slices(self, module: nn.Module) -> dict[str, TPSlice]:
        features = _norm_features(module)
        if features is None:
            raise ValueError(f"HeadShardedNorm takes an RMSNorm over one feature dim with an 'eps'; got "
                             f"{type(module).__name__}.")
        return {"weight": TPSlice(0, (features,))} if getattr(module, "weight", None) is not None else {}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        _shard_parameters(module, self.param_slices(module), device_mesh, type(module).__name__)
        features = _norm_features(module)
        # The module's own forward would normalise over this rank's features only; this one is
        # scoped to the module the plan names (an instance attribute, nothing global).
        module.forward = functools.partial(_sharded_rms_norm, module, device_mesh.get_group(), features)
        return module


def _norm_features(module: nn.Module) -> int | None:
    shape = getattr(module, "normalized_shape", None) or getattr(module, "dim", None)
    if isinstance(shape, int):
        shape = (shape,)
    if ("RMSNorm" not in type(module).__name__ or not hasattr(module, "eps") or not shape or len(shape) != 1
            or getattr(module, "bias", None) is not None):
        return None
    return int(shape[0])


TP_STYLES = {"ColwiseParallel": ColwiseParallel, "RowwiseParallel": RowwiseParallel,
             "PackedColwiseParallel": PackedColwiseParallel, "PackedRowwiseParallel": PackedRowwiseParallel,
             "LocalHeads": LocalHeads, "HeadShardedNorm": HeadShardedNorm, "ShardFeatures": ShardFeatures}


def tp_requirements(style: ParallelStyle, module: nn.Module, where: str) -> list[tuple[str, int]]:
    """``(what, size)`` pairs the ``tp`` degree must divide for ``style`` on ``module``."""
    if isinstance(style, ShardFeatures):
        return []  # checked on the outputs, the same on every rank (shapes the ranks agreed on)
    if isinstance(style, LocalHeads):
        out = [(f"{where}.{a}", getattr(module, a)) for a in HEAD_ATTRIBUTES if isinstance(getattr(module, a, None), int)]
        q, k = getattr(module, "to_q", None), getattr(module, "to_k", None)
        heads = getattr(module, "heads", None)
        if isinstance(q, nn.Linear) and isinstance(k, nn.Linear) and isinstance(heads, int) and heads:
            # grouped-query attention: tp must split the key/value heads too, not only their features
            out.append((f"{where} key/value heads", k.out_features // (q.out_features // heads)))
        return out
    if isinstance(style, HeadShardedNorm):
        features = _norm_features(module)
        if features is None:
            raise ValueError(f"plan tp entry '{where}': HeadShardedNorm takes an RMSNorm over one feature dim; "
                             f"got {type(module).__name__}.")
        return [(f"{where} features", features)]
    if not isinstance(module, nn.Linear):
        raise ValueError(f"plan tp entry '{where}': {type(style).__name__} takes an nn.Linear; got {type(module).__name__}.")
    if isinstance(style, (PackedColwiseParallel, PackedRowwiseParallel)):
        dim = 0 if isinstance(style, PackedColwiseParallel) else 1
        return [(f"{where} block {i}", s) for i, s in enumerate(_packed_sizes(style, module, dim, where))]
    if isinstance(style, _TorchColwise):
        return [(f"{where} out_features", module.out_features)]
    return [(f"{where} in_features", module.in_features)]
