"""Tiny zoo entries, group A: Flux-like and single-stream image DiTs.

Flux3, Chroma, Bria, Bria-Fibo, Bria-Fibo 2, Krea 2, LongCat-Image, Ovis-Image, HiDream-Image,
HunyuanImage 2.1 and Ideogram 4. Each config keeps the class's block structure at toy width (head
dim 16, two heads); each input builder mirrors what the class's diffusers pipeline passes to the
transformer (position ids, masks, timestep scale). See ``meshsp.zoo`` for the grid semantics.
"""

from __future__ import annotations

import torch

from meshsp.zoo import Tiny

HEAD = 16


def _heads(n: int, *keys: str, **width_keys: int) -> dict:
    """Overrides setting every key in ``keys`` to ``n`` and every ``width_keys`` key to ``n * mult``."""
    return {**{k: n for k in keys}, **{k: n * mult for k, mult in width_keys.items()}}


def _grid_ids(h: int, w: int, *, first: float = 0.0, offset: float = 0.0) -> torch.Tensor:
    """Row-major ``(h * w, 3)`` position ids ``(first, row + offset, col + offset)``."""
    ids = torch.zeros(h, w, 3)
    ids[..., 0] = first
    ids[..., 1] = torch.arange(h)[:, None] + offset
    ids[..., 2] = torch.arange(w)[None, :] + offset
    return ids.reshape(h * w, 3)


def _text_mask(batch: int, txt: int, text_pad: int) -> torch.Tensor:
    """Bool ``(batch, txt)`` mask whose last ``text_pad`` tokens are padding."""
    mask = torch.ones(batch, txt, dtype=torch.bool)
    if text_pad:
        mask[:, txt - text_pad:] = False
    return mask


def _unit_time(rand, batch: int) -> torch.Tensor:
    """Flow-matching times in (0, 1)."""
    return torch.sigmoid(rand(batch))


# --- FLUX.3: per-mode blocks (text and image each self-attend), then joint single blocks -------------

def _flux3_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    img_ids = torch.cartesian_prod(torch.arange(1), torch.arange(h), torch.arange(w), torch.zeros(1, dtype=torch.long)).float()
    img_ids[:, 1:3] *= 0.5  # the pipeline's image RoPE scale
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(txt)).float()
    return dict(hidden_states=rand(batch, h * w, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                timestep=_unit_time(rand, batch), img_ids=img_ids, txt_ids=txt_ids)


FLUX3 = Tiny(
    "Flux3Transformer2DModel",
    dict(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD,
         num_attention_heads=2, joint_attention_dim=32, timestep_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4)),
    _flux3_inputs, lambda n: _heads(n, "num_attention_heads"),
    note="per-mode blocks attend text and image separately (two SDPA calls per mode layer), then joint single "
         "blocks over [text, image]; image H/W RoPE ids are scaled by 0.5 as in the pipeline.",
)


# --- Chroma: Flux with a pruned modulation approximator and a text mask ------------------------------

def _chroma_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    text = _text_mask(batch, txt, text_pad).float()  # the pipeline's mask is float (encoder dtype)
    mask = torch.cat([text, torch.ones(batch, h * w)], dim=1)
    return dict(hidden_states=rand(batch, h * w, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                timestep=_unit_time(rand, batch), img_ids=_grid_ids(h, w), txt_ids=torch.zeros(txt, 3), attention_mask=mask)


CHROMA = Tiny(
    "ChromaTransformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD, num_attention_heads=2,
         joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
         approximator_layers=2),
    _chroma_inputs, lambda n: _heads(n, "num_attention_heads"), text_mask=True,
    note="the pipeline's mask is float 0/1 over [text, image]; blocks form a (B,1,L,L) outer product, which SDPA "
         "reads as an additive bias (padding gets +0, real tokens +1), not as a hard mask.",
)


# --- Bria 3.x: Flux without pooled projections or guidance ------------------------------------------

def _bria_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    return dict(hidden_states=rand(batch, h * w, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                timestep=_unit_time(rand, batch) * 1000, img_ids=_grid_ids(h, w), txt_ids=torch.zeros(txt, 3))


BRIA = Tiny(
    "BriaTransformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD, num_attention_heads=2,
         joint_attention_dim=32, axes_dims_rope=[4, 6, 6]),
    _bria_inputs, lambda n: _heads(n, "num_attention_heads"),
)


# --- Bria Fibo: Flux with per-block text-encoder layers and a key-padding mask -------------------------

def _fibo_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    n_blocks = cfg.num_layers + cfg.num_single_layers
    kwargs = dict(hidden_states=rand(batch, h * w, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                  text_encoder_layers=[rand(batch, txt, cfg.text_encoder_dim) for _ in range(n_blocks)],
                  timestep=_unit_time(rand, batch) * 1000, img_ids=_grid_ids(h, w), txt_ids=torch.zeros(txt, 3))
    if text_pad:  # the pipeline passes the mask only when something is padded
        mask = torch.cat([_text_mask(batch, txt, text_pad), torch.ones(batch, h * w, dtype=torch.bool)], dim=1)
        kwargs["joint_attention_kwargs"] = {"attention_mask": mask[:, None, None, :]}
    return kwargs


BRIA_FIBO = Tiny(
    "BriaFiboTransformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD, num_attention_heads=2,
         joint_attention_dim=32, text_encoder_dim=16, axes_dims_rope=[4, 6, 6]),
    _fibo_inputs, lambda n: _heads(n, "num_attention_heads"), text_mask=True,
    note="text mask travels in joint_attention_kwargs['attention_mask'] as a bool (B,1,1,txt+img) key mask; "
         "half of each block's text width is replaced by a projected text-encoder layer.",
)


# --- Bria Fibo 2: Z-Image-like single stream with a Perceiver that makes gist tokens ------------------

def _fibo2_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    bundles = 1 + len(cfg.injection_layer_ids)
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p), timestep=_unit_time(rand, batch),
                encoder_hidden_states=rand(batch, bundles, txt, cfg.cap_feat_dim),
                encoder_attention_mask=_text_mask(batch, txt, text_pad) if text_pad else None)


BRIA_FIBO2 = Tiny(
    "BriaFibo2Transformer2DModel",
    dict(in_channels=4, patch_size=2, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, cap_feat_dim=16,
         injection_layer_ids=(1,), perceiver_num_layers=1, min_num_gist_tokens=2, max_num_gist_tokens=4, gist_step=2,
         gist_min_text_len=4, gist_max_text_len=16, axes_dims=(4, 6, 6), axes_lens=(16, 64, 64)),
    _fibo2_inputs, lambda n: _heads(n, "n_heads", dim=HEAD), text_mask=True,
    note="the Perceiver turns the text into 2-4 gist tokens (count from the text length, a host int) that are "
         "prepended to the image tokens; text is never in the main sequence, it enters by cross-attention "
         "(Perceiver and injection blocks, k/v = text with the bool text mask).",
)


# --- Krea 2: single stream [text, image] with a text-fusion transformer and GQA ---------------------

def _krea2_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    position_ids = torch.cat([torch.zeros(txt, 3), _grid_ids(h, w)])
    return dict(hidden_states=rand(batch, h * w, cfg.in_channels),
                encoder_hidden_states=rand(batch, txt, cfg.num_text_layers, cfg.text_hidden_dim),
                timestep=_unit_time(rand, batch), position_ids=position_ids,
                encoder_attention_mask=_text_mask(batch, txt, text_pad))


KREA2 = Tiny(
    "Krea2Transformer2DModel",
    dict(in_channels=16, num_layers=2, attention_head_dim=HEAD, num_attention_heads=2, num_key_value_heads=1,
         intermediate_size=64, timestep_embed_dim=32, text_hidden_dim=32, num_text_layers=3, text_num_attention_heads=2,
         text_num_key_value_heads=2, text_intermediate_size=64, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
         axes_dims_rope=(4, 6, 6)),
    _krea2_inputs,
    lambda n: _heads(n, "num_attention_heads", "text_num_attention_heads", "text_num_key_value_heads", text_hidden_dim=HEAD),
    text_mask=True,
    note="text fusion first: layer-wise blocks attend across the tapped-layer axis (SDPA batch B*txt, seq "
         "num_text_layers), refiner blocks across the text; main blocks use GQA with k/v heads repeat_interleaved "
         "before SDPA and a sigmoid output gate.",
)


# --- LongCat-Image: Flux-like dual/single stream, modality-separated RoPE ids --------------------------

LONGCAT_TEXT_LEN = 512  # the pipeline's tokenizer_max_length: image ids start past it


def _longcat_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    txt_ids = torch.zeros(txt, 3)
    txt_ids[:, 1] = txt_ids[:, 2] = torch.arange(txt).float()
    return dict(hidden_states=rand(batch, h * w, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                timestep=_unit_time(rand, batch), img_ids=_grid_ids(h, w, first=1, offset=LONGCAT_TEXT_LEN), txt_ids=txt_ids)


LONGCAT = Tiny(
    "LongCatImageTransformer2DModel",
    dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD, num_attention_heads=2,
         joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 6, 6]),
    _longcat_inputs, lambda n: _heads(n, "num_attention_heads"),
)


# --- Ovis-Image: Flux-like dual/single stream with a normed context embedder --------------------------

def _ovis_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    txt_ids = torch.zeros(txt, 3)
    txt_ids[:, 1] = txt_ids[:, 2] = torch.arange(txt).float()
    return dict(hidden_states=rand(batch, h * w, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                timestep=_unit_time(rand, batch), img_ids=_grid_ids(h, w), txt_ids=txt_ids)


OVIS = Tiny(
    "OvisImageTransformer2DModel",
    dict(patch_size=1, in_channels=16, out_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD,
         num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6)),
    _ovis_inputs, lambda n: _heads(n, "num_attention_heads"),
)


# --- HiDream-Image: dual/single stream MoE DiT fed T5 + per-block Llama layers ------------------------

def _hidream_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    n_llama = max(cfg.llama_layers) + 1
    t5_dim, llama_dim = cfg.caption_channels
    if h != w and h * w > model.max_seq:
        raise ValueError(f"HiDream pads a non-square grid to max_seq={model.max_seq} tokens; {h}x{w} does not fit.")
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p), timesteps=_unit_time(rand, batch) * 1000,
                encoder_hidden_states_t5=rand(batch, txt, t5_dim),
                encoder_hidden_states_llama3=rand(n_llama, batch, txt, llama_dim),
                pooled_embeds=rand(batch, cfg.text_emb_dim))


HIDREAM = Tiny(
    "HiDreamImageTransformer2DModel",
    dict(patch_size=2, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=HEAD, num_attention_heads=2,
         caption_channels=[16, 16], text_emb_dim=32, num_routed_experts=4, num_activated_experts=2,
         axes_dims_rope=(4, 6, 6), max_resolution=(16, 16), llama_layers=[0, 1]),
    _hidream_inputs, lambda n: _heads(n, "num_attention_heads"),
    note="calls F.scaled_dot_product_attention directly (not dispatch_attention_fn), (B, heads, L, 16) layout; "
         "a non-square grid is padded to max_seq = 64 image tokens (so h*w <= 64; a square grid is not padded) "
         "and the padded keys are zeroed, not masked; text is T5 + Llama (txt each) plus a per-block Llama "
         "layer: 3*txt text tokens per block; MoE feed-forward with data-dependent routing.",
)


# --- HunyuanImage 2.1: dual/single stream, token refiner, byT5 glyph text -----------------------------

BYT5_TOKENS = 4  # glyph-text tokens, half of them padding


def _hunyuan_image_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    ph, pw = cfg.patch_size
    glyph_mask = torch.zeros(batch, BYT5_TOKENS, dtype=torch.long)
    glyph_mask[:, : BYT5_TOKENS // 2] = 1
    return dict(hidden_states=rand(batch, cfg.in_channels, h * ph, w * pw), timestep=_unit_time(rand, batch) * 1000,
                encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim),
                encoder_attention_mask=_text_mask(batch, txt, text_pad).long(),
                encoder_hidden_states_2=rand(batch, BYT5_TOKENS, cfg.text_embed_2_dim), encoder_attention_mask_2=glyph_mask)


HUNYUAN_IMAGE = Tiny(
    "HunyuanImageTransformer2DModel",
    dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=HEAD, num_layers=1, num_single_layers=1,
         num_refiner_layers=1, mlp_ratio=4.0, patch_size=(1, 1), guidance_embeds=False, text_embed_dim=32,
         text_embed_2_dim=16, rope_axes_dim=(8, 8)),
    _hunyuan_image_inputs, lambda n: _heads(n, "num_attention_heads"), text_mask=True,
    note=f"sequence is [image, text]; text = {BYT5_TOKENS} byT5 glyph tokens + txt MLLM tokens, regrouped per sample "
         "by boolean indexing into [valid byT5, valid MLLM, padded byT5, padded MLLM]; bool (B,1,1,L) key mask; "
         "the token refiner self-attends the MLLM text with a (B,1,txt,txt) mask; patch embed is a Conv2d with "
         "kernel = stride = patch (1 here).",
)


# --- Ideogram 4: one packed [left pad, text, image] sequence with a segment mask ---------------------

def _ideogram4_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    from diffusers.models.transformers.transformer_ideogram4 import (
        IMAGE_POSITION_OFFSET, LLM_TOKEN_INDICATOR, OUTPUT_IMAGE_INDICATOR, SEQUENCE_PADDING_INDICATOR)

    cfg = model.config
    n_img, n_txt = h * w, txt - text_pad
    seq = txt + n_img
    image_pos = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    position_ids = torch.zeros(batch, seq, 3, dtype=torch.long)
    position_ids[:, text_pad:txt] = torch.arange(n_txt)[:, None]
    position_ids[:, txt:] = image_pos.reshape(n_img, 3) + IMAGE_POSITION_OFFSET
    segment_ids = torch.full((batch, seq), SEQUENCE_PADDING_INDICATOR, dtype=torch.long)
    segment_ids[:, text_pad:] = 1
    indicator = torch.zeros(batch, seq, dtype=torch.long)
    indicator[:, text_pad:txt] = LLM_TOKEN_INDICATOR
    indicator[:, txt:] = OUTPUT_IMAGE_INDICATOR
    features = rand(batch, seq, cfg.llm_features_dim) * (indicator == LLM_TOKEN_INDICATOR).unsqueeze(-1)
    latents = torch.cat([torch.zeros(batch, txt, cfg.in_channels), rand(batch, n_img, cfg.in_channels)], dim=1)
    return dict(hidden_states=latents, timestep=_unit_time(rand, batch), encoder_hidden_states=features,
                position_ids=position_ids, segment_ids=segment_ids, indicator=indicator)


IDEOGRAM4 = Tiny(
    "Ideogram4Transformer2DModel",
    dict(in_channels=16, num_layers=2, attention_head_dim=HEAD, num_attention_heads=2, intermediate_size=64, adaln_dim=32,
         llm_features_dim=32, mrope_section=(4, 2, 2)),
    _ideogram4_inputs, lambda n: _heads(n, "num_attention_heads"), text_mask=True,
    note="one packed sequence [text_pad left-padding, text, image] (the pipeline left-pads, so padding comes first); "
         "a bool (B,1,L,L) block-diagonal mask from segment_ids; output covers the whole packed sequence, the "
         "prediction is its last h*w tokens; MRoPE with image positions offset by 65536.",
)


ENTRIES = [FLUX3, CHROMA, BRIA, BRIA_FIBO, BRIA_FIBO2, KREA2, LONGCAT, OVIS, HIDREAM, HUNYUAN_IMAGE, IDEOGRAM4]
REFUSED: dict[str, str] = {}
