"""Tiny random-weight transformers of the supported families, and inputs shaped like real ones.

Configs follow each class's real structure at toy width (head dim 16), built offline with seeded
random weights. Tests, benchmarks and the embedded default pipelines use them.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

__all__ = ["FAMILIES", "Family", "build_transformer", "make_inputs", "output_tensor"]


@dataclass(frozen=True)
class Family:
    cls: str
    config: dict
    heads_key: str
    width_keys: tuple[str, ...] = ()  # config keys that must equal heads * 16 when heads change


FAMILIES: dict[str, Family] = {
    "flux": Family("FluxTransformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=False,
        axes_dims_rope=(4, 4, 8)), "num_attention_heads"),
    "flux2": Family("Flux2Transformer2DModel", dict(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, mlp_ratio=3.0,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True), "num_attention_heads"),
    "qwen-image": Family("QwenImageTransformer2DModel", dict(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4)),
        "num_attention_heads"),
    "z-image": Family("ZImageTransformer2DModel", dict(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32]), "n_heads", ("dim",)),
    "wan": Family("WanTransformer3DModel", dict(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32), "num_attention_heads"),
    "sd3": Family("SD3Transformer2DModel", dict(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=32,
        out_channels=4, pos_embed_max_size=32), "num_attention_heads", ("caption_projection_dim",)),
    "ltx": Family("LTXVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2,
        attention_head_dim=16, cross_attention_dim=32, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=16), "num_attention_heads", ("cross_attention_dim",)),
    "hunyuan-video": Family("HunyuanVideoTransformer3DModel", dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=16, pooled_projection_dim=8, rope_axes_dim=(4, 6, 6)), "num_attention_heads"),
    "cogvideox": Family("CogVideoXTransformer3DModel", dict(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=32,
        text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        temporal_compression_ratio=4, max_text_seq_length=8), "num_attention_heads"),
}


def build_transformer(family: str, *, heads: int | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded random-weight transformer of ``family`` (same weights on every rank for one seed)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}.")
    fam = FAMILIES[family]
    config = dict(fam.config)
    if heads is not None:
        config[fam.heads_key] = heads
        for key in fam.width_keys:
            config[key] = heads * 16
    config.update(overrides)
    cls = getattr(importlib.import_module("diffusers"), fam.cls)
    torch.manual_seed(seed)
    return cls(**config).eval()


def make_inputs(family: str, model, *, h: int = 4, w: int = 4, frames: int = 2, txt: int = 5,
                batch: int = 1, seed: int = 0, text_pad: int = 0) -> dict:
    """Forward kwargs for a token grid ``h x w`` (x ``frames`` for video) and ``txt`` text tokens.

    ``text_pad`` marks that many trailing text tokens as padding in the text mask, for models that
    take one (Qwen-Image, LTX, HunyuanVideo).
    """
    g = torch.Generator().manual_seed(seed)
    cfg = model.config

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    mask = torch.ones(batch, txt, dtype=torch.bool)
    if text_pad:
        mask[:, txt - text_pad:] = False
    t = torch.rand(batch, generator=g)
    if family == "flux":
        ids_img = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1).reshape(-1, 3)
        return dict(hidden_states=rand(batch, h * w, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                    pooled_projections=rand(batch, cfg.pooled_projection_dim), timestep=t,
                    img_ids=ids_img.float(), txt_ids=torch.zeros(txt, 3))
    if family == "flux2":
        grid = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), torch.zeros(1), indexing="ij"), -1)
        ids_img = grid.reshape(1, -1, 4).float().expand(batch, -1, -1)
        ids_txt = torch.zeros(batch, txt, 4)
        ids_txt[..., 3] = torch.arange(txt)
        return dict(hidden_states=rand(batch, h * w, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                    timestep=t, img_ids=ids_img, txt_ids=ids_txt, guidance=torch.full((batch,), 3.5))
    if family == "qwen-image":
        return dict(hidden_states=rand(batch, h * w, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                    encoder_hidden_states_mask=mask if text_pad else None, timestep=t, img_shapes=[(1, h, w)] * batch)
    if family == "z-image":
        return dict(x=[rand(cfg.in_channels, 1, 2 * h, 2 * w) for _ in range(batch)], t=t,
                    cap_feats=[rand(txt, cfg.cap_feat_dim) for _ in range(batch)])
    if family == "wan":
        return dict(hidden_states=rand(batch, cfg.in_channels, frames, 2 * h, 2 * w), timestep=t * 1000,
                    encoder_hidden_states=rand(batch, txt, cfg.text_dim))
    if family == "sd3":
        return dict(hidden_states=rand(batch, cfg.in_channels, 2 * h, 2 * w), encoder_hidden_states=rand(batch, txt, cfg.joint_attention_dim),
                    pooled_projections=rand(batch, cfg.pooled_projection_dim), timestep=t * 1000)
    if family == "ltx":
        return dict(hidden_states=rand(batch, frames * h * w, cfg.in_channels), encoder_hidden_states=rand(batch, txt, cfg.caption_channels),
                    timestep=t * 1000, encoder_attention_mask=mask.float(), num_frames=frames, height=h, width=w)
    if family == "hunyuan-video":
        return dict(hidden_states=rand(batch, cfg.in_channels, frames, h, w), timestep=t * 1000,
                    encoder_hidden_states=rand(batch, txt, cfg.text_embed_dim), encoder_attention_mask=mask.float(),
                    pooled_projections=rand(batch, cfg.pooled_projection_dim), guidance=torch.full((batch,), 6.0) * 1000)
    if family == "cogvideox":
        return dict(hidden_states=rand(batch, frames, cfg.in_channels, 2 * h, 2 * w),
                    encoder_hidden_states=rand(batch, cfg.max_text_seq_length, cfg.text_embed_dim),
                    timestep=(t * 1000).long())
    raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}.")


def output_tensor(out) -> torch.Tensor:
    """The sample of a diffusers transformer output (a list of samples is stacked)."""
    sample = out.sample if hasattr(out, "sample") else out[0]
    return torch.stack(list(sample)) if isinstance(sample, (list, tuple)) else sample
