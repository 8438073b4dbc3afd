"""Noise a decoder block draws over the whole frame, kept to this rank's band (``BandNoise``)."""

from __future__ import annotations

import torch

from meshsp.vae.bands import Bands
from meshsp.vae.intercept import _BandIntercept

__all__ = ["BandNoise"]


class BandNoise(_BandIntercept):
    """A block that adds ``torch.randn(height, width)`` noise to its band (LTX-Video's decoder
    resnets with ``inject_noise``): every rank draws the whole frame's noise and keeps its band's
    rows, so each rank's generator advances as one process's does and, with the generators in the
    same state (seeded alike), the noise is the single-process decode's."""

    def __init__(self, bands: Bands) -> None:
        super().__init__(bands, torch.randn)

    def _handler(self, args):
        bands = self.bands
        shape = tuple(args[0].shape[-2:])  # the block's input [B, C, T, h, W]: the noise is [h, W]

        def randn(*size, **kwargs):
            size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
            if size != shape:
                raise ValueError(f"BandNoise: a torch.randn of size {size} in a block over a band of {shape}; "
                                 "it takes the [height, width] noise of LTX-Video's resnets only.")
            sizes = bands.scale(shape[0])
            whole = torch.randn(sum(sizes), shape[1], **kwargs)
            return whole.narrow(0, sum(sizes[:bands.rank]), shape[0])

        return randn
