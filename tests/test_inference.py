"""Plan inference and _cp_plan repair, in one process (the multi-rank parity is in test_coverage)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

from meshsp.plans import Plan, infer_plan, plan_from_cp_plan
from meshsp.plans.simulate import InferenceError, simulate
from meshsp.plans.trace import kind_of
from meshsp.styles import GatherSequence, ParallelAttention, ShardSequence
from meshsp.zoo import build, inputs_for


def test_kind_of_names_what_a_dim_follows():
    # 20 more image tokens (h 3 -> 5 at w 5, 2 frames), 3 more text tokens
    assert kind_of((2, 30, 8), (2, 50, 8), (2, 30, 8), 20, 3, 10) == ("img", 1)
    assert kind_of((2, 15, 8), (2, 25, 8), (2, 15, 8), 20, 3, 10) == ("img", 1)  # per frame
    assert kind_of((2, 7, 8), (2, 7, 8), (2, 10, 8), 20, 3, 10) == ("txt", 1)
    assert kind_of((37, 8), (57, 8), (40, 8), 20, 3, 10) == ("joint", 0)
    assert kind_of((2, 3, 5), (2, 5, 5), (2, 3, 5), 20, 3, 10) == ("other", 1)  # a grid dim
    assert kind_of((2, 8), (2, 8), (2, 8), 20, 3, 10) == (None, None)


def test_inferred_flux_plan_shards_streams_at_the_first_block_and_rope_per_segment():
    plan = infer_plan(build("FluxTransformer2DModel", heads=3))
    first = plan["transformer_blocks.0"]
    assert isinstance(first, ShardSequence) and set(first.inputs) == {"hidden_states", "encoder_hidden_states"}
    rope = plan["transformer_blocks.*"].inputs["image_rotary_emb"]
    assert rope.segments == (None, "transformer_blocks.0:hidden_states")  # [txt | img], text first
    assert isinstance(plan["transformer_blocks.*.attn"], ParallelAttention)
    assert isinstance(plan["single_transformer_blocks.-1"], GatherSequence)


def test_cross_attention_to_text_stays_local():
    plan = infer_plan(build("PixArtTransformer2DModel", heads=3))
    assert list(plan) == ["transformer_blocks.0", "transformer_blocks.*.attn1", "transformer_blocks.-1"]
    assert set(plan["transformer_blocks.0"].inputs) == {"hidden_states"}  # the text stays whole


class _Block(nn.Module):
    def __init__(self, mix: bool):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.mix = nn.Conv1d(16, 16, 3, padding=1, groups=16) if mix else None

    def forward(self, hidden_states):
        q, k, v = self.qkv(hidden_states).unflatten(-1, (3, 2, 8)).permute(2, 0, 3, 1, 4)
        out = hidden_states + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
        if self.mix is not None:  # a convolution over neighbouring tokens
            out = out + self.mix(out.transpose(1, 2)).transpose(1, 2)
        return out


class _Toy(nn.Module):
    def __init__(self, mix: bool):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(mix), _Block(mix)])

    def forward(self, hidden_states):
        for block in self.blocks:
            hidden_states = block(hidden_states)
        return (hidden_states,)


def _toy_inputs(model, *, h, w, frames, txt, batch, text_pad):
    g = torch.Generator().manual_seed(h * 100 + w)
    return {"hidden_states": torch.randn(batch, h * w, 16, generator=g)}


def test_a_model_without_a_zoo_entry_infers_with_its_own_inputs():
    plan = infer_plan(_Toy(mix=False), _toy_inputs)
    assert list(plan) == ["blocks.0", "blocks.*", "blocks.-1"]  # attention inside the block itself
    assert isinstance(plan["blocks.*"], ParallelAttention) and plan["blocks.0"].inputs["hidden_states"].dim == 1


def test_token_mixing_outside_attention_is_refused_with_what_was_found():
    with pytest.raises(InferenceError, match="mix tokens outside attention"):
        infer_plan(_Toy(mix=True), _toy_inputs)


def test_no_inputs_for_an_unknown_class_says_what_to_pass():
    with pytest.raises(InferenceError, match="pass make_inputs"):
        infer_plan(_Toy(mix=False))


def test_static_cp_plan_for_40_blocks_applies_to_any_depth():
    """Helios' _cp_plan names blocks.0 ... blocks.39 one by one; converted, it is depth-agnostic."""
    model = build("HeliosTransformer3DModel", heads=3)
    assert "blocks.39.attn1" in type(model)._cp_plan and len(model.blocks) == 2
    plan = plan_from_cp_plan(model)
    assert not any(p.split(".")[1].isdigit() for p in plan if p.startswith("blocks.")), list(plan)
    deeper = build("HeliosTransformer3DModel", heads=3, num_layers=3)
    plan.validate(deeper)
    assert plan.matches(deeper, "blocks.*.[a]ttn1") == [f"blocks.{i}.attn1" for i in range(3)]


def test_forgotten_rope_is_found_and_sharded():
    """LTX-2's _cp_plan leaves the audio-video cross-attention RoPE whole (and shards its video RoPE
    only at a rank this config's tables do not have); the conversion shards both at the output."""
    plan = plan_from_cp_plan(build("LTX2VideoTransformer3DModel", heads=3))
    assert isinstance(plan["cross_attn_rope"], ShardSequence) and isinstance(plan["rope"], ShardSequence)
    assert plan["transformer_blocks.*.video_to_audio_attn"].queries == "replicated"


def test_a_cp_plan_without_its_rope_entry_is_repaired():
    model = build("WanTransformer3DModel", heads=3)
    model._cp_plan = {"blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)},
                      "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}
    plan = plan_from_cp_plan(model)
    assert "rope" in plan and simulate(model, plan, inputs_for(model, h=3, w=5, frames=2, txt=7, batch=2))


def test_a_cp_plan_that_cannot_run_is_refused_naming_what_it_found():
    model = build("WanTransformer3DModel", heads=3)
    model._cp_plan = {"blocks.0": {"hidden_states": ContextParallelInput(split_dim=1, expected_dims=3)}}  # no gather
    with pytest.raises(ValueError, match="converted _cp_plan"):
        plan_from_cp_plan(model)


def test_simulation_catches_a_plan_that_leaves_rope_whole():
    model = build("WanTransformer3DModel", heads=3)
    plan = Plan({"blocks.0": ShardSequence(inputs={"hidden_states": 1}), "blocks.*.attn1": ParallelAttention(),
                 "blocks.-1": GatherSequence(outputs={0: 1})})
    with pytest.raises(InferenceError, match="raised RuntimeError"):
        simulate(model, plan, inputs_for(model, h=3, w=5, frames=2, txt=7, batch=2))


def _flux_plan_with(change):
    model = build("FluxTransformer2DModel", heads=3)
    data = infer_plan(model).to_dict()
    change(data["plan"])
    return model, Plan.from_dict(data)


def test_simulation_catches_a_missing_gather():
    """Without the text stream's gather, the next stack would shard an already sharded stream."""
    model, plan = _flux_plan_with(lambda p: p["transformer_blocks.-1"]["outputs"].pop(0))
    with pytest.raises(InferenceError):
        simulate(model, plan, inputs_for(model, h=3, w=5, txt=7, batch=2))


def test_simulation_catches_whole_queries_that_are_sharded():
    def replicate(p):
        p["transformer_blocks.*.attn"]["queries"] = "replicated"

    model, plan = _flux_plan_with(replicate)
    with pytest.raises(InferenceError, match="queries are sharded"):
        simulate(model, plan, inputs_for(model, h=3, w=5, txt=7, batch=2))


def test_simulation_catches_a_key_table_out_of_step():
    """The joint RoPE table sharded image-first while the model puts the text first: refused."""
    def swap(p):
        spec = p["transformer_blocks.*"]["inputs"]["image_rotary_emb"]
        spec["segments"] = list(reversed(spec["segments"]))

    model, plan = _flux_plan_with(swap)
    with pytest.raises(InferenceError, match="differs from its slice"):
        simulate(model, plan, inputs_for(model, h=3, w=5, txt=7, batch=2))


def test_building_a_tiny_model_leaves_the_callers_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build("FluxTransformer2DModel")
    assert torch.equal(torch.rand(3), expected)


def test_plan_infer_cli_writes_a_verified_yaml(tmp_path):
    """meshsp plan --infer on a saved model directory: inferred, checked on 2 and 4 gloo ranks, written."""
    import subprocess
    import sys

    from meshsp.plans import load_plan

    model = build("CogView4Transformer2DModel")
    model.save_pretrained(tmp_path / "transformer")
    out = tmp_path / "plan.yaml"
    proc = subprocess.run([sys.executable, "-m", "meshsp.cli", "plan", "--infer", str(tmp_path), "--output", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "R1xU2: equal to the single-device output" in proc.stderr and "R2xU2: equal" in proc.stderr
    plan = load_plan(out)
    plan.validate(model)
    assert plan.model == "CogView4Transformer2DModel" and "transformer_blocks.*.attn1" in plan


def test_plan_infer_cli_refuses_with_the_reason():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "meshsp.cli", "plan", "--infer", "SanaTransformer2DModel"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "refused" in proc.stderr and "linear attention" in proc.stderr
