"""Rank tasks for tests/test_plan_masks.py: shipped plans whose attention takes a mask over the whole sequence."""

import torch


def _shipped(model, ring: int, ulysses: int):
    from torch.distributed.tensor.parallel import parallelize_module

    from meshsp.bench import sp_mesh
    from meshsp.plans import get_plan

    plan = get_plan(model, ulysses_mode="advanced_uaa")
    assert plan.source == "shipped", plan.source
    parallelize_module(model, sp_mesh(ring, ulysses), plan)
    return plan


def ideogram4_per_token_timestep(ring: int, ulysses: int) -> dict:
    """Ideogram 4 with a per-token timestep [B, S]: its AdaLN input is per token, sharded at the root
    and read by every block and by the final layer on this rank's tokens."""
    from meshsp.plans.verify import compare
    from meshsp.zoo import build, inputs_for, output_of

    cls = "Ideogram4Transformer2DModel"

    def forward(model):
        kwargs = inputs_for(model, h=3, w=5, txt=7, batch=2, text_pad=2)
        seq = kwargs["hidden_states"].shape[1]
        kwargs["timestep"] = torch.sigmoid(torch.randn(2, seq, generator=torch.Generator().manual_seed(3)))
        return output_of(model, model(**kwargs))

    result = compare(lambda: build(cls, heads=3), forward, lambda m: _shipped(m, ring, ulysses),
                     where=f"{cls} per-token timestep R{ring}xU{ulysses}", ring=ring, ulysses=ulysses)
    return {"diff": result["diff"]}


def qwen21_refusal(case: str) -> str:
    """The ValueError a Qwen-Image 2.1 forward under its plan raises: with the prefix KV cache, or
    with the flex processor (which takes no runs)."""
    from diffusers.models.transformers.transformer_qwenimage21 import (QwenImage21FlexAttnProcessor,
                                                                         QwenImage21KVCache)

    from meshsp.zoo import build, inputs_for

    model = build("QwenImage21Transformer2DModel", heads=3)
    _shipped(model, 1, 2)
    kwargs = inputs_for(model, h=3, w=5, txt=7, batch=2, text_pad=2)
    if case == "kv_cache":
        kwargs.update(kv_cache=QwenImage21KVCache(len(model.transformer_blocks)), kv_cache_mode="extract")
    elif case == "flex":
        model.set_attn_processor(QwenImage21FlexAttnProcessor())
    try:
        with torch.no_grad():
            model(**kwargs)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"Qwen-Image 2.1 with {case} ran under its plan")
