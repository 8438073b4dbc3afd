"""Convolutions over a band of rows: the rows a kernel reaches across a band edge come from the
neighbouring ranks (``HaloConv``, ``HaloPadConv``), and a stride-2 downsampling's bottom padding row
under an inner band is the next band's first row (``HaloDownConv``)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle

from meshsp.ops.comm import _count
from meshsp.vae.bands import Bands

__all__ = ["HaloConv", "HaloDownConv", "HaloPadConv"]


class HaloConv(ParallelStyle):
    """A convolution over a band: halo rows from the neighbours, no padding in height.

    Takes ``nn.Conv2d`` and ``nn.Conv3d``, and the causal 3-D convolutions of diffusers' video VAEs
    (Wan, Qwen-Image), which pad in their forward from a ``_padding`` tuple and take the previous
    frames' cache as a second argument: the cache gets its halo rows too."""

    def __init__(self, bands: Bands) -> None:
        super().__init__()
        self.bands = bands

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        bands = self.bands
        halo, causal = _halo_of(module, type(module).__name__)
        saved: list[tuple] = []

        def pre_hook(mod, args, kwargs):
            if not bands.active:
                return None
            args = list(args)
            cache = args[1] if len(args) > 1 else kwargs.get("cache_x")
            if cache is not None:  # the cache's halo comes from the neighbours' caches
                both = _with_halo(torch.cat([cache.to(args[0].device), args[0]], dim=2), halo, bands)
                cache, args[0] = both.split([cache.shape[2], args[0].shape[2]], dim=2)
                if len(args) > 1:
                    args[1] = cache
                else:
                    kwargs = {**kwargs, "cache_x": cache}
            else:
                args[0] = _with_halo(args[0], halo, bands)
            if causal:
                saved.append(mod._padding)
                mod._padding = (*mod._padding[:2], 0, 0, *mod._padding[4:])
            else:
                saved.append(mod.padding)
                mod.padding = (*mod.padding[:-2], 0, mod.padding[-1])
            return tuple(args), kwargs

        def post_hook(mod, args, output):
            if saved:
                if causal:
                    mod._padding = saved.pop()
                else:
                    mod.padding = saved.pop()
            return output

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        module.register_forward_hook(post_hook, always_call=True)
        return module


def _halo_of(module: nn.Module, where: str) -> tuple[int, bool]:
    """(halo rows, whether the padding is the causal ``_padding`` tuple) of a convolution HaloConv
    can run over a band; ``ValueError`` otherwise."""
    causal = isinstance(getattr(module, "_padding", None), tuple)
    halo = module._padding[2] if causal else module.padding[-2] if isinstance(module.padding, tuple) else None
    if not isinstance(module, (nn.Conv2d, nn.Conv3d)) or module.padding_mode != "zeros" \
            or module.stride[-2] != 1 or module.dilation[-2] != 1 or halo is None \
            or module.kernel_size[-2] != 2 * halo + 1:
        raise ValueError(f"{where}: HaloConv takes a zero-padded convolution of stride 1 in height whose kernel "
                         f"is 2 x padding + 1 rows tall (padding in the convolution or a causal _padding); got "
                         f"{module}.")
    return halo, causal


def _with_halo(x: torch.Tensor, halo: int | tuple[int, int], bands: Bands, edge: str = "zeros") -> torch.Tensor:
    """``x`` [..., h, W] with ``halo`` rows of the previous and next bands around it (``(above,
    below)`` when they differ: a strided convolution's); at the image's own edges zero rows
    (``edge="zeros"``) or copies of the edge row (``"replicate"``), as the whole image's padding
    gives. Every band is at least one latent row, so it holds the rows to send."""
    me, n = bands.rank, bands.size
    above, below = (halo, halo) if isinstance(halo, int) else halo
    top = x.new_zeros(*x.shape[:-2], above, x.shape[-1])
    bottom = x.new_zeros(*x.shape[:-2], below, x.shape[-1])
    if edge == "replicate":
        if me == 0:
            top = x[..., :1, :].expand_as(top).contiguous()
        if me == n - 1:
            bottom = x[..., -1:, :].expand_as(bottom).contiguous()
    if n > 1 and (above or below):
        if x.shape[-2] < max(above, below):
            raise ValueError(f"a band of {x.shape[-2]} rows is thinner than the convolution's halo of {halo}.")
        ops, sent = [], 0
        # The previous band takes this band's first `below` rows; the next one its last `above`.
        for peer, send, recv in ((me - 1, x[..., :below, :], top), (me + 1, x[..., x.shape[-2] - above:, :], bottom)):
            if 0 <= peer < n and send.shape[-2]:
                ops.append(dist.P2POp(dist.isend, send.contiguous(), bands.ranks[peer], bands.group))
                sent += send.numel() * send.element_size()
            if 0 <= peer < n and recv.shape[-2]:
                ops.append(dist.P2POp(dist.irecv, recv, bands.ranks[peer], bands.group))
        _count("vae_halo", sent)
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return torch.cat([top, x, bottom], dim=-2)


class HaloPadConv(ParallelStyle):
    """A wrapper that pads in its forward, ``F.pad(x, time_causal_padding, mode=pad_mode)``, and then
    runs its unpadded ``.conv`` (HunyuanVideo's causal convolution; CogVideoX's with
    ``pad_mode="replicate"``): the halo rows come from the neighbours, the image's edge rows are
    padded as ``pad_mode`` pads them, and the wrapper pads only in width and time."""

    def __init__(self, bands: Bands) -> None:
        super().__init__()
        self.bands = bands

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        bands = self.bands
        halo = _pad_halo_of(module, type(module).__name__)
        edge = "replicate" if module.pad_mode == "replicate" else "zeros"
        saved: list[tuple] = []

        def pre_hook(mod, args):
            if not bands.active:
                return None
            saved.append(mod.time_causal_padding)
            pad = mod.time_causal_padding
            mod.time_causal_padding = (*pad[:2], 0, 0, *pad[4:])
            return (_with_halo(args[0], halo, bands, edge), *args[1:])

        def post_hook(mod, args, output):
            if saved:
                mod.time_causal_padding = saved.pop()
            return output

        module.register_forward_pre_hook(pre_hook)
        module.register_forward_hook(post_hook, always_call=True)
        return module


# Convolution wrappers that pad in their forward with F.pad(x, time_causal_padding, mode=pad_mode)
# and run an unpadded .conv, and the pad modes in which they do (CogVideoX's pads its inner
# convolution instead unless pad_mode is "replicate").
_PAD_WRAPPERS = {"HunyuanVideoCausalConv3d": ("replicate", "constant"), "CogVideoXCausalConv3d": ("replicate",)}


def _pad_halo_of(wrapper: nn.Module, where: str) -> tuple[int, int]:
    """Halo rows (above, below) of a padding wrapper HaloPadConv can run over a band; ``ValueError``
    otherwise. A stride-``s`` convolution (an encoder's downsampling, over bands of whole multiples
    of ``s`` rows) reads ``p`` rows above its band and ``p + 1 - s`` below it, ``p`` its padding."""
    pad, conv = getattr(wrapper, "time_causal_padding", None), getattr(wrapper, "conv", None)
    modes = _PAD_WRAPPERS.get(type(wrapper).__name__, ())
    if not (isinstance(pad, tuple) and len(pad) == 6 and isinstance(conv, (nn.Conv2d, nn.Conv3d))
            and wrapper.pad_mode in modes and pad[2] == pad[3] and conv.kernel_size[-2] == 2 * pad[2] + 1
            and conv.padding[-2] == 0 and 1 <= conv.stride[-2] <= pad[2] + 1 and conv.dilation[-2] == 1):
        raise ValueError(f"{where}: HaloPadConv takes a wrapper in a pad mode it pads with F.pad ({_PAD_WRAPPERS}) "
                         "whose .conv is unpadded, 2 x padding + 1 rows tall, of stride 1 in height or at most "
                         f"padding + 1; got pad_mode={getattr(wrapper, 'pad_mode', None)!r}, "
                         f"time_causal_padding={pad}, {wrapper}. Decode and encode this VAE whole "
                         "(parallelize_vae not applied).")
    return pad[2], pad[2] + 1 - conv.stride[-2]


class HaloDownConv(ParallelStyle):
    """A stride-2 convolution behind a padding of one zero row appended at the bottom (diffusers'
    ``Downsample2D`` and ``CogVideoXDownsample3D``, Wan's and Qwen-Image's ``Resample``): under an
    inner band that row is the next band's first row instead."""

    def __init__(self, bands: Bands) -> None:
        super().__init__()
        self.bands = bands

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        bands = self.bands
        if not (isinstance(module, nn.Conv2d) and module.stride == (2, 2) and module.padding == (0, 0)
                and module.kernel_size == (3, 3)):
            raise ValueError(f"HaloDownConv takes a 3x3, stride-2, unpadded nn.Conv2d; got {module}.")

        def pre_hook(mod, args):
            if not bands.active or bands.size == 1:
                return None
            x, me = args[0], bands.rank
            row = x.new_zeros(*x.shape[:-2], 1, x.shape[-1])
            ops = []
            if me > 0:
                ops.append(dist.P2POp(dist.isend, x[..., :1, :].contiguous(), bands.ranks[me - 1], bands.group))
            if me < bands.size - 1:
                ops.append(dist.P2POp(dist.irecv, row, bands.ranks[me + 1], bands.group))
            _count("vae_halo", (me > 0) * row.numel() * row.element_size())
            for work in dist.batch_isend_irecv(ops):
                work.wait()
            if me == bands.size - 1:
                return None  # the image's own bottom edge: the zero row stays
            return (torch.cat([x[..., :-1, :], row], dim=-2), *args[1:])

        module.register_forward_pre_hook(pre_hook)
        return module
