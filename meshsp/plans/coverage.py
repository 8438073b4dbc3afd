"""Which diffusers transformer classes meshsp can make sequence-parallel, and how.

``coverage()`` asks ``get_plan`` about a tiny instance of every class diffusers exports and records
where the plan came from — a shipped YAML plan, the class's converted ``_cp_plan``, or inference —
or why there is none. ``meshsp plan --coverage`` prints it as the README's table; the coverage tests
run every covered class on gloo ranks against the single-device output.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Row", "coverage", "markdown"]


@dataclass(frozen=True)
class Row:
    cls: str
    status: str  # "shipped", "converted", "inferred" or "refused"
    reason: str = ""


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
    return Row(cls, plan.source)


def coverage() -> dict[str, Row]:
    """``{class: Row}`` for every transformer class diffusers exports."""
    from meshsp.zoo import diffusers_transformer_classes

    return {cls: _row(cls) for cls in diffusers_transformer_classes()}


def markdown(rows: dict[str, Row]) -> str:
    lines = ["| class | plan | why not |", "|---|---|---|"]
    for cls, row in rows.items():
        mark = "refused" if row.status == "refused" else f"✓ {row.status}"
        lines.append(f"| {cls} | {mark} | {row.reason.replace('|', '/')[:300]} |")
    return "\n".join(lines)
