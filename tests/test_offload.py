"""Loading and cpu_offload: where the weights load, and diffusers' offloading of the text encoders and VAE.

There is no GPU here, so offloading runs with the CPU as both onload and offload device: the hooks
are diffusers' real ones but move nothing. ``OnloadCheck`` makes that a test of what a GPU would
need: it follows which weights diffusers has onloaded and fails on any op that reads a weight of
an offloaded model that is not onloaded at that moment (on a GPU: a device mismatch).
"""

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from meshsp import ParallelConfig
from meshsp.engine import Engine, SamplingParams, resolve_model
from meshsp.loading import load_kwargs as _load_kwargs
from meshsp.loading import load_pipeline as _load_pipeline

FLUX = SamplingParams(num_inference_steps=2, width=64, height=48, seed=1)
QWEN = SamplingParams(num_inference_steps=2, width=64, height=48, seed=3, guidance_scale=4.0, negative_prompt="blurry")
WAN = SamplingParams(num_inference_steps=2, width=64, height=48, seed=1, num_frames=5, guidance_scale=5.0,
                     negative_prompt="blurry")
PROMPTS = ["a cat", "a red dog on a chair"]  # 12 image + 12 text tokens: even, as strict U2 needs


def frames(images) -> list[np.ndarray]:
    return [np.asarray(f).astype(int) for im in images for f in (im if isinstance(im, list) else [im])]


def assert_same_images(got, want) -> None:
    assert len(frames(got)) == len(frames(want))
    for g, w in zip(frames(got), frames(want)):
        assert np.abs(g - w).max() <= 1


# Tensor methods that read metadata only (a pipeline asks vae.dtype between calls), not the data.
METADATA = {"__get__", "dim", "size", "numel", "element_size", "is_floating_point", "is_complex", "__len__",
            "data_ptr", "__hash__", "__repr__"}


class OnloadCheck(TorchFunctionMode):
    """Fails on an op that reads a weight of ``models`` outside its onloaded window.

    Which weights are onloaded is followed through diffusers' ``ModuleGroup.onload_`` / ``offload_``
    (patched for the test with ``monkeypatch``)."""

    def __init__(self, monkeypatch, models: list[torch.nn.Module]) -> None:
        from diffusers.hooks.group_offloading import ModuleGroup

        super().__init__()
        self.watched = {id(t): name for m in models for name, t in [*m.named_parameters(), *m.named_buffers()]}
        self.onloaded: set[int] = set()
        self.reads = 0
        self.moving = False  # inside diffusers' own onload / offload

        def tensors(group):
            for module in group.modules:
                yield from module.parameters()
                yield from module.buffers()
            yield from group.parameters
            yield from group.buffers

        onload, offload = ModuleGroup.onload_, ModuleGroup.offload_

        def onload_(group):
            self.moving = True
            onload(group)
            self.moving = False
            self.onloaded.update(id(t) for t in tensors(group))

        def offload_(group):
            self.moving = True
            offload(group)
            self.moving = False
            self.onloaded.difference_update(id(t) for t in tensors(group))

        monkeypatch.setattr(ModuleGroup, "onload_", onload_)
        monkeypatch.setattr(ModuleGroup, "offload_", offload_)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.moving and getattr(func, "__name__", "") not in METADATA:
            for t in [*args, *kwargs.values()]:
                if isinstance(t, torch.Tensor) and id(t) in self.watched:
                    self.reads += 1
                    assert id(t) in self.onloaded, f"{func} read {self.watched[id(t)]} while it was offloaded"
        return func(*args, **kwargs)


def test_load_kwargs_by_device():
    """CPU loads as diffusers does by default; CUDA loads the transformers onto the rank's GPU and
    the other models too, unless they are offloaded or transformers' "cuda" (cuda:LOCAL_RANK) is another GPU."""
    cuda1 = torch.device("cuda", 1)
    assert _load_kwargs(torch.device("cpu"), cpu_offload=False, local_rank=0) == ({}, {})
    assert _load_kwargs(torch.device("cpu"), cpu_offload=True, local_rank=3) == ({}, {})
    assert _load_kwargs(cuda1, cpu_offload=False, local_rank=1) == ({"device_map": cuda1}, {"device_map": "cuda"})
    assert _load_kwargs(cuda1, cpu_offload=True, local_rank=1) == ({"device_map": cuda1}, {})
    assert _load_kwargs(cuda1, cpu_offload=False, local_rank=0) == ({"device_map": cuda1}, {})


def test_device_map_loading_gives_the_same_weights():
    """The CUDA loading path (transformer loaded on its own with a device, the pipeline with a
    device_map string) run with the CPU as the device: the same weights as the default load."""
    from diffusers import DiffusionPipeline

    path = resolve_model("tiny-flux")
    want = DiffusionPipeline.from_pretrained(path, dtype=torch.float32)
    got = _load_pipeline(path, torch.float32, ({"device_map": torch.device("cpu")}, {"device_map": "cpu"}), {})
    for name, model in want.components.items():
        if isinstance(model, torch.nn.Module):
            got_state = getattr(got, name).state_dict()
            assert got_state.keys() == model.state_dict().keys(), name
            for key, value in model.state_dict().items():
                assert torch.equal(got_state[key], value), f"{name}.{key}"


@pytest.mark.parametrize("model,params", [("tiny-flux", FLUX), ("tiny-qwen-image", QWEN), ("tiny-wan", WAN)])
def test_offloaded_models_are_onloaded_where_used(monkeypatch, caplog, model, params):
    """Every model but the transformer carries diffusers' offloading hooks; every read of their
    weights happens while the hooks have them onloaded; the images equal those without offload."""
    with Engine(model, device="cpu") as engine:
        want = engine.generate(PROMPTS, params)
    with Engine(model, device="cpu", cpu_offload=True) as engine:
        info = engine.weights_info()[0]
        assert {n for n, w in info.items() if not w["offloaded"]} == {"transformer"}
        assert {n for n, w in info.items() if w["offloaded"]} >= {"text_encoder", "vae"}
        pipe = engine._runner.pipe
        with OnloadCheck(monkeypatch, [getattr(pipe, n) for n, w in info.items() if w["offloaded"]]) as check:
            got = engine.generate(PROMPTS, params)
    assert check.reads > 0
    assert "cpu_offload on device='cpu' saves no memory" in caplog.text
    assert_same_images(got, want)


def test_onload_check_catches_weights_left_offloaded(monkeypatch):
    """The check is not vacuous: block-level offloading of a VAE without block modules hooks only
    ``forward``, which ``vae.decode`` does not call; its weights are read while offloaded."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(resolve_model("tiny-qwen-image"), dtype=torch.float32)
    vae = pipe.vae
    vae.enable_group_offload(torch.device("cpu"), offload_type="block_level", num_blocks_per_group=1)
    latents = torch.zeros(1, vae.config.z_dim, 1, 6, 8)
    with OnloadCheck(monkeypatch, [vae]), pytest.raises(AssertionError, match="while it was offloaded"):
        vae.decode(latents)


@pytest.fixture(scope="module")
def qwen_reference():
    with Engine("tiny-qwen-image", device="cpu") as engine:
        return engine.generate(PROMPTS, QWEN)


@pytest.mark.parametrize("encode_text_once", [False, True], ids=["replicated-text", "text-once"])
def test_offload_per_rank(qwen_reference, encode_text_once):
    """U2: each rank offloads its own text encoder (only rank 0 has one with encode_text_once) and
    VAE and keeps its transformer; the images equal the single-process images without offload."""
    with Engine("tiny-qwen-image", ParallelConfig(ulysses_degree=2), device="cpu", cpu_offload=True,
                encode_text_once=encode_text_once) as engine:
        got = engine.generate(PROMPTS, QWEN)
        info = engine.weights_info()
    assert len(info) == 2
    for rank, weights in enumerate(info):
        assert not weights["transformer"]["offloaded"] and weights["vae"]["offloaded"]
        has_text = rank == 0 or not encode_text_once
        assert ("text_encoder" in weights) == has_text and (not has_text or weights["text_encoder"]["offloaded"])
    assert_same_images(got, qwen_reference)


def test_cpu_offload_flag_reaches_the_engine(monkeypatch, capsys, tmp_path):
    """--cpu-offload on generate (and the examples, which share its flags) and serve."""
    import meshsp.engine
    import meshsp.serve
    from meshsp.cli import build_parser, main

    assert main(["generate", "--model", "tiny-flux", "--cpu-offload", "--width", "64", "--height", "48",
                 "--num-inference-steps", "2", "--output", str(tmp_path / "cat.png")]) == 0
    out = capsys.readouterr().out
    assert "vae 0.1 MiB on cpu (offloaded)" in out and "transformer 0.3 MiB on cpu;" in out, out
    assert "resident 0.3 MiB" in out
    assert not build_parser().parse_args(["generate"]).cpu_offload

    seen = {}

    class FakeEngine:
        def __init__(self, model, config, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(meshsp.engine, "Engine", FakeEngine)
    monkeypatch.setattr(meshsp.serve, "serve", lambda *args, **kwargs: 0)
    assert main(["serve", "tiny-flux", "--cpu-offload"]) == 0
    assert seen["cpu_offload"] is True
