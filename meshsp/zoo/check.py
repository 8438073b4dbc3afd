"""Check zoo entries: ``python -m meshsp.zoo.check [CLASS ...]`` (default: all).

For each class: builds it (default heads and 3 heads), runs forwards at two odd token grids and text
lengths, and prints the output shapes, whether they are finite, the number of
``F.scaled_dot_product_attention`` calls (attention meshsp can route) and the time taken.
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from meshsp.zoo import ZOO, build, inputs_for, output_of


class _CountSDPA(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention:
            q = args[0] if args else kwargs["query"]
            k = args[1] if len(args) > 1 else kwargs["key"]
            self.calls.append((tuple(q.shape), tuple(k.shape)))
        return func(*args, **(kwargs or {}))


SHAPES = [dict(h=3, w=5, frames=1, txt=7), dict(h=4, w=6, frames=2, txt=9)]


def check(cls: str) -> str:
    entry = ZOO[cls]
    start = time.perf_counter()
    lines = []
    for heads in (None, 3) if entry.heads else (None,):
        model = build(cls, heads=heads)
        for shape in SHAPES:
            kwargs = dict(shape, batch=2, text_pad=2 if entry.text_mask else 0)
            with torch.no_grad(), _CountSDPA() as sdpa:
                out = output_of(model, model(**inputs_for(model, **kwargs)))
            assert torch.isfinite(out).all(), f"{cls}: non-finite output"
            lines.append(f"heads={heads} {shape}: out {tuple(out.shape)}, {len(sdpa.calls)} SDPA calls "
                         f"{sorted(set(sdpa.calls))[:4]}")
    return f"{cls} ok in {time.perf_counter() - start:.2f}s\n  " + "\n  ".join(lines)


if __name__ == "__main__":
    torch.set_num_threads(1)
    for name in sys.argv[1:] or sorted(ZOO):
        print(check(name), flush=True)
