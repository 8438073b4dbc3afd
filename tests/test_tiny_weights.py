"""The embedded tiny Qwen-Image pipeline ships trained weights (meshsp/assets/): the README's main
job draws what its prompt says, and the same picture on every layout."""

import numpy as np
import pytest

from meshsp import Engine, ParallelConfig, SamplingParams
from meshsp.train.shapes import COLOURS

PARAMS = SamplingParams(num_inference_steps=20, width=64, height=64, seed=0)
PROMPTS = {"a red circle on a white background": ("red", "white"),
           "a blue square on a yellow background": ("blue", "yellow"),
           "a white circle on a red background": ("white", "red")}


def _nearest(pixels: np.ndarray) -> str:
    """The shapes palette's colour nearest to the mean of ``pixels`` [N, 3]."""
    mean = pixels.reshape(-1, 3).mean(0)
    return min(COLOURS, key=lambda name: np.abs(np.asarray(COLOURS[name]) - mean).sum())


@pytest.fixture(scope="module")
def single():
    with Engine("tiny-qwen-image") as engine:
        return [np.asarray(im) for im in engine.generate(list(PROMPTS), PARAMS)]


def test_pictures_show_the_prompt(single):
    """Centre in the shape's colour, corners in the background's."""
    for picture, (shape, background) in zip(single, PROMPTS.values()):
        centre = picture[24:40, 24:40]
        corners = np.concatenate([picture[:6, :6], picture[:6, -6:], picture[-6:, :6], picture[-6:, -6:]])
        assert (_nearest(centre), _nearest(corners)) == (shape, background)


def test_main_job_picture_is_the_same_on_a_parallel_layout(single):
    config = ParallelConfig(ulysses_degree=2, ring_degree=2, ulysses_mode="advanced_uaa")
    with Engine("tiny-qwen-image", config) as engine:
        parallel = [np.asarray(im) for im in engine.generate(list(PROMPTS), PARAMS)]
    for got, want in zip(parallel, single):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
