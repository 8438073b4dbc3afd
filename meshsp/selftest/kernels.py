"""One-device checks: every path of ``local_attention``, the merges, Ring and whole-query simulated.

Shape legend: B batch, H query heads, Hk key/value heads, Sq / Sk query / key lengths, D head dim
of queries and keys, Dv of values; P simulated ranks.

Inputs are drawn in float64 on the CPU from a seed named after the case (the same inputs in every
process), cast to the dtype and moved to the device; the reference is ``math_attention`` in float64.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meshsp.ops.kernel import local_attention, math_attention, route
from meshsp.ops.ring import merge_partials
from meshsp.selftest.numerics import compare, sdpa_or_none

__all__ = [
    "CASES", "DTYPES", "Case", "check_kernel", "check_merge", "check_merge_empty", "check_ring_simulation",
    "check_whole_query_simulation", "route_label", "simulate_ring", "simulate_whole_query",
]

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)


@dataclass(frozen=True)
class Case:
    """One kernel call's shape. ``dead_row``: batch row 1's keys all masked (out 0, lse -inf)."""

    name: str
    b: int = 2
    h: int = 4
    hk: int = 4
    sq: int = 77
    sk: int = 77
    d: int = 64
    dv: int | None = None
    mask: bool = False
    dead_row: bool = False
    causal: bool = False  # is_causal (square causal blocks of masked attention's runs)
    pairwise: bool = False  # a dense boolean [B, 1, Sq, Sk] mask, two query rows fully masked


CASES = (
    Case("plain"),
    Case("key-padding mask", mask=True),
    Case("fully masked batch row, GQA 8/2", h=8, hk=2, mask=True, dead_row=True),
    Case("GQA 8 query / 2 kv heads", h=8, hk=2),
    Case("GQA + mask, cross lengths", h=6, hk=3, sq=33, sk=91, mask=True),
    Case("head dim 40", d=40),
    Case("head dim 72, mask", d=72, mask=True),
    Case("head dim 6, mask", d=6, mask=True),
    Case("head dim 100", d=100),
    Case("head dim 100, mask", d=100, mask=True),
    Case("head dim 320", d=320),
    Case("head dim 320, mask", d=320, mask=True),
    Case("value dim 32 < head dim 64", dv=32),
    Case("value dim 96 > head dim 40, mask", d=40, dv=96, mask=True),
    Case("empty query shard", sq=0),
    Case("empty key shard", sk=0),
    Case("one token", sq=1, sk=1),
    Case("causal", causal=True),
    Case("causal, GQA 8/2, head dim 100", h=8, hk=2, d=100, causal=True),
    Case("pairwise mask, rows fully masked", pairwise=True),
    Case("pairwise mask, GQA 6/3, cross lengths", h=6, hk=3, sq=33, sk=91, pairwise=True),
)


def _seeded(name: str) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def draw(name: str, b: int, h: int, hk: int, sq: int, sk: int, d: int, dv: int, mask: bool,
         dead_row: bool = False):
    """float64 CPU q [B, H, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv], mask [B, Sk] or None."""
    g = _seeded(name)
    q = torch.randn(b, h, sq, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hk, sk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, hk, sk, dv, generator=g, dtype=torch.float64)
    m = None
    if mask and sk:
        m = torch.rand(b, sk, generator=g) < 0.7
        m[:, 0] = True
        if dead_row:
            m[1] = False
    return q, k, v, m


def _on(device: str, dtype: torch.dtype, *tensors):
    return [None if t is None else t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
            for t in tensors]


def _capability(device: str) -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if device == "cuda" else None


def route_label(device: str, dtype: torch.dtype, d: int, dv: int, masked: bool) -> str:
    """The kernel ``local_attention`` takes and the head dims it runs at, as ``route`` says."""
    r = route(device, dtype, d, dv, masked, _capability(device))
    return f"{r.kernel} {r.head_dim}/{r.value_dim}"


@functools.lru_cache(maxsize=len(CASES))
def _reference(case: Case):
    """A case's float64 inputs and float64 attention, drawn once for every dtype (never modified)."""
    q64, k64, v64, m = draw(case.name, case.b, case.h, case.hk, case.sq, case.sk, case.d, case.dv or case.d,
                            case.mask, case.dead_row)
    bias = _pairwise(case) if case.pairwise else None
    return (q64, k64, v64, m), math_attention(q64, k64, v64, m, causal=case.causal, bias=bias)


def _pairwise(case: Case) -> torch.Tensor:
    bias = torch.rand(case.b, 1, case.sq, case.sk, generator=_seeded(case.name + " mask")) < 0.6
    bias[:, :, :2] = False
    return bias


def check_kernel(case: Case, dtype: torch.dtype, device: str) -> tuple[bool, str]:
    """One case in one dtype: (passed, detail)."""
    dv = case.dv or case.d
    (q64, k64, v64, m), (ref, ref_lse) = _reference(case)
    q, k, v, mask = _on(device, dtype, q64, k64, v64, m)
    bias = _pairwise(case).to(device) if case.pairwise else None
    out, lse = local_attention(q, k, v, mask, causal=case.causal, bias=bias)
    masked = m is not None or bias is not None
    path = "no kernel (empty)" if case.sq == 0 or case.sk == 0 else route_label(device, dtype, case.d, dv, masked)
    if case.causal:
        path += " causal"
    base = sdpa_or_none(q, k, v, mask, causal=case.causal, bias=bias)
    ok, detail = compare(dtype, out, ref, ref_lse, lse=lse, base=base)
    return ok, f"[{path}] {detail}"


# --- merges -----------------------------------------------------------------------------------


def _accumulator(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_merge(dtype: torch.dtype, device: str) -> tuple[bool, str]:
    """Two key blocks' partials merged (out of place and into the accumulator) equal the whole."""
    q64, k64, v64, m = draw("merge", 2, 4, 2, 45, 77, 64, 64, True)
    ref, ref_lse = math_attention(q64, k64, v64, m)
    q, k, v, mask = _on(device, dtype, q64, k64, v64, m)
    cut = 40
    out_a, lse_a = local_attention(q, k[:, :, :cut], v[:, :, :cut], mask[:, :cut])
    out_b, lse_b = local_attention(q, k[:, :, cut:], v[:, :, cut:], mask[:, cut:])
    acc = _accumulator(dtype)
    out, lse = merge_partials(out_a.to(acc), lse_a, out_b, lse_b)
    out_in, lse_in = merge_partials(out_a.to(acc), lse_a, out_b.clone(), lse_b, into_a=True)
    same = torch.allclose(out_in, out, rtol=4 * torch.finfo(acc).eps, atol=0) and torch.equal(lse_in, lse)
    ok, detail = compare(dtype, out.to(dtype), ref, ref_lse, lse=lse, base=sdpa_or_none(q, k, v, mask))
    return ok and same, f"{detail}, in place {'equal' if same else 'DIFFERS'}"


def check_merge_empty(device: str) -> tuple[bool, str]:
    """A partial with no keys (lse -inf, out 0) has no weight; two of them stay 0 / -inf, no NaN."""
    g = _seeded("merge empty")
    out = torch.randn(2, 3, 5, 8, generator=g).to(device)
    lse = torch.randn(2, 3, 5, generator=g).to(device)
    none_out, none_lse = torch.zeros_like(out), torch.full_like(lse, float("-inf"))
    kept, kept_lse = merge_partials(out, lse, none_out, none_lse)
    first, first_lse = merge_partials(none_out.clone(), none_lse, out, lse, into_a=True)
    both, both_lse = merge_partials(none_out.clone(), none_lse, none_out.clone(), none_lse)
    checks = {
        "kept": torch.allclose(kept, out) and torch.allclose(kept_lse, lse),
        "empty first": torch.allclose(first, out) and torch.allclose(first_lse, lse),
        "both empty 0/-inf": bool((both == 0).all()) and bool(torch.isneginf(both_lse).all()),
        "no NaN": not any(bool(t.isnan().any()) for t in (kept, first, both, kept_lse, first_lse, both_lse)),
    }
    failed = [name for name, good in checks.items() if not good]
    return not failed, ("failed: " + ", ".join(failed)) if failed else ", ".join(checks)


# --- Ring and whole-query attention, simulated in one process ---------------------------------

SIM_LENS = (31, 0, 17, 29)  # P = 4 uneven blocks of 77 tokens, one empty


def _sim_inputs(name: str, sq: int, dtype: torch.dtype, device: str):
    """B = 3: row 0 has one key block (tokens 31..47) fully masked, row 1 every key masked."""
    q64, k64, v64, m = draw(name, 3, 8, 2, sq, sum(SIM_LENS), 64, 64, True)
    m[0, 31:48] = False
    m[1] = False
    return (q64, k64, v64, m), _on(device, dtype, q64, k64, v64, m)


def simulate_ring(q, k, v, mask, q_lens: Sequence[int], kv_lens: Sequence[int]):
    """Every simulated ring rank's queries over the key blocks in ring order (rank ``me`` sees
    block ``me - t`` at step t), merged as ``ring_attention`` merges. Returns (out, lse) whole."""
    acc = _accumulator(q.dtype)
    q_blocks, k_blocks, v_blocks = q.split(list(q_lens), 2), k.split(list(kv_lens), 2), v.split(list(kv_lens), 2)
    m_blocks = mask.split(list(kv_lens), 1)
    outs, lses = [], []
    for me in range(len(q_lens)):
        out = lse = None
        for step in range(len(kv_lens)):
            src = (me - step) % len(kv_lens)
            out_i, lse_i = local_attention(q_blocks[me], k_blocks[src], v_blocks[src], m_blocks[src])
            if out is None:
                out, lse = out_i.to(acc), lse_i
            else:
                out, lse = merge_partials(out, lse, out_i, lse_i, into_a=True)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def simulate_whole_query(q, k, v, mask, kv_lens: Sequence[int]):
    """Whole queries over each simulated rank's keys, combined as ``replicated_query_attention``
    combines them (max of lse, then weighted outputs and weights summed), one SP axis."""
    parts = [local_attention(q, k_r, v_r, m_r)
             for k_r, v_r, m_r in zip(k.split(list(kv_lens), 2), v.split(list(kv_lens), 2), mask.split(list(kv_lens), 1))]
    lses = torch.stack([lse for _, lse in parts])
    top = lses.max(dim=0).values  # the all-reduce "max"
    safe = torch.where(torch.isneginf(top), 0.0, top)
    weights = torch.exp(lses - safe)
    acc = sum(out.to(lses.dtype) * w[..., None] for (out, _), w in zip(parts, weights))  # the all-reduce "sum"
    total = weights.sum(dim=0)[..., None]
    out = torch.where(total > 0, acc / total.clamp_min(torch.finfo(total.dtype).tiny), 0.0)
    lse = torch.where(total[..., 0] > 0, safe + torch.log(total[..., 0]), float("-inf"))
    return out.to(q.dtype), lse


def check_ring_simulation(dtype: torch.dtype, device: str) -> tuple[bool, str]:
    """Ring over P = 4 uneven blocks (one empty) in one process equals whole attention."""
    (q64, k64, v64, m), (q, k, v, mask) = _sim_inputs("ring simulation", sum(SIM_LENS), dtype, device)
    ref, ref_lse = math_attention(q64, k64, v64, m)
    out, lse = simulate_ring(q, k, v, mask, SIM_LENS, SIM_LENS)
    return compare(dtype, out, ref, ref_lse, lse=lse, base=sdpa_or_none(q, k, v, mask))


def check_whole_query_simulation(dtype: torch.dtype, device: str) -> tuple[bool, str]:
    """Whole queries (33) over keys on P = 4 simulated ranks (one empty) equal whole attention."""
    (q64, k64, v64, m), (q, k, v, mask) = _sim_inputs("whole-query simulation", 33, dtype, device)
    ref, ref_lse = math_attention(q64, k64, v64, m)
    out, lse = simulate_whole_query(q, k, v, mask, SIM_LENS)
    return compare(dtype, out, ref, ref_lse, lse=lse, base=sdpa_or_none(q, k, v, mask))
