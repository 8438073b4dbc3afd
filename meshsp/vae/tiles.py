"""diffusers' tiled decode with its tiles decoded round-robin across the ranks (``DistributedTiles``)."""

from __future__ import annotations

import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle

from meshsp.ops.comm import _count
from meshsp.vae.bands import Bands

__all__ = ["DistributedTiles"]


class DistributedTiles(ParallelStyle):
    """diffusers' own tiled decode, its tiles decoded round-robin across the ranks.

    ``vae.tiled_decode`` runs twice: first with the decoder computing only this rank's tiles (tile
    ``t`` on rank ``t mod P``; the others stand in as zeros and their blending is discarded), then,
    after every tile is broadcast from the rank that decoded it, with the decoder replaying the
    decoded tiles — so the tiles are cut and blended by diffusers' code, exactly as one process
    blends them."""

    def __init__(self, bands: Bands) -> None:
        super().__init__()
        self.bands = bands

    def _apply(self, vae: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        bands, whole, decoder = self.bands, vae.tiled_decode, vae.decoder
        scale = 2 ** sum(1 for m in decoder.modules() if type(m).__name__.startswith("Upsample"))
        channels = decoder.conv_out.out_channels

        def run(z, return_dict, forward):
            bands.tiling = True
            decoder.forward = forward  # scoped to this call, removed below
            try:
                return whole(z, return_dict=return_dict)
            finally:
                del decoder.forward
                bands.tiling = False

        def tiled_decode(z, return_dict: bool = True):
            mine, shapes, real = {}, [], type(decoder).forward.__get__(decoder)

            def first(tile, *args, **kwargs):
                t = len(shapes)
                shapes.append((tile.shape[0], channels, tile.shape[-2] * scale, tile.shape[-1] * scale))
                if t % bands.size != bands.rank:
                    return tile.new_zeros(shapes[-1])
                mine[t] = real(tile, *args, **kwargs)
                return mine[t].clone()  # blending writes into the tiles it is given

            run(z, False, first)
            tiles = []
            for t, shape in enumerate(shapes):
                owner = t % bands.size
                tile = mine[t].contiguous() if owner == bands.rank else z.new_empty(shape)
                if owner == bands.rank:
                    _count("vae_tiles", tile.numel() * tile.element_size() * (bands.size - 1))
                dist.broadcast(tile, bands.ranks[owner], group=bands.group)
                tiles.append(tile)
            return run(z, return_dict, lambda tile, *args, **kwargs: tiles.pop(0))

        vae.tiled_decode = tiled_decode
        return vae
