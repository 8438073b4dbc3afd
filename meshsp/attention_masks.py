"""How a plan's ``ParallelAttention`` reads the masks a model passes to SDPA.

Shape legend: B batch, s this rank's local tokens of the attention, S all ranks' (rank-major, as
in ``meshsp.ops.masks``).

Model code builds its masks from the tensors it holds. Under a plan those are this rank's shards,
so a mask arrives in one of three ways:

* **key padding** ``[B, 1|H, 1, s_k]`` (or ``[B, s_k]``): it travels with its keys (``styles``).
* **local pairwise** ``[B|1, 1, s, s]``, built from this rank's tokens: Chroma adds the outer
  product ``m_i * m_j`` of a float 0/1 token mask, HunyuanVideo 1.5 takes ``m_i & m_j``. Such a mask
  is the outer product of its diagonal; the diagonal is every rank's per-token mask, which the
  ranks all-gather (B x s values each), and the product's rule becomes runs (``local_pairs``).
  A local pairwise mask of any other structure cannot be cut: its entries between this rank's
  tokens and the others' are not there.
* **global** (``ParallelAttention(masks="global")``, declared by the plan): the model builds one
  mask over the whole sequence, ``[B|1, 1|H, S_q, S_k]`` in its global order, and the attention's
  tokens are that sequence sharded as meshsp shards it (one stream), so that rank-major order is
  the layout's ``order()``. Masks with few distinct rows and columns become runs (``compress``);
  others are sliced densely. ``is_causal=True`` takes the same declaration.
"""

from __future__ import annotations

import torch

from meshsp.ops.blocks import PairMask
from meshsp.ops.masks import Rule, RunMask, causal_runs, compress, runs_from_ids
from meshsp.placements import SeqLayout

__all__ = ["global_pairs", "is_local_pairwise", "local_pairs", "outer_diagonal"]

_NEG_INF = float("-inf")


def is_local_pairwise(mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> bool:
    """A [B|1, 1, s, s] mask over this rank's own query and key tokens (self-attention)."""
    return (mask.dim() == 4 and mask.shape[0] in (1, query.shape[0]) and mask.shape[1] == 1
            and tuple(mask.shape[2:]) == (query.shape[2], key.shape[2]) and query.shape[2] == key.shape[2])


def outer_diagonal(mask: torch.Tensor, where: str) -> torch.Tensor:
    """The per-token mask [B|1, s] whose outer product (``&`` for booleans, ``*`` for floats) is
    ``mask`` [B|1, 1, s, s]; ValueError when the mask is no such product (reads it on the host)."""
    m = mask[:, 0].diagonal(dim1=-2, dim2=-1)
    outer = (m[:, :, None] & m[:, None, :]) if mask.dtype == torch.bool else m[:, :, None] * m[:, None, :]
    is_outer = bool((outer == mask[:, 0]).all())
    if not is_outer or (mask.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all())):
        raise ValueError(
            f"{where}: a pairwise mask [B, 1, {mask.shape[2]}, {mask.shape[3]}] built from this rank's tokens "
            "can be cut only when it is the outer product of a per-token 0/1 (or boolean) mask, as Chroma's "
            "and HunyuanVideo 1.5's are; other masks must be built over the whole sequence and declared "
            "with ParallelAttention(masks='global').")
    return m


def local_pairs(every: torch.Tensor, boolean: bool) -> PairMask:
    """Runs of the outer-product mask of ``every`` [B, S], all ranks' per-token masks rank-major:
    token class 1 where the token mask is set. Boolean: only class 1 x class 1 attends; float
    (added to the scores): class 1 x class 1 gets +1, every other pair 0."""
    ids = every.ne(0).long().cpu()
    positions = torch.arange(ids.shape[1])
    runs = tuple(runs_from_ids(row, positions) for row in ids)
    if boolean:
        bias = ((_NEG_INF, _NEG_INF), (_NEG_INF, 0.0))
    else:
        bias = ((0.0, 0.0), (0.0, 1.0))
    return PairMask(runs=RunMask(runs, runs, Rule(bias, ((False, False), (False, False)))))


def global_pairs(mask: torch.Tensor | None, is_causal: bool, q_layout: SeqLayout, kv_layout: SeqLayout,
                 ring_rank: int, where: str) -> PairMask:
    """A mask over the whole sequence (global order) or ``is_causal``, for layouts that shard one
    sequence: runs when they are few, else this ring row's dense rows (rank-major)."""
    q_order, k_order = q_layout.order(), kv_layout.order()
    if is_causal:
        return PairMask(runs=causal_runs(q_layout.pieces(), kv_layout.pieces()))
    b_ok = mask.dim() == 4 and mask.shape[2] in (1, q_layout.total) and mask.shape[3] == kv_layout.total
    if not b_ok:
        raise ValueError(f"{where}: masks='global' expects masks [B, 1 or H, S_q, S_k] over the whole sequence "
                         f"(S_q = {q_layout.total}, S_k = {kv_layout.total}); got {tuple(mask.shape)}.")
    if mask.shape[1] == 1 and mask.shape[2] == q_layout.total:
        runs = compress(mask, q_order, k_order)
        if runs is not None:
            return PairMask(runs=runs)
    start, rows = sum(q_layout.ring_lens[:ring_rank]), q_layout.ring_lens[ring_rank]
    cols = mask.index_select(3, k_order.to(mask.device)) if kv_layout.balance != "contiguous" else mask
    if mask.shape[2] == 1:
        return PairMask(rows=cols.expand(-1, -1, rows, -1), q_start=start)
    return PairMask(rows=cols.index_select(2, q_order[start : start + rows].to(mask.device)), q_start=start)
