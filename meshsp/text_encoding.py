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

__all__ = ["ENCODERS", "broadcast_embeddings", "encode", "parallelize_text_encoder", "text_encoder_names"]

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


def _text_tp_plan(encoder: torch.nn.Module) -> tuple[str, dict] | None:
    """(module path of the text model, its transformers ``base_model_tp_plan``), or None."""
    config = getattr(encoder, "config", None)
    for cfg in (getattr(config, "text_config", None), config):
        plan = getattr(cfg, "base_model_tp_plan", None)
        if not plan:
            continue
        for name, module in encoder.named_modules():
            if getattr(module, "config", None) is cfg and isinstance(getattr(module, "layers", None), torch.nn.ModuleList):
                return name, plan
    return None


def parallelize_text_encoder(encoder: torch.nn.Module, tp_mesh) -> str | None:
    """Shard a transformers text encoder over ``tp_mesh`` with its own ``base_model_tp_plan``
    (q/k/v and MLP up projections column-wise, output projections row-wise; meshsp's versions of
    torch's styles, which slice each rank's own weights). Returns None when sharded, else why it
    stays whole (no plan, a style other than colwise / rowwise, or widths ``tp`` does not divide),
    checked before anything is sharded.

    Example::

        parallelize_text_encoder(pipe.text_encoder, mesh["tp"])   # Qwen2.5-VL's language model
    """
    from torch.distributed.tensor.parallel import parallelize_module

    from meshsp.plans import match_path
    from meshsp.tp import ColwiseParallel, RowwiseParallel, tp_requirements

    found = _text_tp_plan(encoder)
    if found is None:
        return f"{type(encoder).__name__} has no transformers tp plan"
    prefix, plan = found
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    other = sorted({v for v in plan.values() if v not in styles})
    if other:
        return f"{type(encoder).__name__}'s tp plan uses {other}, which meshsp does not apply"
    tp = tp_mesh.size()
    entries = {}
    for key, style in plan.items():
        for name in match_path(encoder, f"{prefix}.{key}" if prefix else key):
            module = encoder.get_submodule(name)
            if any(size % tp for _, size in tp_requirements(styles[style](), module, name)):
                return f"tensor_parallel_size={tp} does not divide the widths of {name}"
            entries[name] = styles[style]()
    text = encoder.get_submodule(prefix) if prefix else encoder
    heads = [getattr(text.config, a, 0) or 0 for a in ("num_attention_heads", "num_key_value_heads")]
    if not entries or any(h % tp for h in heads):
        return f"tensor_parallel_size={tp} does not divide the text encoder's heads {heads}"
    parallelize_module(encoder, tp_mesh, entries)
    return None
