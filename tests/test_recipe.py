"""``meshsp.parallelize_pipeline``: a user's own diffusers pipeline, made parallel with one call, returns on
every rank what one process returns; bad input is refused on every rank with the pipeline untouched."""

import numpy as np
import pytest

import pipeline_tasks
from meshsp import ParallelConfig

# 80x48 pixels: 10x6 latents -> 5x3 = 15 packed image tokens, which divide over neither 2 nor 4 ranks.
QWEN = dict(prompt="a cat on a windowsill", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=3,
            width=80, height=48, seed=5)
FLUX = dict(prompt="a red dog", num_inference_steps=2, width=80, height=48, seed=1)
WAN = dict(prompt="a cat walking", negative_prompt="blurry", guidance_scale=5.0, num_inference_steps=2,
           width=48, height=80, num_frames=5, seed=2)
CASES = {
    "qwen-cfg2xU2-uaa": ("tiny-qwen-image", dict(cfg_degree=2, ulysses_degree=2, ulysses_mode="advanced_uaa"), QWEN, {}),
    "qwen-TP2xU2-uaa": ("tiny-qwen-image", dict(tensor_parallel_size=2, ulysses_degree=2, ulysses_mode="advanced_uaa"),
                        QWEN, {}),
    "qwen-U2xR2-uaa-taylorseer": ("tiny-qwen-image", dict(ulysses_degree=2, ring_degree=2, ulysses_mode="advanced_uaa"),
                                  {**QWEN, "num_inference_steps": 8}, {"cache": "taylorseer"}),
    "qwen-cfg2xU2-uaa-unguided": ("tiny-qwen-image", dict(cfg_degree=2, ulysses_degree=2, ulysses_mode="advanced_uaa"),
                                  {k: v for k, v in QWEN.items() if k != "negative_prompt"}, {}),
    "flux-R2xU2-uaa": ("tiny-flux", dict(ring_degree=2, ulysses_degree=2, ulysses_mode="advanced_uaa"), FLUX, {}),
    "wan-cfg2xU2-uaa": ("tiny-wan", dict(cfg_degree=2, ulysses_degree=2, ulysses_mode="advanced_uaa"), WAN, {}),
}


@pytest.fixture(scope="module")
def references():
    """One process: the same pipelines, the same calls, nothing parallel (a step cache where asked)."""
    out = {}
    for case, (name, _, kwargs, options) in CASES.items():
        pipe = pipeline_tasks.load(name)
        cache = None
        if options.get("cache"):
            from meshsp.cache import enable_pipeline_cache

            cache = enable_pipeline_cache(pipe, options["cache"])
            cache.prepare(kwargs["num_inference_steps"])
        out[case] = pipeline_tasks.call(pipe, kwargs)
        out[case, "cache"] = dict(cache.counts) if cache is not None else None
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_call_equals_one_process(pools, references, case):
    name, degrees, kwargs, options = CASES[case]
    results = pools(ParallelConfig(**degrees).world_size).run(pipeline_tasks.parallel_call, name, degrees, kwargs,
                                                              options, timeout=600)
    want = references[case]
    for rank, got in enumerate(results):
        assert got["out"].shape == want.shape
        diff = np.abs(got["out"] - want).max()
        # Decoded pixels in [0, 1]: SP, TP and the split VAE agree with one process to fp32 rounding;
        # TaylorSeer extrapolates features from finite differences of past steps, which scales that
        # rounding up (still a small fraction of one 8-bit level).
        assert diff <= (2e-4 if options.get("cache") == "taylorseer" else 2e-5), (case, rank, diff)
        assert got["vae_ranks"] == 4 and got["transformers"] == ("transformer",)
        assert got["vae_encode_split"]  # these VAEs' encoders split too (image-to-image pipelines use them)
        assert got["class"] == results[0]["class"] and got["sent"]  # it communicated
    first = results[0]
    assert first["cfg"] == (1 if degrees.get("cfg_degree", 1) > 1 else 0)
    if degrees.get("tensor_parallel_size", 1) > 1:
        assert first["text_encoders"] == ("text_encoder",)  # Qwen2.5-VL's language model on the tp axis
        assert first["sent"].get("tp_all_reduce", 0) > 0
    if degrees.get("cfg_degree", 1) > 1:  # one exchange of the predictions per guided step; none unguided
        guided = "negative_prompt" in kwargs
        assert first["sent"].get("cfg_all_gather", 0) == (kwargs["num_inference_steps"] if guided else 0)
    if options.get("cache"):  # the same blocks computed and skipped as in one process
        assert first["cache"] == references[case, "cache"] and first["cache"]["skipped"] > 0, first["cache"]


@pytest.mark.parametrize("case,match", [
    ("world", "process world size is 4 but the config needs"),
    ("no-plan", "no meshsp plan for SanaWMTransformer3DModel"),
    ("tiling", "tiling enabled"),
    ("cache", "one state for the 'cond' and 'uncond' calls"),
    ("tp", "tensor_parallel_size=4 must divide"),
    ("second", "already parallelized"),
    ("not-a-pipeline", "takes a diffusers pipeline with a transformer"),
])
def test_bad_input_refused_on_every_rank_before_anything_changes(pools, case, match):
    results = pools(4).run(pipeline_tasks.refusal, "tiny-qwen-image", case, timeout=300)
    for rank, result in enumerate(results):
        assert result["error"] is not None and match in result["error"], (rank, result)
        assert result["untouched"], (rank, result)
    assert len({r["error"] for r in results}) == 1  # the same message on every rank


def _run_script(tmp_path, launcher: list[str], name: str, *flags: str):
    import os
    import pathlib
    import subprocess

    root = pathlib.Path(__file__).resolve().parents[1]
    out = tmp_path / name
    proc = subprocess.run([*launcher, str(root / "examples" / "diffusers_script.py"), "--width", "80", "--height", "48",
                           "--steps", "2", "--output", str(out), *flags],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    from PIL import Image

    return np.asarray(Image.open(out)).astype(int)


def test_example_script_under_torchrun_and_spawned_equals_one_process(tmp_path):
    import sys

    layout = ("--ulysses-degree", "2", "--cfg-parallel-size", "2", "--ulysses-mode", "advanced_uaa")
    one = _run_script(tmp_path, [sys.executable], "one.png")
    torchrun = _run_script(tmp_path, [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4"],
                           "torchrun.png", *layout)
    spawned = _run_script(tmp_path, [sys.executable], "spawned.png", "--spawn", "4", *layout)
    assert one.shape == (48, 80, 3)
    assert np.abs(torchrun - one).max() <= 1 and np.abs(spawned - one).max() <= 1


def test_cfg_parallel_refuses_a_cond_call_left_without_its_uncond(pools):
    for errors in pools(2).run(pipeline_tasks.cfg_missing_uncond, timeout=300):
        assert len(errors) == 2 and all("expected an 'uncond' transformer call" in e for e in errors), errors
