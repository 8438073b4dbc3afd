"""``meshsp plan``: pick ulysses / ring / cfg degrees from a model of the whole request.

A request is text encoding, ``steps`` denoising steps and one VAE decode::

    T(layout) = T_text + steps x T_step(layout) + T_vae        speedup = T(1 GPU) / T(layout)

Text encoding runs whole on every rank and caps the speedup; the VAE decode is split across
``vae_ranks`` (meshsp's engine: every rank, ``recommend``; the published runs decoded whole); a step is ``calls`` transformer calls (2 with CFG, split by a cfg axis) of ``layers``
layer calls each. One layer call, with S tokens, hidden size d, MLP width f, U = ulysses, R = ring,
P = U x R, bf16 (2 bytes an element), costs on each rank:

* GEMMs:        2·S·(4d² + 2df) / P FLOPs at ``GEMM_EFFICIENCY`` of the dense peak;
* elementwise:  ``ELEMENTWISE_PASSES`` x S/P·d·2 bytes through HBM (norms, modulation, RoPE, GELU,
                gates and residuals run eagerly);
* attention:    4·S²·d / P FLOPs in R blocks of L = S/R keys, each at the hardware's flash-attention
                efficiency x L / (L + ``ATTENTION_HALF_TOKENS``) — short blocks run slower;
* Ulysses:      4 all-to-alls (q, k, v, out), (U-1)/U of S/P·d·2 bytes each over the link plus
                ``ALPHA_US``, not overlapped with compute;
* Ring:         R-1 steps, each sending a K/V block (2·S/R·d/U·2 bytes) while the previous block is
                computed — only the part of the transfer longer than the block is exposed — plus
                ``RING_STEP_US`` of launches and log-sum-exp merge;
* tensor parallel (T = tp): GEMMs and attention run on 1/T of the weights and heads (the
                Ulysses and Ring bytes shrink with the heads); two all-reduces a layer (attention and
                MLP outputs) of S/P·d·2 bytes, each ``ALPHA_US`` plus 2(T-1)/T of the bytes over the
                link; elementwise work on the hidden states is not split;
* sync:         ``SYNC_US`` x log2(P·T): the layer's collectives wait for the last rank of the group.

All communication uses the one ``interconnect`` given (the slowest link the job spans). The README
compares the model with the eight published runs in ``PUBLISHED`` and with runs it was not set on.
Not modelled: a single GPU whose host cannot issue kernels as fast as the GPU runs them (eager
FLUX.1-dev at 1024x1024 on one H100), GEMM efficiency falling on small shards, overlap of the
Ulysses exchange with compute, and a VAE split across ranks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import NamedTuple

__all__ = ["HARDWARE", "MODELS", "PUBLISHED", "published_markdown", "Hardware", "ModelShape", "Published", "RequestTime", "predict",
           "predict_step", "recommend", "request_time", "tokens"]

# Shared efficiencies and overheads (every hardware, every model):
GEMM_EFFICIENCY = 0.70      # cuBLAS bf16 on GEMMs with N, K >= 3072 reaches 70-80% of the dense peak
#                             (NVIDIA, "Matrix Multiplication Background User's Guide"); the low end
ELEMENTWISE_PASSES = 80     # bytes the non-matmul ops of one eager Qwen-Image block read and write,
#                             counted on `meta` with a dispatch mode: ~80 x S·d·2 bytes
ATTENTION_HALF_TOKENS = 256  # flash attention at L keys runs at L / (L + 256) of its long-sequence
#                             rate: FlashAttention-2 paper (Dao 2023), forward, head dim 128, A100:
#                             about 2/3 of the 16k rate at 512 tokens, 4/5 at 1k, 9/10 at 2k
VAE_EFFICIENCY = 0.13       # VAE decode: sglang PR #36012 measured HunyuanVideo's tiled decode of
#                             848x480x77 in 5.71 s on an H200, 733 TFLOPs as counted below: 13% of peak
ALPHA_US = 10.0             # NCCL latency of one collective on NVLink or PCIe (nccl-tests, small messages)
SYNC_US = 750.0             # per layer call and doubling of the SP group: the layer's collectives
#                             wait for the last of P ranks, log2(P) rounds deep. xDiT's published
#                             FLUX.1-dev table on 4xH100 (eager, 28 steps) takes T(P) - T(1)/P =
#                             0.64 ms per layer call at U2 and 1.60 ms at U4
RING_STEP_US = 200.0        # per ring step: the P2P pair, the block's attention with its LSE and the
#                             merge, ~10 eager ops at ~20 µs of host time each (xDiT's host-bound U4
#                             run: 2.66 ms per FLUX.1-dev block call of ~143 ops)


@dataclass(frozen=True)
class Hardware:
    peak_tflops: float           # dense bf16 tensor-core peak, vendor datasheet
    hbm_tbps: float              # memory bandwidth, vendor datasheet
    attention_efficiency: float  # flash attention's forward rate at long sequences, fraction of peak
    link_gbps: dict              # interconnect -> per-GPU, per-direction GB/s that NCCL reaches


# Link rates: 80% of the vendor's per-direction rate (NCCL's usual bus bandwidth). NVLink: H100 and
# H200 900 GB/s, H800 400 GB/s, A100 600 GB/s bidirectional; PCIe 5.0 x16 64 GB/s and 4.0 x16
# 32 GB/s a direction; InfiniBand NDR 400 Gb/s (50 GB/s) and HDR 200 Gb/s (25 GB/s), one NIC a GPU.
# The L20 has no NVLink.
HARDWARE = {
    # H100 SXM5: 989 dense bf16 TFLOPS, 3.35 TB/s HBM3; FlashAttention-2 reaches ~35% of it
    # (FlashAttention-3 paper, H100 forward benchmarks), and SDPA's flash backend is FA2
    "h100": Hardware(989, 3.35, 0.35, {"nvlink": 360, "pcie": 50, "ib": 40}),
    "h800": Hardware(989, 3.35, 0.35, {"nvlink": 160, "pcie": 50, "ib": 40}),  # H100 with 400 GB/s NVLink
    "h200": Hardware(989, 4.80, 0.35, {"nvlink": 360, "pcie": 50, "ib": 40}),  # H100 compute, 4.8 TB/s HBM3e
    # A100 80GB SXM: 312 TFLOPS, 2.04 TB/s; FlashAttention-2's forward reaches ~2/3 of peak (FA2 paper)
    "a100": Hardware(312, 2.04, 0.65, {"nvlink": 240, "pcie": 25, "ib": 20}),
    # L20: 119.5 TFLOPS, 864 GB/s GDDR6, PCIe only; Ada runs FA2's sm80 kernels (0.6 is an assumption)
    "l20": Hardware(119.5, 0.864, 0.60, {"pcie": 25, "ib": 20}),
}
INTERCONNECTS = ("nvlink", "pcie", "ib")


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    mlp: int
    heads: int
    text_tokens: int
    text_encoder_b: float    # text encoder parameters run per prompt, billions (non-embedding)
    vae_mflop_px: float      # VAE decode MFLOPs per output pixel (per frame), torch's FlopCounterMode
    #                          on the released config on `meta` at 1024x1024 (videos: 832x480x17)
    latent_scale: int = 16   # pixels per token side (VAE 8x, then 2x2 patches)
    frame_scale: int = 1     # frames per latent frame (video VAEs: 4)
    cfg: bool = True         # CFG as two transformer calls per step (what meshsp's cfg axis splits);
    #                          False: no CFG, embedded guidance, or CFG batched into one call


MODELS = {  # published configurations, rounded; text encoders: Qwen2.5-VL-7B, T5-XXL (+ CLIP-L / -G),
    #         Mistral-Small-3.1-24B, Qwen3-4B, UMT5-XXL, LLaVA-LLaMA-3-8B
    "qwen-image": ModelShape(60, 3072, 12288, 24, 256, 6.5, 11.1),
    "flux": ModelShape(57, 3072, 12288, 24, 512, 4.75, 10.0, cfg=False),
    "flux2": ModelShape(56, 6144, 18432, 48, 512, 23.0, 10.0, cfg=False),
    "z-image": ModelShape(30, 3840, 10240, 30, 256, 3.6, 10.0, cfg=False),
    "sd3": ModelShape(24, 1536, 6144, 24, 333, 5.45, 10.0, cfg=False),
    "wan": ModelShape(40, 5120, 13824, 40, 512, 4.63, 8.6, frame_scale=4),
    "ltx": ModelShape(28, 2048, 8192, 32, 128, 4.63, 0.89, latent_scale=32, frame_scale=8, cfg=False),
    "hunyuan-video": ModelShape(60, 3072, 12288, 24, 256, 7.1, 23.4, frame_scale=4, cfg=False),
    "cogvideox": ModelShape(42, 3072, 12288, 48, 226, 4.63, 18.7, frame_scale=4, cfg=False),
}


class Published(NamedTuple):
    model: str
    hardware: str
    interconnect: str
    size: int       # width = height
    steps: int
    ring: int
    ulysses: int
    speedup: float  # end to end, over one GPU


PUBLISHED = [
    # vLLM-Omni's parallelism guide: Qwen-Image, 50 steps, over diffusers on one GPU. Two transformer
    # calls a step (true CFG): 112.5 s on one H800 is 2 x 50 calls of 421 TFLOPs at 38% of peak.
    # The A100s' link is not stated; NVLink is assumed (the README shows what PCIe would give).
    Published("qwen-image", "h800", "nvlink", 2048, 50, 1, 2, 1.73),
    Published("qwen-image", "h800", "nvlink", 2048, 50, 1, 4, 2.84),
    Published("qwen-image", "h800", "nvlink", 2048, 50, 1, 8, 3.65),
    Published("qwen-image", "a100", "nvlink", 1024, 50, 2, 1, 1.51),
    Published("qwen-image", "a100", "nvlink", 1024, 50, 4, 1, 1.94),
    Published("qwen-image", "a100", "nvlink", 1024, 50, 2, 2, 1.87),
    # cache-dit's context-parallel table: FLUX.1-dev, 28 steps, L20 (PCIe only), 23.56 s on one.
    Published("flux", "l20", "pcie", 1024, 28, 1, 2, 1.71),
    Published("flux", "l20", "pcie", 1024, 28, 1, 4, 2.85),
]


_NAMES = {"qwen-image": "Qwen-Image", "flux": "FLUX.1-dev"}
_LINKS = {"nvlink": "NVLink", "pcie": "PCIe", "ib": "InfiniBand"}


def published_markdown() -> str:
    """``PUBLISHED`` against ``predict`` as the Markdown table of docs/planning.md (``meshsp plan --published``).

    Example::

        print(published_markdown())   # | Qwen-Image | H800, NVLink | 2048x2048 | 50 | U2 | 1.73x | 1.72x | yes (-1%) |
    """
    lines = ["| model | GPU, link | size | steps | degrees | published | predicted, whole request | within 15%? |",
             "|---|---|---|---|---|---|---|---|"]
    for row in PUBLISHED:
        got = predict(row.model, row.hardware, row.size, row.size, steps=row.steps, ring=row.ring,
                      ulysses=row.ulysses, interconnect=row.interconnect)
        degrees = "x".join([f"U{row.ulysses}"] * (row.ulysses > 1) + [f"R{row.ring}"] * (row.ring > 1))
        off = got / row.speedup - 1
        lines.append(f"| {_NAMES.get(row.model, row.model)} | {row.hardware.upper()}, {_LINKS[row.interconnect]} | "
                     f"{row.size}x{row.size} | {row.steps} | {degrees} | {row.speedup:.2f}x | {got:.2f}x | "
                     f"{'yes' if abs(off) <= 0.15 else 'no'} ({off * 100:+.0f}%) |")
    return "\n".join(lines)


def tokens(model: ModelShape, width: int, height: int, frames: int = 1) -> int:
    latent_frames = (frames - 1) // model.frame_scale + 1 if frames > 1 else 1
    return latent_frames * (width // model.latent_scale) * (height // model.latent_scale) + model.text_tokens


@dataclass(frozen=True)
class RequestTime:
    """Seconds of one request on each rank: text encoding, one denoising step, the VAE decode."""

    text: float
    step: float
    vae: float
    steps: int

    @property
    def total(self) -> float:
        return self.text + self.steps * self.step + self.vae


def _layer_seconds(m: ModelShape, hw: Hardware, s: int, ring: int, ulysses: int, link: str, tp: int = 1) -> float:
    p, flops, link_bps = ring * ulysses, hw.peak_tflops * 1e12, hw.link_gbps[link] * 1e9
    gemm = 2 * s * (4 * m.hidden**2 + 2 * m.hidden * m.mlp) / (flops * GEMM_EFFICIENCY) / p / tp
    elementwise = ELEMENTWISE_PASSES * s / p * m.hidden * 2 / (hw.hbm_tbps * 1e12)
    keys = s / ring  # a ring block's keys; after the Ulysses exchange a rank also holds S/R queries
    block_rate = flops * hw.attention_efficiency * keys / (keys + ATTENTION_HALF_TOKENS)
    block = 4 * keys * keys * m.hidden / ulysses / tp / block_rate
    seconds = gemm + elementwise + ring * block
    if ulysses > 1:
        shard_bytes = s / p * m.hidden / tp * 2
        seconds += 4 * (ALPHA_US * 1e-6 + (ulysses - 1) / ulysses * shard_bytes / link_bps)
    if ring > 1:
        kv_bytes = 2 * keys * m.hidden / ulysses / tp * 2
        seconds += (ring - 1) * (max(0.0, kv_bytes / link_bps - block) + RING_STEP_US * 1e-6)
    if tp > 1:
        seconds += 2 * (ALPHA_US * 1e-6 + 2 * (tp - 1) / tp * s / p * m.hidden * 2 / link_bps)
    return seconds + SYNC_US * 1e-6 * math.log2(p * tp)


def _check(model: str, hardware: str, interconnect: str, steps: int, ring: int = 1, ulysses: int = 1,
           cfg: int = 1, tp: int = 1) -> None:
    if model not in MODELS:
        raise ValueError(f"unknown model family {model!r}; known: {sorted(MODELS)}.")
    if hardware not in HARDWARE:
        raise ValueError(f"unknown hardware {hardware!r}; known: {sorted(HARDWARE)}.")
    if interconnect not in INTERCONNECTS:
        raise ValueError(f"interconnect must be nvlink, pcie or ib, got {interconnect!r}.")
    if interconnect not in HARDWARE[hardware].link_gbps:
        raise ValueError(f"{hardware} has no {interconnect} link; use one of {sorted(HARDWARE[hardware].link_gbps)}.")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    if ring < 1 or ulysses < 1 or cfg not in (1, 2):
        raise ValueError(f"ring and ulysses must be >= 1 and cfg 1 or 2, got ring={ring}, ulysses={ulysses}, "
                         f"cfg={cfg}.")
    if tp < 1 or MODELS[model].heads % tp:
        raise ValueError(f"tp must divide {model}'s {MODELS[model].heads} heads, got tp={tp}.")
    if cfg == 2 and not MODELS[model].cfg:
        raise ValueError(f"{model} makes one transformer call a step; there is no CFG branch to split (cfg=2).")


def request_time(model: str, hardware: str, width: int, height: int, *, frames: int = 1, steps: int = 50,
                 ring: int = 1, ulysses: int = 1, cfg: int = 1, interconnect: str = "nvlink",
                 tp: int = 1, vae_ranks: int = 1) -> RequestTime:
    """Modelled seconds of one request in a layout (see the module docstring). ``vae_ranks``: the
    ranks the VAE decode is split across (meshsp splits it across the whole mesh; the published
    runs decode whole, 1); its halo and norm traffic are small next to the decode and left out.

    Example::

        >>> t = request_time("qwen-image", "h800", 2048, 2048, ulysses=8)
        >>> round(t.total), round(t.step, 2)
        (29, 0.58)
    """
    _check(model, hardware, interconnect, steps, ring, ulysses, cfg, tp)
    m, hw = MODELS[model], HARDWARE[hardware]
    flops, hbm = hw.peak_tflops * 1e12, hw.hbm_tbps * 1e12
    prompts = 2 if m.cfg else 1  # with CFG the negative prompt is encoded too
    params = m.text_encoder_b * 1e9
    text = prompts * max(2 * params * m.text_tokens / (flops * GEMM_EFFICIENCY), 2 * params / hbm)
    vae = m.vae_mflop_px * 1e6 * width * height * frames / (flops * VAE_EFFICIENCY) / vae_ranks
    calls = (2 if m.cfg else 1) // cfg
    layer = _layer_seconds(m, hw, tokens(m, width, height, frames), ring, ulysses, interconnect, tp)
    exchange = SYNC_US * 1e-6 if cfg > 1 else 0.0  # the branches swap their predictions once a step
    return RequestTime(text=text, step=calls * m.layers * layer + exchange, vae=vae, steps=steps)


def predict(model: str, hardware: str, width: int, height: int, *, frames: int = 1, steps: int = 50,
            ring: int = 1, ulysses: int = 1, cfg: int = 1, interconnect: str = "nvlink", tp: int = 1,
            vae_ranks: int = 1) -> float:
    """Predicted speedup of the whole request (text encoding, ``steps`` steps, VAE decode) over one GPU.

    Example::

        >>> round(predict("qwen-image", "h800", 2048, 2048, ulysses=8), 2)
        3.69
    """
    kw = dict(frames=frames, steps=steps, interconnect=interconnect)
    one = request_time(model, hardware, width, height, **kw)
    return one.total / request_time(model, hardware, width, height, ring=ring, ulysses=ulysses, cfg=cfg, tp=tp,
                                    vae_ranks=vae_ranks, **kw).total


def predict_step(model: str, hardware: str, width: int, height: int, *, frames: int = 1, ring: int = 1,
                 ulysses: int = 1, cfg: int = 1, interconnect: str = "nvlink", tp: int = 1) -> float:
    """Predicted speedup of one denoising step over one GPU: the limit of ``predict`` as steps grow.

    Example::

        >>> round(predict_step("qwen-image", "h800", 2048, 2048, ulysses=8), 2)
        3.72
    """
    kw = dict(frames=frames, interconnect=interconnect)
    one = request_time(model, hardware, width, height, **kw)
    return one.step / request_time(model, hardware, width, height, ring=ring, ulysses=ulysses, cfg=cfg, tp=tp,
                                   **kw).step


def recommend(model: str, hardware: str, width: int, height: int, gpus: int, *, frames: int = 1,
              interconnect: str = "nvlink", steps: int = 50, max_tp: int = 8, vae_parallel: bool = True) -> list[dict]:
    """Every (cfg, ring, ulysses, tp) with cfg x ring x ulysses x tp = gpus (tp dividing the heads, at
    most ``max_tp``: one node), best predicted speedup first. ``vae_parallel``: the decode split across
    all ``gpus``, as meshsp's engine does by default.

    Example::

        >>> rows = recommend("qwen-image", "h800", 2048, 2048, 8)
        >>> rows[0]["cfg"], rows[0]["ring"], rows[0]["ulysses"]
        (2, 1, 4)
    """
    _check(model, hardware, interconnect, steps)
    if gpus < 1:
        raise ValueError(f"gpus must be a positive integer, got {gpus}.")
    m = MODELS[model]
    s = tokens(m, width, height, frames)
    rows = []
    for cfg, tp, ring in itertools.product((1, 2), range(1, min(gpus, max_tp) + 1), range(1, gpus + 1)):
        if gpus % (cfg * tp * ring) or (cfg == 2 and not m.cfg) or m.heads % tp:
            continue
        ulysses = gpus // (cfg * tp * ring)
        even = (s - m.text_tokens) % (ring * ulysses) == 0 and m.text_tokens % (ring * ulysses) == 0
        mode = "strict" if (m.heads // tp) % ulysses == 0 and even else "advanced_uaa"
        rows.append({"cfg": cfg, "ring": ring, "ulysses": ulysses, "tp": tp, "ulysses_mode": mode,
                     "speedup": predict(model, hardware, width, height, frames=frames, steps=steps, ring=ring,
                                        ulysses=ulysses, cfg=cfg, interconnect=interconnect, tp=tp,
                                        vae_ranks=gpus if vae_parallel else 1)})
    return sorted(rows, key=lambda r: -r["speedup"])
