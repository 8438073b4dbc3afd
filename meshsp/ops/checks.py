"""Validation of attention inputs against the SP layout. Pure: no communication.

Each check depends only on values every rank shares (global lengths, head counts, degrees, mode),
so every rank raises the same ``ValueError`` before the first collective.
"""

from __future__ import annotations

import torch

from meshsp.placements import SeqLayout

__all__ = ["check_attention_inputs", "working_ulysses_degrees"]


def working_ulysses_degrees(q_heads: int, kv_heads: int, lengths: tuple[int, ...], ring: int) -> list[int]:
    """Ulysses degrees that strict mode accepts for these heads and global sequence lengths."""
    ok = []
    for u in range(1, q_heads + 1):
        if q_heads % u or kv_heads % u:
            continue
        if all(all(c % u == 0 for c in SeqLayout.from_global(n, ring=ring, ulysses=1).ring_lens) for n in lengths):
            ok.append(u)
    return ok


def _check_strict(q, k, q_layout: SeqLayout, kv_layout: SeqLayout) -> None:
    u = q_layout.ulysses
    heads_ok = q.shape[1] % u == 0 and k.shape[1] % u == 0
    seq_ok = all(len(set(row)) == 1 for row in q_layout.lens + kv_layout.lens)
    if heads_ok and seq_ok:
        return
    why = []
    if not heads_ok:
        why.append(f"{q.shape[1]} query / {k.shape[1]} key-value heads are not divisible by ulysses_degree={u}")
    if not seq_ok:
        why.append(
            f"sequence lengths (query {q_layout.total}, key {kv_layout.total}) do not split into equal "
            f"shards over ulysses_degree={u} (local query lengths {q_layout.lens}, key {kv_layout.lens})"
        )
    works = working_ulysses_degrees(q.shape[1], k.shape[1], (q_layout.total, kv_layout.total), q_layout.ring)
    raise ValueError(
        "Ulysses strict mode cannot run this attention: " + "; ".join(why) + ". "
        f"ulysses_degree values that work here: {works}; or set ulysses_mode='advanced_uaa', "
        "which accepts any head count and sequence length without padding."
    )


def check_attention_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask_BSk: torch.Tensor | None,
    *,
    q_layout: SeqLayout,
    kv_layout: SeqLayout,
    ring_rank: int,
    ulysses_rank: int,
    uaa: bool,
) -> None:
    """Raise ``ValueError`` naming the values and the fix for anything the SP ops cannot run."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [batch, heads, seq, head_dim], got {tuple(q.shape)}, "
            f"{tuple(k.shape)}, {tuple(v.shape)}."
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if q.shape[0] != k.shape[0] or k.shape[:3] != v.shape[:3] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"incompatible q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: batch, key "
            "heads/length and q/k head dim must agree."
        )
    if k.shape[1] == 0 or q.shape[1] < k.shape[1] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"{q.shape[1]} query heads cannot be grouped over {k.shape[1]} key-value heads; "
            "grouped-query attention needs query heads to be a multiple of key-value heads."
        )
    if q_layout.lens[0].__len__() != kv_layout.ulysses or q_layout.ring != kv_layout.ring:
        raise ValueError(f"query layout {q_layout} and key layout {kv_layout} are on different meshes.")
    expect_q = q_layout.local(ring_rank, ulysses_rank)
    expect_k = kv_layout.local(ring_rank, ulysses_rank)
    if q.shape[2] != expect_q or k.shape[2] != expect_k:
        raise ValueError(
            f"rank (ring={ring_rank}, ulysses={ulysses_rank}) holds {q.shape[2]} query / {k.shape[2]} key "
            f"tokens but the layouts give it {expect_q} / {expect_k}; shard the sequence with "
            "meshsp.placements (torch.chunk sizes, ring outer, ulysses inner)."
        )
    if mask_BSk is not None:
        if mask_BSk.dtype != torch.bool or tuple(mask_BSk.shape) != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"the attention mask must be a boolean key-padding mask [batch, local keys] = "
                f"[{k.shape[0]}, {k.shape[2]}], got {mask_BSk.dtype} {tuple(mask_BSk.shape)}."
            )
    if q_layout.ulysses > 1 and not uaa:
        _check_strict(q, k, q_layout, kv_layout)
