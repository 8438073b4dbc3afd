"""Non-causal linear attention on sequence shards: ``ParallelLinearAttention``.

ReLU linear attention (Sana, Sana-Video) never forms the ``[S, S]`` score matrix. Per head, with
``phi = relu`` and tokens ``j``::

    out_i = (sum_j v_j phi(k_j)^T) phi(q_i) / ((sum_j phi(k_j))^T phi(q_i))

Both token sums — the ``d x d`` state ``V^T phi(K)`` and the key sum ``sum phi(K)`` — are sums over
tokens, so on sequence shards each rank computes them over its own tokens and one all-reduce per SP
axis (ulysses, then ring) makes them the whole sequence's; everything else (the projections, the
read-out ``state @ phi(q_i)``, the division) is per query token and stays local. Bytes per axis and
call: the state plus the key sum (diffusers' ``SanaLinearAttnProcessor2_0`` packs the key sum into
the state as one more row: ``[B, H, D + 1, D]`` in float32; ``SanaLinearAttnProcessor3_0`` computes
it separately: ``[B, H, D, 1]`` and ``[B, H, D, D]``).

Mechanism, and why: a ``TorchFunctionMode`` scoped to the attention module's forward
(``meshsp.styles.scope_mode``) that recognises the token-contracting operations and all-reduces
their results. The processor code runs unchanged (no copy of diffusers' math per processor class,
so the PAG variants and the video processor with RoPE work as they are), nothing is monkeypatched,
and the interception ends with the module's forward. A wrapper processor (``set_processor``) would
either re-implement each processor's math — a per-model copy that drifts from diffusers — or run
the original under the same mode anyway. The rule:

* a ``matmul`` / ``bmm`` whose contracted dim has the local token count (``a.shape[-1] == b.shape[-2]
  == s``), or a ``sum`` over a dim of that size, is a token reduction, unless one of its operands is
  *derived from* an all-reduced result: every output of an op that reads a reduced (or derived)
  tensor is marked derived, so the read-out ``state @ phi(q)`` and ``key_sum^T @ phi(q)`` are never
  taken for reductions, even when the head dim equals the local token count;
* a forward that makes no token reduction raises ``ValueError``: the module attends some other way
  and the plan should not route it here (never a silent local-only attention).

In the processors of diffusers 0.42.1 the only operations that contract a dim of the local token
count, before a reduced tensor exists, are the token sums themselves, whatever the sizes; so every
rank recognises the same operations and issues the same collectives.

Example::

    plan = Plan({"transformer_blocks.*.attn1": ParallelLinearAttention(), ...})
"""

from __future__ import annotations

import weakref

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from meshsp.ops.adjoint import all_reduce_sum
from meshsp.ops.comm import _count
from meshsp.styles import SPMesh, _Bound, scope_mode

__all__ = ["LINEAR_STYLES", "ParallelLinearAttention", "all_reduce_sp"]

_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_SUMS = {torch.sum, torch.Tensor.sum}


def all_reduce_sp(t: torch.Tensor, sp: SPMesh) -> torch.Tensor:
    """Sum ``t`` over every SP rank: one all-reduce on the ulysses axis, then one on the ring axis,
    each counted (``linear_ulysses`` / ``linear_ring``) as the tensor's bytes. A 16-bit partial sum
    (Sana-Video's key sum in a bf16 model) travels and adds up in float32, so the sum is rounded to
    its dtype once, as on one device, not once per rank."""
    dtype = t.dtype
    t = (t.float() if dtype in (torch.bfloat16, torch.float16) else t).contiguous()
    for axis, group in (("ulysses", sp.ulysses_group), ("ring", sp.ring_group)):
        if group is not None:
            _count(f"linear_{axis}", t.numel() * t.element_size())
            t = all_reduce_sum(t, group)  # the backward all-reduces the gradient (its adjoint)
    return t.to(dtype)


def _reduced_dims(args, kwargs) -> tuple[torch.Tensor, tuple[int, ...]] | None:
    """(input, reduced dims) of a ``sum`` call; every dim for a full sum."""
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    if dim is None or (isinstance(dim, (tuple, list)) and not dim):
        return x, tuple(range(x.dim()))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return x, tuple(d % x.dim() for d in dims)


class _TokenSums(TorchFunctionMode):
    """Inside one linear-attention forward: all-reduce the token reductions over the SP ranks."""

    def __init__(self, sp: SPMesh, tokens: int, total: int) -> None:
        super().__init__()
        self.sp, self.tokens, self.total = sp, tokens, total
        self.reductions = 0
        # id -> weak reference: a set of tensors would compare them with ``==`` (elementwise)
        self.derived: dict[int, weakref.ref] = {}

    def _is_derived(self, values) -> bool:
        for t in values:
            if isinstance(t, torch.Tensor):
                ref = self.derived.get(id(t))
                if ref is not None and ref() is t:
                    return True
        return False

    def _is_reduction(self, func, args, kwargs) -> bool:
        if func in _MATMULS and len(args) >= 2 and all(isinstance(a, torch.Tensor) and a.dim() >= 2 for a in args[:2]):
            return args[0].shape[-1] == self.tokens and args[1].shape[-2] == self.tokens
        if func in _SUMS and args and isinstance(args[0], torch.Tensor):
            x, dims = _reduced_dims(args, kwargs)
            return any(x.shape[d] == self.tokens for d in dims)
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = tree_leaves((args, kwargs))
        if self._is_derived(leaves):
            self._mark(out)
        elif self._is_reduction(func, args, kwargs):
            self.reductions += 1
            out = all_reduce_sp(out, self.sp)
            self._mark(out)
        return out

    def _mark(self, out) -> None:
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.derived[id(t)] = weakref.ref(t)


class ParallelLinearAttention(_Bound):
    """Make a module's non-causal linear attention exact on sequence shards (see the module docstring).

    The module's first positional argument is its token sequence ``[B, s, C]`` (this rank's shard);
    keys and values come from the same tokens (self-attention). Parameters, buffers and the
    processor are untouched.

    Example::

        {"transformer_blocks.*.attn1": ParallelLinearAttention()}
    """

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        sp = SPMesh(device_mesh)
        modes: list[_TokenSums] = []
        where = f"plan '{self.key}'"

        @torch.compiler.disable
        def make(args):
            if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() != 3:
                raise ValueError(f"{where}: ParallelLinearAttention needs the token sequence [B, s, C] as the first "
                                 f"positional argument of {type(module).__name__}.forward; got "
                                 f"{[tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__ for a in args]}.")
            tokens = args[0].shape[1]
            lens = self.state.rank_lens(sp, self.key, (tokens,))
            total = sum(n for row in lens for (n,) in row)
            self.state.attention_tokens[0] += tokens
            self.state.attention_tokens[1] += total
            modes.append(_TokenSums(sp, tokens, total))
            return modes[-1]

        @torch.compiler.disable
        def check(mod, args, output):
            mode = modes.pop()
            if mode.reductions == 0:  # the same code on every rank: all raise together
                raise ValueError(f"{where}: {type(module).__name__}'s forward made no token reduction (no matmul "
                                 f"or sum over the local shard of its {mode.total} tokens): it is not linear attention. Route "
                                 "softmax attention with ParallelAttention, or leave the module out of the plan.")

        scope_mode(module, make)
        module.register_forward_hook(check)
        return module


def _styles() -> dict:
    from meshsp.grid import GridHalo, ShardGrid, ShardGridOutputs

    return {"ParallelLinearAttention": ParallelLinearAttention, "ShardGrid": ShardGrid,
            "ShardGridOutputs": ShardGridOutputs, "GridHalo": GridHalo}


LINEAR_STYLES = _styles()  # the plan styles of linear-attention models, for meshsp.plans.STYLES
