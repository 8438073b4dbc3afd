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

import torch.distributed._functional_collectives as funcol

from meshsp.config import ULYSSES_MODES
from meshsp.ops.attention import sp_attention
from meshsp.ops.blocks import PairMask
from meshsp.ops.comm import _count
from meshsp.ops.flex import RoutesFlex, dtensor_flex, is_flex_call
from meshsp.ops.masks import SegmentMask, causal_runs, segment_runs
from meshsp.placements import SeqLayout
from meshsp.placements.sequence import BALANCES

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


def _is_key_padding(attn_mask, key) -> bool:
    b, s_k = key.shape[0], key.shape[2]
    return attn_mask.dtype == torch.bool and tuple(attn_mask.shape) in ((b, 1, 1, s_k), (b, s_k))


def _local_mask(attn_mask, key: DTensor, layout: SeqLayout, r: int, u: int) -> torch.Tensor:
    """Key-padding mask [B, 1, 1, S_k] (DTensor sharded on dim 3, or a full tensor in the
    sequence's own order) -> local [B, s_k]."""
    b = key.shape[0]
    if isinstance(attn_mask, DTensor):
        _check_placements("attn_mask", attn_mask, attn_mask.dim() - 1)
        return attn_mask.to_local().reshape(b, -1)
    index = layout.local_index(r, u).to(attn_mask.device)
    return attn_mask.reshape(b, -1).index_select(1, index)


def _gather_rows(rows: torch.Tensor, mesh, lens: tuple[int, ...]) -> torch.Tensor:
    """A row-sharded mask's local rows -> the rows of the whole ulysses group (uneven lengths)."""
    group = mesh["ulysses"].get_group()
    most = max(lens)
    padded = torch.nn.functional.pad(rows, (0, 0, 0, most - rows.shape[2])).contiguous()
    _count("all_gather", padded.numel() * padded.element_size() * (len(lens) - 1))
    every = funcol.wait_tensor(funcol.all_gather_single(padded.movedim(2, 0).contiguous(), 0, group))
    every = every.view(len(lens), most, *padded.movedim(2, 0).shape[1:])
    return torch.cat([every[i, :n] for i, n in enumerate(lens)]).movedim(0, 2)


def _pairwise(attn_mask, query, key, q_layout: SeqLayout, kv_layout: SeqLayout, mesh, r: int, ulysses: int) -> PairMask:
    """A pairwise mask [B|1, 1|H, S_q, S_k] as the rows this rank's ring row computes, rank-major."""
    b, h, s_q, s_k = query.shape[0], query.shape[1], query.shape[2], key.shape[2]
    if attn_mask.dim() == 2 and not isinstance(attn_mask, DTensor):  # [S_q, S_k], as SDPA broadcasts it
        attn_mask = attn_mask[None, None]
    shape = tuple(attn_mask.shape)
    if attn_mask.dim() != 4 or shape[0] not in (1, b) or shape[1] not in (1, h) or shape[2] not in (1, s_q) \
            or shape[3] != s_k or attn_mask.is_complex():
        raise ValueError(
            f"attention masks must be boolean key-padding [B, 1, 1, S_k] = [{b}, 1, 1, {s_k}] or pairwise "
            f"[B or 1, 1 or H, S_q or 1, S_k] = [{b}, {h}, {s_q}, {s_k}] (boolean or additive), "
            f"got {attn_mask.dtype} {shape}.")
    start, rows = sum(q_layout.ring_lens[:r]), q_layout.ring_lens[r]
    if shape[2] == 1 and not isinstance(attn_mask, DTensor):  # the same row for every query
        cols = attn_mask.index_select(3, kv_layout.order().to(attn_mask.device))
        return PairMask(rows=cols.expand(-1, -1, rows, -1), q_start=start)
    if isinstance(attn_mask, DTensor):  # rows sharded like the queries; columns in the DTensors' order
        _check_placements("attn_mask", attn_mask, 2)
        local = attn_mask.to_local()
        if ulysses > 1:
            local = _gather_rows(local, mesh, q_layout.lens[r])
        return PairMask(rows=local, q_start=start)
    q_order, k_order = (t.order().to(attn_mask.device) for t in (q_layout, kv_layout))
    rows_BHSS = attn_mask.index_select(2, q_order[start : start + rows])
    if kv_layout.balance != "contiguous":
        rows_BHSS = rows_BHSS.index_select(3, k_order)
    return PairMask(rows=rows_BHSS, q_start=start)


class sequence_parallel_attention(RoutesFlex, TorchFunctionMode):
    """Scope in which SDPA on sequence-sharded DTensors runs as Ulysses, Ring or the hybrid.

    Example::

        mesh = meshsp.init_sp_mesh(ParallelConfig(ulysses_degree=2, ring_degree=2))
        q, k, v = (shard_sequence(t, mesh, seq_dim=2) for t in (q_full, k_full, v_full))
        with meshsp.sequence_parallel_attention():
            out = F.scaled_dot_product_attention(q, k, v)   # DTensor, placements (Shard(2), Shard(2))
    """

    def __init__(self, ulysses_mode: str = "strict", balance: str = "contiguous") -> None:
        super().__init__()
        if ulysses_mode not in ULYSSES_MODES:
            raise ValueError(f"ulysses_mode must be one of {ULYSSES_MODES}, got {ulysses_mode!r}.")
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {BALANCES}, got {balance!r}.")
        self.uaa = ulysses_mode == "advanced_uaa"
        self.balance = balance

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
        if dropout_p != 0.0:
            raise ValueError(f"sequence-parallel attention runs without dropout (inference), got dropout_p={dropout_p}.")
        if is_causal and attn_mask is not None:
            raise ValueError("pass is_causal=True or an attn_mask, not both (as F.scaled_dot_product_attention); "
                             "a causal rule with other masking is a meshsp.SegmentMask with causal=True.")
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
        q_layout = SeqLayout.from_global(query.shape[2], ring=ring, ulysses=ulysses, balance=self.balance)
        kv_layout = SeqLayout.from_global(key.shape[2], ring=ring, ulysses=ulysses, balance=self.balance)
        key_mask, pair = None, None
        if is_causal:
            pair = PairMask(runs=causal_runs(q_layout.pieces(), kv_layout.pieces()))
        elif isinstance(attn_mask, SegmentMask):
            attn_mask.check(query.shape[0], query.shape[2], key.shape[2])
            pair = PairMask(runs=segment_runs(attn_mask, q_layout.order(), kv_layout.order()))
        elif attn_mask is not None and _is_key_padding(attn_mask, key):
            key_mask = _local_mask(attn_mask, key, kv_layout, r, u)
        elif attn_mask is not None:
            pair = _pairwise(attn_mask, query, key, q_layout, kv_layout, mesh, r, ulysses)
        out = sp_attention(
            query.to_local(), key.to_local(), value.to_local(), key_mask,
            ring_group=mesh["ring"].get_group() if ring > 1 else None,
            ulysses_group=mesh["ulysses"].get_group() if ulysses > 1 else None,
            q_layout=q_layout, kv_layout=kv_layout, uaa=self.uaa, scale=scale, pair=pair,
        )
        shape = (*query.shape[:3], value.shape[-1])
        b, h, s, dv = shape  # sp_attention returns token-major memory: [B, S, H, Dv] seen as [B, H, S, Dv]
        return DTensor.from_local(out, mesh, query.placements, run_check=False, shape=torch.Size(shape),
                                  stride=torch.empty(b, s, h, dv, device="meta").transpose(1, 2).stride())
