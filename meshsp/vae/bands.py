"""Bands: the ranks that split one image, this rank's rows of it; ``SplitBands`` cuts a decoder's (or
encoder's) input into this rank's band and all-gathers the output bands."""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle

from meshsp.ops.comm import _count
from meshsp.ops.consensus import agree
from meshsp.placements.sequence import balanced_sizes
from meshsp.styles import PlanState

__all__ = ["Bands", "SplitBands"]


class Bands:
    """The ranks that decode one image together, and this rank's band of the current forward."""

    comm_kind = "vae_halo"  # what record_comm counts the halo rows as

    def __init__(self, mesh: DeviceMesh) -> None:
        ranks = mesh.mesh.flatten().tolist()
        self.device = mesh.device_type
        self.size, self.rank = len(ranks), ranks.index(dist.get_rank())
        self.ranks = ranks
        self.group = dist.new_group(ranks) if len(ranks) < dist.get_world_size() else dist.group.WORLD
        # Ring attention over the bands' tokens runs on a 1-D "ring" mesh of the same ranks.
        self.ring_mesh = DeviceMesh(self.device, torch.tensor(ranks), mesh_dim_names=("ring",))
        self.active = False   # inside a split decode
        self.tiling = False   # inside diffusers' tiled decode (tiles shared out, not split into bands)
        self.rows: tuple[int, ...] = ()   # band heights at the current resolution

    def split(self, rows: int, unit: int = 1) -> None:
        """Bands of whole ``unit``s of rows (an encoder's input: 2 ** downsamplings, so that every
        band stays whole rows at every resolution)."""
        self.rows = tuple(n * unit for n in balanced_sizes(rows // unit, self.size))

    def scale(self, height: int) -> tuple[int, ...]:
        """Every rank's band height in a tensor whose band here is ``height`` rows (the input bands
        scaled by the up- or downsampling so far)."""
        factor = Fraction(height, self.rows[self.rank])
        sizes = tuple(r * factor for r in self.rows)
        if any(s.denominator != 1 for s in sizes):
            raise ValueError(f"a band of {height} rows does not scale the input bands {self.rows} evenly.")
        return tuple(int(s) for s in sizes)


class SplitBands(ParallelStyle):
    """Cut the decoder's (or encoder's) input into this rank's band; all-gather the output bands.
    ``unit``: band heights are multiples of it (an encoder's total downsampling)."""

    def __init__(self, bands: Bands, state: PlanState, unit: int = 1, arg: str = "z") -> None:
        super().__init__()
        self.bands, self.state, self.unit, self.arg = bands, state, unit, arg

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        bands = self.bands

        def pre_hook(mod, args, kwargs):
            if bands.tiling:
                return None  # a tile of diffusers' tiled decode: DistributedTiles shares the tiles out
            z = args[0] if args else kwargs[self.arg]
            rows, unit = z.shape[-2], self.unit
            error, whole = None, "" if unit == 1 else ", or encode whole (parallelize_vae(..., encode=False))"
            if rows % unit:
                error = (f"the image has {rows} rows, not a multiple of {unit} (the encoder's downsampling in "
                         f"height), which its bands of whole {unit}-row units need; resize it{whole}.")
            elif rows // unit < bands.size:
                what = "latent" if unit == 1 else f"image (in bands of {unit} rows)"
                error = (f"the {what} has {rows} rows, fewer than the {bands.size} ranks splitting it; run "
                         f"on fewer ranks (parallelize_vae with a smaller mesh) or a larger image{whole}.")
            agree(f"vae {self.arg}", f"input {tuple(z.shape)} {z.dtype}", error, (bands.group,), bands.device)
            bands.split(rows, unit)
            bands.active = True
            self.state.global_lens.update({"vae:rows": rows, "vae:cols": z.shape[-1], "vae:batch": z.shape[0]})
            start = sum(bands.rows[:bands.rank])
            band = z.narrow(-2, start, bands.rows[bands.rank])
            return ((band, *args[1:]), kwargs) if args else (args, {**kwargs, self.arg: band})

        def post_hook(mod, args, output):
            if bands.tiling:
                return output
            bands.active = False
            if output is None:  # the forward raised: the exception propagates
                return output
            if isinstance(output, tuple):  # CogVideoX's decoder: (band, this rank's caches of its band)
                return (_gather_rows(output[0], bands.scale(output[0].shape[-2]), bands), *output[1:])
            return _gather_rows(output, bands.scale(output.shape[-2]), bands)

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        module.register_forward_hook(post_hook, always_call=True)
        return module


def _gather_rows(band: torch.Tensor, sizes: tuple[int, ...], bands: Bands) -> torch.Tensor:
    """Every rank's band, concatenated along the rows (bands padded to the tallest for the gather)."""
    tallest = max(sizes)
    padded = F.pad(band, (0, 0, 0, tallest - band.shape[-2])).contiguous()
    _count("vae_gather", padded.numel() * padded.element_size() * (bands.size - 1))
    parts = [torch.empty_like(padded) for _ in range(bands.size)]
    dist.all_gather(parts, padded, group=bands.group)
    return torch.cat([p.narrow(-2, 0, n) for p, n in zip(parts, sizes)], dim=-2)
