"""Which diffusers transformer classes meshsp can make sequence-parallel, and how.

``coverage()`` asks ``get_plan`` about a tiny instance of every class diffusers exports and records
where the plan came from — a shipped YAML plan, the class's converted ``_cp_plan``, or inference —
or why there is none — and its tensor parallelism: verified, refused (and why) or not verified.
``meshsp plan --coverage`` prints it as the README's table (no ranks are started: the TP column reads
``TP_VERIFIED``, the classes ``tests/test_tp_coverage.py`` runs at TP2 and TP2xU2 on gloo ranks); the
coverage tests run every covered class on gloo ranks against the single-device output.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Row", "TP_VERIFIED", "coverage", "markdown", "summary"]

# Equal to the single-device output at TP2 (2 ranks) and TP2 x U2 advanced_uaa (4 ranks, 6 heads: 3 per
# tp rank over 2 Ulysses ranks), with TP's all-reduces run and each rank holding less than the whole
# model: tests/test_tp_coverage.py runs every class listed here.
TP_VERIFIED = (
    "AllegroTransformer3DModel", "AnyFlowTransformer3DModel", "AuraFlowTransformer2DModel",
    "BriaFibo2Transformer2DModel", "BriaFiboTransformer2DModel", "BriaTransformer2DModel",
    "ChronoEditTransformer3DModel", "CogVideoXTransformer3DModel", "CogView3PlusTransformer2DModel",
    "CogView4Transformer2DModel", "ConsisIDTransformer3DModel", "CosmosTransformer3DModel",
    "DiTTransformer2DModel", "DreamLiteTransformer2DModel", "EasyAnimateTransformer3DModel",
    "ErnieImageTransformer2DModel", "Flux2Transformer2DModel", "Flux3Transformer2DModel",
    "FluxTransformer2DModel", "GlmImageTransformer2DModel", "HeliosTransformer3DModel",
    "HunyuanImageTransformer2DModel", "HunyuanVideoFramepackTransformer3DModel",
    "HunyuanVideoTransformer3DModel", "JoyImageEditPlusTransformer3DModel", "JoyImageEditTransformer3DModel",
    "Kandinsky5Transformer3DModel", "Kandinsky6Transformer3DModel", "Krea2Transformer2DModel",
    "LTX2VideoTransformer3DModel", "LTXVideoTransformer3DModel", "LatteTransformer3DModel",
    "LongCatImageTransformer2DModel", "Lumina2Transformer2DModel", "MiniMaxH3Transformer3DModel",
    "MochiTransformer3DModel", "OvisImageTransformer2DModel", "PRXTransformer2DModel",
    "PixArtTransformer2DModel", "QwenImageTransformer2DModel", "SD3Transformer2DModel",
    "SkyReelsV2Transformer3DModel", "Transformer2DModel", "WanTransformer3DModel",
    "WanVACETransformer3DModel", "ZImageTransformer2DModel",
)


@dataclass(frozen=True)
class Row:
    cls: str
    status: str  # "shipped", "converted", "inferred" or "refused"
    reason: str = ""
    tp: str = ""  # "verified", "refused: <why>" or "not verified"; "" without a plan


def _row(cls: str) -> Row:
    from meshsp.plans import get_plan
    from meshsp.zoo import NOT_DIT, REFUSED, ZOO, build

    if cls in NOT_DIT:
        return Row(cls, "refused", NOT_DIT[cls])
    if cls not in ZOO:
        return Row(cls, "refused", REFUSED.get(cls, "no tiny config"))
    try:
        plan = get_plan(build(cls, heads=3))
    except ValueError as exc:
        return Row(cls, "refused", str(exc).split(": ", 1)[-1])
    return Row(cls, plan.source, tp=_tp_status(cls, plan))


def _tp_status(cls: str, plan) -> str:
    if not plan.tp:
        return ("refused: no attention or feed-forward the tp recogniser can shard (meshsp.plans.tp_plan) and "
                "no tp section in a shipped plan")
    return "verified" if cls in TP_VERIFIED else "not verified"


def coverage() -> dict[str, Row]:
    """``{class: Row}`` for every transformer class diffusers exports.

    Example::

        rows = coverage()
        rows["FluxTransformer2DModel"].tp   # "verified"
    """
    from meshsp.zoo import diffusers_transformer_classes

    return {cls: _row(cls) for cls in diffusers_transformer_classes()}


def summary(rows: dict[str, Row]) -> str:
    """One line: how many DiT classes have a plan, from where, and how many are refused."""
    from meshsp.zoo import NOT_DIT

    dits = {c: r for c, r in rows.items() if c not in NOT_DIT}
    count = {k: sum(r.status == k for r in dits.values()) for k in ("shipped", "converted", "inferred", "refused")}
    return (f"**{len(dits) - count['refused']} of the {len(dits)} DiT classes have a plan**: {count['shipped']} "
            f"shipped, {count['converted']} converted from their `_cp_plan`, {count['inferred']} inferred when "
            f"`get_plan` is called; {count['refused']} refused.")


def markdown(rows: dict[str, Row]) -> str:
    """The summary line and the rows as a Markdown table: plan, why not, and TP at TP2 / TP2xU2."""
    lines = [summary(rows), "", "| class | plan | why not | TP2, TP2xU2 |", "|---|---|---|---|"]
    for cls, row in rows.items():
        mark = "refused" if row.status == "refused" else f"✓ {row.status}"
        tp = f"✓ {row.tp}" if row.tp == "verified" else row.tp
        lines.append(f"| {cls} | {mark} | {row.reason.replace('|', '/')[:300]} | {tp.replace('|', '/')} |")
    return "\n".join(lines)
