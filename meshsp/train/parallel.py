"""The training layout: the ``("dp", "ring", "ulysses")`` mesh, the SP plan, LoRA, activation
checkpointing and FSDP2 over the data x sequence ranks.

Gradient convention. Every rank computes the full-sequence loss of its data rank's samples (the
plan's ``GatherSequence`` hands every sequence rank the whole prediction), and the gather's backward
is the reduce-scatter *sum* of the sequence ranks' gradients, so summed over the ``sp`` ranks every
parameter's gradient is ``sp * g_d`` (``g_d``: the data rank's gradient; docs/gradients.md). FSDP2
averages over all ``dp * sp`` ranks it shards over: ``(1 / (dp * sp)) * sum_d sp * g_d = mean_d g_d``,
the gradient of the global batch's mean loss, as one process computes it.

In order (each step needs the modules the one before left): the SP plan on the ``ring`` /
``ulysses`` sub-mesh (``meshsp.parallelize``), LoRA adapters (peft) on the attention projections,
activation checkpointing of the transformer blocks (non-reentrant), then ``fully_shard`` of each
block and of the root over the flattened data x sequence mesh.

Example::

    mesh = train_mesh(ParallelConfig(data_parallel_size=2, ulysses_degree=2, ulysses_mode="advanced_uaa"))
    prepare_transformer(pipe.transformer, mesh, parallel, lora_rank=8)
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from meshsp.config import ParallelConfig

__all__ = ["BLOCK_LISTS", "LORA_TARGETS", "add_lora", "blocks", "mean_over_ranks", "merge_lora", "prepare_transformer",
           "train_mesh", "trainable_parameters"]

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks")  # Qwen-Image / Flux / Wan
# diffusers' attention projections: image stream, text stream (joint attention), output
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


def train_mesh(parallel: ParallelConfig, device_type: str = "cpu") -> DeviceMesh | None:
    """The ``("dp", "ring", "ulysses")`` mesh (``dp`` left out at size 1), or None on one process.

    Example::

        train_mesh(ParallelConfig(data_parallel_size=2, ulysses_degree=2)).mesh_dim_names   # ("dp", "ring", "ulysses")
    """
    if parallel.world_size == 1:
        return None
    from meshsp.mesh import init_sp_mesh

    return init_sp_mesh(parallel, device_type)


def _fsdp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    names = tuple(n for n in ("dp", "ring", "ulysses") if n in (mesh.mesh_dim_names or ()))
    return mesh[names]._flatten("dp_sp")


def blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's blocks, in order of their lists (``BLOCK_LISTS``)."""
    found = []
    for name in BLOCK_LISTS:
        found += list(getattr(transformer, name, None) or [])
    return found


def add_lora(transformer: nn.Module, rank: int, seed: int = 0) -> None:
    """LoRA adapters of ``rank`` (alpha = rank) on the attention projections; every other weight frozen.

    The adapters' random initial ``lora_A`` is drawn from ``seed`` (the caller's RNG untouched): every
    rank must start from the same weights before FSDP shards them, and so must one process."""
    from peft import LoraConfig, inject_adapter_in_model

    present = sorted({t for t in LORA_TARGETS for n, _ in transformer.named_modules() if n.endswith("." + t)})
    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=present)
    transformer.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(config, transformer)  # the new lora_A / lora_B weights require grad
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)


def merge_lora(transformer: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and put the base layer back (peft's merge)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(transformer.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = transformer.get_submodule(parent_name) if parent_name else transformer
            setattr(parent, child, module.get_base_layer())
    return transformer


def trainable_parameters(transformer: nn.Module) -> list[nn.Parameter]:
    return [p for p in transformer.parameters() if p.requires_grad]


def _checkpoint_blocks(transformer: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    targets = {id(b) for b in blocks(transformer)}
    apply_activation_checkpointing(
        transformer, checkpoint_wrapper_fn=functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: id(m) in targets)


def prepare_transformer(transformer: nn.Module, mesh: DeviceMesh | None, parallel: ParallelConfig, *,
                        lora_rank: int = 0, activation_checkpointing: bool = False, seed: int = 0) -> nn.Module:
    """Make ``transformer`` trainable on ``mesh`` (None: one process, no plan, no FSDP); in place.
    ``seed`` draws LoRA's initial weights.

    Example::

        prepare_transformer(pipe.transformer, train_mesh(parallel), parallel, lora_rank=0)
    """
    transformer.train()
    transformer.requires_grad_(True)
    if mesh is not None and parallel.sequence_parallel_size > 1:
        from meshsp.plans import get_plan, parallelize

        parallelize(transformer, mesh, get_plan(transformer, ulysses_mode=parallel.ulysses_mode))
    if lora_rank > 0:
        add_lora(transformer, lora_rank, seed)
    if activation_checkpointing:
        _checkpoint_blocks(transformer)
    if mesh is not None:
        from torch.distributed.fsdp import fully_shard

        shard_mesh = _fsdp_mesh(mesh)
        for block in blocks(transformer):
            fully_shard(block, mesh=shard_mesh)
        fully_shard(transformer, mesh=shard_mesh)
    return transformer


def mean_over_ranks(value: torch.Tensor, mesh: DeviceMesh | None) -> torch.Tensor:
    """The mean of a per-rank scalar over the whole world (sequence ranks hold equal values)."""
    if mesh is None:
        return value.detach()
    import torch.distributed as dist

    out = value.detach().clone()
    dist.all_reduce(out)
    return out / dist.get_world_size()
