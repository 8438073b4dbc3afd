"""Tiny zoo entries, group B: Qwen-Image 2.1, CogView 3+/4, Lumina 2, Sana, PixArt, DiT, AuraFlow, OmniGen, PRX.

Each config keeps its class's block structure at toy width (head dim 16, or 24 where the width must split
in three; two heads; one or two blocks of each stack); each input builder mirrors what the class's
diffusers pipeline passes to the forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from meshsp.zoo import Tiny

Rand = Callable[..., torch.Tensor]
HEAD_DIM = 16


def _t01(rand: Rand, batch: int) -> torch.Tensor:
    """Seeded timesteps in (0, 1), one per sample."""
    return torch.sigmoid(rand(batch))


def _steps(rand: Rand, batch: int) -> torch.Tensor:
    """Seeded integer timesteps in [0, 999], as DDPM-style schedulers hand them out."""
    return (_t01(rand, batch) * 999).long()


def _text_mask(batch: int, txt: int, text_pad: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Tokenizer-style mask over right-padded text: the last ``text_pad`` tokens are padding."""
    mask = torch.ones(batch, txt, dtype=dtype)
    mask[:, txt - text_pad:] = 0
    return mask


def _size_cond(batch: int, h: int, w: int, patch: int) -> dict:
    """SDXL-style micro-conditions (original/target size, crop) in pixels, as the CogView pipelines build them."""
    size = torch.tensor([[h * patch * 8.0, w * patch * 8.0]]).repeat(batch, 1)
    return dict(original_size=size, target_size=size.clone(), crop_coords=torch.zeros(batch, 2))


def _heads(counts: tuple[str, ...], widths: tuple[str, ...] = (), head_dim: int = HEAD_DIM) -> Callable[[int], dict]:
    """Head-count override: every ``counts`` key set to ``n``, every ``widths`` key to ``n * head_dim``."""
    def heads(n: int) -> dict:
        return {**{k: n for k in counts}, **{k: n * head_dim for k in widths}}
    return heads


# --- Qwen-Image 2.1: one single-stream stack over [text | condition images | target], block-causal prefix.

def _qwen21_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    # Every VLM image slot stands for 4 latent tokens, filled in sequence order, so the target's h*w tokens must
    # fill whole slots. Real grids are even; for any h x w we run edit mode with one condition image of
    # 4 - (h*w) % 4 tokens whose slot sits right before the target slots, so the two fill them contiguously.
    cond = 4 - (h * w) % 4
    cond_shape = (1, 2, 2) if cond == 4 else (1, 1, cond)
    vlm = torch.cat([torch.zeros(txt, dtype=torch.bool), torch.ones(1, dtype=torch.bool)])  # [text, cond slot]
    img_mask = torch.cat([vlm, torch.ones(h * w // 4, dtype=torch.bool)]).expand(batch, -1).clone()
    mask = None  # the pipeline passes None when no prompt is padded
    if text_pad:
        mask = torch.cat([_text_mask(batch, txt, text_pad), torch.ones(batch, 1, dtype=torch.long)], dim=1)
    return dict(hidden_states=rand(batch, cond + h * w, cfg.in_channels),
                encoder_hidden_states=rand(batch, txt + 1, cfg.context_in_dim),
                timestep=_t01(rand, batch), encoder_hidden_states_mask=mask,
                img_shapes=[[cond_shape, (1, h, w)]] * batch, img_mask=img_mask)


QWEN21 = Tiny(
    "QwenImage21Transformer2DModel",
    dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
         context_in_dim=32, mlp_ratio=3, axes_dims_rope=(4, 6, 6)),
    _qwen21_inputs, _heads(("num_attention_heads",)), text_mask=True,
    note="one single-stream stack over the joint sequence [text (+pads), condition image, target]; inputs are edit "
         "mode with a 1-4 token condition image (so any h x w fills the 4-token VLM slots; real grids are even). "
         "Output covers the whole joint sequence (txt + cond + h*w rows; the pipeline keeps the last h*w). "
         "Block-causal attention runs as one SDPA per prefix segment (text: causal + key-padding mask; condition "
         "image: keys = everything before and itself) plus one for the target: 3 SDPA per block.",
)


# --- CogView 4 / CogView 3-Plus: joint text+image attention, SDXL micro-conditions.

def _cogview4_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p),
                encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim),
                timestep=_t01(rand, batch) * 1000, **_size_cond(batch, h, w, p))


def _cogview3_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    kwargs = _cogview4_inputs(model, h=h, w=w, frames=frames, txt=txt, batch=batch, text_pad=text_pad, rand=rand)
    kwargs["timestep"] = _steps(rand, batch)  # CogVideoX DDIM scheduler: integer steps
    return kwargs


_COGVIEW = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                num_attention_heads=2, text_embed_dim=32, time_embed_dim=32, condition_dim=16,
                pos_embed_max_size=32, sample_size=32)

COGVIEW4 = Tiny(
    "CogView4Transformer2DModel", dict(_COGVIEW, rope_axes_dim=(256, 256)), _cogview4_inputs,
    _heads(("num_attention_heads",)),
    note="joint [text, image] self-attention, RoPE on image tokens only (positions rescaled into a 256x256 table); "
         "the pipeline left-pads text to a multiple of 16 with real pad tokens and passes no mask.",
)

COGVIEW3 = Tiny(
    "CogView3PlusTransformer2DModel", dict(_COGVIEW), _cogview3_inputs, _heads(("num_attention_heads",)),
    note="joint [text, image] self-attention (CogVideoX processor), sincos position table cropped to the grid; "
         "the pipeline pads text to 224 tokens and passes no mask.",
)


# --- Lumina 2: context and noise refiners, then a joint stack over packed [valid text, image].

def _lumina2_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p), timestep=_t01(rand, batch),
                encoder_hidden_states=rand(batch, txt, cfg.cap_feat_dim),
                encoder_attention_mask=_text_mask(batch, txt, text_pad))


LUMINA2 = Tiny(
    "Lumina2Transformer2DModel",
    dict(sample_size=16, patch_size=2, in_channels=16, hidden_size=32, num_layers=2, num_refiner_layers=1,
         num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(64, 32, 32),
         cap_feat_dim=32),
    _lumina2_inputs, _heads(("num_attention_heads",), ("hidden_size",)), text_mask=True,
    note="GQA (1 KV head, repeated before SDPA); the joint stack drops padded text (sequence = valid text + image, "
         "masked only when valid lengths differ across the batch); token counts read with .tolist().",
)


# --- Sana: linear self-attention, SDPA cross-attention, Mix-FFN with a depthwise conv over the token grid.

def _sana_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p),
                encoder_hidden_states=rand(batch, txt, cfg.caption_channels),
                encoder_attention_mask=_text_mask(batch, txt, text_pad),
                timestep=_t01(rand, batch) * 1000 * cfg.timestep_scale)


SANA = Tiny(
    "SanaTransformer2DModel",
    dict(in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
         num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32,
         mlp_ratio=2.5, sample_size=16, patch_size=1),
    _sana_inputs, _heads(("num_attention_heads", "num_cross_attention_heads"), ("cross_attention_dim",)),
    text_mask=True,
    note="self-attention is ReLU linear attention (matmuls, not SDPA); only cross-attention to text uses SDPA. "
         "The Mix-FFN (GLUMBConv) runs a 3x3 depthwise conv over the h x w token grid (block gets height/width ints).",
    grid={"h": 7},  # SP ranks hold whole token rows: 7 rows for up to 4 ranks (4 + 3, 2 + 2 + 2 + 1)
)


# --- PixArt (Sigma layout) and Transformer2DModel (PixArt-alpha 1024 layout): self + cross attention blocks.

def _pixart_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    cond = {"resolution": None, "aspect_ratio": None}
    if cfg.sample_size == 128:  # the alpha pipeline adds resolution / aspect-ratio conditions at 1024 px
        cond = {"resolution": torch.tensor([[h * p * 8.0, w * p * 8.0]]).repeat(batch, 1),
                "aspect_ratio": torch.tensor([[h / w]]).repeat(batch, 1)}
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p),
                encoder_hidden_states=rand(batch, txt, cfg.caption_channels),
                encoder_attention_mask=_text_mask(batch, txt, text_pad),
                timestep=_steps(rand, batch), added_cond_kwargs=cond)


_PIXART = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
               cross_attention_dim=32, caption_channels=32, patch_size=2)

PIXART = Tiny(
    "PixArtTransformer2DModel", dict(_PIXART, sample_size=64), _pixart_inputs,
    _heads(("num_attention_heads",), ("cross_attention_dim",)), text_mask=True,
    note="PixArt-Sigma layout (no resolution conditions); sincos position table recomputed for the grid.",
)

TRANSFORMER2D = Tiny(
    "Transformer2DModel",
    dict(_PIXART, attention_head_dim=24, cross_attention_dim=48, sample_size=128, attention_bias=True,
         activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
         norm_elementwise_affine=False, norm_eps=1e-6),
    _pixart_inputs, _heads(("num_attention_heads",), ("cross_attention_dim",), head_dim=24), text_mask=True,
    note="continuous patched input, PixArt-alpha-1024 layout (ada_norm_single, caption projection, resolution and "
         "aspect-ratio conditions); head dim 24 because the size-condition embedding splits the width in 3; "
         "sincos position table recomputed for the grid.",
)


# --- DiT: class-conditional, self-attention only.

def _dit_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    labels = (rand(batch).abs() * 1e4).long() % cfg.num_embeds_ada_norm
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p), timestep=_steps(rand, batch),
                class_labels=labels)


# The forward's unpatchify takes the grid side as sqrt(token count): square grids only (square=True).
DIT = Tiny(
    "DiTTransformer2DModel",
    dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, sample_size=32,
         patch_size=2),
    _dit_inputs, _heads(("num_attention_heads",)),
    note="class labels instead of text (txt ignored); sincos position table recomputed for the grid; "
         "square grids only (h == w).",
    square=True,
)


# --- AuraFlow: MMDiT joint blocks then single blocks, 8 learned register tokens prepended to the text.

def _auraflow_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p),
                encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim), timestep=_t01(rand, batch))


AURAFLOW = Tiny(
    "AuraFlowTransformer2DModel",
    dict(sample_size=64, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1,
         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32,
         out_channels=4, pos_embed_max_size=1024),
    _auraflow_inputs, _heads(("num_attention_heads",), ("caption_projection_dim",)),
    note="8 register tokens are prepended to the text (attention length 8 + txt + h*w); the pipeline zeroes padded "
         "text embeddings instead of passing a mask; learned position table cropped around its centre.",
)


# --- OmniGen: a causal LLM-style stack over [text ids, time token, image], bidirectional inside the image.

_OMNIGEN_PAD_ID = 2  # the pipeline's collator pads with id 2


def _omnigen_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    n_img, valid = h * w, txt - text_pad
    ids = (rand(batch, txt).abs() * 1e4).long() % cfg.vocab_size
    ids[:, :text_pad] = _OMNIGEN_PAD_ID  # the collator pads on the left
    # The collator's mask: causal over [valid text, time token], every image row sees everything unpadded;
    # padded rows see everything, padded columns are hidden from the rest.
    body = torch.cat([torch.tril(torch.ones(valid + 1, valid + 1)), torch.zeros(valid + 1, n_img)], dim=1)
    body = torch.cat([body, torch.ones(n_img, valid + 1 + n_img)], dim=0)
    mask = torch.cat([torch.zeros(valid + 1 + n_img, text_pad), body], dim=1)
    mask = torch.cat([torch.ones(text_pad, txt + 1 + n_img), mask], dim=0)
    positions = torch.cat([torch.zeros(text_pad, dtype=torch.long), torch.arange(valid + n_img + 1)])
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p), timestep=_t01(rand, batch),
                input_ids=ids, input_img_latents=[], input_image_sizes={},
                attention_mask=mask.expand(batch, -1, -1).clone(), position_ids=positions.expand(batch, -1).clone())


OMNIGEN = Tiny(
    "OmniGenTransformer2DModel",
    dict(in_channels=4, patch_size=2, hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
         intermediate_size=64, num_layers=2, pad_token_id=60, vocab_size=64, pos_embed_max_size=32,
         rope_scaling={"short_factor": [1.0] * 8, "long_factor": [1.5] * 8}),
    _omnigen_inputs, _heads(("num_attention_heads", "num_key_value_heads"), ("hidden_size",)),
    text_mask=True,
    note="text enters as token ids (embedded inside); one extra time token sits between text and image; full "
         "(B, S, S) additive mask from the pipeline's collator, text padding is LEADING (the collator left-pads); "
         "1-D position ids over the joint sequence.",
)


# --- PRX: image-token queries attend to [text, image] keys; the text stream is only projected.

def _prx_inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict:
    cfg = model.config
    p = cfg.patch_size
    return dict(hidden_states=rand(batch, cfg.in_channels, h * p, w * p), timestep=_t01(rand, batch),
                encoder_hidden_states=rand(batch, txt, cfg.context_in_dim),
                attention_mask=_text_mask(batch, txt, text_pad, torch.bool))


PRX = Tiny(
    "PRXTransformer2DModel",
    dict(in_channels=16, patch_size=2, context_in_dim=32, hidden_size=32, mlp_ratio=3.5, num_heads=2, depth=2,
         axes_dim=[8, 8]),
    _prx_inputs, _heads(("num_heads",), ("hidden_size",)), text_mask=True,
    note="queries are image tokens only, keys/values are [text, image] (text never updated); RoPE on image only. "
         "Block modulation is zero-initialized, so at init every gate is 0 and the blocks (attention included) "
         "do not change the output.",
)


ENTRIES = [QWEN21, COGVIEW4, COGVIEW3, LUMINA2, SANA, PIXART, TRANSFORMER2D, AURAFLOW, OMNIGEN, PRX, DIT]
REFUSED: dict[str, str] = {}
