"""Convolutions over a band of rows: the rows a kernel reaches across a band edge come from the
neighbouring ranks (``HaloConv``, ``HaloPadConv``), and a stride-2 downsampling's bottom padding row
under an inner band is the next band's first row (``HaloDownConv``).

``HaloConv`` and ``HaloPadConv`` leave the convolution to run over its band as it is, padded in
height as it pads the whole image, while the halo rows are in flight; then they recompute the few
output rows whose window reaches past an inner band edge from those rows and the band's edge rows,
unpadded in height. So the band is never copied to add its halo (the memory and time of one more
band per convolution), and only the edge rows are computed twice.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle

from meshsp.ops.comm import _count
from meshsp.vae.bands import Bands

__all__ = ["HaloConv", "HaloDownConv", "HaloPadConv"]


class HaloConv(ParallelStyle):
    """A convolution over a band, with the output rows next to an inner band edge recomputed from
    the neighbours' halo rows (see the module docstring).

    Takes ``nn.Conv2d`` and ``nn.Conv3d``, and the causal 3-D convolutions of diffusers' video VAEs
    (Wan, Qwen-Image), which pad in their forward from a ``_padding`` tuple and take the previous
    frames' cache as a second argument: the cache's halo rows come with the input's."""

    def __init__(self, bands: Bands) -> None:
        super().__init__()
        self.bands = bands

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        halo, causal = _halo_of(module, type(module).__name__)
        # where the convolution keeps its height padding: the causal (w, w, h, h, t, 0) or nn's (..., h, w)
        where = ("_padding", (2, 3)) if causal else ("padding", (len(module.padding) - 2,))

        def inputs(args, kwargs):
            cache = args[1] if len(args) > 1 else kwargs.get("cache_x")
            return args[0], None if cache is None else cache.to(args[0].device)

        def run(mod, x, cache):
            return mod.forward(x) if cache is None else mod.forward(x, cache)

        _edge_fixed(module, self.bands, (halo, 1), "zeros", where, inputs, run)
        return module


def _halo_of(module: nn.Module, where: str) -> tuple[int, bool]:
    """(halo rows, whether the padding is the causal ``_padding`` tuple) of a convolution HaloConv
    can run over a band; ``ValueError`` otherwise."""
    causal = isinstance(getattr(module, "_padding", None), tuple)
    halo = module._padding[2] if causal else module.padding[-2] if isinstance(module.padding, tuple) else None
    if not isinstance(module, (nn.Conv2d, nn.Conv3d)) or module.padding_mode != "zeros" \
            or module.stride[-2] != 1 or module.dilation[-2] != 1 or halo is None \
            or module.kernel_size[-2] != 2 * halo + 1 or (causal and module._padding[3] != halo):
        raise ValueError(f"{where}: HaloConv takes a zero-padded convolution of stride 1 in height whose kernel "
                         f"is 2 x padding + 1 rows tall (padding in the convolution or a causal _padding); got "
                         f"{module}.")
    return halo, causal


class HaloPadConv(ParallelStyle):
    """A wrapper that pads in its forward, ``F.pad(x, time_causal_padding, mode=pad_mode)``, and then
    runs its unpadded ``.conv`` (HunyuanVideo's causal convolution, strided in its encoder's
    downsampling; CogVideoX's with ``pad_mode="replicate"``): the output rows next to an inner band
    edge are recomputed from the neighbours' halo rows (see the module docstring)."""

    def __init__(self, bands: Bands) -> None:
        super().__init__()
        self.bands = bands

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        window = _pad_halo_of(module, type(module).__name__)
        edge = "replicate" if module.pad_mode == "replicate" else "zeros"

        def run(mod, x, cache):
            out = mod.forward(x)
            return out[0] if isinstance(out, tuple) else out  # CogVideoX's: (output, conv cache)

        _edge_fixed(module, self.bands, window, edge, ("time_causal_padding", (2, 3)),
                    lambda args, kwargs: (args[0], None), run)
        return module


def _edge_fixed(module: nn.Module, bands: Bands, window: tuple[int, int], edge: str, where: tuple[str, tuple],
                inputs, run) -> None:
    """Hooks on ``module`` (a convolution padded ``window[0]`` rows in height, of stride
    ``window[1]``): the halo exchange starts before its forward and is waited for after it, and
    the output rows that read padding at an inner band edge are recomputed with ``run(module, x,
    cache)`` over the rows they read, the height padding at ``where`` (attribute, indices) off."""
    pad, stride = window
    pending: list[_Halo] = []

    def start(mod, args, kwargs):
        if bands.active:
            pending.append(_Halo(*inputs(args, kwargs), (pad, pad + 1 - stride), bands, edge))

    def finish(mod, args, kwargs, output):
        if not pending:
            return output
        halo = pending.pop()
        if output is None:  # the forward raised: the exception propagates, nothing to fix
            return output
        halo.wait()
        out = output[0] if isinstance(output, tuple) else output
        h, rows = halo.x.shape[-2], out.shape[-2]
        first = -(-(h - pad) // stride)  # the first output row whose window reaches past the band's bottom
        for lo, hi, inner in ((0, min(-(-pad // stride), rows), bands.rank > 0),
                              (max(first, 0), rows, bands.rank < bands.size - 1)):
            if inner and lo < hi:
                x, cache = halo.slab(stride * lo - pad, stride * (hi - 1) + pad)
                with _height_unpadded(mod, *where):
                    out[..., lo:hi, :] = run(mod, x, cache)
        return output

    module.register_forward_pre_hook(start, with_kwargs=True)
    module.register_forward_hook(finish, with_kwargs=True, always_call=True)


@contextlib.contextmanager
def _height_unpadded(module: nn.Module, attr: str, index: tuple[int, ...]):
    saved = getattr(module, attr)
    setattr(module, attr, tuple(0 if i in index else v for i, v in enumerate(saved)))
    try:
        yield
    finally:
        setattr(module, attr, saved)


class _Halo:
    """The rows of the previous and next bands a band's convolution reads: ``above`` rows from the
    previous band (its last), ``below`` from the next (its first), for ``x`` [..., T, h, W] and
    its cache of earlier frames [..., Tc, h, W] alike (one message each way); at the image's own
    edges zero rows or copies of the edge row (``edge``), as the whole image's padding gives. The
    exchange is in flight from construction to ``wait``."""

    def __init__(self, x: torch.Tensor, cache: torch.Tensor | None, halo: tuple[int, int], bands: Bands,
                 edge: str) -> None:
        me, n, h = bands.rank, bands.size, x.shape[-2]
        above, below = halo
        if h < max(halo):
            raise ValueError(f"a band of {h} rows is thinner than the convolution's halo of {max(halo)}.")
        if torch.is_grad_enabled() and (x.requires_grad or (cache is not None and cache.requires_grad)):
            # the halo rows' gradients would have to travel back to their band: not built, so refuse
            # rather than return a gradient that misses the neighbours' share
            raise ValueError("a convolution split over row bands (halo exchange) has no backward yet: run it under "
                             "torch.no_grad() (a frozen VAE, inference), or train a model whose plan splits no "
                             "convolution (GridHalo).")
        self.x, self.cache = x, cache

        def rows(lo: int, hi: int) -> torch.Tensor:  # of the cache and x, one tensor (one message)
            return x[..., lo:hi, :] if cache is None else torch.cat([cache[..., lo:hi, :], x[..., lo:hi, :]], dim=2)

        def fill(lo: int, count: int, replicate: bool) -> torch.Tensor:
            edge_row = rows(lo, lo + 1)
            if replicate:
                return edge_row.expand(*edge_row.shape[:-2], count, -1).contiguous()
            return edge_row.new_zeros(*edge_row.shape[:-2], count, edge_row.shape[-1])

        self.top = fill(0, above, edge == "replicate" and me == 0)
        self.bottom = fill(h - 1, below, edge == "replicate" and me == n - 1)
        ops, sent = [], 0
        # the previous band takes this band's first `below` rows; the next one its last `above`
        for peer, (lo, hi), recv in ((me - 1, (0, below), self.top), (me + 1, (h - above, h), self.bottom)):
            if 0 <= peer < n and hi > lo:
                send = rows(lo, hi).contiguous()
                ops.append(dist.P2POp(dist.isend, send, bands.ranks[peer], bands.group))
                sent += send.numel() * send.element_size()
            if 0 <= peer < n and recv.shape[-2]:
                ops.append(dist.P2POp(dist.irecv, recv, bands.ranks[peer], bands.group))
        _count(bands.comm_kind, sent)
        self.ops = ops  # the buffers in flight stay referenced until wait
        self.works = dist.batch_isend_irecv(ops) if ops else []

    def wait(self) -> None:
        for work in self.works:
            work.wait()
        self.ops = []

    def slab(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows ``lo..hi`` (inclusive; negative: rows of the band above, ``>= h``: of the band below)
        of x and of its cache."""
        h, frames = self.x.shape[-2], 0 if self.cache is None else self.cache.shape[2]
        out = []
        for t, (start, count) in ((self.cache, (0, frames)), (self.x, (frames, self.x.shape[2]))):
            if t is None:
                out.append(None)
                continue
            top, bottom = (e.narrow(2, start, count) if self.cache is not None else e for e in (self.top, self.bottom))
            parts = [top[..., top.shape[-2] + lo:, :]] if lo < 0 else []
            parts.append(t[..., max(lo, 0):min(hi + 1, h), :])
            parts += [bottom[..., :hi + 1 - h, :]] if hi >= h else []
            out.append(torch.cat(parts, dim=-2) if len(parts) > 1 else parts[0])
        cache, x = out
        return x, cache


# Convolution wrappers that pad in their forward with F.pad(x, time_causal_padding, mode=pad_mode)
# and run an unpadded .conv, and the pad modes in which they do (CogVideoX's pads its inner
# convolution instead unless pad_mode is "replicate").
_PAD_WRAPPERS = {"HunyuanVideoCausalConv3d": ("replicate", "constant"), "CogVideoXCausalConv3d": ("replicate",)}


def _pad_halo_of(wrapper: nn.Module, where: str) -> tuple[int, int]:
    """(padding, stride) in height of a padding wrapper HaloPadConv can run over a band;
    ``ValueError`` otherwise. A stride-``s`` convolution (an encoder's downsampling, over bands of
    whole multiples of ``s`` rows) reads ``p`` rows above its band and ``p + 1 - s`` below it, ``p``
    its padding."""
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
    return pad[2], conv.stride[-2]


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
