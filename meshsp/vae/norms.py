"""Norms over a band: ``BandGroupNorm`` normalises with the whole image's per-group statistics; a
norm over the channels of one position is band-local as it is."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle

from meshsp.ops.comm import _count
from meshsp.vae.bands import Bands

__all__ = ["BandGroupNorm"]


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
    """Each band's per-group mean and variance, combined across the ranks as float64 counts, sums
    and sums of squares, then applied as one per-channel scale and shift: the band's memory once,
    as ``nn.GroupNorm`` holds it.

    In fp32 and fp64, ``torch.native_group_norm`` (nn.GroupNorm's own kernel) normalises the band
    by its own statistics, ``(x - mean_band) * rstd_band``, and returns them; the scale and shift
    then correct that in place to the whole image's. It reads the band in one vectorised pass where
    ``var_mean`` takes about three times as long on CPU, and writes it once, as nn.GroupNorm does.
    Narrower dtypes (whose kernel returns the statistics in that dtype) take fp32 ``var_mean`` of
    the band and one ``addcmul`` from ``x``."""
    b, c = x.shape[:2]
    g = norm.num_groups
    n = x[0, : c // g].numel()
    native = x.dtype in (torch.float32, torch.float64)
    if native:
        base, mean, rstd = torch.native_group_norm(x.contiguous(), None, None, b, c, n * g // c, g, norm.eps)  # [B, G]
        mean, rstd = mean.double(), rstd.double()
        var, center = rstd.pow(-2) - norm.eps, mean
    else:  # the band as it is: (x - 0) * 1
        var, mean = (t.double() for t in torch.var_mean(x.reshape(b, g, -1).float(), dim=-1, correction=0))
        base, center, rstd = x, torch.zeros_like(mean), torch.ones_like(mean)
    stats = torch.stack([mean * n, (var + mean * mean) * n, torch.full_like(mean, n)], dim=-1)
    _count("vae_norm_all_reduce", stats.numel() * stats.element_size())
    dist.all_reduce(stats, group=bands.group)
    whole_mean = stats[..., 0] / stats[..., 2]
    inv = torch.rsqrt((stats[..., 1] / stats[..., 2] - whole_mean * whole_mean).clamp_min(0) + norm.eps)  # [B, G]
    # base = (x - center) * rstd, so (x - whole_mean) * inv = base * (inv / rstd) + (center - whole_mean) * inv
    scale = (inv / rstd).repeat_interleave(c // g, dim=1)
    shift = ((center - whole_mean) * inv).repeat_interleave(c // g, dim=1)
    if norm.affine:
        scale, shift = scale * norm.weight.double(), shift * norm.weight.double() + norm.bias.double()
    shape = (b, c) + (1,) * (x.dim() - 2)
    scale, shift = scale.to(x.dtype).reshape(shape), shift.to(x.dtype).reshape(shape)
    if native:  # base is this call's own output: corrected in place, no second band-sized tensor
        return base.mul_(scale).add_(shift)
    return torch.addcmul(shift, x, scale)


def _per_position(norm: nn.Module) -> bool:
    """A norm over the channels of one position (the video VAEs' RMS norms: Wan's and Qwen-Image's
    ``RMS_norm``, LTX-Video's ``RMSNorm`` over channels moved last): band-local as it is."""
    name = type(norm).__name__
    return name.endswith("RMS_norm") or name == "RMSNorm" or isinstance(norm, (nn.LayerNorm, nn.GroupNorm))
