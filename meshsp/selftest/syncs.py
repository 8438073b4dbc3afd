"""Host syncs in the per-layer path: every kernel route, the merges and the head expansion, watched.

On CUDA under ``torch.cuda.set_sync_debug_mode("error")`` (an implicit synchronisation raises);
on every device by counting ``aten._local_scalar_dense`` (what ``bool()`` / ``.item()`` of a tensor
runs). Inputs are made on the device before the watch starts.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from meshsp.ops.attention import _expand_heads
from meshsp.ops.kernel import local_attention, route_for
from meshsp.ops.ring import merge_partials
from meshsp.selftest.kernels import CASES, _on, draw

__all__ = ["check_no_host_syncs"]


class _CountSyncs(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.syncs += func.overloadpacket is torch.ops.aten._local_scalar_dense
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _sync_debug(device: str):
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def check_no_host_syncs(device: str) -> tuple[bool, str]:
    """Every non-empty kernel case in bf16 and fp32, each merged into the previous output of its
    shape, and a cut-GQA head expansion: no host sync (and no error under CUDA's sync debug mode)."""
    calls = []
    for dtype in (torch.bfloat16, torch.float32):
        for case in CASES:
            if case.sq and case.sk:
                q, k, v, m = draw(case.name, case.b, case.h, case.hk, case.sq, case.sk, case.d, case.dv or case.d,
                                  case.mask, case.dead_row)
                calls.append(_on(device, dtype, q, k, v, m))
    routes = sorted({route_for(q, v, m is not None).kernel for q, _, v, m in calls})
    kv = calls[0][1]
    with _sync_debug(device), _CountSyncs() as count:
        for q, k, v, m in calls:
            out, lse = local_attention(q, k, v, m)
            merge_partials(out.float(), lse, out, lse, into_a=True)
        _expand_heads(kv, 3, 1, kv.shape[1] * 3 - 2)
    return count.syncs == 0, (f"{len(calls)} calls over routes {', '.join(routes)}: {count.syncs} host syncs"
                              + (", none under torch.cuda.set_sync_debug_mode('error')" if device == "cuda" else ""))
