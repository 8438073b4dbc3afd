"""Sequence shards of whole token-grid rows (or frames), for models whose feed-forward convolves the grid.

Sana's feed-forward (GLUMBConv) reshapes its tokens to ``[B, C, h, w]`` with the ``height`` and
``width`` its model computed from the latent, and runs a 3x3 depthwise convolution over them;
Sana-Video's (GLUMBTempConv) reshapes to ``[B, F, h, w, C]`` and adds a kernel-3 convolution over
the frames. A shard of the token sequence can only be reshaped so if it holds whole rows (whole
frames), and every convolution reads one row (one frame) of each neighbouring shard:

* ``ShardGrid`` on the model's root slices its latent input along one dim (rows or frames) in whole
  patches, balanced (sizes differ by at most one unit, larger first, in ring-outer rank order), so
  that the model computes this shard's ``height`` (``frames``) itself and every reshape and the
  final unpatchify run on the shard; its outputs are all-gathered back along the same dim. A latent
  with fewer units than ranks is refused (the same ``ValueError`` on every rank: it follows from the
  shapes every rank shares).
* ``ShardGridOutputs`` runs a module that builds a per-token table from the latent (a RoPE table,
  a patch embedding with positions) on the *whole* latent, and shards its outputs in the same units:
  positions stay those of the whole grid.
* ``GridHalo`` runs a convolution whose height dim (``-2``) is the sharded one with the neighbours'
  halo rows: ``meshsp.vae.halo.HaloConv`` over the SP ranks (P2P with the previous and next shard,
  in flight while the convolution runs; bytes counted as ``grid_halo``).

Example::

    Plan({"": ShardGrid(inputs={"hidden_states": 2}),            # [B, C, H, W]: rows
          "transformer_blocks.*.ff.conv_depth": GridHalo()})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh

from meshsp.placements.sequence import balanced_sizes
from meshsp.styles import SeqDim, SPMesh, _as_seqdim, _Bound, _positions
from meshsp.vae.halo import HaloConv

__all__ = ["GridHalo", "ShardGrid", "ShardGridOutputs"]


@dataclass
class _Split:
    """This forward's split: ``units`` grid units over the SP ranks, ``sizes[i]`` for rank index
    ``i = ring_rank * ulysses + ulysses_rank``; ``whole`` maps id(shard) -> the unsharded input."""

    units: int
    sizes: tuple[int, ...]
    index: int
    whole: dict[int, torch.Tensor] = field(default_factory=dict)

    def narrow(self, t: torch.Tensor, dim: int, where: str) -> torch.Tensor:
        size = t.shape[dim]
        if size % self.units:
            raise ValueError(f"{where}: {size} along dim {dim} is not a whole number of the grid's {self.units} "
                             f"units (shape {tuple(t.shape)}); shard it along the dim that follows the grid.")
        unit = size // self.units
        return t.narrow(dim, sum(self.sizes[:self.index]) * unit, self.sizes[self.index] * unit)


def _patch_along(module: nn.Module, ndim: int, dim: int, where: str) -> int:
    """The patch size of ``module`` (a diffusers model: ``config.patch_size``) along latent dim ``dim``."""
    patch = getattr(getattr(module, "config", None), "patch_size", None)
    if isinstance(patch, (tuple, list)) and len(patch) == ndim - 2:
        return int(patch[dim - 2])
    if isinstance(patch, int):
        return patch if dim >= ndim - 2 else int(getattr(module.config, "patch_size_t", None) or 1)
    raise ValueError(f"{where}: ShardGrid reads the patch size from the model's config.patch_size; "
                     f"{type(module).__name__} has {patch!r} for a {ndim}-D latent. Put ShardGrid on the model's root.")


def _index(sp: SPMesh) -> int:
    return sp.r * sp.ulysses + sp.u


class ShardGrid(_Bound):
    """Slice the latent input (the first of ``inputs``) in whole units of the token grid along its
    ``dim``; slice the other ``inputs`` (per-token inputs such as a per-frame timestep) in the same
    units; all-gather ``outputs`` (index or field: dim; default ``{0: <the latent's dim>}``) back.

    Example::

        ShardGrid(inputs={"hidden_states": 2, "timestep": {"dim": 2, "ndim": 5}}, outputs={0: 2})
    """

    def __init__(self, inputs: Mapping, outputs: Mapping | None = None) -> None:
        super().__init__()
        if not inputs:
            raise ValueError("ShardGrid needs 'inputs': the latent first ({name: dim}), then per-token inputs.")
        self.inputs: dict[str, SeqDim] = {str(k): _as_seqdim(v) for k, v in inputs.items()}
        if any(s.segments is not None or s.flatten for s in self.inputs.values()):
            raise ValueError(f"ShardGrid inputs take 'dim' and 'ndim' only; got {inputs}.")
        first = next(iter(self.inputs.values()))
        self.outputs = {int(k): _as_seqdim(v) for k, v in (outputs or {0: first.dim}).items()}

    def entry(self) -> dict:
        """The YAML entry's keys besides 'style'."""
        def spec(s: SeqDim):
            return s.dim if s.ndim is None else {"dim": s.dim, "ndim": s.ndim}
        return {"inputs": {k: spec(s) for k, s in self.inputs.items()},
                "outputs": {k: spec(s) for k, s in self.outputs.items()}}

    def _split(self, sp: SPMesh, module: nn.Module, name: str, x: torch.Tensor) -> _Split:
        dim = self.inputs[name].dim % x.dim()
        where = f"plan '{self.key}'"
        patch = _patch_along(module, x.dim(), dim, where)
        what = "rows" if dim == x.dim() - 2 else "frames" if x.dim() == 5 and dim == 2 else f"dim-{dim} slices"
        size, ranks = x.shape[dim], sp.ring * sp.ulysses
        if size % patch:
            raise ValueError(f"{where}: '{name}' has {size} {what} (shape {tuple(x.shape)}), not a multiple of the "
                             f"patch size {patch} along them; resize the input to a multiple of {patch}.")
        units = size // patch
        if units < ranks:
            raise ValueError(
                f"{where}: '{name}' has {units} {what} of tokens ({size} at patch {patch}), fewer than the {ranks} "
                f"sequence-parallel ranks ({sp.ring} ring x {sp.ulysses} ulysses); each rank needs whole {what} "
                f"because the model reshapes its tokens to the grid and convolves it. Use at most {units} ranks, or "
                f"a larger input (at least {ranks * patch} {what}).")
        self.state.global_lens[f"{self.key}:{name}"] = size
        return _Split(units, balanced_sizes(units, ranks), _index(sp))

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        sp = SPMesh(device_mesh)
        positions = _positions(module)
        missing = [k for k in self.inputs if k not in positions]
        if missing:
            raise ValueError(f"plan '{self.key}': {type(module).__name__}.forward has no argument {missing}; its "
                             f"arguments are {list(positions)}.")
        grid_name = next(iter(self.inputs))

        @torch.compiler.disable  # bookkeeping stays eager: no recompiles under torch.compile
        def pre_hook(mod, args, kwargs):
            args = list(args)

            def get(name):
                return kwargs.get(name) if name in kwargs else args[positions[name]] if positions[name] < len(args) else None

            def put(name, value):
                if name in kwargs or positions[name] >= len(args):
                    kwargs[name] = value
                else:
                    args[positions[name]] = value

            latent = get(grid_name)
            if not isinstance(latent, torch.Tensor):
                raise ValueError(f"plan '{self.key}': ShardGrid's first input '{grid_name}' is {type(latent).__name__}, "
                                 "not the latent tensor.")
            split = self.state.grid = self._split(sp, mod, grid_name, latent)
            for name, spec in self.inputs.items():
                value = get(name)
                if not isinstance(value, torch.Tensor) or (spec.ndim is not None and value.dim() != spec.ndim):
                    continue  # absent, or declared: only tensors of rank `ndim` follow the grid
                shard = split.narrow(value, spec.dim % value.dim(), f"plan '{self.key}': '{name}'")
                split.whole[id(shard)] = value
                put(name, shard)
            return tuple(args), kwargs

        @torch.compiler.disable
        def post_hook(mod, args, output):
            split, self.state.grid = self.state.grid, None
            if output is None or split is None:  # the forward raised: the exception propagates
                return output
            if isinstance(output, torch.Tensor):
                return self._gather(sp, split, output, self.outputs[0].dim)
            values = list(output.values()) if isinstance(output, Mapping) else list(output)
            for idx, spec in self.outputs.items():
                values[idx] = self._gather(sp, split, values[idx], spec.dim)
            if isinstance(output, Mapping):  # a diffusers BaseOutput: set the fields it has
                for key, value in zip(list(output.keys()), values):
                    setattr(output, key, value)
                return output
            return type(output)(values)

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        module.register_forward_hook(post_hook, always_call=True)
        return module

    @staticmethod
    def _gather(sp: SPMesh, split: _Split, t: torch.Tensor, dim: int) -> torch.Tensor:
        """The whole tensor from every rank's piece along ``dim`` (pieces scale with the units)."""
        dim %= t.dim()
        unit = t.shape[dim] // split.sizes[split.index]
        assert unit * split.sizes[split.index] == t.shape[dim], (t.shape, split)
        longest = max(split.sizes) * unit
        if longest > t.shape[dim]:  # uneven shards: pad to the longest for the all-gather
            t = F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, longest - t.shape[dim]])
        grid = sp.all_gather(t)
        pieces = [grid[r][u].narrow(dim, 0, split.sizes[r * sp.ulysses + u] * unit)
                  for r in range(sp.ring) for u in range(sp.ulysses)]
        return torch.cat(pieces, dim=dim)


class ShardGridOutputs(_Bound):
    """Run the module on the whole latent (``inputs``: names of arguments that are a ``ShardGrid``
    shard; they are given the unsharded tensor) and slice ``outputs`` ({index: dim}) in the grid's
    units: a RoPE table or position embedding keeps the whole grid's positions.

    Example::

        ShardGridOutputs(inputs=["hidden_states"], outputs={0: 1, 1: 1})   # Sana-Video's rope
    """

    def __init__(self, inputs: Sequence[str], outputs: Mapping) -> None:
        super().__init__()
        if isinstance(inputs, (str, Mapping)) or not inputs or not outputs:
            raise ValueError(f"ShardGridOutputs needs 'inputs' (a list of argument names) and 'outputs' "
                             f"({{index: dim}}); got inputs={inputs!r}, outputs={outputs!r}.")
        self.inputs = [str(n) for n in inputs]
        self.outputs = {int(k): int(v) for k, v in outputs.items()}

    def entry(self) -> dict:
        return {"inputs": list(self.inputs), "outputs": dict(self.outputs)}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        positions = _positions(module)
        missing = [k for k in self.inputs if k not in positions]
        if missing:
            raise ValueError(f"plan '{self.key}': {type(module).__name__}.forward has no argument {missing}; its "
                             f"arguments are {list(positions)}.")
        where = f"plan '{self.key}'"

        @torch.compiler.disable
        def pre_hook(mod, args, kwargs):
            split, args = self._split(where), list(args)
            for name in self.inputs:
                in_kwargs = name in kwargs
                value = kwargs[name] if in_kwargs else args[positions[name]] if positions[name] < len(args) else None
                whole = split.whole.get(id(value)) if isinstance(value, torch.Tensor) else None
                if whole is None:
                    raise ValueError(f"{where}: '{name}' is not a tensor the plan's ShardGrid sliced; name an argument "
                                     "that is (the latent).")
                if in_kwargs:
                    kwargs[name] = whole
                else:
                    args[positions[name]] = whole
            return tuple(args), kwargs

        @torch.compiler.disable
        def post_hook(mod, args, output):
            split = self._split(where)
            one = isinstance(output, torch.Tensor)
            values = [output] if one else list(output)
            for idx, dim in self.outputs.items():
                values[idx] = split.narrow(values[idx], dim, f"{where}: output {idx}").clone()
            return values[0] if one else type(output)(values)

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        module.register_forward_hook(post_hook)
        return module

    def _split(self, where: str):
        if self.state.grid is None:
            raise ValueError(f"{where}: ShardGridOutputs runs inside a forward whose root has ShardGrid; the plan has "
                             "none (or the module runs outside the model's forward).")
        return self.state.grid


class _SPRanks:
    """The SP ranks as ``HaloConv``'s bands: shard ``i`` (ring-outer) is rank ``ranks[i]``."""

    comm_kind = "grid_halo"
    active = True
    group = None  # P2P peers are global ranks of the default group

    def __init__(self, device_mesh: DeviceMesh) -> None:
        self.ranks = device_mesh.mesh.flatten().tolist()
        self.size = len(self.ranks)
        self.rank = _index(SPMesh(device_mesh))


class GridHalo(_Bound):
    """A convolution over shards of whole rows of its input's dim ``-2`` (a 3x3 over ``[B, C, h, w]``
    rows, or a ``(3, 1)`` over ``[B, C, F, h * w]`` frames), with the halo rows of the neighbouring
    shards (``meshsp.vae.halo.HaloConv``).

    Example::

        {"transformer_blocks.*.ff.conv_depth": GridHalo(), "transformer_blocks.*.ff.conv_temp": GridHalo()}
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        return HaloConv(_SPRanks(device_mesh))._apply(module, device_mesh)
