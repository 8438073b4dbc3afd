"""Tiny offline diffusers pipelines: build, save, load through ``from_pretrained``, generate."""

import json
import threading

import numpy as np
import pytest
import torch

from meshsp import pipelines
from meshsp.pipelines import (
    BUILD_VERSION,
    TINY_PIPELINES,
    build_tiny_pipeline,
    example_call_kwargs,
    load_tiny_pipeline,
    tiny_pipeline_path,
)

NAMES = ["tiny-qwen-image", "tiny-flux", "tiny-wan"]
PIPELINE_CLASS = {"tiny-qwen-image": "QwenImagePipeline", "tiny-flux": "FluxPipeline", "tiny-wan": "WanPipeline"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache directory shared by the tests below (each pipeline is built once)."""
    return tmp_path_factory.mktemp("meshsp-cache")


def _pixels(output) -> np.ndarray:
    """The generated image(s) or video frames of a pipeline output as one uint8 array."""
    images = output.frames[0] if hasattr(output, "frames") else output.images
    return np.stack([np.asarray(image) for image in images])


def test_registry():
    assert set(NAMES) <= set(TINY_PIPELINES)
    assert all(isinstance(text, str) and text for text in TINY_PIPELINES.values())


@pytest.mark.parametrize("name", NAMES)
def test_build_saves_complete_pipeline(name, cache, monkeypatch):
    path = tiny_pipeline_path(name, cache)
    assert path.parent == cache and path.name.startswith(f"{name}-v{BUILD_VERSION}-")
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE_CLASS[name]
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]

    # A second call (or $MESHSP_CACHE as the default) reuses the directory without building.
    def no_build(_name):
        raise AssertionError("rebuilt a cached pipeline")

    monkeypatch.setattr(pipelines, "build_tiny_pipeline", no_build)
    assert tiny_pipeline_path(name, cache) == path
    monkeypatch.setenv("MESHSP_CACHE", str(cache))
    assert tiny_pipeline_path(name) == path


@pytest.mark.parametrize("name", NAMES)
def test_load_and_generate(name, cache):
    pipe = load_tiny_pipeline(name, cache)
    assert type(pipe).__name__ == PIPELINE_CLASS[name]
    pipe.set_progress_bar_config(disable=True)

    # Loaded weights equal a fresh in-memory build (the build is seeded).
    fresh = build_tiny_pipeline(name)
    for key, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            ref = fresh.components[key].state_dict()
            for param, tensor in module.state_dict().items():
                assert torch.equal(tensor, ref[param]), f"{key}.{param}"

    # With guidance (Qwen: true CFG + negative prompt; Flux: embedded guidance; Wan: CFG).
    first = _pixels(pipe(**example_call_kwargs(name), output_type="pil"))
    second = _pixels(pipe(**example_call_kwargs(name), output_type="pil"))
    frames = 5 if name == "tiny-wan" else 1
    assert first.shape == (frames, 64, 64, 3)
    np.testing.assert_array_equal(first, second)
    assert first.std() > 0

    # The plain call, pipeline defaults otherwise.
    extra = {"num_frames": 5} if name == "tiny-wan" else {}
    plain = pipe(prompt="a cat", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="pil", **extra)
    assert _pixels(plain).shape == (frames, 64, 64, 3)


def test_qwen_prompt_template_prefix_is_dropped_exactly(cache):
    pipe = load_tiny_pipeline("tiny-qwen-image", cache)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx
    tokens = pipe.tokenizer.tokenize(pipe.prompt_template_encode.format("a cat"))
    assert tokens[pipe.prompt_template_encode_start_idx:][:2] == ["a", "Ġcat"]


def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    calls = []
    real_build = pipelines.build_tiny_pipeline

    def counting_build(name):
        calls.append(name)
        return real_build(name)

    monkeypatch.setattr(pipelines, "build_tiny_pipeline", counting_build)
    # flock locks belong to open file descriptions, so threads contend like separate processes.
    results = []
    threads = [threading.Thread(target=lambda: results.append(tiny_pipeline_path("tiny-wan", tmp_path)))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == ["tiny-wan"]
    assert len(results) == 4 and len(set(results)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([results[0].name, f".{results[0].name}.lock"])


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def failing_build(name):
        raise RuntimeError("boom")

    monkeypatch.setattr(pipelines, "build_tiny_pipeline", failing_build)
    with pytest.raises(RuntimeError, match="boom"):
        tiny_pipeline_path("tiny-flux", tmp_path)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.parametrize("fn", [tiny_pipeline_path, load_tiny_pipeline, build_tiny_pipeline, example_call_kwargs])
def test_unknown_name(fn, tmp_path):
    with pytest.raises(ValueError, match="tiny-qwen-image") as err:
        fn("tiny-sdxl", tmp_path) if fn in (tiny_pipeline_path, load_tiny_pipeline) else fn("tiny-sdxl")
    assert "'tiny-sdxl'" in str(err.value) and all(name in str(err.value) for name in NAMES)
    assert list(tmp_path.iterdir()) == []
