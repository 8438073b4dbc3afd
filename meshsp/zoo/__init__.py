"""Tiny random-weight instances of every diffusers transformer class, with inputs shaped like real ones.

One ``Tiny`` entry per class: a toy-width config of the class's real structure (head dim 16 where
the class allows it, 1-2 layers of each block stack), a function that builds forward inputs for a
token grid, and how to change the head count. Plan inference (``meshsp.plans.infer``), the coverage
tests and ``meshsp plan --infer`` build models from these entries; nothing is downloaded.

Grid semantics, the same for every entry: ``h x w`` is the image token grid *after* patchification
(the latent is ``h * patch x w * patch``), ``frames`` the latent frames after temporal patching
(video classes only), ``txt`` the text tokens, ``text_pad`` how many trailing text tokens are padding
in the text mask (classes that take one), ``batch`` the batch size. ``rand(*shape)`` draws seeded
normal floats, so every rank builds the same inputs.

Example::

    from meshsp.zoo import build, inputs_for
    model = build("FluxTransformer2DModel", heads=3)
    out = model(**inputs_for(model, h=3, w=5, txt=7))
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["NOT_DIT", "REFUSED", "Tiny", "ZOO", "build", "diffusers_transformer_classes", "inputs_for", "output_of"]


@dataclass(frozen=True)
class Tiny:
    """A tiny instance of one diffusers transformer class.

    ``inputs(model, *, h, w, frames, txt, batch, text_pad, rand) -> dict`` of forward kwargs.
    ``heads(n) -> dict`` of config overrides giving ``n`` attention heads (head dim unchanged).
    ``output(result) -> Tensor`` picks the prediction from the forward's result (default: ``.sample``
    or the first element; a list of per-sample tensors is stacked). ``square``: the class takes
    square token grids only (``w`` is then ignored and ``h x h`` used). ``extra["init"](model)``
    finishes weights the class leaves uninitialised. ``grid``: what the coverage runs change in their
    token grid for this class (``meshsp.plans.verify.grid_for``), and why in ``note``.
    """

    cls: str
    config: dict
    inputs: Callable[..., dict]
    heads: Callable[[int], dict] | None = None
    video: bool = False
    text_mask: bool = False
    output: Callable | None = None
    note: str = ""
    square: bool = False
    extra: dict = field(default_factory=dict)
    grid: dict = field(default_factory=dict)


ZOO: dict[str, Tiny] = {}
REFUSED: dict[str, str] = {}  # class name -> why no tiny instance can run here
# Exported by diffusers with "Transformer" in the name but not image/video diffusion transformers.
NOT_DIT: dict[str, str] = {
    "AceStepTransformer1DModel": "an audio (1-D) diffusion transformer",
    "MiniMaxMusic3Transformer1DModel": "a music (1-D) diffusion transformer",
    "TransformerTemporalModel": "a temporal block used inside UNets, not a standalone DiT",
}


def _register(module_name: str) -> None:
    mod = importlib.import_module(f"meshsp.zoo.{module_name}")
    for entry in getattr(mod, "ENTRIES", []):
        assert entry.cls not in ZOO, entry.cls
        ZOO[entry.cls] = entry
    REFUSED.update(getattr(mod, "REFUSED", {}))


for _name in ("families", "group_a", "group_b", "group_c", "group_d", "group_e"):
    try:
        _register(_name)
    except ModuleNotFoundError as exc:  # a group not written yet
        if exc.name != f"meshsp.zoo.{_name}":
            raise


def diffusers_transformer_classes() -> list[str]:
    """Every class diffusers exports named ``*Transformer*Model`` (a ``ModelMixin``), sorted."""
    import diffusers
    from diffusers import ModelMixin

    names = [n for n in dir(diffusers) if "Transformer" in n and "Model" in n]
    return sorted(n for n in names if isinstance(getattr(diffusers, n, None), type)
                  and issubclass(getattr(diffusers, n), ModelMixin))


def build(cls: str, *, heads: int | None = None, seed: int = 0, **overrides) -> torch.nn.Module:
    """A seeded random-weight tiny instance of diffusers class ``cls`` (same weights for one seed)."""
    if cls not in ZOO:
        raise ValueError(f"no tiny config for {cls!r}; known: {sorted(ZOO)}.")
    entry = ZOO[cls]
    config = dict(entry.config)
    if heads is not None:
        if entry.heads is None:
            raise ValueError(f"{cls}: the tiny config has no head-count override.")
        config.update(entry.heads(heads))
    config.update(overrides)
    klass = getattr(importlib.import_module("diffusers"), cls)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = klass(**config).eval()
        if "init" in entry.extra:
            entry.extra["init"](model)
    _wake_zero_layers(model, seed)
    return model


def _wake_zero_layers(model: torch.nn.Module, seed: int) -> None:
    """Give zero-initialised weights (adaLN-zero gates, output projections) small seeded random values.

    Many DiTs start every block as the identity; a freshly built tiny model would then ignore its
    attention altogether, and a parity test of it could not fail. Loaded checkpoints never look so.
    """
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.dim() >= 2 and p.numel() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.02)


def inputs_for(model: torch.nn.Module, *, h: int = 4, w: int = 4, frames: int = 2, txt: int = 5, batch: int = 1,
               text_pad: int = 0, seed: int = 0) -> dict:
    """Forward kwargs for ``model`` (a zoo class) at an ``h x w`` token grid (x ``frames``), ``txt`` text tokens."""
    entry = ZOO[type(model).__name__]
    g = torch.Generator().manual_seed(seed)
    w = h if entry.square else w

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    return entry.inputs(model, h=h, w=w, frames=frames, txt=txt, batch=batch, text_pad=text_pad, rand=rand)


def output_of(model: torch.nn.Module, result) -> torch.Tensor:
    """The prediction tensor of a forward's result."""
    entry = ZOO.get(type(model).__name__)
    if entry is not None and entry.output is not None:
        return entry.output(result)
    sample = result.sample if hasattr(result, "sample") else result[0] if isinstance(result, (tuple, list)) else result
    return torch.stack(list(sample)) if isinstance(sample, (list, tuple)) else sample
