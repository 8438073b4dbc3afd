"""Model plans: each of the 9 transformers, parallelized with its plan, equals the single-device output."""

import pytest
import rank_tasks
import torch

from meshsp.plans import Plan, available_plans, get_plan, load_plan
from meshsp.tiny import FAMILIES, build_transformer

MODELS = sorted(FAMILIES)
MASKED = {"qwen-image", "ltx", "hunyuan-video"}  # take a text padding mask


def _even(family):
    return dict(h=4, w=4, txt=8, frames=2)


def _odd(family):
    return dict(h=3, w=5, txt=7, frames=1, text_pad=2 if family in MASKED else 0, batch=2)


# (world, ring, ulysses, mode, heads, shapes)
CONFIGS = {
    "U2": (2, 1, 2, "strict", 2, _even),
    "R2": (2, 2, 1, "strict", 2, _odd),  # ring takes uneven lengths in any mode
    "U2-uaa": (2, 1, 2, "advanced_uaa", 3, _odd),
    "U4": (4, 1, 4, "strict", 4, _even),
    "U2xR2": (4, 2, 2, "strict", 2, _even),
    "U4-uaa": (4, 1, 4, "advanced_uaa", 6, _odd),
    "U2xR2-uaa": (4, 2, 2, "advanced_uaa", 3, _odd),
}


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("family", MODELS)
def test_model_parity(pools, family, config):
    world, ring, ulysses, mode, heads, shapes = CONFIGS[config]
    errs = pools(world).run(rank_tasks.model_parity, family, ring, ulysses, mode, heads, shapes(family))
    assert len(errs) == world


@pytest.mark.parametrize("family", ["z-image", "qwen-image", "wan"])
def test_torch_parallelize_module_applies_the_plan_as_meshsp_does(pools, family):
    """torch's own entry point with a meshsp plan: '-1' paths resolved (Z-Image), exact output."""
    world, ring, ulysses, mode, heads, shapes = CONFIGS["U2xR2-uaa"]
    pools(world).run(rank_tasks.model_parity, family, ring, ulysses, mode, heads, shapes(family), entry="torch")


@pytest.mark.parametrize("case,text", [
    ("typo", "plan path 'transformer_block.*.attn' matches no module"),
    ("partial", "has no argument 'latents'"),
    ("inputs", "differ"),
])
def test_torch_parallelize_module_raises_as_meshsp_does(pools, case, text):
    msgs = pools(2).run(rank_tasks.raises, "torch_entry_point", case, timeout=60)
    assert len(set(msgs)) == 1 and text in msgs[0], msgs


def test_torch_parallelize_module_is_identity_on_one_rank(pools):
    assert pools(2).run(rank_tasks.torch_entry_point, "degree1") == ["identity"] * 2


def test_z_image_30_heads_on_u4(pools):
    """Z-Image's real head count: 30 heads do not divide over 4 Ulysses ranks; UAA runs them."""
    pools(4).run(rank_tasks.model_parity, "z-image", 1, 4, "advanced_uaa", 30, dict(h=3, w=5, txt=7))


@pytest.mark.parametrize("config", ["U2xR2-uaa", "R2"])
def test_z_image_refiners_are_sequence_parallel(pools, config):
    """The real model's 2 image refiner layers run sharded and are gathered after the last one:
    every attention (2 refiner + 2 main layers) goes through SP attention, the caption refiner not."""
    world, ring, ulysses, mode, heads, shapes = CONFIGS[config]
    results = pools(world).run(rank_tasks.model_parity, "z-image", ring, ulysses, mode, heads, shapes("z-image"),
                               config=dict(n_refiner_layers=2, n_layers=2))
    for res in results:
        assert res["calls"].get("p2p", 0) == 4 * (ring - 1), res  # one ring step per SP attention
        assert res["calls"].get("all_to_all", 0) == (8 if ulysses > 1 else 0), res


def test_strict_mode_refuses_30_heads_on_u4(pools):
    msgs = pools(4).run(rank_tasks.raises, "model_parity", "z-image", 1, 4, "strict", 30, dict(h=3, w=5, txt=7))
    assert all("ulysses_mode='advanced_uaa'" in m for m in msgs), msgs[0]


CP_PLAN_MODELS = [f for f in MODELS if getattr(build_transformer(f), "_cp_plan", None)]


@pytest.mark.parametrize("family", CP_PLAN_MODELS)
@pytest.mark.parametrize("config", ["U2-uaa", "R2"])
def test_converted_cp_plan_parity(pools, family, config):
    world, ring, ulysses, mode, heads, shapes = CONFIGS[config]
    pools(world).run(rank_tasks.model_parity, family, ring, ulysses, mode, heads, shapes(family),
                     plan_source="cp_plan")


def test_cp_plan_models_are_the_five_with_a_diffusers_plan():
    assert CP_PLAN_MODELS == ["flux", "flux2", "ltx", "qwen-image", "wan"]


@pytest.mark.parametrize("family", MODELS)
def test_shipped_plan_yaml_round_trip(family):
    model = build_transformer(family)
    plan = get_plan(model)
    assert plan.model == type(model).__name__
    again = Plan.from_dict(__import__("yaml").safe_load(plan.to_yaml()))
    again.validate(model)
    assert again.to_dict() == plan.to_dict()


def test_every_shipped_plan_names_a_diffusers_class_with_a_tiny_config():
    """So that the coverage tests run each shipped plan on gloo ranks (test_coverage.py)."""
    from meshsp.zoo import ZOO

    assert {f.cls for f in FAMILIES.values()} <= set(available_plans()) <= set(ZOO)


def test_parallelize_leaves_weights_and_processors_untouched(pools):
    assert all(pools(2).run(rank_tasks.untouched_after_parallelize, "flux"))


PLAN_ERRORS = [
    ({"plan": {"x_embedder": {"style": "ShardSeq"}}}, "unknown style 'ShardSeq'; valid styles"),
    ({"plan": {"x_embedder": {"style": "ShardSequence", "input": {"a": 1}}}}, "unknown keys ['input']"),
    ({"plan": {"transformer_block.*.attn": {"style": "ParallelAttention"}}}, "nearest module names"),
    ({"plan": {"proj_out": "GatherSequence"}}, "must be a mapping with a 'style'"),
    ({"plan": {"proj_out": {"style": "ShardSequence"}}}, "needs 'inputs' and/or 'outputs'"),
    ({"plan": {"proj_out": {"style": "ShardSequence", "inputs": {"x": {"dims": 1}}}}}, "needs 'dim'"),
    ({"plan": {"proj_out": {"style": "ParallelAttention", "inputs": {"x": 1}}}}, "takes no inputs"),
    ({"plans": {}}, "has 'model', 'plan'"),
    ({"plan": {"proj_out.-1": {"style": "GatherSequence"}}}, "nearest module names"),  # not a ModuleList
    ({"plan": {"proj_out": {"style": "ShardSequence", "outputs": {0: {"dim": 1, "flatten": True, "segments": [None]}}}}},
     "one of 'segments', 'flatten' and 'units'"),
]


@pytest.mark.parametrize("data,text", PLAN_ERRORS)
def test_plan_errors(data, text):
    model = build_transformer("flux")
    with pytest.raises(ValueError, match=text.replace("[", r"\[").replace("*", r"\*")):
        Plan.from_dict(data).validate(model)


def test_last_child_path():
    model = build_transformer("z-image", heads=2)
    plan = Plan.from_dict({"plan": {"noise_refiner.-1": {"style": "GatherSequence"}}})
    assert plan.matches(model, "noise_refiner.-1") == [f"noise_refiner.{len(model.noise_refiner) - 1}"]
    assert plan.matches(model, "layers.-1.attention") == [f"layers.{len(model.layers) - 1}.attention"]
    assert plan.matches(model, "layers.*.attention") == [f"layers.{i}.attention" for i in range(len(model.layers))]


def test_unknown_plan_name_and_model_without_plan():
    with pytest.raises(ValueError, match="shipped plans"):
        load_plan("NoSuchModel")
    with pytest.raises(ValueError, match="no meshsp plan for Linear"):
        get_plan(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ulysses_mode must be one of"):
        load_plan("FluxTransformer2DModel", ulysses_mode="fast")


def test_shard_errors_raise_on_every_rank(pools):
    msgs = pools(2).run(rank_tasks.raises, "bad_plan_forward", "flux", timeout=60)
    assert len(set(msgs)) == 1 and "cannot shard 'img_ids'" in msgs[0], msgs
    msgs = pools(2).run(rank_tasks.raises, "bad_plan_apply", "flux", timeout=60)
    assert "has no argument 'latents'" in msgs[0] and len(set(msgs)) == 1, msgs
