"""Text encoding once per request: rank 0 encodes, every other rank receives the embeddings.

With ``Engine(..., encode_text_once=True)`` only global rank 0 loads the pipeline's text encoders;
the other ranks load the pipeline without them (a text encoder is as large as 15 GiB in bf16 for
Qwen-Image's Qwen2.5-VL-7B) and get the prompt embeddings by one broadcast per request. The
pipeline is then called with ``prompt_embeds`` (and its companions) instead of prompts, which every
diffusers pipeline accepts.

Per pipeline class: what ``encode_prompt`` returns, in order, as ``__call__`` keyword names
(``None``: a value ``__call__`` does not take); negatives are encoded by a second call unless the
pipeline encodes them itself (Wan).
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist

__all__ = ["ENCODERS", "broadcast_embeddings", "encode", "text_encoder_names"]

# pipeline class -> (names of encode_prompt's outputs, whether one call also encodes the negative)
ENCODERS: dict[str, tuple[tuple[str | None, ...], bool]] = {
    "QwenImagePipeline": (("prompt_embeds", "prompt_embeds_mask"), False),
    "FluxPipeline": (("prompt_embeds", "pooled_prompt_embeds", None), False),
    "WanPipeline": (("prompt_embeds", "negative_prompt_embeds"), True),
}


def text_encoder_names(model_index: dict) -> list[str]:
    """The text encoder components (``text_encoder``, ``text_encoder_2``, ...) of a pipeline's
    ``model_index.json`` (``DiffusionPipeline.load_config``)."""
    return [n for n, v in model_index.items() if n.startswith("text_encoder") and isinstance(v, (list, tuple))]


def _check(pipe) -> tuple[tuple[str | None, ...], bool]:
    name = type(pipe).__name__
    if name not in ENCODERS:
        raise ValueError(f"encode_text_once supports {sorted(ENCODERS)}; {name} is not one of them. "
                         "Leave encode_text_once off (every rank encodes).")
    return ENCODERS[name]


def encode(pipe, prompts: list[str], negative: list[str] | None, per_prompt: int, cfg: bool) -> dict:
    """``__call__`` keyword arguments holding the embeddings of ``prompts`` (and ``negative``), on CPU."""
    names, negative_in_one = _check(pipe)
    takes = inspect.signature(pipe.encode_prompt).parameters
    per = "num_videos_per_prompt" if "num_videos_per_prompt" in takes else "num_images_per_prompt"
    kwargs = {per: per_prompt}
    calls = inspect.signature(pipe.__call__).parameters
    if "max_sequence_length" in takes and "max_sequence_length" in calls:  # the call's default, not encode_prompt's
        kwargs["max_sequence_length"] = calls["max_sequence_length"].default
    if negative_in_one:
        kwargs.update(negative_prompt=negative, do_classifier_free_guidance=cfg)
    with torch.no_grad():
        values = pipe.encode_prompt(prompt=prompts, **kwargs)
        out = {n: v for n, v in zip(names, values) if n is not None and v is not None}
        if negative is not None and not negative_in_one:
            neg = pipe.encode_prompt(prompt=negative, **{k: v for k, v in kwargs.items() if k in (per, "max_sequence_length")})
            out.update({f"negative_{n}": v for n, v in zip(names, neg) if n is not None and v is not None})
    return {k: v.cpu() for k, v in out.items()}


def broadcast_embeddings(embeddings: dict | None) -> dict:
    """Rank 0's embeddings on every rank of the default group (one object broadcast)."""
    box = [embeddings]
    dist.broadcast_object_list(box, src=0)
    return box[0]
