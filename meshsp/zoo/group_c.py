"""Tiny configs for diffusers video transformers: LTX-2, HunyuanVideo 1.5 / Framepack, Mochi, Cosmos,
SkyReels-V2, Allegro, Latte, EasyAnimate, ConsisID and Motif-Video.

Each ``inputs`` builds the forward kwargs the class's own pipeline passes (text-to-video path unless
noted), for an ``h x w`` token grid after spatial patching and ``frames`` latent frames after temporal
patching. Conditioning streams that are not text (audio, image tokens, history latents, face
features) get a small fixed size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshsp.zoo import Tiny

Rand = Callable[..., torch.Tensor]

HEAD_DIM = 16
AUDIO_FRAMES = 5  # LTX-2 audio latent frames
IMAGE_TOKENS = 4  # vision-encoder tokens (SigLIP / CLIP stand-ins)
GLYPH_TOKENS = 4  # HunyuanVideo 1.5 ByT5 tokens, the first half valid
FACE_TOKENS = 5  # ConsisID ViT tokens per scale


def _timestep(rand: Rand, batch: int, scale: float = 1000.0) -> torch.Tensor:
    """Seeded timesteps in (0, scale)."""
    return rand(batch).sigmoid() * scale


def _text_mask(batch: int, txt: int, text_pad: int) -> torch.Tensor:
    """A tokenizer-style int64 mask: 1 for real tokens, 0 for the trailing ``text_pad`` padding tokens."""
    mask = torch.ones(batch, txt, dtype=torch.long)
    if text_pad:
        mask[:, txt - text_pad:] = 0
    return mask


def _widths(n: int, *keys: str, head_dim: int = HEAD_DIM) -> dict:
    return {k: n * head_dim for k in keys}


# --- LTX-2 (video + audio streams) -------------------------------------------------------------

def _ltx2_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int, rand: Rand) -> dict:
    cfg = model.config
    t = _timestep(rand, batch)
    mask = _text_mask(batch, txt, text_pad)
    fps = 24.0
    return dict(
        hidden_states=rand(batch, frames * h * w, cfg.in_channels),
        audio_hidden_states=rand(batch, AUDIO_FRAMES, cfg.audio_in_channels),
        encoder_hidden_states=rand(batch, txt, cfg.caption_channels),
        audio_encoder_hidden_states=rand(batch, txt, cfg.caption_channels),
        timestep=t, sigma=t, encoder_attention_mask=mask, audio_encoder_attention_mask=mask,
        num_frames=frames, height=h, width=w, fps=fps, audio_num_frames=AUDIO_FRAMES,
        video_coords=model.rope.prepare_video_coords(batch, frames, h, w, torch.device("cpu"), fps=fps),
        audio_coords=model.audio_rope.prepare_audio_coords(batch, AUDIO_FRAMES, torch.device("cpu")),
        isolate_modalities=False, use_cross_timestep=False,
    )


def _ltx2_heads(n: int) -> dict:
    return {"num_attention_heads": n, "audio_num_attention_heads": n,
            **_widths(n, "cross_attention_dim", "audio_cross_attention_dim")}


LTX2 = Tiny(
    "LTX2VideoTransformer3DModel",
    dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
         attention_head_dim=HEAD_DIM, cross_attention_dim=32, audio_in_channels=8, audio_out_channels=8,
         audio_num_attention_heads=2, audio_attention_head_dim=HEAD_DIM, audio_cross_attention_dim=32,
         num_layers=2, caption_channels=16, rope_type="split"),
    _ltx2_inputs, _ltx2_heads, video=True, text_mask=True,
    output=lambda result: result.sample,
    note="Joint audio stream of 5 audio latent frames; per block 6 attentions (video self, video-text, audio self, "
         "audio-text, audio->video, video->audio), text masks as additive -10000 biases. RoPE is applied before "
         "the head split over the whole inner dim (split layout as in the LTX-2 checkpoint; cos/sin [B,H,N,D/2]); the a2v/v2a RoPE has "
         "only the temporal axis. The real LTX-2 replaces text padding with learned registers in its connector, "
         "so there the mask is all ones.",
)


# --- HunyuanVideo 1.5 ---------------------------------------------------------------------------

def _hunyuan15_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                      rand: Rand) -> dict:
    cfg = model.config
    latent = (cfg.in_channels - 1) // 2
    p, pt = cfg.patch_size, cfg.patch_size_t
    shape = (frames * pt, h * p, w * p)
    glyph_mask = _text_mask(batch, GLYPH_TOKENS, GLYPH_TOKENS // 2)
    return dict(
        # text-to-video: [noisy latents | zero condition latents | zero condition mask]
        hidden_states=torch.cat([rand(batch, latent, *shape), torch.zeros(batch, latent + 1, *shape)], dim=1),
        image_embeds=torch.zeros(batch, IMAGE_TOKENS, cfg.image_embed_dim),
        timestep=_timestep(rand, batch),
        encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim),
        encoder_attention_mask=_text_mask(batch, txt, text_pad),
        encoder_hidden_states_2=rand(batch, GLYPH_TOKENS, cfg.text_embed_2_dim),
        encoder_attention_mask_2=glyph_mask,
    )


HUNYUAN15 = Tiny(
    "HunyuanVideo15Transformer3DModel",
    dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=HEAD_DIM, num_layers=2,
         num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=16,
         image_embed_dim=16, rope_axes_dim=(4, 6, 6)),
    _hunyuan15_inputs, lambda n: {"num_attention_heads": n}, video=True, text_mask=True,
    note="Context = 4 image tokens (all-zero in text-to-video, so masked) + 4 ByT5 glyph tokens (2 valid) + txt "
         "text tokens, re-ordered per sample valid-first in a Python loop; the joint attention gets a boolean "
         "[B,1,S,S] mask that masks padded queries as well as keys. The ByT5 projection has a hard-coded "
         "2048-wide hidden layer (4M of the parameters).",
)


# --- HunyuanVideo Framepack ----------------------------------------------------------------------

def _framepack_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                      rand: Rand) -> dict:
    cfg = model.config
    c, p = cfg.in_channels, cfg.patch_size
    hh, ww = h * p, w * p
    # Inverted anti-drifting sampling, last section (no padding):
    # [prefix | latents | 1x history (1) | 2x history (2) | 4x history (16)]
    idx = torch.arange(0, 1 + frames + 1 + 2 + 16)
    prefix, latents_idx, hist_1x, hist_2x, hist_4x = idx.split([1, frames, 1, 2, 16])
    return dict(
        hidden_states=rand(batch, c, frames, hh, ww),
        timestep=_timestep(rand, batch),
        encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim),
        encoder_attention_mask=_text_mask(batch, txt, text_pad),
        pooled_projections=rand(batch, cfg.pooled_projection_dim),
        image_embeds=rand(batch, IMAGE_TOKENS, cfg.image_proj_dim),
        indices_latents=latents_idx,
        guidance=torch.full((batch,), 10.0) * 1000.0,
        latents_clean=rand(batch, c, 2, hh, ww),
        indices_latents_clean=torch.cat([prefix, hist_1x]),
        latents_history_2x=rand(batch, c, 2, hh, ww),
        indices_latents_history_2x=hist_2x,
        latents_history_4x=rand(batch, c, 16, hh, ww),
        indices_latents_history_4x=hist_4x,
    )


FRAMEPACK = Tiny(
    "HunyuanVideoFramepackTransformer3DModel",
    dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=HEAD_DIM, num_layers=1,
         num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
         text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6), has_image_proj=True,
         image_proj_dim=16, has_clean_x_embedder=True),
    _framepack_inputs, lambda n: {"num_attention_heads": n}, video=True, text_mask=True,
    note="History tokens are prepended to the video tokens: 2 clean frames (h*w each), 2 frames pooled 2x "
         "(1 x ceil(h/2) x ceil(w/2)) and 16 frames pooled 4x (4 x ceil(h/4) x ceil(w/4)), via Conv3d "
         "embedders with replicate padding; their RoPE is avg-pooled the same way. 4 image tokens precede the "
         "text. At batch > 1 a [B,1,1,N] key mask (tokens past each sample's valid length); at batch 1 the "
         "padded text is sliced off instead (no mask).",
)


# --- Mochi ----------------------------------------------------------------------------------------

def _mochi_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int, rand: Rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    return dict(
        hidden_states=rand(batch, cfg.in_channels, frames, h * p, w * p),
        encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim),
        timestep=_timestep(rand, batch),
        encoder_attention_mask=_text_mask(batch, txt, text_pad).bool(),
    )


MOCHI = Tiny(
    "MochiTransformer3DModel",
    dict(patch_size=2, num_attention_heads=2, attention_head_dim=HEAD_DIM, num_layers=2, pooled_projection_dim=16,
         in_channels=4, text_embed_dim=16, time_embed_dim=32),
    _mochi_inputs, lambda n: {"num_attention_heads": n}, video=True, text_mask=True,
    note="Joint attention runs one SDPA per sample (Python loop over the batch) on video + that sample's valid "
         "text tokens only (padding gathered out, output zero-padded back), no mask. The text stream is "
         "narrower (pooled_projection_dim=16) than the video stream. The caption pooler is an extra SDPA "
         "with 8 fixed heads over text_embed_dim and a single query (q [B,8,1,2]). Learned per-head RoPE "
         "frequencies (pos_frequencies).",
)


# --- Cosmos (Predict2 video-to-world inputs) -------------------------------------------------------

def _cosmos_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                   rand: Rand) -> dict:
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    shape = (frames * pt, h * ph, w * pw)
    cond = torch.zeros(1, 1, shape[0], 1, 1)
    cond[:, :, :1] = 1.0  # first latent frame is the conditioning frame
    sigma_cond = 1e-4
    t = rand(batch).sigmoid().view(batch, 1, 1, 1, 1).expand(-1, -1, shape[0], -1, -1)
    timestep = cond * (sigma_cond / (sigma_cond + 1)) + (1 - cond) * t
    return dict(
        hidden_states=rand(batch, cfg.in_channels - 1, *shape),
        timestep=timestep,
        encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim),
        fps=16,
        condition_mask=cond.expand(batch, 1, *shape).clone(),
    )


COSMOS = Tiny(
    "CosmosTransformer3DModel",
    dict(in_channels=5, out_channels=4, num_attention_heads=2, attention_head_dim=HEAD_DIM, num_layers=2,
         text_embed_dim=16, adaln_lora_dim=8, max_size=(16, 64, 64), patch_size=(1, 2, 2),
         concat_padding_mask=False, extra_pos_embed_type="learnable"),
    _cosmos_inputs, lambda n: {"num_attention_heads": n}, video=True,
    note="Per-frame timestep [B,1,F,1,1] (conditioning frame at ~0) and a condition-mask channel, as the "
         "Cosmos-2 video2world pipeline passes. concat_padding_mask=False because the padding-mask resize needs "
         "torchvision (not installed); real checkpoints concat one more all-zero channel. No text mask (padded "
         "text embeddings are zeroed instead). Learnable absolute pos-embeds sized by max_size.",
)


# --- SkyReels-V2 (diffusion forcing) ---------------------------------------------------------------

def _skyreels_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                     rand: Rand) -> dict:
    cfg = model.config
    pt, ph, pw = cfg.patch_size
    return dict(
        hidden_states=rand(batch, cfg.in_channels, frames * pt, h * ph, w * pw),
        timestep=rand(batch, frames * pt).sigmoid() * 1000.0,  # one noise level per latent frame
        encoder_hidden_states=rand(batch, txt, cfg.text_dim),
        enable_diffusion_forcing=True,
        fps=[0] * batch,  # fps 16 -> embedding index 0
    )


SKYREELS = Tiny(
    "SkyReelsV2Transformer3DModel",
    dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
         text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
         qk_norm="rms_norm_across_heads", rope_max_seq_len=32),
    _skyreels_inputs, lambda n: {"num_attention_heads": n}, video=True,
    note="Diffusion-forcing inputs: per-frame timesteps [B,F] expanded to per-token modulation [B,6,N,D]. "
         "inject_sample_info=False: with it, diffusers 0.42.1 adds the fps modulation with .repeat(F,1,1) and "
         "breaks at batch > 1 (shape error), so the fps kwarg the pipeline passes is ignored here. With "
         "num_frame_per_block > 1 a block-causal [1,1,N,N] self-attention mask would be added (default 1: "
         "none). No text mask.",
)


# --- Allegro ----------------------------------------------------------------------------------------

def _allegro_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                    rand: Rand) -> dict:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

    cfg = model.config
    p, pt = cfg.patch_size, cfg.patch_size_t
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=cfg.attention_head_dim, crops_coords=((0, 0), (h, w)), grid_size=(h, w), temporal_size=frames,
        interpolation_scale=(cfg.interpolation_scale_t, cfg.interpolation_scale_h, cfg.interpolation_scale_w))
    pos = torch.cartesian_prod(grid_t.long(), grid_h.long(), grid_w.long())
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return dict(
        hidden_states=rand(batch, cfg.in_channels, frames * pt, h * p, w * p),
        encoder_hidden_states=rand(batch, txt, cfg.caption_channels),
        encoder_attention_mask=_text_mask(batch, txt, text_pad),
        timestep=_timestep(rand, batch),
        image_rotary_emb=((freqs_t, freqs_h, freqs_w), tuple(pos)),
    )


ALLEGRO_HEAD_DIM = 12  # RoPE splits the head dim in 3 even parts (real: 96)

ALLEGRO = Tiny(
    "AllegroTransformer3DModel",
    dict(patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=ALLEGRO_HEAD_DIM, in_channels=4,
         out_channels=4, num_layers=2, cross_attention_dim=2 * ALLEGRO_HEAD_DIM, caption_channels=16),
    _allegro_inputs,
    lambda n: {"num_attention_heads": n, "cross_attention_dim": n * ALLEGRO_HEAD_DIM},
    video=True, text_mask=True,
    note="Head dim 12, not 16: the 3-axis RoPE needs head_dim divisible by 6. RoPE comes in as "
         "(per-axis cos/sin tables, per-axis integer position ids) looked up with F.embedding. Text mask is an "
         "additive -10000 bias [B,1,txt] on cross-attention.",
)


# --- Latte ------------------------------------------------------------------------------------------

def _latte_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int, rand: Rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    f = 1 if frames == 1 else cfg.video_length  # temporal pos-embed only broadcasts at video_length frames
    return dict(
        hidden_states=rand(batch, cfg.in_channels, f, h * p, w * p),
        encoder_hidden_states=rand(batch, txt, cfg.caption_channels),
        timestep=_timestep(rand, batch).long(),
        enable_temporal_attentions=True,
    )


LATTE = Tiny(
    "LatteTransformer3DModel",
    dict(num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=8, num_layers=1,
         cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2,
         activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
         norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=16, video_length=2),
    _latte_inputs, lambda n: {"num_attention_heads": n, "cross_attention_dim": n * HEAD_DIM}, video=True,
    note="frames > 1 is mapped to video_length (2 here; real 16): the fixed temporal pos-embed only broadcasts "
         "at exactly that many frames. Factorised attention: spatial blocks attend within a frame "
         "(batch B*F, h*w tokens, + text cross-attention), temporal blocks across frames "
         "(batch B*h*w, F tokens). Output has 8 channels (learned sigma).",
)


# --- EasyAnimate ---------------------------------------------------------------------------------------

def _easyanimate_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                        rand: Rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    return dict(
        hidden_states=rand(batch, cfg.in_channels, frames, h * p, w * p),
        timestep=_timestep(rand, batch),
        encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim),
    )


EASYANIMATE = Tiny(
    "EasyAnimateTransformer3DModel",
    dict(num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, patch_size=2,
         num_layers=2, mmdit_layers=1, time_embed_dim=32, text_embed_dim=16),
    _easyanimate_inputs, lambda n: {"num_attention_heads": n}, video=True,
    note="One MMDiT block (separate text weights) and one shared-weight block. Joint attention over "
         "[text, video], no mask; 3-D RoPE (t 4, h 6, w 6) with crop coordinates relative to a hard-coded "
         "90x60 base grid. Patch embedding is a per-frame Conv2d.",
)


# --- ConsisID ---------------------------------------------------------------------------------------------

def _consisid_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int,
                     rand: Rand) -> dict:
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.consisid.pipeline_consisid import get_resize_crop_region_for_grid

    cfg = model.config
    p = cfg.patch_size
    latent = cfg.out_channels
    image = torch.zeros(batch, frames, latent, h * p, w * p)
    image[:, :1] = rand(batch, 1, latent, h * p, w * p)  # the reference image's latent, padded with zeros
    crops = get_resize_crop_region_for_grid((h, w), cfg.sample_width // p, cfg.sample_height // p)
    rotary = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=crops, grid_size=(h, w),
                                     temporal_size=frames)
    return dict(
        hidden_states=torch.cat([rand(batch, frames, latent, h * p, w * p), image], dim=2),
        encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim),
        timestep=_timestep(rand, batch).long(),
        image_rotary_emb=rotary,
        id_vit_hidden=[rand(batch, FACE_TOKENS, cfg.LFE_vit_dim) for _ in range(cfg.LFE_num_scale)],
        id_cond=rand(batch, cfg.LFE_id_dim),
    )


def _consisid_heads(n: int) -> dict:
    # the face cross-attention reads keys of width int(inner_dim * 2 / 3), which the face extractor must output
    return {"num_attention_heads": n, "LFE_output_dim": int(n * HEAD_DIM / 3 * 2)}


CONSISID = Tiny(
    "ConsisIDTransformer3DModel",
    dict(num_attention_heads=2, attention_head_dim=HEAD_DIM, in_channels=8, out_channels=4, time_embed_dim=32,
         text_embed_dim=16, num_layers=2, patch_size=2, use_rotary_positional_embeddings=True,
         is_train_face=True, cross_attn_interval=2, cross_attn_dim_head=HEAD_DIM, cross_attn_num_heads=2,
         LFE_id_dim=16, LFE_vit_dim=16, LFE_depth=2, LFE_dim_head=8, LFE_num_heads=2, LFE_num_id_token=2,
         LFE_num_querie=4, LFE_output_dim=21, LFE_ff_mult=2, LFE_num_scale=2),
    _consisid_inputs, _consisid_heads, video=True,
    note="Input is [B,F,C,H,W] (frames before channels) with the reference-image latent concatenated on "
         "channels. Joint CogVideoX-style attention over [text, video] (no mask). The face path (local facial "
         "extractor + a perceiver cross-attention every 2nd block) computes attention by hand "
         "(matmul + softmax), not through SDPA.",
)


# --- Motif-Video (image-to-video inputs) -------------------------------------------------------------------

def _motif_inputs(model, *, h: int, w: int, frames: int, txt: int, batch: int, text_pad: int, rand: Rand) -> dict:
    cfg = model.config
    latent = cfg.out_channels
    p, pt = cfg.patch_size, cfg.patch_size_t
    shape = (frames * pt, h * p, w * p)
    condition = torch.zeros(batch, latent, *shape)
    condition[:, :, :1] = rand(batch, latent, 1, *shape[1:])  # first-frame latent
    mask = torch.zeros(batch, 1, *shape)
    mask[:, :, :1] = 1.0
    return dict(
        hidden_states=torch.cat([rand(batch, latent, *shape), condition, mask], dim=1),
        timestep=_timestep(rand, batch),
        encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim),
        encoder_attention_mask=_text_mask(batch, txt, text_pad),
        image_embeds=rand(batch, IMAGE_TOKENS, cfg.image_embed_dim),
    )


MOTIF = Tiny(
    "MotifVideoTransformer3DModel",
    dict(in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=HEAD_DIM, num_layers=1,
         num_single_layers=2, num_decoder_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
         image_embed_dim=16, rope_axes_dim=(4, 6, 6), enable_text_cross_attention_dual=True,
         enable_text_cross_attention_single=True),
    _motif_inputs, lambda n: {"num_attention_heads": n}, video=True, text_mask=True,
    note="Image-to-video inputs: 4 image tokens prepended to the text; the int image_embed_seq_len is passed to "
         "every block so the extra text cross-attention skips them. Joint attention gets a [B,1,1,N+ctx] key "
         "mask; the cross-attention a [B,1,1,txt] mask and RoPE on queries only. The last single block is a "
         "'decoder' block: video tokens (a copy of the patch embeddings) attend jointly with the encoder output "
         "as context, unmasked.",
)


ENTRIES = [LTX2, HUNYUAN15, FRAMEPACK, MOCHI, COSMOS, SKYREELS, ALLEGRO, LATTE, EASYANIMATE, CONSISID, MOTIF]
REFUSED: dict[str, str] = {}
