"""Engine: images generated sequence-parallel equal the single-process images for the same seed."""

import numpy as np
import pytest

from meshsp import ParallelConfig
from meshsp.engine import Engine, SamplingParams

# 64x48 pixels -> 8x6 latents -> 4x3 = 12 packed image tokens: does not divide over 4 ranks.
PARAMS = SamplingParams(num_inference_steps=2, width=64, height=48, seed=3, guidance_scale=4.0,
                        negative_prompt="blurry")
PROMPTS = ["a cat", "a red dog on a chair"]  # 12 image + 12 text tokens: even, as strict U2 needs


class _Reference(list):
    bytes: dict = {}


@pytest.fixture(scope="module")
def reference():
    with Engine("tiny-qwen-image") as engine:
        images = _Reference(np.asarray(im) for im in engine.generate(PROMPTS, PARAMS))
        images.bytes = {name: w["bytes"] for name, w in engine.weights_info()[0].items()}
        return images


# The engine's own path (spawned workers, batching, the split decode) on one layout of each kind;
# every degree combination of the pipeline call itself is in test_recipe.py (cfg2xU2, TP2xU2,
# U2xR2, ...) on the shared pools, and R2 and cfg2 through the engine in the tests below.
@pytest.mark.parametrize("config", [
    ParallelConfig(ulysses_degree=2),
    ParallelConfig(ulysses_degree=2, ring_degree=2, ulysses_mode="advanced_uaa"),
    ParallelConfig(cfg_degree=2, tensor_parallel_size=2),
], ids=["U2", "U2xR2-uaa", "cfg2xTP2"])
def test_sp_images_equal_single_process(reference, config):
    with Engine("tiny-qwen-image", config) as engine:
        images = engine.generate(PROMPTS, PARAMS)
        assert engine.vae_ranks == config.world_size  # the decode was split too (meshsp.vae)
        if config.tensor_parallel_size > 1:  # every rank holds part of the transformer and text encoder
            # (the tiny Qwen2.5-VL is mostly embeddings and a vision tower, which stay whole)
            for name, share in (("transformer", 0.8), ("text_encoder", 0.97)):
                sizes = [rank[name]["bytes"] for rank in engine.weights_info()]
                assert len(set(sizes)) == 1 and sizes[0] < share * reference.bytes[name], (name, sizes)
    assert [im.size for im in images] == [(64, 48)] * 2
    for got, want in zip(images, reference):
        # fp32 transformer outputs agree to ~1e-7; after VAE decode and uint8 rounding, pixels agree
        # within 1 level (they are identical in practice).
        assert np.abs(np.asarray(got).astype(int) - want.astype(int)).max() <= 1


def test_bad_sampling_params_and_prompts():
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        SamplingParams(num_inference_steps=0)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        SamplingParams(width=-64)
    with pytest.raises(ValueError, match="prompts must be non-empty strings"):
        Engine("tiny-qwen-image").generate(["a cat", " "])


@pytest.mark.parametrize("command,name", [
    (["meshsp", "generate"], "cat.png"),
    ([__import__("sys").executable, "examples/offline_inference/text_to_image/text_to_image.py"], "cat.png"),
    ([__import__("sys").executable, "examples/offline_inference/text_to_video/text_to_video.py"], "cat.gif"),
], ids=["meshsp-generate", "text-to-image", "text-to-video"])
def test_cli_writes_output(tmp_path, command, name):
    import pathlib
    import subprocess

    from PIL import Image

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / name
    model = "tiny-wan" if name.endswith(".gif") else "tiny-qwen-image"
    proc = subprocess.run(command + ["--model", model, "--ulysses-degree", "2", "--ulysses-mode", "advanced_uaa",
                                     "--width", "64", "--height", "64", "--num-inference-steps", "2",
                                     "--output", str(out)],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mesh (ring=1, ulysses=2" in proc.stdout and Image.open(out).size == (64, 64)
    assert "VAE decode split over 2 rank(s)" in proc.stdout
    assert getattr(Image.open(out), "n_frames", 1) == (5 if name.endswith(".gif") else 1)


@pytest.mark.parametrize("model,config,params", [
    ("tiny-flux", ParallelConfig(ring_degree=2), SamplingParams(num_inference_steps=2, width=64, height=48, seed=1)),
    # Flux's plan shards the latents in a pre-hook on the root: CFG's placeholder must keep their whole shape.
    ("tiny-flux", ParallelConfig(cfg_degree=2, ulysses_degree=2, ulysses_mode="advanced_uaa"),
     SamplingParams(num_inference_steps=2, width=64, height=48, seed=1, guidance_scale=4.0, negative_prompt="blurry")),
    ("tiny-wan", ParallelConfig(cfg_degree=2, ulysses_degree=2, ulysses_mode="advanced_uaa"),
     SamplingParams(num_inference_steps=2, width=64, height=48, seed=1, num_frames=5, guidance_scale=5.0,
                    negative_prompt="blurry")),
], ids=["flux-R2", "flux-cfg2xU2-uaa", "wan-cfg2xU2-uaa"])
def test_other_families_match_single_process(model, config, params):
    with Engine(model) as engine:
        want = engine.generate("a cat in the snow", params)
    with Engine(model, config) as engine:
        got = engine.generate("a cat in the snow", params)
    flat = lambda imgs: [np.asarray(f).astype(int) for im in imgs for f in (im if isinstance(im, list) else [im])]
    assert len(flat(got)) == len(flat(want)) == (5 if params.num_frames else 1)
    for g, w in zip(flat(got), flat(want)):
        assert np.abs(g - w).max() <= 1


def test_bf16_generation_is_as_close_to_fp32_as_single_process_bf16(reference):
    """The same request in bfloat16 (weights and compute), single process and U2xR2 UAA: the
    parallel images are no further from the float32 images than the single-process bf16 ones."""
    config = ParallelConfig(ulysses_degree=2, ring_degree=2, ulysses_mode="advanced_uaa")
    with Engine("tiny-qwen-image", dtype="bfloat16") as engine:
        single = [np.asarray(im).astype(float) for im in engine.generate(PROMPTS, PARAMS)]
        assert engine.dtype == __import__("torch").bfloat16
    with Engine("tiny-qwen-image", config, dtype="bfloat16") as engine:
        parallel = [np.asarray(im).astype(float) for im in engine.generate(PROMPTS, PARAMS)]
    for s, p, want in zip(single, parallel, reference):
        err_single, err_parallel = np.abs(s - want).mean(), np.abs(p - want).mean()
        assert err_parallel <= 1.5 * err_single + 0.5, (err_parallel, err_single)
        assert np.abs(p - s).mean() <= 2.0, np.abs(p - s).mean()  # levels of 255


def test_bad_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of"):
        Engine("tiny-qwen-image", dtype="float8")


@pytest.mark.parametrize("model,config,params", [
    ("tiny-qwen-image", ParallelConfig(ulysses_degree=2), PARAMS),
    ("tiny-wan", ParallelConfig(cfg_degree=2), SamplingParams(num_inference_steps=2, width=64, height=48, seed=1,
                                                              num_frames=5, guidance_scale=5.0, negative_prompt="blurry")),
], ids=["qwen-U2", "wan-cfg2"])
def test_text_encoded_once_and_broadcast(model, config, params):
    """encode_text_once: only rank 0 holds a text encoder; the images equal the replicated path's."""
    with Engine(model, config) as engine:
        want = engine.generate(PROMPTS, params)
    with Engine(model, config, encode_text_once=True) as engine:
        got = engine.generate(PROMPTS, params)
        info = engine.rank_info()
    assert info[0].get("text_encoder", 0) > 0 and all(not any(k.startswith("text_encoder") for k in r) for r in info[1:])
    flat = lambda imgs: [np.asarray(f).astype(int) for im in imgs for f in (im if isinstance(im, list) else [im])]
    for g, w in zip(flat(got), flat(want)):
        assert np.abs(g - w).max() <= 1


def test_tiled_vae_decode_shared_out_matches_single_process_tiled():
    """--vae-tiling: at 128x96 the tiny Flux VAE (64-pixel tiles) decodes in 6 overlapping tiles;
    on 2 ranks they are decoded round-robin and blended by diffusers' code."""
    params = SamplingParams(num_inference_steps=2, width=128, height=96, seed=2)
    with Engine("tiny-flux", vae_tiling=True) as engine:
        want = np.asarray(engine.generate("a cat in the snow", params)[0]).astype(int)
    with Engine("tiny-flux", ParallelConfig(ulysses_degree=2), vae_tiling=True) as engine:
        got = np.asarray(engine.generate("a cat in the snow", params)[0]).astype(int)
        assert engine.vae_ranks == 2
    assert np.abs(got - want).max() <= 1


def test_step_cache_through_the_engine_equals_one_process_with_the_cache():
    """``Engine(cache=...)``: U2 UAA with first-block caching skips exactly the blocks one process
    with the same cache skips, and its images equal that process's."""
    params = SamplingParams(num_inference_steps=8, width=64, height=48, seed=3)
    options = {"threshold": 0.4}
    with Engine("tiny-qwen-image", cache="first-block", cache_options=options) as engine:
        want = engine.generate("a cat in the snow", params)
        want_counts = engine.last_cache
    config = ParallelConfig(ulysses_degree=2, ulysses_mode="advanced_uaa")
    with Engine("tiny-qwen-image", config, cache="first-block", cache_options=options) as engine:
        got = engine.generate("a cat in the snow", params)
        assert engine.last_cache == want_counts and want_counts["skipped"] > 0, (engine.last_cache, want_counts)
        with pytest.raises(ValueError, match="decides from the whole batch"):
            engine.generate_batch([("a cat", params), ("a dog", params)])
    assert np.abs(np.asarray(got[0]).astype(int) - np.asarray(want[0])).max() <= 1


def test_bad_cache_is_refused_before_any_rank_starts():
    with pytest.raises(ValueError, match="pab"):
        Engine("tiny-qwen-image", ParallelConfig(cfg_degree=2), cache="pab")
    with pytest.raises(ValueError, match="unknown|not one of|kind"):
        Engine("tiny-qwen-image", cache="teacache")
