"""Tiny zoo entries, group E: MiniMax-H3, AnyFlow(-FAR), DreamLite, ERNIE/GLM-Image, JoyImage(-Plus), Nucleus-MoE.

Inputs follow each class's own pipeline (``diffusers/pipelines/...``, ``modular_pipelines/minimax_h3``):
the same tensor layouts, position ids, masks and timestep scales, at toy sizes. Reference images, audio
and cached context use small fixed sizes so only ``h``, ``w``, ``frames`` and ``txt`` move the grid.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshsp.zoo import Tiny

REF_HW = (2, 2)  # token grid of a reference image (edit models that accept any size)
AUDIO_LATENTS = 3  # audio latents per channel (MiniMax-H3 packs 2 channels)
FAR_CONTEXT = (1, 1, 1)  # frames of the already generated AnyFlow-FAR chunks held in the KV cache

Rand = Callable[..., torch.Tensor]


def _t(rand: Rand, batch: int) -> torch.Tensor:
    """Seeded timesteps in (0, 1)."""
    return rand(batch).sigmoid()


def _ids(rand: Rand, shape: tuple[int, ...], high: int) -> torch.Tensor:
    """Seeded integer ids in [0, high) drawn from the seeded float stream."""
    return (rand(*shape).abs() * 997).long() % high


def _normal_(params: list[torch.Tensor], fan_in: list[int]) -> None:
    """Seeded fan-in scaled normal init (the same weights on every rank)."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p, n in zip(params, fan_in):
            p.normal_(0.0, n ** -0.5, generator=g)


def init_nucleus_experts(model: torch.nn.Module) -> None:
    """Initialise the routed experts, which the class allocates with ``torch.empty`` and never initialises."""
    if getattr(model, "_zoo_experts_init", False):
        return
    experts = [m for m in model.modules() if type(m).__name__ == "SwiGLUExperts"]
    params = [p for e in experts for p in (e.gate_up_proj, e.down_proj)]
    _normal_(params, [p.shape[-2] for p in params])
    model._zoo_experts_init = True


def init_ernie_zeros(model: torch.nn.Module) -> None:
    """Give ERNIE-Image's zero-initialised AdaLN and output projections random weights (else the output is 0)."""
    layers = [model.adaLN_modulation[-1], model.final_linear]
    _normal_([m.weight for m in layers], [m.in_features for m in layers])


def _keep(batch: int, txt: int, text_pad: int) -> torch.Tensor:
    """Text mask, True for real tokens; the last ``text_pad`` tokens are padding."""
    mask = torch.ones(batch, txt, dtype=torch.bool)
    if text_pad:
        mask[:, txt - text_pad:] = False
    return mask


# --- MiniMax-H3: one packed [text | audio | video] sequence, per-row AdaLN, no cross-attention ---------------------

def _minimax_h3_inputs(model: torch.nn.Module, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                       rand: Rand) -> dict:
    from diffusers.modular_pipelines.minimax_h3.before_denoise import (
        MiniMaxH3PrepareLayoutStep, MiniMaxH3SetTimestepsStep)
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import (
        MINIMAX_H3_AUDIO_CHANNELS, MINIMAX_H3_AUDIO_TAG, MINIMAX_H3_TEXT_TAG, MINIMAX_H3_VIDEO_TAG)

    cfg = model.config
    pt, ph, pw = cfg.patch_size
    position_ids, token_tags, video_idx, audio_idx, text_idx, _, _ = MiniMaxH3PrepareLayoutStep.build_packed_sequence(
        text_token_tags=torch.full((txt,), MINIMAX_H3_TEXT_TAG), num_latent_frames=frames * pt,
        latent_height=h * ph, latent_width=w * pw, num_audio_latents=AUDIO_LATENTS, patch_size=tuple(cfg.patch_size),
        audio_channels=MINIMAX_H3_AUDIO_CHANNELS, audio_tag=MINIMAX_H3_AUDIO_TAG, video_tag=MINIMAX_H3_VIDEO_TAG)
    t_video, t_audio = _t(rand, 2).tolist()  # the (t2va) pipeline steps video and audio on separate schedules
    timestep, timestep_indices = MiniMaxH3SetTimestepsStep.build_row_timesteps(
        video_idx, audio_idx, 0, 0, txt, t_video, t_audio, max(t_video, 0.999), 1.0)
    return dict(hidden_states=rand(batch, video_idx.numel(), cfg.in_channels * pt * ph * pw),
                audio_hidden_states=rand(batch, audio_idx.numel(), cfg.audio_in_channels),
                encoder_hidden_states=rand(batch, txt, cfg.text_dim), timestep=timestep,
                timestep_indices=timestep_indices, token_tags=token_tags, position_ids=position_ids,
                video_indices=video_idx, audio_indices=audio_idx, text_indices=text_idx)


# --- AnyFlow: Wan backbone with a (t, r) flow-map embedding, per-frame timesteps -----------------------------------

def _anyflow_inputs(model: torch.nn.Module, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                    rand: Rand) -> dict:
    cfg = model.config
    t, r = _t(rand, batch), _t(rand, batch)
    t, r = torch.maximum(t, r) * 1000, torch.minimum(t, r) * 1000
    return dict(hidden_states=rand(batch, frames, cfg.in_channels, h * cfg.patch_size[1], w * cfg.patch_size[2]),
                timestep=t[:, None].repeat(1, frames), r_timestep=r[:, None].repeat(1, frames),
                encoder_hidden_states=rand(batch, txt, cfg.text_dim))


def _anyflow_far_inputs(model: torch.nn.Module, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                        rand: Rand) -> dict:
    """One denoising step of the last chunk, attending to a KV cache of the earlier chunks (pipeline's main path)."""
    cfg = model.config
    H, W = h * cfg.patch_size[1], w * cfg.patch_size[2]
    chunks = [*FAR_CONTEXT, frames]
    full_tpf = h * w
    comp_tpf = (H // cfg.compressed_patch_size[1]) * (W // cfg.compressed_patch_size[2])
    n_comp = max(len(chunks) - cfg.full_chunk_limit, 0)
    n_full_cached = sum(chunks[n_comp:-1]) * full_tpf
    n_comp_cached = sum(chunks[:n_comp]) * comp_tpf
    heads, hd = cfg.num_attention_heads, cfg.attention_head_dim
    kv_cache = {i: {"full_cache": rand(2, batch, heads, n_full_cached, hd),
                    "compressed_cache": rand(2, batch, heads, max(n_comp_cached, 1), hd)}
                for i in range(cfg.num_layers)}
    t, r = _t(rand, batch), _t(rand, batch)
    t, r = torch.maximum(t, r) * 1000, torch.minimum(t, r) * 1000
    return dict(hidden_states=rand(batch, frames, cfg.in_channels, H, W), timestep=t[:, None].repeat(1, frames),
                r_timestep=r[:, None].repeat(1, frames), encoder_hidden_states=rand(batch, txt, cfg.text_dim),
                chunk_partition=chunks, kv_cache=kv_cache,
                kv_cache_flag={"num_cached_chunks": len(chunks) - 1, "is_cache_step": False}, return_dict=False)


# --- DreamLite: the transformer inside the DreamLite UNet (feature map in, feature map out) --------------------------

def _dreamlite_inputs(model: torch.nn.Module, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                      rand: Rand) -> dict:
    cfg = model.config
    # The UNet turns the 2-D text mask into an additive bias of shape (B, 1, txt) before its blocks.
    bias = (1 - _keep(batch, txt, text_pad).float()) * -10000.0
    return dict(hidden_states=rand(batch, cfg.in_channels, h, w),
                encoder_hidden_states=rand(batch, txt, cfg.cross_attention_dim),
                encoder_attention_mask=bias[:, None, :])


# --- ERNIE-Image: single stream [image | text], per-sample text lengths --------------------------------------------

def _ernie_inputs(model: torch.nn.Module, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                  rand: Rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p), timestep=_t(rand, batch) * 1000,
                text_bth=rand(batch, txt, cfg.text_in_dim), text_lens=torch.full((batch,), txt - text_pad))


# --- GLM-Image: joint [text | image] attention, prior (AR) tokens added to image tokens -----------------------------

def _glm_inputs(model: torch.nn.Module, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                rand: Rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p),
                encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim),
                prior_token_id=_ids(rand, (batch, h * w), cfg.prior_vq_quantizer_codebook_size),
                prior_token_drop=torch.zeros(batch, h * w, dtype=torch.bool),
                timestep=_t(rand, batch) * 1000 - 1,
                target_size=torch.tensor([[h * p * 8.0, w * p * 8.0]]).repeat(batch, 1),
                crop_coords=torch.zeros(batch, 2))


# --- JoyImage Edit: [noise | reference] items of the same size, joint attention with text ---------------------------

def _joyimage_inputs(model: torch.nn.Module, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                     rand: Rand) -> dict:
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    # (B, items, C, T, H, W): one reference latent (same size as the target, as the pipeline requires), then noise.
    return dict(hidden_states=rand(batch, 2, cfg.in_channels, pt, h * ph, w * pw), timestep=_t(rand, batch) * 1000,
                encoder_hidden_states=rand(batch, txt, cfg.text_dim))


def _joyimage_plus_inputs(model: torch.nn.Module, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                          rand: Rand) -> dict:
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    shapes = [(1, h, w), (1, *REF_HW)]  # target first, then a small reference image
    n = sum(a * b * c for a, b, c in shapes)
    return dict(hidden_states=rand(batch, n, cfg.in_channels, pt, ph, pw), timestep=_t(rand, batch) * 1000,
                encoder_hidden_states=rand(batch, txt, cfg.text_dim),
                encoder_hidden_states_mask=_keep(batch, txt, text_pad).long(), shape_list=[shapes] * batch)


# --- Nucleus-MoE: image queries attend to [image | text] keys, expert-choice MoE ------------------------------------

def _nucleus_inputs(model: torch.nn.Module, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                    rand: Rand) -> dict:
    init_nucleus_experts(model)  # idempotent; without it the experts hold uninitialised memory
    cfg = model.config
    mask = _keep(batch, txt, text_pad)
    return dict(hidden_states=rand(batch, h * w, cfg.in_channels), img_shapes=[(1, h, w)] * batch,
                encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                encoder_hidden_states_mask=None if mask.all() else mask, timestep=_t(rand, batch))


ENTRIES = [
    Tiny("MiniMaxH3Transformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=1,
        ffn_dim=64, in_channels=4, audio_in_channels=8, patch_size=(1, 2, 2), text_dim=16, freq_dim=32,
        time_embed_hidden_dim=32, time_embed_dim=16, rope_freq_dim=2),
        _minimax_h3_inputs, lambda n: {"num_attention_heads": n}, video=True,
        note="one packed 1-D sequence [text | audio | video] (layout from the modular pipeline); hidden_size is "
             "independent of heads*head_dim; RoPE rotates 12 of 16 channels (2*3*rope_freq_dim); "
             f"{2 * AUDIO_LATENTS} audio rows; per-row AdaLN picked by index_select; text refiner self-attention "
             "runs first on text alone; output is token rows, not a latent"),
    Tiny("AnyFlowTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64),
        _anyflow_inputs, lambda n: {"num_attention_heads": n}, video=True,
        note="latent is (B, F, C, H, W); per-frame (t, r) timesteps expanded to per-token modulation"),
    Tiny("AnyFlowFARTransformer3DModel", dict(
        patch_size=(1, 2, 2), compressed_patch_size=(1, 4, 4), full_chunk_limit=3, num_attention_heads=2,
        attention_head_dim=16, in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2,
        rope_max_seq_len=64, chunk_partition=(1, 1, 1, 1)),
        _anyflow_far_inputs, lambda n: {"num_attention_heads": n}, video=True,
        note="autoregressive step of the last chunk: self-attention keys = KV cache (1 compressed 4x4-patch frame + "
             "2 full frames) + current chunk; self-attention runs through flex_attention (forced 'flex' backend, "
             "q/k/v zero-padded by the query's pad-to-128 amount, no mask, so padded keys take softmax weight), "
             "only cross-attention goes through SDPA; returns (sample, kv_cache)"),
    Tiny("DreamLiteTransformer2DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=32, num_layers=1, norm_num_groups=8,
        cross_attention_dim=32, qk_norm="rms_norm", ff_mult=6),
        _dreamlite_inputs, lambda n: {"num_attention_heads": n, "in_channels": 16 * n}, text_mask=True,
        note="a transformer inside the DreamLite UNet, not a standalone DiT: input is a UNet feature map "
             "(in_channels = heads*head_dim), GroupNorm over the whole token grid and 1x1 conv in/out, residual "
             "around the block; self-attn then cross-attn to text with an additive text bias (B, 1, txt); "
             "the UNet uses 1 KV head through its own DreamLiteAttnProcessor2_0, but the standalone class keeps the "
             "stock AttnProcessor2_0, which breaks with num_kv_heads != heads, so KV heads = heads here"),
    Tiny("ErnieImageTransformer2DModel", dict(
        hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=16, out_channels=16,
        patch_size=1, text_in_dim=16, rope_axes_dim=(4, 6, 6)),
        _ernie_inputs, lambda n: {"num_attention_heads": n, "hidden_size": 16 * n}, text_mask=True,
        extra={"init": init_ernie_zeros},
        note="sequence [image | text] in (S, B, D) layout; text_lens is a per-sample int tensor that sets the mask "
             "and the image tokens' first RoPE coordinate; adaLN_modulation and final_linear are zero-initialised, "
             "so a fresh model outputs exactly zero and every block is the identity: call extra['init'] after "
             "build for numeric comparisons"),
    Tiny("GlmImageTransformer2DModel", dict(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=16, time_embed_dim=32, condition_dim=8, prior_vq_quantizer_codebook_size=64),
        _glm_inputs, lambda n: {"num_attention_heads": n},
        note="joint [text | image] attention, RoPE on image tokens only; prior-token embeddings (one id per image "
             "token) are added to the image tokens; the pipeline passes no text mask; the image-edit path (KV cache "
             "written by a separate pass over the condition image) is not exercised"),
    Tiny("JoyImageEditTransformer3DModel", dict(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
        rope_dim_list=[4, 6, 6]),
        _joyimage_inputs, lambda n: {"num_attention_heads": n, "hidden_size": 16 * n},
        note="edit input (B, 2, C, 1, H, W): the reference latent must match the target size, so image tokens are "
             "2*h*w (noise item moved first, RoPE frame index = item); joint [image | text] attention, no text mask"),
    Tiny("JoyImageEditPlusTransformer3DModel", dict(
        patch_size=[1, 2, 2], in_channels=4, hidden_size=32, num_attention_heads=2, text_dim=16, num_layers=2,
        rope_dim_list=[4, 6, 6]),
        _joyimage_plus_inputs, lambda n: {"num_attention_heads": n, "hidden_size": 16 * n}, text_mask=True,
        note=f"pre-patchified (B, N, C, 1, 2, 2): target h*w patches then a {REF_HW[0]}x{REF_HW[1]} reference; "
             "shape_list per sample; samples with different references are zero-padded to the longest and masked; "
             "key mask (B, 1, 1, N + txt)"),
    Tiny("NucleusMoEImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        num_key_value_heads=1, joint_attention_dim=16, axes_dims_rope=(4, 6, 6), mlp_ratio=6.0,
        dense_moe_strategy="leave_first_block_dense", num_experts=4, moe_intermediate_dim=32, capacity_factors=2.0),
        _nucleus_inputs, lambda n: {"num_attention_heads": n}, text_mask=True,
        extra={"init": init_nucleus_experts},
        note="image-only queries attend to [image | text] keys (text K/V projected per block, GQA 1 KV head); "
             "block 0 dense, block 1 expert-choice MoE: each expert takes the top ceil(cf*S/E) tokens of the "
             "whole image sequence, so routing depends on every other token; the expert weights are torch.empty in "
             "the class, so extra['init'] seeds them (the input builder also calls it once per model)"),
]

REFUSED: dict[str, str] = {}
