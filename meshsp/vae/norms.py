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

def _per_position(norm: nn.Module) -> bool:
    """A norm over the channels of one position (the video VAEs' RMS norms: Wan's and Qwen-Image's
    ``RMS_norm``, LTX-Video's ``RMSNorm`` over channels moved last): band-local as it is."""
    name = type(norm).__name__
    return name.endswith("RMS_norm") or name == "RMSNorm" or isinstance(norm, (nn.LayerNorm, nn.GroupNorm))
