"""``meshsp plan``: pick ulysses / ring / cfg degrees from an alpha-beta model of one denoising step.

Per transformer layer and denoising step, with S tokens, hidden size d, MLP width f, h heads and
P = ring x ulysses sequence-parallel ranks (bf16, 2 bytes per element):

* compute:   linear 2·S·(4·d² + 2·d·f) FLOPs at ``mfu_linear`` of peak; attention 4·S²·d FLOPs at
             ``mfu_attention`` of peak — both divided by P (and by cfg, which halves the work);
* Ulysses:   4 all-to-alls (q, k, v, out) of S/P·d elements, each costing ``alpha`` per peer plus
             (U-1)/U of the bytes over the link bandwidth ``beta`` — not overlapped with compute;
* Ring:      R-1 steps, each moving one K/V block (2·S/P·d elements) over the ring link while the
             previous block's attention runs: a step costs max(compute, transfer) + ``ring_step``;
* CFG:       the two branches run on the two halves (the per-step swap of predictions is small
             next to a step and is not modelled).

All communication uses the one ``interconnect`` given (the slowest link the job spans). This is a
per-step model: text encoding and VAE decoding, which do not parallelize, are outside it, so it
over-predicts end-to-end speedups at high degrees (see the README's comparison). The constants are rounded
from vendor peak numbers and the efficiencies attention kernels reach at long sequences; they are
documented in ``HARDWARE`` and compared with published scaling in the README.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

__all__ = ["HARDWARE", "MODELS", "ModelShape", "Hardware", "predict", "recommend"]


@dataclass(frozen=True)
class Hardware:
    peak_tflops: float      # dense bf16
    mfu_linear: float       # fraction of peak reached by the GEMMs
    mfu_attention: float    # fraction of peak reached by flash attention at long sequences
    beta_gbps: dict         # interconnect -> effective per-GPU bandwidth, GB/s, for all-to-all / P2P
    alpha_us: float = 10.0  # per-peer latency of one collective, microseconds
    ring_step_us: float = 30.0  # per-step overhead of the ring loop (launches, merge)


HARDWARE = {
    "h800": Hardware(989, 0.55, 0.45, {"nvlink": 160, "pcie": 25, "ib": 40}),
    "h100": Hardware(989, 0.55, 0.45, {"nvlink": 300, "pcie": 25, "ib": 40}),
    "a100": Hardware(312, 0.60, 0.50, {"nvlink": 200, "pcie": 20, "ib": 20}),
    "l20": Hardware(119, 0.65, 0.55, {"nvlink": 20, "pcie": 20, "ib": 12}),
}


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    mlp: int
    heads: int
    text_tokens: int
    latent_scale: int = 16   # pixels per token side (VAE 8x, then 2x2 patches)
    frame_scale: int = 1     # frames per latent frame (video VAEs: 4)
    cfg: bool = True         # CFG as two transformer calls per step (what meshsp's cfg axis splits);
    #                          False: no CFG, embedded guidance, or CFG batched into one call


MODELS = {  # published configurations, rounded
    "qwen-image": ModelShape(60, 3072, 12288, 24, 256),
    "flux": ModelShape(57, 3072, 12288, 24, 512, cfg=False),
    "flux2": ModelShape(56, 6144, 18432, 48, 512, cfg=False),
    "z-image": ModelShape(30, 3840, 10240, 30, 256, cfg=False),
    "sd3": ModelShape(24, 1536, 6144, 24, 333, cfg=False),
    "wan": ModelShape(40, 5120, 13824, 40, 512, frame_scale=4),
    "ltx": ModelShape(28, 2048, 8192, 32, 128, latent_scale=32, frame_scale=8, cfg=False),
    "hunyuan-video": ModelShape(60, 3072, 12288, 24, 256, frame_scale=4, cfg=False),
    "cogvideox": ModelShape(42, 3072, 12288, 48, 226, frame_scale=4, cfg=False),
}


def tokens(model: ModelShape, width: int, height: int, frames: int = 1) -> int:
    latent_frames = (frames - 1) // model.frame_scale + 1 if frames > 1 else 1
    return latent_frames * (width // model.latent_scale) * (height // model.latent_scale) + model.text_tokens


def _step_seconds(m: ModelShape, hw: Hardware, s: int, ring: int, ulysses: int, cfg: int, link: str) -> float:
    p = ring * ulysses
    flops_linear = 2 * s * (4 * m.hidden**2 + 2 * m.hidden * m.mlp)
    flops_attn = 4 * s * s * m.hidden
    t_linear = flops_linear / (hw.peak_tflops * 1e12 * hw.mfu_linear) / p
    t_attn = flops_attn / (hw.peak_tflops * 1e12 * hw.mfu_attention) / p
    t_comm = 0.0
    if ulysses > 1:
        elems = s / p * m.hidden * (ulysses - 1) / ulysses
        t_comm += 4 * (hw.alpha_us * 1e-6 * (ulysses - 1) + 2 * elems / (hw.beta_gbps[link] * 1e9))
    if ring > 1:
        block_bytes = 2 * (2 * s / p * m.hidden)
        per_block = t_attn / ring
        exposed = max(0.0, block_bytes / (hw.beta_gbps[link] * 1e9) - per_block)  # transfer not hidden
        t_attn += (ring - 1) * (exposed + hw.ring_step_us * 1e-6)
    per_layer = t_linear + t_attn + t_comm
    branches = 2 if m.cfg else 1
    return m.layers * per_layer * branches / cfg


def predict(model: str, hardware: str, width: int, height: int, *, frames: int = 1, ring: int = 1,
            ulysses: int = 1, cfg: int = 1, interconnect: str = "nvlink") -> float:
    """Predicted speedup of one denoising step over one GPU."""
    m, hw = MODELS[model], HARDWARE[hardware]
    s = tokens(m, width, height, frames)
    one = _step_seconds(m, hw, s, 1, 1, 1, interconnect)
    return one / _step_seconds(m, hw, s, ring, ulysses, cfg, interconnect)


def recommend(model: str, hardware: str, width: int, height: int, gpus: int, *, frames: int = 1,
              interconnect: str = "nvlink") -> list[dict]:
    """Every (cfg, ring, ulysses) with cfg x ring x ulysses = gpus, best predicted speedup first."""
    if model not in MODELS:
        raise ValueError(f"unknown model family {model!r}; known: {sorted(MODELS)}.")
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; known: {sorted(HARDWARE)}.")
    if gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus}.")
    if interconnect not in ("nvlink", "pcie", "ib"):
        raise ValueError(f"interconnect must be nvlink, pcie or ib, got {interconnect!r}.")
    m = MODELS[model]
    rows = []
    for cfg, ring in itertools.product((1, 2), range(1, gpus + 1)):
        if gpus % (cfg * ring) or (cfg == 2 and not m.cfg):
            continue
        ulysses = gpus // (cfg * ring)
        s = tokens(m, width, height, frames)
        even = (s - m.text_tokens) % (ring * ulysses) == 0 and m.text_tokens % (ring * ulysses) == 0
        mode = "strict" if m.heads % ulysses == 0 and even else "advanced_uaa"
        rows.append({"cfg": cfg, "ring": ring, "ulysses": ulysses, "ulysses_mode": mode,
                     "speedup": predict(model, hardware, width, height, frames=frames, ring=ring,
                                        ulysses=ulysses, cfg=cfg, interconnect=interconnect)})
    return sorted(rows, key=lambda r: -r["speedup"])


PUBLISHED = [  # (model, hardware, size, ring, ulysses, measured speedup), as published with the guide
    ("qwen-image", "h800", 2048, 1, 2, 1.73), ("qwen-image", "h800", 2048, 1, 4, 2.84),
    ("qwen-image", "h800", 2048, 1, 8, 3.65),
    ("qwen-image", "a100", 1024, 2, 1, 1.51), ("qwen-image", "a100", 1024, 4, 1, 1.94),
    ("qwen-image", "a100", 1024, 2, 2, 1.87),
    ("flux", "l20", 1024, 1, 2, 1.71), ("flux", "l20", 1024, 1, 4, 2.85),
]
