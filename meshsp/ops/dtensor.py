"""``F.scaled_dot_product_attention`` on sequence-sharded DTensors, routed to meshsp's algorithms.

Active only inside a ``sequence_parallel_attention()`` scope (a ``TorchFunctionMode``): nothing is
registered globally and no torch function is replaced, so DTensor code outside the scope (tensor
parallel with head-sharded q/k/v, say) keeps torch's own behaviour. Inside the scope an SDPA call
whose q/k/v are DTensors ``[B, H, S, D]`` with ``Shard(2)`` on every axis of a ``("ring",
"ulysses")`` mesh (either axis alone works too) runs the custom op ``meshsp::sp_attention`` on the
local shards and returns a DTensor with the same placements. Local lengths follow from the global
shape (``SeqLayout``), so the call needs no sharding propagation (stock DTensor SDPA on a 2x2 CPU
mesh spends about a minute in strategy enumeration on its first call) and no size exchange.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Shard
from torch.overrides import TorchFunctionMode

from meshsp.config import ULYSSES_MODES
from meshsp.ops.attention import sp_attention
from meshsp.ops.flex import RoutesFlex, dtensor_flex, is_flex_call
from meshsp.placements import SeqLayout

__all__ = ["sequence_parallel_attention"]

_SP_AXES = ("ring", "ulysses")


def _axis_sizes(mesh) -> tuple[int, int]:
    names = mesh.mesh_dim_names or ()
    if not names or any(n not in _SP_AXES for n in names):
        raise ValueError(
            f"sequence-parallel attention needs a mesh whose axes are named from {_SP_AXES}, got "
            f"{names}; build it with meshsp.init_sp_mesh (use mesh['ring', 'ulysses'] of a cfg mesh)."
        )
    ring = mesh["ring"].size() if "ring" in names else 1
    ulysses = mesh["ulysses"].size() if "ulysses" in names else 1
    return ring, ulysses


def _check_placements(name: str, t: DTensor, seq_dim: int) -> None:
    if any(p != Shard(seq_dim) for p in t.placements):
        raise ValueError(
            f"{name} must be sharded along its sequence dim on every mesh axis, i.e. placements "
            f"{tuple(Shard(seq_dim) for _ in t.placements)}, got {t.placements}; use "
            "meshsp.placements.shard_sequence or redistribute first."
        )


def _local_mask(attn_mask, key: DTensor, layout: SeqLayout, r: int, u: int) -> torch.Tensor | None:
    """Key-padding mask [B, 1, 1, S_k] (DTensor sharded on dim 3, or a full tensor) -> local [B, s_k]."""
    if attn_mask is None:
        return None
    b, s_k = key.shape[0], key.shape[2]
    if attn_mask.dtype != torch.bool or tuple(attn_mask.shape) not in ((b, 1, 1, s_k), (b, s_k)):
        raise ValueError(
            f"only boolean key-padding masks of shape [B, 1, 1, S_k] = [{b}, 1, 1, {s_k}] (or [B, S_k]) "
            f"are supported, got {attn_mask.dtype} {tuple(attn_mask.shape)}."
        )
    if isinstance(attn_mask, DTensor):
        _check_placements("attn_mask", attn_mask, attn_mask.dim() - 1)
        return attn_mask.to_local().reshape(b, -1)
    return attn_mask.reshape(b, s_k).narrow(1, layout.offset(r, u), layout.local(r, u))


class sequence_parallel_attention(RoutesFlex, TorchFunctionMode):
    """Scope in which SDPA on sequence-sharded DTensors runs as Ulysses, Ring or the hybrid.

    Example::

        mesh = meshsp.init_sp_mesh(ParallelConfig(ulysses_degree=2, ring_degree=2))
        q, k, v = (shard_sequence(t, mesh, seq_dim=2) for t in (q_full, k_full, v_full))
        with meshsp.sequence_parallel_attention():
            out = F.scaled_dot_product_attention(q, k, v)   # DTensor, placements (Shard(2), Shard(2))
    """

    def __init__(self, ulysses_mode: str = "strict") -> None:
        super().__init__()
        if ulysses_mode not in ULYSSES_MODES:
            raise ValueError(f"ulysses_mode must be one of {ULYSSES_MODES}, got {ulysses_mode!r}.")
        self.uaa = ulysses_mode == "advanced_uaa"

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        qkv = list(args[:3]) + [kwargs.get(k) for k in ("query", "key", "value")]
        if func is F.scaled_dot_product_attention and any(isinstance(a, DTensor) for a in qkv):
            return self._attention(*args, **kwargs)
        if is_flex_call(func) and any(isinstance(a, DTensor) for a in args[:3]):  # meshsp.ops.flex
            return dtensor_flex(args, kwargs, self.uaa, torch.compiler.is_compiling())
        return func(*args, **kwargs)

    def _attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                   scale=None, enable_gqa=False):
        if not all(isinstance(t, DTensor) for t in (query, key, value)):
            raise ValueError("query, key and value must all be DTensors (or none of them).")
        if not (query.device_mesh == key.device_mesh == value.device_mesh):
            raise ValueError("query, key and value must live on the same device mesh.")
        if dropout_p != 0.0 or is_causal:
            raise ValueError(
                f"sequence-parallel attention supports dropout_p=0 and is_causal=False (diffusion "
                f"transformers attend bidirectionally), got dropout_p={dropout_p}, is_causal={is_causal}."
            )
        if query.shape[1] != key.shape[1] and not enable_gqa:
            raise ValueError(
                f"{query.shape[1]} query heads vs {key.shape[1]} key heads: pass enable_gqa=True for "
                "grouped-query attention, as F.scaled_dot_product_attention requires."
            )
        mesh = query.device_mesh
        ring, ulysses = _axis_sizes(mesh)
        for name, t in (("query", query), ("key", key), ("value", value)):
            _check_placements(name, t, 2)
        names = mesh.mesh_dim_names
        r = mesh.get_local_rank("ring") if "ring" in names else 0
        u = mesh.get_local_rank("ulysses") if "ulysses" in names else 0
        q_layout = SeqLayout.from_global(query.shape[2], ring=ring, ulysses=ulysses)
        kv_layout = SeqLayout.from_global(key.shape[2], ring=ring, ulysses=ulysses)
        out = sp_attention(
            query.to_local(), key.to_local(), value.to_local(),
            _local_mask(attn_mask, key, kv_layout, r, u),
            ring_group=mesh["ring"].get_group() if ring > 1 else None,
            ulysses_group=mesh["ulysses"].get_group() if ulysses > 1 else None,
            q_layout=q_layout, kv_layout=kv_layout, uaa=self.uaa, scale=scale,
        )
        shape = (*query.shape[:3], value.shape[-1])
        b, h, s, dv = shape  # sp_attention returns token-major memory: [B, S, H, Dv] seen as [B, H, S, Dv]
        return DTensor.from_local(out, mesh, query.placements, run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(b, s, h, dv, device="meta").transpose(1, 2).stride())
