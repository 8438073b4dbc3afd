"""How the selftest judges a result: against float64, no further off than SDPA in the same dtype.

Shape legend: B batch, H query heads, Sq query length, Dv value head dim.

An output passes when its largest error against a float64 reference, over the rows that have a key
to attend, is at most ``1.5 x`` the error of ``F.scaled_dot_product_attention`` in the same dtype
and on the same device, plus a floor of a few units in the dtype's last place (16 units when no
SDPA bound exists). Rows with no key at all (a fully masked batch row, an empty key shard) must be
exactly 0 with ``lse = -inf``. A log-sum-exp must be within 16 units of rounding of float64 (the
scores round in the dtype).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["ULP", "allowed_error", "compare", "dtype_label", "sdpa_or_none"]

ULP = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 2 ** -23, torch.float64: 2 ** -52}
_LABELS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}


def dtype_label(dtype: torch.dtype) -> str:
    return _LABELS[dtype]


def allowed_error(sdpa_err: float, dtype: torch.dtype, scale: float, factor: float = 1.5) -> float:
    """The largest output error accepted, given SDPA's error in the same dtype (0: none known)."""
    # Without SDPA to compare with, the floor alone bounds the result: 16 units of rounding (one in
    # 40 random inputs of a math-path case needed 9 in float32).
    floor = (8 if sdpa_err else 16) * ULP[dtype] * max(scale, 1.0)
    return factor * sdpa_err + floor


def sdpa_or_none(q, k, v, mask_BSk=None, *, causal: bool = False, bias=None) -> torch.Tensor | None:
    """``F.scaled_dot_product_attention`` in the inputs' dtype and device, or None where it cannot run."""
    if q.shape[2] == 0 or k.shape[2] == 0:
        return None
    sdpa_mask = bias if bias is not None else None if mask_BSk is None else mask_BSk[:, None, None, :]
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=causal,
                                              enable_gqa=q.shape[1] != k.shape[1])
    except RuntimeError:
        return None


def _max_abs(a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> float:
    diff = (a - b).abs()
    if not bool(rows.all()):
        diff = diff[rows]
    return diff.max().item() if diff.numel() else 0.0


def _empty_rows(out, lse, dead) -> tuple[bool, str]:
    """Rows without keys: out exactly 0, lse -inf (what the merges rely on)."""
    zeros = bool((out[dead] == 0).all())
    neg_inf = lse is None or bool(torch.isneginf(lse[dead]).all())
    text = f"{int(dead.sum())} rows without keys: out {'0' if zeros else 'NOT 0'}"
    if lse is not None:
        text += f", lse {'-inf' if neg_inf else 'NOT -inf'}"
    return zeros and neg_inf, text


def compare(dtype: torch.dtype, out: torch.Tensor, ref: torch.Tensor, ref_lse: torch.Tensor, *,
            lse: torch.Tensor | None = None, base: torch.Tensor | None = None,
            factor: float = 1.5) -> tuple[bool, str]:
    """(passed, detail) of ``out`` [B, H, Sq, Dv] (and ``lse`` [B, H, Sq]) against the float64
    ``ref`` / ``ref_lse``; ``base`` is SDPA's output in ``dtype`` (None: no bound known)."""
    out, ref, ref_lse = out.detach().double().cpu(), ref.double().cpu(), ref_lse.double().cpu()
    lse = None if lse is None else lse.detach().double().cpu()
    if out.shape != ref.shape:
        return False, f"shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    dead = torch.isneginf(ref_lse)
    live = ~dead
    ok, notes = True, []
    if dead.any():
        ok, text = _empty_rows(out, lse, dead)
        notes.append(text)
    err = _max_abs(out, ref, live)
    bound = _max_abs(base.detach().double().cpu(), ref, live) if base is not None else 0.0
    if not math.isfinite(bound):
        bound = 0.0
        notes.append("SDPA not finite")
    scale = ref[live].abs().max().item() if live.any() else 0.0
    allowed = allowed_error(bound, dtype, scale, factor)
    ok = ok and math.isfinite(err) and err <= allowed
    parts = [f"err {err:.1e} (SDPA {bound:.1e}, allowed {allowed:.1e})"]
    if lse is not None:
        lse_err = _max_abs(lse, ref_lse, live)
        lse_scale = ref_lse[live].abs().max().item() if live.any() else 0.0
        lse_allowed = 16 * ULP[dtype] * max(lse_scale, 1.0)
        ok = ok and math.isfinite(lse_err) and lse_err <= lse_allowed
        parts.append(f"lse err {lse_err:.1e} (allowed {lse_allowed:.1e})")
    return ok, ", ".join(parts + notes)
