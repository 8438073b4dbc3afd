"""``RefuseInputs``: forward arguments a plan cannot run with, refused by name.

Some modes of a model cannot run sequence-parallel as they are: Qwen-Image 2.1's prefix KV cache
stores ``key[:, :prefix_len]`` of what is, under a plan, this rank's shard, and its decode steps
concatenate that cache in front of the target's keys. Rather than run them wrong, a plan names such
arguments with the reason; a forward given one raises ``ValueError`` before the model runs. The
root's ``CheckInputs`` has already made every rank agree on the inputs, so every rank raises alike.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from meshsp.ops.consensus import describe
from meshsp.styles import _Bound, _positions

__all__ = ["RefuseInputs"]


class RefuseInputs(_Bound):
    """Raise ``ValueError`` when one of ``inputs`` (forward argument name -> why it cannot run under
    the plan) is given, i.e. is not None.

    Example::

        RefuseInputs(inputs={"kv_cache": "the prefix KV cache holds slices at global token indices"})
    """

    def __init__(self, inputs: Mapping[str, str]) -> None:
        super().__init__()
        if not inputs or not isinstance(inputs, Mapping) or not all(isinstance(v, str) for v in inputs.values()):
            raise ValueError(f"RefuseInputs needs 'inputs': a mapping of argument name -> reason; got {inputs!r}.")
        self.inputs = {str(k): v for k, v in inputs.items()}

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        positions = _positions(module)
        unknown = [name for name in self.inputs if name not in positions]
        if unknown:
            raise ValueError(f"plan '{self.key}': {type(module).__name__}.forward has no argument(s) {unknown}; "
                             f"its arguments are {list(positions)}.")

        @torch.compiler.disable  # bookkeeping stays eager: no recompiles under torch.compile
        def pre_hook(mod, args, kwargs):
            for name, why in self.inputs.items():
                pos = positions[name]
                value = kwargs[name] if name in kwargs else (args[pos] if pos < len(args) else None)
                if value is not None:
                    raise ValueError(f"plan '{self.key}': {type(mod).__name__} was called with {name}={describe(value)}, "
                                     f"which this plan cannot run sequence-parallel: {why}. Call it with {name}=None "
                                     "(or without sequence parallelism).")

        module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return module
