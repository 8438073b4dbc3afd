"""The scoped torch-function interception of ``FrameCausalAttention`` and ``BandNoise``: inside a
split decode, each forward of the style's module routes one torch function to a handler made for
that forward's inputs, and nothing outside that forward is touched."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel.style import ParallelStyle
from torch.overrides import TorchFunctionMode

from meshsp.styles import scope_mode
from meshsp.vae.bands import Bands


class _Intercept(TorchFunctionMode):
    """Routes calls of one torch function to ``handler(*args, **kwargs)``; entered and left by a
    style's hooks, so it is scoped to one module's forward."""

    def __init__(self, func, handler) -> None:
        super().__init__()
        self.func, self.handler = func, handler

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not self.func:
            return func(*args, **(kwargs or {}))
        return self.handler(*args, **(kwargs or {}))


class _BandIntercept(ParallelStyle):
    """A style that, for each forward of its module inside a split decode, routes ``func`` to
    ``self._handler(args)`` (``args``: that forward's positional inputs)."""

    def __init__(self, bands: Bands, func: Callable) -> None:
        super().__init__()
        self.bands, self.func = bands, func

    def _handler(self, args: tuple) -> Callable:
        raise NotImplementedError

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        scope_mode(module, lambda args: _Intercept(self.func, self._handler(args)) if self.bands.active else None)
        return module
