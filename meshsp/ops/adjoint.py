"""Collectives on activations whose backward is their adjoint, for training through a plan.

The convention (docs/training.md): every rank computes the whole loss, and a backward is the exact
adjoint of the SPMD program, as if each rank's loss were added up. Then every parameter's gradient,
summed over the sequence-parallel ranks, is ``sp`` times the single-device gradient, whichever part
of the model (sharded or run whole on every rank) the parameter serves — so FSDP's mean over the data
x sequence ranks is exact, with no correction for the degree.

* ``gather``: all-gather along dim 0; its adjoint is the reduce-scatter sum of the gradient (each
  rank's slice, summed over every rank's gradient of the whole tensor). Counted as
  ``reduce_scatter`` when the backward runs.
* ``all_reduce_sum``: all-reduce sum; its adjoint all-reduces the gradient, counted as
  ``all_reduce_grad`` (the forward is counted by its caller).
  On the ``tp`` axis, where the reduced value feeds per-rank (sharded) work, the same holds: the
  whole gradient is the sum of the ranks' parts.

Integer tensors and tensors that do not require grad pass through the plain collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from meshsp.ops.comm import _count

__all__ = ["all_reduce_sum", "gather"]


def _gather(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_gather_single(t.contiguous(), 0, group))


def _reduce_scatter(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)
    _count("reduce_scatter", t.numel() * t.element_size() * (size - 1) // size)
    return funcol.wait_tensor(funcol.reduce_scatter_single(t.contiguous(), "sum", 0, group))


def _all_reduce(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return funcol.wait_tensor(funcol.all_reduce(t.contiguous(), "sum", group))


def _all_reduce_grad(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    size = dist.get_world_size(group)  # a ring all-reduce sends 2 (P - 1) / P of the tensor per rank
    _count("all_reduce_grad", 2 * (size - 1) * t.numel() * t.element_size() // size)
    return _all_reduce(t, group)


class _WithAdjoint(torch.autograd.Function):
    """``forward(t, group)`` with ``adjoint(grad, group)`` as its backward."""

    @staticmethod
    def forward(ctx, t, group, forward, adjoint):
        ctx.group, ctx.adjoint = group, adjoint
        return forward(t, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.adjoint(grad, ctx.group), None, None, None


def _apply(forward, adjoint, t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    if torch.is_grad_enabled() and t.requires_grad:
        return _WithAdjoint.apply(t, group, forward, adjoint)
    return forward(t, group)


def gather(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Every group rank's ``t`` concatenated along dim 0; the backward reduce-scatters (sums).

    Example::

        whole = gather(local_BSC.movedim(1, 0), group).movedim(0, 1)
    """
    return _apply(_gather, _reduce_scatter, t, group)


def all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The sum of every group rank's ``t``; the backward all-reduces the gradient (its adjoint).

    Example::

        state = all_reduce_sum(keys.transpose(-1, -2) @ values, group)
    """
    return _apply(_all_reduce, _all_reduce_grad, t, group)
