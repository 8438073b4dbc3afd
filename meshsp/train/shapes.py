"""A generated dataset: coloured shapes on plain backgrounds, with captions that name them.

Every sample is drawn from its index alone (a ``random.Random`` seeded by ``(seed, index)``), so a
dataset is the same on every rank and every run without being stored: ``ShapesDataset(n)[i]`` is
``(image, caption)`` with ``image`` a float tensor ``[3, size, size]`` in ``[-1, 1]`` (the range
diffusers' VAEs take) and ``caption`` such as ``"a red circle on a white background"``.

Example::

    data = ShapesDataset(1024, size=64, seed=0)
    image, caption = data[3]
"""

from __future__ import annotations

import math
import random

import torch
from PIL import Image, ImageDraw

__all__ = ["COLOURS", "SHAPES", "ShapesDataset", "caption", "draw_shape", "to_tensor"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220),
    "yellow": (240, 210, 30), "white": (245, 245, 245), "black": (15, 15, 15),
}


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def _polygon(shape: str, cx: float, cy: float, r: float, turn: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [turn + math.pi / 4 + i * math.pi / 2 for i in range(4)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    if shape == "triangle":
        corners = [turn - math.pi / 2 + i * 2 * math.pi / 3 for i in range(3)]
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in corners]
    points = []  # a five-pointed star: outer and inner corners in turn
    for i in range(10):
        a = turn - math.pi / 2 + i * math.pi / 5
        radius = r if i % 2 == 0 else r * 0.42
        points.append((cx + radius * math.cos(a), cy + radius * math.sin(a)))
    return points


def draw_shape(shape: str, colour: str, background: str, size: int = 64, *,
               rng: random.Random | None = None) -> Image.Image:
    """One RGB picture: ``shape`` in ``colour`` on a plain ``background``; ``rng`` places it (centred,
    upright and half the picture wide when None)."""
    if shape not in SHAPES or colour not in COLOURS or background not in COLOURS:
        raise ValueError(f"shape {shape!r}, colour {colour!r}, background {background!r}: shapes are "
                         f"{list(SHAPES)}, colours and backgrounds {list(COLOURS)}.")
    image = Image.new("RGB", (size, size), COLOURS[background])
    draw = ImageDraw.Draw(image)
    if rng is None:
        cx = cy = size / 2
        r, turn = size * 0.3, 0.0
    else:
        r = size * rng.uniform(0.22, 0.36)
        cx = size / 2 + size * rng.uniform(-0.12, 0.12)
        cy = size / 2 + size * rng.uniform(-0.12, 0.12)
        turn = rng.uniform(-0.25, 0.25)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[colour])
    else:
        draw.polygon(_polygon(shape, cx, cy, r, turn), fill=COLOURS[colour])
    return image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB picture as ``[3, H, W]`` float32 in ``[-1, 1]``."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(image.height, image.width, 3).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ShapesDataset(torch.utils.data.Dataset):
    """``n`` samples of every shape, colour and (different) background, drawn from the index.

    Example::

        image, text = ShapesDataset(256, size=64)[0]   # [3, 64, 64] in [-1, 1], "a ... background"
    """

    def __init__(self, n: int, *, size: int = 64, seed: int = 0) -> None:
        if n < 1 or size < 8:
            raise ValueError(f"ShapesDataset(n={n}, size={size}): n must be >= 1 and size >= 8 pixels.")
        self.n, self.size, self.seed = n, size, seed
        self.combos = [(s, c, b) for s in SHAPES for c in COLOURS for b in COLOURS if b != c]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        rng = random.Random(f"{self.seed}:{index}")
        shape, colour, background = self.combos[rng.randrange(len(self.combos))]
        image = draw_shape(shape, colour, background, self.size, rng=rng)
        return to_tensor(image), caption(shape, colour, background)
