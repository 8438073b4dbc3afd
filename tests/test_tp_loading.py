"""Tensor-parallel loading: each rank reads only its part of every sharded weight from the
safetensors files (``meshsp.loading.load_sharded_transformer``), bit for bit what loading the whole
model and slicing it gives, with a load peak of about ``1/tp`` of the model."""

import json

import pytest
import torch
import tp_loading_tasks

from meshsp.loading import load_sharded_transformer
from meshsp.memory import parallel_weight_bytes
from meshsp.tiny import FAMILIES, build_transformer

MODELS = sorted(FAMILIES)
HEADS = {f: 12 if f == "z-image" else 4 for f in MODELS}  # 4 heads (Z-Image: an MLP width 4 divides)
# Qwen-Image at 8 heads of 128 (width 1024), 2 blocks: 304 MiB in float32, its largest tensor 24 MiB.
BIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=128, num_attention_heads=8,
           joint_attention_dim=512, guidance_embeds=False, axes_dims_rope=(16, 56, 56))
QWEN = dict(prompt="a cat on a windowsill", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=2,
            width=80, height=48, seed=5)
WAN = dict(prompt="a cat walking", negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=2,
           width=48, height=80, num_frames=5, seed=2)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """Every family's tiny transformer saved with save_pretrained (one safetensors file each)."""
    root = tmp_path_factory.mktemp("tp_loading")
    for family in MODELS:
        build_transformer(family, heads=HEADS[family]).save_pretrained(root / family / "transformer")
    return str(root)


@pytest.fixture(scope="module")
def big_model(tmp_path_factory):
    """The scaled-up Qwen-Image saved as a sharded checkpoint (4 files and an index), and its bytes."""
    import diffusers
    from diffusers.models.modeling_utils import no_init_weights

    folder = tmp_path_factory.mktemp("tp_loading_big")
    with no_init_weights():
        model = diffusers.QwenImageTransformer2DModel(**BIG)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.02, generator=generator)
    model.save_pretrained(folder / "transformer", max_shard_size="100MB")
    whole = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    return str(folder), whole, max(t.nbytes for t in model.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_weights_equal_whole_then_sliced(pools, tiny_root, dtype):
    """Every family at TP2: each local shard, replicated tensor and buffer equals (values, dtype,
    placement) what from_pretrained and then the plan give; bfloat16 casts as diffusers does,
    keeping Wan's _keep_in_fp32_modules in float32."""
    results = pools(2).run(tp_loading_tasks.weights_equal, tiny_root, MODELS, dtype)
    for rank in results:
        for family in MODELS:
            r = rank[family]
            assert not r["bad"] and r["sharded"] > 0, (family, r)


def test_sharded_weights_equal_at_tp4(pools, tiny_root):
    results = pools(4).run(tp_loading_tasks.weights_equal, tiny_root, ["flux", "qwen-image", "wan"], torch.float32, 4)
    assert all(not r[f]["bad"] and r[f]["sharded"] for r in results for f in r), results


@pytest.mark.parametrize("tp", [2, 4])
def test_load_peak_is_the_rank_share(pools, big_model, tp):
    """Each rank's peak of tensor bytes while loading is its share (the planner's count) plus at most
    one checkpoint tensor, far below the whole model that loading whole and slicing holds first."""
    folder, whole, largest = big_model
    results = pools(tp).run(tp_loading_tasks.load_peak, folder, tp)
    with torch.device("meta"):
        import diffusers

        planned = parallel_weight_bytes(diffusers.QwenImageTransformer2DModel(**BIG), torch.float32, tp=tp)
    for r in results:
        assert r["kept"] == planned, (r, planned)
        assert r["peak"] <= planned + largest, (r, planned, largest)
        assert r["peak"] < whole / tp + whole * 0.1, (r, whole)
    if tp == 2:  # today's path, for the record: the whole model first
        old = pools(tp).run(tp_loading_tasks.load_peak, folder, tp, torch.float32, True)
        assert all(r["peak"] >= whole and r["kept"] == planned for r in old), (old, whole)


@pytest.mark.parametrize("name,degrees,kwargs", [
    ("tiny-qwen-image", dict(tensor_parallel_size=2), QWEN),
    ("tiny-qwen-image", dict(tensor_parallel_size=2, ulysses_degree=2, ulysses_mode="advanced_uaa"), QWEN),
    ("tiny-wan", dict(tensor_parallel_size=2), WAN),
], ids=["qwen-TP2", "qwen-TP2xU2-uaa", "wan-TP2"])
def test_pipeline_with_sharded_transformer_equals_whole(pools, name, degrees, kwargs):
    world = degrees["tensor_parallel_size"] * degrees.get("ulysses_degree", 1)
    results = pools(world).run(tp_loading_tasks.pipeline_equal, name, degrees, kwargs)
    assert all(r["equal"] and r["loaded_tp"] == 2 for r in results), results


def test_engine_never_loads_the_whole_transformer(pools):
    results = pools(2).run(tp_loading_tasks.engine_reads_sharded, "tiny-qwen-image", 2)
    assert [r["loaded_tp"] for r in results] == [2, 2], results


def test_checkpoints_it_cannot_slice_are_refused(tmp_path, tiny_root):
    model = build_transformer("flux", heads=4)
    model.save_pretrained(tmp_path / "bin" / "transformer", safe_serialization=False)
    with pytest.raises(ValueError, match="reads each rank's slices from safetensors files.*save_pretrained"):
        load_sharded_transformer(str(tmp_path / "bin"), "transformer", tp_mesh=None)
    folder = tmp_path / "quantized" / "transformer"
    model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "bitsandbytes"}}))
    with pytest.raises(ValueError, match="quantized checkpoint"):
        load_sharded_transformer(str(tmp_path / "quantized"), "transformer", tp_mesh=None)


def test_plans_check_what_was_read_sharded(pools, tiny_root):
    messages = pools(2).run(tp_loading_tasks.refusals, tiny_root)
    assert messages[0] == messages[1] and len(messages[0]) == 3, messages
    layout, packed, twice = messages[0]
    assert "read sharded for tensor_parallel_size=2" in layout and "tensor_parallel_size=1" in layout
    assert "was loaded sharded as TPSlice(dim=0, blocks=(64,))" in packed and "blocks=(32, 32)" in packed
    assert "already a DTensor" in twice and "freshly loaded" in twice


def test_hub_ids_are_downloaded_first_and_tp1_is_refused(monkeypatch, tiny_root):
    from diffusers import DiffusionPipeline

    from meshsp import ParallelConfig
    from meshsp.loading import load_sharded_transformers

    with pytest.raises(ValueError, match="is for tensor_parallel_size > 1"):
        load_sharded_transformers(tiny_root, ParallelConfig())
    asked = []
    monkeypatch.setattr(DiffusionPipeline, "download", classmethod(lambda cls, name: asked.append(name) or tiny_root))
    with pytest.raises(ValueError, match="the process world size is 1"):  # one process: no tp ranks to load for
        load_sharded_transformers("org/model", ParallelConfig(tensor_parallel_size=2))
    assert asked == ["org/model"]
