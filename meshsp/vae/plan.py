"""A VAE's split plan as data (``{module path: style name}``), derived from its modules and the
per-class tables below, and the entry points ``vae_plan`` and ``parallelize_vae``."""

from __future__ import annotations

import math

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle

from meshsp.styles import PlanState
from meshsp.vae.attention import FrameCausalAttention, _BandAttention
from meshsp.vae.bands import Bands, SplitBands
from meshsp.vae.halo import _PAD_WRAPPERS, HaloConv, HaloDownConv, HaloPadConv, _halo_of, _pad_halo_of
from meshsp.vae.noise import BandNoise
from meshsp.vae.norms import BandGroupNorm, _per_position
from meshsp.vae.tiles import DistributedTiles

__all__ = ["VaePlan", "parallelize_vae", "vae_plan"]


# Per-class knowledge the module walk below cannot see from the modules alone:
# norms whose statistics come from a GroupNorm child (split by BandGroupNorm) and whose conditioning
# is band-local (CogVideoX's: the latent band, resized nearest by the band's integer scale, through
# 1x1 convolutions);
_BAND_NORMS = ("CogVideoXSpatialNorm3D",)
# mid-blocks whose attention is frame-causal over all frames (FrameCausalAttention);
_FRAME_CAUSAL_BLOCKS = ("HunyuanVideoMidBlock3D",)
# blocks that add [height, width] noise from torch.randn when built with inject_noise (BandNoise);
_NOISE_BLOCKS = ("LTXVideoResnetBlock3d",)
# modules that pad one zero row at the bottom (and column at the right) in their forward before
# their unpadded stride-2 convolution (HaloDownConv; Wan's and Qwen-Image's Resample do it with an
# nn.ZeroPad2d before the convolution in an nn.Sequential, recognised as it is);
_BOTTOM_PADDERS = ("Downsample2D", "CogVideoXDownsample3D")
# encoders meshsp leaves whole however their convolutions look, and why.
_WHOLE_ENCODERS = {"AutoencoderKLLTXVideo": "patchifies its input (patch_size rows into channels) and downsamples "
                                            "space to depth, which bands of rows cannot follow"}


class VaePlan(ParallelStyle, dict):
    """``{module path: style}`` for a VAE's decoder (and encoder, where it splits); itself the style
    of the VAE, so torch's ``parallelize_module(vae, mesh, plan)`` applies it.

    ``encode``: ``None`` splits the encoder where meshsp can (every supported class but LTX-Video's,
    whose encoder patchifies; ``bands.encoder_split`` says which) into bands of whole multiples of
    its total downsampling in height (``encoder_unit``) and leaves it whole elsewhere; ``True``
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
                self.encoder_unit = math.prod(m.stride[-2] for m in encoder.modules()
                                              if isinstance(m, (nn.Conv2d, nn.Conv3d)))
                self["encoder"] = "SplitBands"

    def check(self, module: nn.Module, tiling: bool | None = None) -> None:
        """Raise ``ValueError`` for what ``_apply`` would refuse (tiling, as ``tiling`` says or as
        ``module`` has it), without communicating."""
        tiling = getattr(module, "use_tiling", False) if tiling is None else tiling
        if tiling and self.vae_class != "AutoencoderKL":
            raise ValueError(f"{self.vae_class} has tiling enabled; meshsp shares out the tiles of "
                             "AutoencoderKL only: call vae.disable_tiling() for the (exact, untiled) split decode.")

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.check(module)
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
        kind = type(module).__name__
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            entry = _conv_entry(module, name, modules, prefix, vae_class)
            if entry is not None:
                plan[entry[0]] = entry[1]
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


def _conv_entry(conv: nn.Module, name: str, modules: dict, prefix: str, vae_class: str) -> tuple[str, str] | None:
    """(path, style) for a convolution whose kernel reaches across rows (or whose stride skips
    them: an encoder's downsampling); ``None`` for one that stays within its rows. Refused here,
    before any rank communicates."""
    parent_name = name.rpartition(".")[0]
    parent, path, parent_path = modules[parent_name], f"{prefix}.{name}", f"{prefix}.{parent_name}".rstrip(".")
    strided = conv.stride[-2] != 1
    if strided and prefix == "encoder" and _pads_bottom_row(conv, name, parent):
        return path, "HaloDownConv"
    if type(parent).__name__ in _PAD_WRAPPERS and conv.padding[-2] == 0 and (conv.kernel_size[-2] > 1 or strided):
        if strided and prefix != "encoder":
            raise ValueError(f"{vae_class}: {path} is a strided convolution in the decoder; meshsp splits "
                             "downsampling in encoders only.")
        _pad_halo_of(parent, f"{vae_class}: {parent_path}")
        return parent_path, "HaloPadConv"
    if strided:
        raise ValueError(f"{vae_class}: {path} is a strided {type(conv).__name__} that meshsp cannot split into "
                         "row bands.")
    if conv.kernel_size[-2] > 1:
        _halo_of(conv, f"{vae_class}: {path}")
        return path, "HaloConv"
    return None


def _pads_bottom_row(conv: nn.Module, name: str, parent: nn.Module) -> bool:
    """Whether ``conv`` is a 3x3 stride-2 unpadded ``nn.Conv2d`` whose input ``parent`` pads with one
    zero row at the bottom (and column at the right): what ``HaloDownConv`` takes."""
    if not (isinstance(conv, nn.Conv2d) and conv.stride == (2, 2) and conv.padding == (0, 0)
            and conv.kernel_size == (3, 3)):
        return False
    if type(parent).__name__ in _BOTTOM_PADDERS:
        return True
    if isinstance(parent, nn.Sequential):
        index = list(parent._modules).index(name.rpartition(".")[2])
        before = parent[index - 1] if index > 0 else None
        return isinstance(before, nn.ZeroPad2d) and tuple(before.padding) == (0, 1, 0, 1)
    return False


def vae_plan(vae: nn.Module, encode: bool | None = None) -> VaePlan:
    """The split plan of ``vae`` (paths of its decoder's and encoder's convolutions, norms and
    attention).

    Example::

        parallelize_module(vae, mesh, vae_plan(vae))   # the same as parallelize_vae(vae, mesh)
    """
    return VaePlan(vae, encode)


def parallelize_vae(vae: nn.Module, mesh: DeviceMesh, encode: bool | None = None) -> nn.Module:
    """Split ``vae.decode`` (and ``vae.encode``, as ``encode`` says: see ``VaePlan``) across every
    rank of ``mesh`` (see ``meshsp.vae``'s docstring).

    Example::

        mesh = meshsp.init_sp_mesh(ParallelConfig(ulysses_degree=2, ring_degree=2))
        parallelize_vae(pipe.vae, mesh)
        image = pipe.vae.decode(latents).sample     # full latents in, the full image out, every rank
    """
    from torch.distributed.tensor.parallel import parallelize_module

    return parallelize_module(vae, mesh, vae_plan(vae, encode))
