"""Noise a VAE decoder draws from torch's global generator: over the whole frame, kept to this
rank's band (``BandNoise``), and per request of a batch (``noise_per_request``).

LTX-Video's decoder resnets built with ``inject_noise`` add ``torch.randn(height, width)`` with no
generator: the draw comes from the global generator, once per block for the whole batch, and every
batch element gets the same noise. A pipeline's per-request generators never reach it, so in one
call for several requests the noise would follow the global seed alone and be shared by all of
them: a request's video would depend on what it is batched with. ``noise_per_request`` decodes such
a batch one request at a time, the global generator seeded with that request's seed before each,
so each request's decode draws what it draws alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from meshsp.vae.bands import Bands
from meshsp.vae.intercept import _BandIntercept

__all__ = ["GLOBAL_NOISE_DECODERS", "BandNoise", "draws_global_noise", "noise_per_request"]

# VAE classes whose decode draws noise from the global generator -> the config field that turns it
# on (a flag per decoder block).
GLOBAL_NOISE_DECODERS = {"AutoencoderKLLTXVideo": "decoder_inject_noise"}


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


def draws_global_noise(vae: nn.Module | None) -> bool:
    """Whether ``vae.decode`` draws noise from the global generator (``GLOBAL_NOISE_DECODERS``)."""
    field = GLOBAL_NOISE_DECODERS.get(type(vae).__name__)
    return field is not None and any(vae.config[field])


@contextlib.contextmanager
def noise_per_request(vae: nn.Module | None, seeds: Sequence[int], sizes: Sequence[int]) -> Iterator[None]:
    """Inside the block, ``vae.decode`` of a batch of ``sum(sizes)`` latents decodes request ``i``'s
    ``sizes[i]`` latents on their own, right after ``torch.manual_seed(seeds[i])``, and concatenates
    the videos. Only for a VAE that ``draws_global_noise`` and more than one request; otherwise, and
    after the block, ``vae.decode`` is untouched, so a lone request draws as it always has.

    Each slice runs through ``vae.decode`` itself, so a split decode (``parallelize_vae``: the
    decoder's bands, hooks on ``vae.decoder``) splits each slice; every rank must enter the block
    with the same seeds and sizes, so that the ranks decode the same slices in the same order.

    Example::

        torch.manual_seed(seeds[0])
        with noise_per_request(pipe.vae, seeds=[1, 2], sizes=[1, 1]):
            video = pipe(["a cat", "a dog"], generator=[torch.Generator().manual_seed(s) for s in (1, 2)])
    """
    if len(seeds) != len(sizes) or any(n < 1 for n in sizes):
        raise ValueError(f"noise_per_request takes one seed and a positive batch size per request; got seeds {list(seeds)} "
                         f"and sizes {list(sizes)}.")
    if len(seeds) < 2 or not draws_global_noise(vae):
        yield
        return
    decode, before = vae.decode, vars(vae).get("decode")

    def per_request(z: torch.Tensor, temb: torch.Tensor | None = None, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        if z.shape[0] != sum(sizes):
            raise ValueError(f"noise_per_request: vae.decode got a batch of {z.shape[0]} latents, but the requests "
                             f"have {list(sizes)} ({sum(sizes)}); call the pipeline with the requests' prompts, one "
                             "latent per image.")
        per_element = torch.is_tensor(temb) and temb.ndim > 0 and temb.shape[0] == z.shape[0]
        videos, start = [], 0
        for seed, n in zip(seeds, sizes):
            torch.manual_seed(seed)
            t = temb.narrow(0, start, n) if per_element else temb
            videos.append(decode(z.narrow(0, start, n), t, return_dict=False)[0])
            start += n
        video = torch.cat(videos)
        return DecoderOutput(sample=video) if return_dict else (video,)

    vae.decode = per_request  # scoped to the block, undone below
    try:
        yield
    finally:
        if before is None:
            del vae.decode
        else:
            vae.decode = before
