"""Tiny configs for diffusers video transformers: Wan derivatives, Helios, Sana video and Kandinsky 5/6.

Each entry keeps the class's real block structure at toy width (head dim 16, 2 heads, 1-2 blocks per
stack) and builds forward kwargs the way the class's diffusers pipeline does, including the
conditioning inputs (reference latents, pose/face inputs, control context, image embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from meshsp.zoo import Tiny

Rand = Callable[..., torch.Tensor]

HD = 16  # attention head dim of every tiny config
WAN_TEXT_LEN = 512  # Wan attention processors with image K/V split the image tokens off by this text length
IMG_TOKENS = 5  # CLIP image-embedding tokens (257 in the real pipelines)


def _timestep(rand: Rand, batch: int) -> torch.Tensor:
    """Flow-matching timesteps in (0, 1000), one per sample."""
    return rand(batch).sigmoid() * 1000


def _wan_text(rand: Rand, batch: int, txt: int, dim: int) -> torch.Tensor:
    """Prompt embeddings zero-padded to 512 tokens, as the Wan I2V-style pipelines pass them."""
    return torch.cat([rand(batch, txt, dim), torch.zeros(batch, WAN_TEXT_LEN - txt, dim)], dim=1)


def _first_frame_mask(batch: int, channels: int, frames: int, h: int, w: int) -> torch.Tensor:
    """The I2V latent mask: ones on the first latent frame (the conditioning image), zeros elsewhere."""
    mask = torch.zeros(batch, channels, frames, h, w)
    mask[:, :, 0] = 1.0
    return mask


def _text_mask(batch: int, txt: int, text_pad: int) -> torch.Tensor:
    """A (batch, txt) 0/1 mask with the last ``text_pad`` tokens marked as padding."""
    mask = torch.ones(batch, txt, dtype=torch.long)
    if text_pad:
        mask[:, txt - text_pad:] = 0
    return mask


def _wan_i2v_heads(n: int) -> dict:
    return {"num_attention_heads": n, "added_kv_proj_dim": n * HD}


# ---------------------------------------------------------------- ChronoEdit (Wan 2.1 I2V based)

CHRONO = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HD, in_channels=12, out_channels=4,
    text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    image_dim=16, added_kv_proj_dim=2 * HD, rope_max_seq_len=32, rope_temporal_skip_len=8,
)


def chronoedit_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                      rand: Rand) -> dict:
    """Noise latents + [4-channel first-frame mask, image-condition latents] on channels, CLIP image tokens."""
    del text_pad
    cfg = model.config
    z = cfg.out_channels
    shape = (frames, 2 * h, 2 * w)
    cond = torch.cat([_first_frame_mask(batch, 4, *shape), rand(batch, z, *shape)], dim=1)
    return dict(hidden_states=torch.cat([rand(batch, z, *shape), cond], dim=1), timestep=_timestep(rand, batch),
                encoder_hidden_states=_wan_text(rand, batch, txt, cfg.text_dim),
                encoder_hidden_states_image=rand(batch, IMG_TOKENS, cfg.image_dim))


# ---------------------------------------------------------------- Helios (multi-term memory history)

HELIOS = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HD, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_dim=(4, 6, 6),
)
HELIOS_HISTORY = (16, 2, 1)  # the pipeline's default history_sizes: long, mid, 1x frames


def helios_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int, rand: Rand) -> dict:
    """A chunk of ``frames`` latent frames plus long/mid/short history latents and their frame indices.

    As the pipeline with ``keep_first_frame=True``: indices run prefix | long | mid | 1x | chunk; the
    short history is the prefix frame and the 1x frame.
    """
    del text_pad
    c = model.config.in_channels
    n_long, n_mid, n_1x = HELIOS_HISTORY
    idx = torch.arange(1 + n_long + n_mid + n_1x + frames)
    prefix, long_, mid, one, chunk = idx.split([1, n_long, n_mid, n_1x, frames])
    lat = (2 * h, 2 * w)
    return dict(
        hidden_states=rand(batch, c, frames, *lat), timestep=_timestep(rand, batch),
        encoder_hidden_states=rand(batch, txt, model.config.text_dim),
        indices_hidden_states=chunk[None], indices_latents_history_short=torch.cat([prefix, one])[None],
        indices_latents_history_mid=mid[None], indices_latents_history_long=long_[None],
        latents_history_short=rand(batch, c, 1 + n_1x, *lat), latents_history_mid=rand(batch, c, n_mid, *lat),
        latents_history_long=rand(batch, c, n_long, *lat),
    )


# ---------------------------------------------------------------- Wan-Animate (pose + face motion)

ANIMATE = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HD, in_channels=12, latent_channels=4,
    out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", image_dim=16, added_kv_proj_dim=2 * HD, rope_max_seq_len=32,
    motion_encoder_channel_sizes={"8": 16, "4": 16}, motion_encoder_size=8, motion_style_dim=16, motion_dim=4,
    motion_encoder_dim=16, face_encoder_hidden_dim=16, face_encoder_num_heads=4, inject_face_latents_blocks=2,
    motion_encoder_batch_size=8,
)


def animate_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                   rand: Rand) -> dict:
    """``frames`` generated latent frames after one reference-image frame (the latent has frames + 1).

    Channels: noise | 4-channel mask | reference + previous-segment latents; pose latents cover the
    ``frames`` generated frames; the face video has ``4 * (frames - 1) + 1`` pixel frames.
    """
    del text_pad
    cfg = model.config
    z, size = cfg.latent_channels, cfg.motion_encoder_size
    shape = (frames + 1, 2 * h, 2 * w)
    ref = torch.cat([_first_frame_mask(batch, 4, *shape), rand(batch, z, *shape)], dim=1)
    return dict(
        hidden_states=torch.cat([rand(batch, z, *shape), ref], dim=1), timestep=_timestep(rand, batch),
        encoder_hidden_states=_wan_text(rand, batch, txt, cfg.text_dim),
        encoder_hidden_states_image=rand(batch, IMG_TOKENS, cfg.image_dim),
        pose_hidden_states=rand(batch, z, frames, 2 * h, 2 * w),
        face_pixel_values=rand(batch, 3, 4 * (frames - 1) + 1, size, size).clamp(-1, 1),
        motion_encode_batch_size=cfg.motion_encoder_batch_size,
    )


# ---------------------------------------------------------------- Wan VACE (control branch)

VACE = dict(
    patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HD, in_channels=4, out_channels=4,
    text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    rope_max_seq_len=32, vace_layers=[0, 1], vace_in_channels=24,
)
VACE_MASK_CHANNELS = 16  # the mask folded into channels (vae_scale_factor_spatial ** 2: 64 in the real model)


def vace_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int, rand: Rand) -> dict:
    """Control context = [inactive, reactive] video latents + the space-to-channel mask, no reference image."""
    del text_pad
    cfg = model.config
    z = cfg.in_channels
    shape = (frames, 2 * h, 2 * w)
    mask = (rand(batch, VACE_MASK_CHANNELS, *shape) > 0).float()
    control = torch.cat([rand(batch, 2 * z, *shape), mask], dim=1)
    return dict(hidden_states=rand(batch, z, *shape), timestep=_timestep(rand, batch),
                encoder_hidden_states=rand(batch, txt, cfg.text_dim), control_hidden_states=control,
                control_hidden_states_scale=torch.ones(len(cfg.vace_layers)))


# ---------------------------------------------------------------- Wan-Animate-2 (in-context reference K/V cache)

ANIMATE2 = dict(
    patch_size=(1, 2, 2), text_len=WAN_TEXT_LEN, in_dim=12, dim=2 * HD, ffn_dim=64, freq_dim=32, text_dim=16,
    out_dim=4, num_heads=2, num_layers=2, cross_attn_norm=True, use_img_emb=True,
)
CLIP_DIM = 1280  # Wan-Animate-2 hard-codes its CLIP projection input width


def _warm_block_mask(model, frames: int, hw: int) -> None:
    """Fill the model's block-mask cache for this grid without torch.compile (same mask, ms not seconds)."""
    from diffusers.models.transformers import transformer_wan_animate_2 as mod

    if (frames, hw) in model.block_masks:
        return
    compiled = mod.create_block_mask
    mod.create_block_mask = lambda *args, **kwargs: compiled(*args, **{**kwargs, "_compile": False})
    try:
        model.block_masks[(frames, hw)] = model.create_mask(frames, hw, model.device)
    finally:
        mod.create_block_mask = compiled


def animate2_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                    rand: Rand) -> dict:
    """A cached-mode denoising step: ``frames`` segment frames after the reference-image frame.

    Per-sample lists as the modular pipeline passes them; the K/V cache the reference pass would fill
    is pre-filled with random pre-RoPE keys/values over the ``frames``-frame driving segment.
    """
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    del text_pad
    cfg = model.config
    z, heads = cfg.out_dim, cfg.num_heads
    lat = (frames + 1, 2 * h, 2 * w)
    cache = WanAnimate2KVCache(cfg.num_layers)
    for layer in range(cfg.num_layers):
        cache.get(layer).store(rand(batch, frames * h * w, heads, cfg.dim // heads),
                               rand(batch, frames * h * w, heads, cfg.dim // heads))
    cond = [torch.cat([_first_frame_mask(1, 4, *lat)[0], rand(z, *lat)]) for _ in range(batch)]
    _warm_block_mask(model, frames, h * w)  # origin_len // 4 + 1 == frames, origin_area / 256 == h * w
    return dict(
        hidden_states=[rand(z, *lat) for _ in range(batch)], timestep=_timestep(rand, batch),
        encoder_hidden_states=[rand(txt, cfg.text_dim) for _ in range(batch)], condition_latents=cond,
        kv_cache=cache, kv_cache_mode="cached", seq_len=(frames + 1) * h * w,
        encoder_hidden_states_image=rand(batch, IMG_TOKENS, CLIP_DIM),
        reference_grid_sizes=torch.tensor([[frames, h, w]] * batch),
        origin_len=4 * (frames - 1) + 1, origin_area=[16 * h, 16 * w],
    )



# ---------------------------------------------------------------- Sana-Video (linear attention + conv FFN)

SANA_VIDEO = dict(
    in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=HD, num_layers=2,
    num_cross_attention_heads=2, cross_attention_head_dim=HD, cross_attention_dim=2 * HD, caption_channels=16,
    mlp_ratio=2.5, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
)


def sana_video_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                      rand: Rand) -> dict:
    """The text-to-video pipeline: latents, Gemma prompt embeddings with their padding mask, one timestep."""
    cfg = model.config
    return dict(hidden_states=rand(batch, cfg.in_channels, frames, 2 * h, 2 * w),
                encoder_hidden_states=rand(batch, txt, cfg.caption_channels),
                encoder_attention_mask=_text_mask(batch, txt, text_pad), timestep=_timestep(rand, batch))


def _sana_video_heads(n: int) -> dict:
    return {"num_attention_heads": n, "num_cross_attention_heads": n, "cross_attention_dim": n * HD}


# ---------------------------------------------------------------- SANA-WM (camera-controlled world model)

SANA_WM = dict(
    in_channels=4, num_layers=2, hidden_size=2 * HD, num_attention_heads=2, patch_size=(1, 1, 1),
    softmax_every_n=2, linear_head_dim=HD, t_kernel_size=3, conv_kernel_size=4, caption_channels=16,
    mlp_ratio=3.0, chunk_plucker_channels=48, chunk_plucker_post_attn_blocks=2,
)


def _camera_raymap(rand: Rand, batch: int, frames: int, h: int, w: int) -> torch.Tensor:
    """(batch, frames, 20): relative camera-to-world 4x4 (identity first) + latent-pixel intrinsics."""
    c2w = torch.eye(4).repeat(batch, frames, 1, 1)
    c2w[..., :3, 3] = torch.arange(frames).view(1, frames, 1) * 0.1 * torch.tensor([0.2, 0.1, 1.0])
    c2w[:, 1:, :3, 3] += 0.01 * rand(batch, frames - 1, 3)
    intrinsics = torch.tensor([float(w), float(h), w / 2, h / 2]).expand(batch, frames, 4)
    return torch.cat([c2w.flatten(-2), intrinsics], dim=-1)


def sana_wm_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                   rand: Rand) -> dict:
    """Per-frame timesteps (B, 1, T) with the first (conditioning) frame at 0, Gemma text (B, 1, L, D)
    with its mask, the per-latent-frame camera raymap and chunked Plucker rays (48 = 6 x 8 frames)."""
    cfg = model.config
    timestep = _timestep(rand, batch).view(batch, 1, 1).repeat(1, 1, frames)
    timestep[:, :, 0] = 0.0
    return dict(
        hidden_states=rand(batch, cfg.in_channels, frames, h, w), timestep=timestep,
        encoder_hidden_states=rand(batch, 1, txt, cfg.caption_channels),
        mask=_text_mask(batch, txt, text_pad),
        data_info={"img_hw": torch.tensor([[32.0 * h, 32.0 * w]])},
        camera_conditions=_camera_raymap(rand, batch, frames, h, w),
        chunk_plucker=rand(batch, cfg.chunk_plucker_channels, frames, h, w),
    )


# ---------------------------------------------------------------- SANA-WM stage-2 refiner (LTX-2, sliding-window KV)

REFINER = dict(
    in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=HD,
    cross_attention_dim=2 * HD, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
    audio_attention_head_dim=HD, audio_cross_attention_dim=2 * HD, num_layers=2, caption_channels=16,
)
REFINER_FPS = 24.0


def refiner_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                   rand: Rand) -> dict:
    """An 'inject' denoising step of one AR block of ``frames`` frames.

    The KV cache holds a 1-frame attention sink (pre-RoPE, re-RoPE'd at its sliding offset) and
    ``frames`` frames of refined history (post-RoPE), both random; so keys cover 1 + 2 * frames frames.
    """
    from diffusers.models.transformers.transformer_sana_wm_refiner import SanaWMRefinerKVCache

    cfg = model.config
    inner = cfg.num_attention_heads * cfg.attention_head_dim
    sink, history = 1, frames
    start = sink + history
    cache = SanaWMRefinerKVCache(cfg.num_layers)
    for layer in range(cfg.num_layers):
        cache.get(layer).store_sink(rand(batch, sink * h * w, inner), rand(batch, sink * h * w, inner))
        cache.get(layer).store_history(rand(batch, history * h * w, inner), rand(batch, history * h * w, inner))
    rope = model.build_rotary_emb_for_absolute_positions
    cache.sink_pe = rope(batch_size=batch, frame_positions=list(range(start - history - sink, start - history)),
                         height=h, width=w, device=model.device, fps=REFINER_FPS)
    seq = frames * h * w
    return dict(
        hidden_states=rand(batch, seq, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.caption_channels),
        timestep=_timestep(rand, batch)[:, None].expand(batch, seq).contiguous(),
        video_rotary_emb=rope(batch_size=batch, frame_positions=list(range(start, start + frames)), height=h,
                              width=w, device=model.device, fps=REFINER_FPS),
        encoder_attention_mask=_text_mask(batch, txt, text_pad), kv_cache=cache, kv_cache_mode="inject",
    )


def _refiner_heads(n: int) -> dict:
    return {"num_attention_heads": n, "cross_attention_dim": n * HD, "audio_num_attention_heads": n,
            "audio_cross_attention_dim": n * HD}


# ---------------------------------------------------------------- Kandinsky 5 / 6 (channel-last latents)

KANDINSKY5 = dict(
    in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=16, time_dim=32, patch_size=(1, 2, 2),
    model_dim=2 * HD, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=True,
)


def _visual_cond_latents(rand: Rand, batch: int, frames: int, h: int, w: int, c: int) -> torch.Tensor:
    """(B, F, H, W, 2c + 1): noisy latent | conditioning latent | conditioning mask, channel-last."""
    return torch.cat([rand(batch, frames, h, w, c), torch.zeros(batch, frames, h, w, c + 1)], dim=-1)


def kandinsky5_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                      rand: Rand) -> dict:
    """Text-to-video: Qwen token embeddings (no mask), pooled CLIP embedding, RoPE positions per axis."""
    del text_pad
    cfg = model.config
    return dict(
        hidden_states=_visual_cond_latents(rand, batch, frames, 2 * h, 2 * w, cfg.in_visual_dim),
        encoder_hidden_states=rand(batch, txt, cfg.in_text_dim), timestep=_timestep(rand, batch),
        pooled_projections=rand(batch, cfg.in_text_dim2),
        visual_rope_pos=[torch.arange(frames), torch.arange(h), torch.arange(w)], text_rope_pos=torch.arange(txt),
        scale_factor=(1, 2, 2), sparse_params=None,
    )


KANDINSKY6 = dict(
    in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=16, time_dim=32, patch_size=(1, 2, 2),
    model_dim=2 * HD, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6), visual_cond=True,
    in_audio_dim=4, out_audio_dim=4, scale_factor=(1.0, 2.0, 2.0), visual_token_type_num_embeddings=2,
)
K6_FPS, K6_AUDIO_RATE, K6_AUDIO_HOP = 24.0, 44_100, 1024  # the pipeline's defaults without an audio VAE


def kandinsky6_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                      rand: Rand) -> dict:
    """Text+image-to-video+audio: ``frames`` generated frames plus the reference image as a tail frame
    (RoPE time 0, token type 1, cond mask 1), audio latents sized for the video length, boolean text mask."""
    cfg = model.config
    c, lat = cfg.in_visual_dim, (2 * h, 2 * w)
    latents = torch.cat([rand(batch, frames + 1, *lat, c), torch.zeros(batch, frames + 1, *lat, c + 1)], dim=-1)
    latents[:, -1, :, :, -1] = 1.0  # the tail (reference image) frame is marked as conditioning
    token_types = torch.zeros(batch, frames + 1, dtype=torch.long)
    token_types[:, -1] = 1
    audio_len = math.ceil(((frames - 1) * 4 + 1) / K6_FPS * K6_AUDIO_RATE / K6_AUDIO_HOP)
    return dict(
        hidden_states=latents, encoder_hidden_states=rand(batch, txt, cfg.in_text_dim),
        pooled_projections=rand(batch, cfg.in_text_dim2), timestep=_timestep(rand, batch),
        audio_hidden_states=rand(batch, audio_len, cfg.in_audio_dim),
        visual_rope_pos=(torch.cat([torch.arange(frames), torch.zeros(1, dtype=torch.long)]), torch.arange(h),
                         torch.arange(w)),
        encoder_attention_mask=_text_mask(batch, txt, text_pad).bool(), visual_token_type_ids=token_types,
    )


KANDINSKY6_SR = dict(
    in_visual_dim=4, out_visual_dim=4, time_dim=32, patch_size=(1, 1, 1), model_dim=2 * HD, ff_dim=64,
    num_visual_blocks=2, axes_dims=(4, 6, 6), scale_factor=(1.0, 2.0, 2.0), nabla_threshold=0.8,
    nabla_window=(11, 7, 7),
)
K6SR_BLOCK = 8  # NABLA attention tiles the token grid into 8x8 blocks


def kandinsky6_sr_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                         rand: Rand) -> dict:
    """An anchor-free latent tile, as the pipeline runs the released checkpoints: [latent | zero anchor |
    zero anchor mask]. The token grid is rounded up to whole 8x8 NABLA blocks (patch 1)."""
    del txt, text_pad
    lat = (K6SR_BLOCK * math.ceil(h / K6SR_BLOCK), K6SR_BLOCK * math.ceil(w / K6SR_BLOCK))
    return dict(hidden_states=_visual_cond_latents(rand, batch, frames, *lat, model.config.in_visual_dim),
                timestep=_timestep(rand, batch))


ENTRIES = [
    Tiny("ChronoEditTransformer3DModel", CHRONO, chronoedit_inputs, _wan_i2v_heads, video=True,
         note="Wan 2.1 I2V structure: text is zero-padded to 512 tokens as in the pipeline (the attention "
              "processor splits image tokens off by that hard-coded length), so cross-attention keys are "
              f"{IMG_TOKENS} image tokens + 512 text tokens. frames=2 takes the temporal-skip RoPE path "
              "(the pipeline's edit case: input and output frame). Head dim 16 makes the RoPE split "
              "(6,5,5) differ from the frequency table's (8,4,4); it still runs. frames=1 is not a pipeline "
              "case (it always has >= 2 latent frames). _cp_plan splits rope/blocks.0 hidden_states only, "
              "never the text."),
    Tiny("HeliosTransformer3DModel", HELIOS, helios_inputs, lambda n: {"num_attention_heads": n}, video=True,
         note="History tokens (long/mid/short memory latents, patchified by separate Conv3d with 4x/2x/1x "
              "kernels after padding) are prepended to the chunk's tokens; cross-attention and the output "
              "use only the last original_context_length tokens (an int passed to every block). _cp_plan "
              "names 40 blocks; the tiny model has 2."),
    Tiny("WanAnimateTransformer3DModel", ANIMATE, animate_inputs, _wan_i2v_heads, video=True,
         note="The latent has frames + 1 frames (reference image frame first); output has the same. Text "
              "zero-padded to 512 (image K/V split). A face adapter after block 0 (every "
              "inject_face_latents_blocks) attends per latent frame: batch*frames SDPA batches of h*w "
              "queries over 5 face tokens. Motion encoder (2D convs) runs on 8x8 face pixels. The plan gives "
              "every rank whole latent frames, so the coverage runs take 3 generated frames (4 latent): one "
              "per rank of U2xR2.",
         grid={"frames": 3}),
    Tiny("WanVACETransformer3DModel", VACE, vace_inputs, lambda n: {"num_attention_heads": n}, video=True,
         note="Control branch of 2 VACE blocks (vace_layers=[0, 1]) runs over the control tokens first, "
              "then its hints are added after the matching main blocks. vace_in_channels = 2*4 latent + "
              "16 mask channels (64 in the real model)."),
    Tiny("WanAnimate2Transformer3DModel", ANIMATE2, animate2_inputs,
         lambda n: {"num_heads": n, "dim": n * HD}, video=True,
         note="Denoising (kv_cache_mode='cached') forward; the reference pass ('extract') that fills the "
              "K/V cache is replaced by random cached K/V. Self-attention is NOT SDPA: flex_attention with "
              "a BlockMask over a 128-padded [generation | reference] buffer, each generation frame seeing "
              "all generation tokens plus the same-index reference frame (the model builds the mask with "
              "torch.compile, seconds on CPU; inputs() pre-fills model.block_masks uncompiled). Inputs are "
              "per-sample lists; seq_len is an int token count; text is zero-padded to text_len=512 inside the model. "
              "Latent has frames + 1 frames (reference image slot). Only cross-attention (text, CLIP image) "
              "goes through SDPA."),
    Tiny("SanaVideoTransformer3DModel", SANA_VIDEO, sana_video_inputs, _sana_video_heads, video=True,
         text_mask=True,
         note="Self-attention is ReLU linear attention with RoPE (matmuls, no SDPA); only the masked "
              "cross-attention (additive -1e4 bias from the 0/1 text mask) is SDPA. The FFN (GLUMBTempConv) "
              "runs 3x3 depthwise convs over each frame's h x w grid and a kernel-3 temporal conv, and blocks "
              "get frames/height/width ints. I2V passes per-token timesteps (B, 1, F, h, w) instead.",
         grid={"frames": 4}),  # SP ranks hold whole frames: 4 for up to 4 ranks
    Tiny("SanaWMTransformer3DModel", SANA_WM, sana_wm_inputs,
         lambda n: {"num_attention_heads": n, "hidden_size": n * HD}, video=True, text_mask=True,
         note="patch 1 (token grid = latent grid). Block 0 is a bidirectional gated-delta-net linear "
              "attention (chunked recurrence over frames, short convs; not SDPA), block 1 "
              "(softmax_every_n=2) full softmax self-attention via F.scaled_dot_product_attention; both "
              "with a camera (UCPE) path whose softmax variant calls SDPA in bf16 with head dim zero-padded "
              "16 -> 128. Text cross-attention takes a boolean (B, 1, 1, L) mask. Per-frame timesteps "
              "(B, 1, T). The GDN short-conv weights are "
              "zero-initialised, so that branch contributes nothing with random init."),
    Tiny("SanaWMLTX2RefinerTransformer3DModel", REFINER, refiner_inputs, _refiner_heads, video=True,
         text_mask=True,
         note="Video-only LTX-2 forward on packed tokens (B, frames*h*w, C) with caller-built RoPE at "
              "absolute frame positions and per-token timesteps (B, seq). Self-attention queries are the "
              "active block only; keys/values are [sink | history | current] from a sliding-window KV cache "
              "(random here, filled by capture passes in the pipeline), so K is (1 + 2*frames)*h*w long "
              "while Q is frames*h*w. Audio modules are built (tiny) but unused."),
    Tiny("Kandinsky5Transformer3DModel", KANDINSKY5, kandinsky5_inputs, lambda n: {"model_dim": n * HD},
         video=True,
         note="Latents are channel-last (B, F, H, W, 2C+1) with the visual_cond channels; heads = model_dim / "
              "sum(axes_dims). Text blocks refine the text tokens first (text self-attention), then visual "
              "blocks do self- and cross-attention. No text mask: the pipeline pads a batch without one. "
              "attention_type='nabla' (flex) not used; regular SDPA."),
    Tiny("Kandinsky6Transformer3DModel", KANDINSKY6, kandinsky6_inputs, lambda n: {"model_dim": n * HD},
         video=True, text_mask=True,
         note="Joint video+audio: latent has frames + 1 frames (reference image appended as the tail frame at "
              "RoPE time 0, token type 1); audio tokens ceil(((frames-1)*4+1)/24*44100/1024). Separate video "
              "and audio text encoders, then fused blocks with video/audio self-, text cross- and "
              "video<->audio cross-attention. Boolean (B, txt) text mask passed straight to attention. Output "
              "sample is video only (audio_sample alongside)."),
    Tiny("Kandinsky6SRTransformer3DModel", KANDINSKY6_SR, kandinsky6_sr_inputs, lambda n: {"model_dim": n * HD},
         video=True,
         note="The token grid must divide into 8x8 blocks, so h and w are rounded up to multiples of 8 "
              "(h=3, w=5 runs an 8x8 grid; pass multiples of 8 for grids that scale; an (8h) x (8w) grid costs "
              "~0.1-1.5 s per forward on CPU). Patch 1. Self-attention only (no text), NOT SDPA: "
              "flex_attention with a per-call NABLA BlockMask from block-mean q/k statistics OR'd with a "
              "sliding-tile prior; tokens are reordered into 8x8 local blocks before the blocks. Eager flex "
              "on CPU materialises the full score matrix."),
]

REFUSED: dict[str, str] = {}
