"""Tensor parallel: the 9 families on a mesh with a ``tp`` axis, alone and with Ulysses, Ring and CFG,
equal the single-device output; TP's all-reduces and each rank's parameter bytes equal theory."""

import pytest
import rank_tasks
import torch

from meshsp import ParallelConfig
from meshsp.memory import parallel_weight_bytes
from meshsp.plans import Plan, get_plan, load_plan
from meshsp.tiny import FAMILIES, build_transformer

MODELS = sorted(FAMILIES)
EVEN = dict(h=4, w=4, txt=8, frames=2)
ODD = dict(h=3, w=5, txt=7, frames=1, batch=2)
# Z-Image's MLP is 8/3 of its width: 12 heads of 16 give 512, which 4 divides.
HEADS4 = {f: 12 if f == "z-image" else 4 for f in MODELS}
HEADS6 = {f: 6 for f in MODELS}

# (world, tp, ring, ulysses, mode, heads, shapes)
CONFIGS = {
    "TP2": (2, 2, 1, 1, "strict", HEADS4, ODD),
    "TP4": (4, 4, 1, 1, "strict", HEADS4, EVEN),
    "TP2xU2": (4, 2, 1, 2, "strict", HEADS4, EVEN),
    "TP2xU2-uaa": (4, 2, 1, 2, "advanced_uaa", HEADS6, ODD),  # 3 heads per tp rank on 2 Ulysses ranks
    "TP2xR2": (4, 2, 2, 1, "strict", HEADS4, ODD),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_tp_parity(pools, config):
    world, tp, ring, ulysses, mode, heads, shapes = CONFIGS[config]
    results = pools(world).run(rank_tasks.tp_parity_all, MODELS, tp, ring, ulysses, mode, heads, shapes, timeout=600)
    for family in MODELS:
        r = results[0][family]
        # Every rank holds 1/tp of the attention and MLP weights: bytes as the planner counts them.
        predicted = parallel_weight_bytes(build_transformer(family, heads=heads[family]), torch.float32, ring, ulysses, tp)
        assert [res[family]["param_bytes"] for res in results] == [predicted] * world, family
        assert r["param_bytes"] < r["full_param_bytes"]


def test_tp_all_reduce_bytes_equal_theory(pools):
    """Qwen-Image at TP2: per block, 4 row-wise projections (image and text attention outputs, image
    and text MLPs), each an all-reduce of [B, S_stream, d] that sends 2 (P-1)/P of its bytes."""
    shapes = dict(h=4, w=4, txt=8, frames=1, batch=2)
    r = pools(2).run(rank_tasks.tp_parity, "qwen-image", 2, 1, 1, "strict", 4, shapes)[0]
    model = build_transformer("qwen-image", heads=4)
    d, blocks, b = model.inner_dim, len(model.transformer_blocks), 2
    img, txt = 4 * 4, 8  # make_inputs' h x w is the token grid
    per_block = 2 * (img + txt) * d * b * 4  # fp32
    assert r["calls"]["tp_all_reduce"] == 4 * blocks
    assert r["bytes"]["tp_all_reduce"] == blocks * per_block * 2 * (2 - 1) // 2
    # AdaLN modulation (img_mod, txt_mod per block: 6d; norm_out: 2d) all-gathered: (P-1)/P of [B, k·d]
    assert r["calls"]["tp_all_gather"] == 2 * blocks + 1
    assert r["bytes"]["tp_all_gather"] == b * (12 * blocks + 2) * d * 4 * (2 - 1) // 2


def test_wan_norm_across_heads_bytes(pools):
    """Wan: the q/k RMSNorms over all heads all-reduce one float per token each."""
    r = pools(2).run(rank_tasks.tp_parity, "wan", 2, 1, 1, "strict", 4, dict(h=4, w=4, txt=8, frames=2))[0]
    model = build_transformer("wan", heads=4)
    blocks, d = len(model.blocks), model.config.num_attention_heads * model.config.attention_head_dim
    img, txt = 2 * 4 * 4, 8  # frames x h x w tokens
    rowwise = 3 * img * d * blocks  # attn1, attn2 and ffn outputs over the image tokens
    norms = (3 * img + txt) * blocks  # attn1 q, k and attn2 q over the image; attn2 k over the text
    assert r["calls"]["tp_all_reduce"] == 7 * blocks
    assert r["bytes"]["tp_all_reduce"] == (rowwise + norms) * 4 * 2 * (2 - 1) // 2


@pytest.mark.parametrize("family,tp,heads,text", [
    ("flux", 2, 3, "transformer_blocks.0.attn.heads = 3"),
    ("z-image", 4, 4, "feed_forward.w1 out_features = 170"),
])
def test_tp_that_does_not_divide_is_refused_before_any_collective(pools, family, tp, heads, text):
    msgs = pools(tp).run(rank_tasks.tp_refused, family, tp, heads)
    assert len(set(msgs)) == 1 and text in msgs[0] and f"tensor_parallel_size={tp}" in msgs[0], msgs


def test_plans_round_trip_their_tp_section():
    for cls in (FAMILIES[f].cls for f in MODELS):
        plan = load_plan(cls)
        assert plan.tp, cls
        again = Plan.from_dict(plan.to_dict())
        assert again.to_dict() == plan.to_dict()
    with pytest.raises(ValueError, match="ShardFeatures, and only it, takes 'outputs'"):
        Plan.from_dict({"model": "X", "plan": {}, "tp": {"a": {"style": "ColwiseParallel", "outputs": {0: -1}}}})
    with pytest.raises(ValueError, match="must be a mapping with a 'style'"):
        Plan.from_dict({"model": "X", "plan": {}, "tp": {"a": {"style": "Colwise"}}})


def test_recognised_tp_entries_follow_diffusers_tp_plan():
    """Flux's shipped tp section is its diffusers _tp_plan plus LocalHeads on each attention."""
    model = build_transformer("flux", heads=2)
    plan = get_plan(model)
    shipped = {k: type(v).__name__ for k, v in plan.tp.items()}
    for key, style in model._tp_plan.items():
        assert shipped[key] == {"colwise": "ColwiseParallel", "rowwise": "RowwiseParallel"}.get(style, type(style).__name__)
    assert shipped["transformer_blocks.*.attn"] == shipped["single_transformer_blocks.*.attn"] == "LocalHeads"


def test_config_and_mesh_take_tensor_parallel_size():
    from meshsp import DiffusionParallelConfig

    cfg = DiffusionParallelConfig(ulysses_degree=2, cfg_parallel_size=2, tensor_parallel_size=2)
    assert cfg.cfg_degree == 2 and cfg.world_size == 8 and cfg.tensor_parallel_size == 2
    assert ParallelConfig(tensor_parallel_size=4, ring_degree=2).world_size == 8
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ValueError, match="same setting"):
        DiffusionParallelConfig(cfg_degree=2, cfg_parallel_size=1)


def test_mesh_puts_tp_innermost(pools):
    assert pools(4).run(rank_tasks.mesh_names, 2, 1, 2) == [[("ring", "ulysses", "tp"), [[0, 1], [2, 3]]]] * 4


def test_tp2_u2_r2_on_8_ranks(pools):
    """Three axes at once: 4 heads -> 2 per tp rank -> 1 per Ulysses rank, and a ring of 2."""
    families = ["qwen-image", "wan"]
    results = pools(8).run(rank_tasks.tp_parity_all, families, 2, 2, 2, "strict", HEADS4, EVEN, timeout=600)
    for family in families:
        calls = results[0][family]["calls"]
        assert calls["all_to_all"] > 0 and calls["p2p"] > 0 and calls["tp_all_reduce"] > 0, calls


def test_text_encoder_runs_tensor_parallel_with_its_transformers_plan(pools):
    results = pools(2).run(rank_tasks.text_encoder_tp_parity, 2)
    layers = 2  # the tiny Qwen2.5-VL: an o_proj and a down_proj all-reduce per layer
    assert all(r["why"] is None and r["calls"]["tp_all_reduce"] == 2 * layers for r in results), results


def test_text_encoder_without_a_plan_stays_whole():
    import transformers

    from meshsp.text_encoding import parallelize_text_encoder

    t5 = transformers.T5EncoderModel(transformers.T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    assert "has no transformers tp plan" in parallelize_text_encoder(t5, tp_mesh=None)
