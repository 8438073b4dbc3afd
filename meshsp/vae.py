"""The VAE decode split across every rank of the mesh, equal to the untiled single-device decode.

The latent is cut into bands of rows (``balanced_sizes``: heights that differ by at most one), one
per rank of the whole mesh (cfg, ring, ulysses and tp alike: the decode runs once per request),
and every rank decodes its band. Styles on the decoder's modules keep that exact:

* ``SplitBands`` on the decoder: its input latent is cut into this rank's band; its output bands
  are all-gathered, so ``vae.decode(latents)`` takes and returns full tensors on every rank, as
  diffusers' pipelines call it;
* ``HaloConv`` on every convolution taller than one row: the rows its kernel reaches across a band
  edge come from the neighbouring ranks (one P2P exchange each way), zero rows at the image's own
  edges — what the convolution's zero padding gives — and the convolution runs with no padding in
  height, so its output is exactly this band's rows; ``HaloPadConv`` does the same for a wrapper
  that pads with ``F.pad`` before an unpadded convolution (HunyuanVideo's causal convolution:
  replicate padding, so the image's edge rows are copied instead of zeros);
* ``BandGroupNorm`` on every ``GroupNorm`` (CogVideoX's spatial norm included: its conditioning on
  the latent band is band-local): the per-group counts, sums and sums of squares (float64, from
  each band's fp32 mean and variance) are all-reduced, so every band is normalised with the whole
  image's statistics, applied as one per-channel scale and shift;
* the mid-block's spatial attention runs as Ring attention over the bands' tokens (meshsp's
  ``ParallelAttention``; a band's tokens are a contiguous run of the row-major sequence);
  HunyuanVideo's attends over all frames with a frame-causal mask (``FrameCausalAttention``: a
  ring whose steps attend each query frame to the visiting band's frames up to it);
* upsampling (nearest x2, or depth-to-space) scales every band alike, so bands stay aligned;
* ``BandNoise`` on LTX-Video's noise-injecting blocks: each rank draws the whole frame's noise and
  keeps its band's rows.

``parallelize_vae(vae, mesh)`` applies ``vae_plan(vae)``; ``parallelize_module(vae, mesh,
vae_plan(vae))`` does the same. Supported: ``AutoencoderKL`` (Flux, SD3), ``AutoencoderKLFlux2``,
and the video VAEs ``AutoencoderKLWan``, ``AutoencoderKLQwenImage``, ``AutoencoderKLHunyuanVideo``,
``AutoencoderKLLTXVideo`` and ``AutoencoderKLCogVideoX``. Those that decode a few frames at a time
with a cache of the previous frames per convolution (Wan, Qwen-Image, CogVideoX) keep the cache per
rank, of its own band, and a cached frame's halo rows come from the neighbours with the new
frame's; HunyuanVideo's temporal tiles are decoder calls of their own, each split. With diffusers'
tiling enabled (``AutoencoderKL``), its tiles are decoded round-robin across the ranks and blended
by diffusers' own code (``DistributedTiles``): equal to the single-device tiled decode.
"""

from __future__ import annotations

from fractions import Fraction

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.overrides import TorchFunctionMode

from meshsp.ops.comm import _count
from meshsp.ops.consensus import agree
from meshsp.ops.kernel import local_attention
from meshsp.ops.ring import merge_partials
from meshsp.placements.sequence import balanced_sizes
from meshsp.styles import ParallelAttention, PlanState

__all__ = ["BandGroupNorm", "BandNoise", "Bands", "DistributedTiles", "FrameCausalAttention", "HaloConv",
           "HaloDownConv", "HaloPadConv", "SplitBands", "VaePlan", "parallelize_vae", "vae_plan"]


class Bands:
    """The ranks that decode one image together, and this rank's band of the current forward."""

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
            error = None
            if rows % unit or rows // unit < bands.size:
                what = "latent" if unit == 1 else f"image (in bands of {unit} rows)"
                error = (f"the {what} has {rows} rows, fewer than the {bands.size} ranks splitting it; run "
                         "on fewer ranks (parallelize_vae with a smaller mesh) or a larger image.")
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


def _with_halo(x: torch.Tensor, halo: int, bands: Bands, edge: str = "zeros") -> torch.Tensor:
    """``x`` [..., h, W] with ``halo`` rows of the previous and next bands around it; at the image's
    own edges zero rows (``edge="zeros"``) or copies of the edge row (``"replicate"``), as the
    whole image's padding gives. Every band is at least one latent row, so it holds ``halo`` rows
    to send."""
    me, n = bands.rank, bands.size
    top = x.new_zeros(*x.shape[:-2], halo, x.shape[-1])
    bottom = torch.zeros_like(top)
    if edge == "replicate":
        if me == 0:
            top = x[..., :1, :].expand_as(top).contiguous()
        if me == n - 1:
            bottom = x[..., -1:, :].expand_as(bottom).contiguous()
    if n > 1 and halo:
        if x.shape[-2] < halo:
            raise ValueError(f"a band of {x.shape[-2]} rows is thinner than the convolution's halo of {halo}.")
        ops = []
        if me > 0:
            ops += [dist.P2POp(dist.isend, x[..., :halo, :].contiguous(), bands.ranks[me - 1], bands.group),
                    dist.P2POp(dist.irecv, top, bands.ranks[me - 1], bands.group)]
        if me < n - 1:
            ops += [dist.P2POp(dist.isend, x[..., -halo:, :].contiguous(), bands.ranks[me + 1], bands.group),
                    dist.P2POp(dist.irecv, bottom, bands.ranks[me + 1], bands.group)]
        _count("vae_halo", (len(ops) // 2) * top.numel() * top.element_size())
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


def _pad_halo_of(wrapper: nn.Module, where: str) -> int:
    """Halo rows of a padding wrapper HaloPadConv can run over a band; ``ValueError`` otherwise."""
    pad, conv = getattr(wrapper, "time_causal_padding", None), getattr(wrapper, "conv", None)
    modes = _PAD_WRAPPERS.get(type(wrapper).__name__, ())
    if not (isinstance(pad, tuple) and len(pad) == 6 and isinstance(conv, (nn.Conv2d, nn.Conv3d))
            and wrapper.pad_mode in modes and pad[2] == pad[3] and conv.kernel_size[-2] == 2 * pad[2] + 1
            and conv.padding[-2] == 0 and conv.stride[-2] == 1 and conv.dilation[-2] == 1):
        raise ValueError(f"{where}: HaloPadConv takes a wrapper in a pad mode it pads with F.pad ({_PAD_WRAPPERS}) "
                         "whose .conv is unpadded, of stride 1 in height and 2 x padding + 1 rows tall; got "
                         f"pad_mode={getattr(wrapper, 'pad_mode', None)!r}, time_causal_padding={pad}, {wrapper}. "
                         "Decode this VAE whole (parallelize_vae not applied).")
    return pad[2]


class HaloDownConv(ParallelStyle):
    """A stride-2 convolution behind diffusers' ``Downsample2D`` padding (one zero row appended at
    the bottom): under an inner band that row is the next band's first row instead."""

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


class BandGroupNorm(ParallelStyle):
    """``GroupNorm`` over a band with the whole image's per-group statistics (one all-reduce)."""

    def __init__(self, bands: Bands) -> None:
        super().__init__()
        self.bands = bands

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if not isinstance(module, nn.GroupNorm):
            raise ValueError(f"BandGroupNorm takes an nn.GroupNorm; got {type(module).__name__}.")
        bands, whole = self.bands, module.forward

        def forward(x: torch.Tensor) -> torch.Tensor:
            if not bands.active:
                return whole(x)
            return _band_group_norm(module, x, bands)

        # Scoped to this module (an instance attribute), as the plan names it.
        module.forward = forward
        return module


def _band_group_norm(norm: nn.GroupNorm, x: torch.Tensor, bands: Bands) -> torch.Tensor:
    """Each band's per-group mean and variance (fp32, no copy of the band), combined across the
    ranks as float64 counts, sums and sums of squares, then applied as one per-channel scale and
    shift: the band's memory once, as ``nn.GroupNorm`` holds it."""
    b, c = x.shape[:2]
    g = norm.num_groups
    var, mean = torch.var_mean(x.reshape(b, g, -1).float(), dim=-1, correction=0)  # [B, G]
    n = x[0, : c // g].numel()
    mean, var = mean.double(), var.double()
    stats = torch.stack([mean * n, (var + mean * mean) * n, torch.full_like(mean, n)], dim=-1)
    _count("vae_norm_all_reduce", stats.numel() * stats.element_size())
    dist.all_reduce(stats, group=bands.group)
    mean = stats[..., 0] / stats[..., 2]
    inv = torch.rsqrt((stats[..., 1] / stats[..., 2] - mean * mean).clamp_min(0) + norm.eps)  # [B, G]
    scale, shift = inv.repeat_interleave(c // g, dim=1), (-mean * inv).repeat_interleave(c // g, dim=1)
    if norm.affine:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
    shape = (b, c) + (1,) * (x.dim() - 2)
    return torch.addcmul(shift.to(x.dtype).reshape(shape), x, scale.to(x.dtype).reshape(shape))


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


class _BandAttention(ParallelAttention):
    """``ParallelAttention`` that routes only inside a split decode (a whole decode stays local)."""

    def __init__(self, bands: Bands, state: PlanState) -> None:
        super().__init__()
        self.bands = bands
        self.bind(state, "vae.mid_block.attention")

    def attention(self, sp, query, key, value, *args, **kwargs):
        if not self.bands.active:
            return F.scaled_dot_product_attention(query, key, value, *args, **kwargs)
        return super().attention(sp, query, key, value, *args, **kwargs)


class _Intercept(TorchFunctionMode):
    """Routes calls of one torch function to ``handler(*args, **kwargs)``; entered and left by a
    style's hooks, so it is scoped to one module's forward."""

    def __init__(self, func, handler) -> None:
        super().__init__()
        self.func, self.handler = func, handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not self.func:
            return func(*args, **(kwargs or {}))
        return self.handler(*args, **(kwargs or {}))


def _scoped(module: nn.Module, bands: Bands, make_mode) -> None:
    """Enter ``make_mode(args)`` for each forward of ``module`` inside a split decode."""
    modes: list[TorchFunctionMode] = []

    def enter(mod, args):
        if bands.active:
            modes.append(make_mode(args))
            modes[-1].__enter__()

    def leave(mod, args, output):
        if modes:
            modes.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave, always_call=True)


class FrameCausalAttention(ParallelStyle):
    """A mid-block whose attention runs over all frames with a frame-causal mask (HunyuanVideo's
    ``prepare_causal_attention_mask``: a token sees the tokens of its own and earlier frames), run
    as Ring attention over the bands.

    A band's tokens are ``[T, h, W]`` in frame-major order, so the keys a query of frame ``t`` sees in
    any band are that band's first ``(t + 1) h W`` tokens: each ring step attends each query frame
    to that prefix of the visiting band (the band's own mask, built by diffusers inside the block,
    is recognised and stands for this rule), and the steps merge by log-sum-exp."""

    def __init__(self, bands: Bands) -> None:
        super().__init__()
        self.bands = bands

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        bands = self.bands

        def mode(args):
            frames, rows, width = args[0].shape[2:]  # the block's input [B, C, T, h, W]
            return _Intercept(F.scaled_dot_product_attention,
                              lambda *a, **kw: _frame_causal_sdpa(bands, frames, rows, width, *a, **kw))

        _scoped(module, bands, mode)
        return module


def _frame_causal_sdpa(bands: Bands, frames: int, rows: int, width: int, query, key, value, attn_mask=None,
                       dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> torch.Tensor:
    """The SDPA call of a frame-causal attention over a band: checks that the call is the one
    ``FrameCausalAttention`` stands for (on every rank alike), then runs the ring."""
    tokens, s = rows * width, query.shape[2]
    error = None
    if dropout_p or is_causal or enable_gqa or query.shape != key.shape or key.shape != value.shape \
            or s != frames * tokens or attn_mask is None or tuple(attn_mask.shape[-2:]) != (s, s):
        error = (f"FrameCausalAttention takes SDPA over a band's {frames} x {tokens} tokens with their [S, S] "
                 f"frame-causal mask, no dropout, is_causal=False; got q {tuple(query.shape)}, k {tuple(key.shape)}, "
                 f"mask {None if attn_mask is None else tuple(attn_mask.shape)}.")
    else:
        first, last = attn_mask.reshape(-1, s, s)[0, 0], attn_mask.reshape(-1, s, s)[0, -1]
        if not (bool((first[:tokens] == 0).all()) and bool(torch.isneginf(first[tokens:]).all())
                and bool((last == 0).all())):
            error = (f"FrameCausalAttention: the mask is not the frame-causal mask of {frames} frames of {tokens} "
                     "tokens.")
    agree("vae frame-causal attention", f"frames {frames}, {tuple(query.shape[:2])} {query.dtype}", error,
          (bands.group,), bands.device)
    return _frame_causal_ring(query, key, value, frames, tuple(r * width for r in bands.scale(rows)), bands, scale)


def _frame_causal_ring(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, frames: int, tokens: tuple[int, ...],
                       bands: Bands, scale: float | None) -> torch.Tensor:
    """q, k, v [B, H, T * tokens[me], D] -> out [B, H, T * tokens[me], D]: query frame t over the
    first (t + 1) frames of every band's keys. ``tokens[i]``: band i's tokens per frame. The K/V of
    band ``me - step`` visits at step ``step``, the next one in flight meanwhile."""
    me, n = bands.rank, bands.size
    b, h, _, d = k.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    block = torch.cat([k.reshape(-1), v.reshape(-1)])
    out = lse = None
    for step in range(n):
        src = (me - step) % n
        pending = None
        if step + 1 < n:
            pending = block.new_empty(2 * b * h * frames * tokens[(src - 1) % n] * d)
            _count("p2p", block.numel() * block.element_size())
            works = dist.batch_isend_irecv([
                dist.P2POp(dist.isend, block, bands.ranks[(me + 1) % n], bands.group),
                dist.P2POp(dist.irecv, pending, bands.ranks[(me - 1) % n], bands.group)])
        k_i, v_i = block.view(2, b, h, frames * tokens[src], d).unbind(0)
        parts = [local_attention(q_t, k_i[:, :, :(t + 1) * tokens[src]], v_i[:, :, :(t + 1) * tokens[src]], None, scale)
                 for t, q_t in enumerate(q.split(tokens[me], dim=2))]
        out_i, lse_i = torch.cat([p[0] for p in parts], dim=2), torch.cat([p[1] for p in parts], dim=2)
        out, lse = (out_i.to(acc), lse_i) if out is None else merge_partials(out, lse, out_i, lse_i, into_a=True)
        if pending is not None:
            for work in works:
                work.wait()
            block = pending
    return out.to(q.dtype)


class BandNoise(ParallelStyle):
    """A block that adds ``torch.randn(height, width)`` noise to its band (LTX-Video's decoder
    resnets with ``inject_noise``): every rank draws the whole frame's noise and keeps its band's
    rows, so each rank's generator advances as one process's does and, with the generators in the
    same state (seeded alike), the noise is the single-process decode's."""

    def __init__(self, bands: Bands) -> None:
        super().__init__()
        self.bands = bands

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        bands = self.bands

        def mode(args):
            shape = tuple(args[0].shape[-2:])  # the block's input [B, C, T, h, W]: the noise is [h, W]

            def randn(*size, **kwargs):
                size = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else size
                if size != shape:
                    raise ValueError(f"BandNoise: a torch.randn of size {size} in a block over a band of {shape}; "
                                     "it takes the [height, width] noise of LTX-Video's resnets only.")
                sizes = bands.scale(shape[0])
                whole = torch.randn(sum(sizes), shape[1], **kwargs)
                return whole.narrow(0, sum(sizes[:bands.rank]), shape[0])

            return _Intercept(torch.randn, randn)

        _scoped(module, bands, mode)
        return module


def _per_position(norm: nn.Module) -> bool:
    """A norm over the channels of one position (the video VAEs' RMS norms: Wan's and Qwen-Image's
    ``RMS_norm``, LTX-Video's ``RMSNorm`` over channels moved last): band-local as it is."""
    name = type(norm).__name__
    return name.endswith("RMS_norm") or name == "RMSNorm" or isinstance(norm, (nn.LayerNorm, nn.GroupNorm))


# Per-class knowledge the module walk below cannot see from the modules alone:
# norms whose statistics come from a GroupNorm child (split by BandGroupNorm) and whose conditioning
# is band-local (CogVideoX's: the latent band, resized nearest by the band's integer scale, through
# 1x1 convolutions);
_BAND_NORMS = ("CogVideoXSpatialNorm3D",)
# mid-blocks whose attention is frame-causal over all frames (FrameCausalAttention);
_FRAME_CAUSAL_BLOCKS = ("HunyuanVideoMidBlock3D",)
# blocks that add [height, width] noise from torch.randn when built with inject_noise (BandNoise);
_NOISE_BLOCKS = ("LTXVideoResnetBlock3d",)
# encoders meshsp leaves whole however their convolutions look, and why.
_WHOLE_ENCODERS = {"AutoencoderKLLTXVideo": "patchifies its input (patch_size rows into channels) and downsamples "
                                            "space to depth, which bands of rows cannot follow"}


class VaePlan(ParallelStyle, dict):
    """``{module path: style}`` for a VAE's decoder (and encoder, where it splits); itself the style
    of the VAE, so torch's ``parallelize_module(vae, mesh, plan)`` applies it.

    ``encode``: ``None`` splits the encoder where meshsp can (``AutoencoderKL``: stride-2
    downsampling behind diffusers' ``Downsample2D`` padding) and leaves it whole elsewhere (the
    video VAEs' strided or patchifying encoders; ``bands.encoder_split`` says which); ``True``
    raises where it cannot; ``False`` leaves it whole."""

    def __init__(self, vae: nn.Module, encode: bool | None = None) -> None:
        dict.__init__(self)
        self.vae_class = type(vae).__name__
        decoder = getattr(vae, "decoder", None)
        if decoder is None or not hasattr(vae, "decode"):
            raise ValueError(f"parallelize_vae takes a diffusers VAE with a .decoder; got {self.vae_class}.")
        self.update(_part_plan(decoder, "decoder", self.vae_class))
        self["decoder"] = "SplitBands"
        self.encoder_unit = 0
        encoder = getattr(vae, "encoder", None)
        if encode is not False and encoder is not None:
            try:
                entries = _part_plan(encoder, "encoder", self.vae_class)
            except ValueError:
                if encode:
                    raise
                entries = None
            if entries is not None:
                self.update(entries)
                self.encoder_unit = 2 ** sum(1 for v in entries.values() if v == "HaloDownConv")
                self["encoder"] = "SplitBands"

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        if getattr(module, "use_tiling", False) and self.vae_class != "AutoencoderKL":
            raise ValueError(f"{self.vae_class} has tiling enabled; meshsp shares out the tiles of "
                             "AutoencoderKL only: call vae.disable_tiling() for the (exact, untiled) split decode.")
        bands, state = Bands(device_mesh), PlanState("advanced_uaa")
        bands.encoder_split = "encoder" in self
        if bands.size == 1:
            return module
        styles = {"HaloConv": lambda p: HaloConv(bands), "HaloDownConv": lambda p: HaloDownConv(bands),
                  "HaloPadConv": lambda p: HaloPadConv(bands), "BandGroupNorm": lambda p: BandGroupNorm(bands),
                  "FrameCausalAttention": lambda p: FrameCausalAttention(bands),
                  "BandNoise": lambda p: BandNoise(bands),
                  "ParallelAttention": lambda p: _BandAttention(bands, state),
                  "SplitBands": lambda p: SplitBands(bands, state, *((self.encoder_unit, "x") if p == "encoder"
                                                                      else (1, "z")))}
        for path, name in self.items():
            style = styles[name](path)
            style._apply(module.get_submodule(path), bands.ring_mesh if name == "ParallelAttention" else device_mesh)
        if self.vae_class == "AutoencoderKL":  # latents larger than a tile, with tiling on
            DistributedTiles(bands)._apply(module, device_mesh)
        module.meshsp_bands = bands  # how many ranks split the decode (read by the engine and tests)
        return module


def _part_plan(part: nn.Module, prefix: str, vae_class: str) -> dict[str, str]:
    """Styles for the decoder's or encoder's modules; ``ValueError`` for a module bands cannot split."""
    if prefix == "encoder" and vae_class in _WHOLE_ENCODERS:
        raise ValueError(f"{vae_class}: the encoder {_WHOLE_ENCODERS[vae_class]}; meshsp splits this VAE's decoder "
                         "only: encode with encode=None (whole) or False.")
    plan: dict[str, str] = {}
    frame_causal: list[str] = []  # paths of FrameCausalAttention blocks: their attention is routed there
    modules = dict(part.named_modules())
    for name, module in modules.items():
        path = f"{prefix}.{name}" if name else prefix
        kind, parent_name = type(module).__name__, name.rpartition(".")[0]
        parent = modules[parent_name] if name else None
        if isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.stride[-2] != 1:
            if type(parent).__name__ == "Downsample2D" and isinstance(module, nn.Conv2d) and module.padding == (0, 0):
                plan[path] = "HaloDownConv"
                continue
            raise ValueError(f"{vae_class}: {path} is a strided {kind} that meshsp cannot split into row bands.")
        if isinstance(module, (nn.Conv2d, nn.Conv3d)) and module.kernel_size[-2] > 1:
            # refused here, before any rank communicates
            if type(parent).__name__ in _PAD_WRAPPERS and module.padding[-2] == 0:
                _pad_halo_of(parent, f"{vae_class}: {prefix}.{parent_name}")
                plan[f"{prefix}.{parent_name}"] = "HaloPadConv"
            else:
                _halo_of(module, f"{vae_class}: {path}")
                plan[path] = "HaloConv"
        elif isinstance(module, nn.GroupNorm):
            plan[path] = "BandGroupNorm"
        elif kind in _FRAME_CAUSAL_BLOCKS and getattr(module, "add_attention", False):
            plan[path] = "FrameCausalAttention"
            frame_causal.append(path)
        elif kind in _NOISE_BLOCKS and getattr(module, "per_channel_scale1", None) is not None:
            plan[path] = "BandNoise"
        elif (hasattr(module, "processor") and hasattr(module, "to_q")) or kind.endswith("AttentionBlock"):
            # diffusers' Attention, or the video VAEs' single-head block
            if not any(path.startswith(f"{block}.") for block in frame_causal):
                plan[path] = "ParallelAttention"
        elif isinstance(module, nn.Conv1d) or "Norm" in kind and not _per_position(module) and kind not in _BAND_NORMS:
            raise ValueError(f"{vae_class}: {path} ({kind}) is not one meshsp can split into row bands.")
    return plan


def vae_plan(vae: nn.Module, encode: bool | None = None) -> VaePlan:
    """The split-decode plan of ``vae`` (paths of its decoder's convolutions, norms and attention).

    Example::

        parallelize_module(vae, mesh, vae_plan(vae))   # the same as parallelize_vae(vae, mesh)
    """
    return VaePlan(vae, encode)


def parallelize_vae(vae: nn.Module, mesh: DeviceMesh, encode: bool | None = None) -> nn.Module:
    """Split ``vae.decode`` across every rank of ``mesh`` (see the module docstring).

    Example::

        mesh = meshsp.init_sp_mesh(ParallelConfig(ulysses_degree=2, ring_degree=2))
        parallelize_vae(pipe.vae, mesh)
        image = pipe.vae.decode(latents).sample     # full latents in, the full image out, every rank
    """
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(vae, mesh, vae_plan(vae, encode))
