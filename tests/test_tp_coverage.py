"""Tensor parallel beyond the 9 families: every class in ``meshsp.plans.coverage.TP_VERIFIED`` (its
plan's ``tp`` section shipped, from the class's ``_tp_plan``, or recognised by ``meshsp.plans.tp_plan``)
equals the single-device output at TP2 (2 ranks, 4 heads) and TP2 x U2 ``advanced_uaa`` (4 ranks,
6 heads: 3 per tp rank over 2 Ulysses ranks), on an odd token grid, batch 2, padded text; TP's
all-reduces ran and each rank holds less than the whole model (``verify.parity`` asserts both).
The ranks start once; each layout runs its classes in a few batches."""

import pytest

from meshsp.plans.coverage import TP_VERIFIED, Row, markdown
from meshsp.plans.tp_plan import tp_entries
from meshsp.plans.verify import parity
from meshsp.zoo import build

CLASSES = sorted(TP_VERIFIED)
# layout -> (world, ring, ulysses, tp, heads)
LAYOUTS = {"TP2": (2, 1, 1, 2, 4), "TP2xU2-uaa": (4, 1, 2, 2, 6)}
BATCH = 12


def parity_batch(classes: list[str], ring: int, ulysses: int, tp: int, heads: int) -> dict:
    """``parity`` for several classes in one call on every rank: class -> result."""
    return {cls: parity(cls, ring, ulysses, tp=tp, heads=heads) for cls in classes}


@pytest.fixture(scope="module")
def results(pools):
    """layout -> class -> per-rank results, or the failure of the batch the class ran in."""
    out: dict[str, dict] = {}
    for layout, (world, ring, ulysses, tp, heads) in LAYOUTS.items():
        out[layout] = {}
        for start in range(0, len(CLASSES), BATCH):
            batch = CLASSES[start:start + BATCH]
            try:
                per_rank = pools(world).run(parity_batch, batch, ring, ulysses, tp, heads, timeout=300)
            except Exception as exc:  # noqa: BLE001 - reported by each class of the batch
                out[layout].update({cls: exc for cls in batch})
                continue
            out[layout].update({cls: [rank[cls] for rank in per_rank] for cls in batch})
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("cls", CLASSES)
def test_verified_class_tp_parity(results, cls, layout):
    per_rank = results[layout][cls]
    if isinstance(per_rank, Exception):
        raise per_rank
    world, _, ulysses, _, _ = LAYOUTS[layout]
    assert len(per_rank) == world
    shares = [r["share"] for r in per_rank]
    # Each tp rank's Ulysses pair attends to every query token once (uneven shards of odd lengths).
    assert ulysses == 1 or abs(sum(shares) - 2.0) < 1e-9, shares
    assert all(r["param_share"] < 1.0 for r in per_rank), [r["param_share"] for r in per_rank]


def test_grouped_query_attention_is_left_whole():
    """Lumina2's tiny attention has 1 key/value head for 4 query heads: a tp that divides the query
    heads and every width would still split the key/value head, so the recogniser leaves it."""
    entries = tp_entries(build("Lumina2Transformer2DModel", heads=4))
    assert not any(".attn" in path for path in entries), entries


def test_second_stream_without_its_projection_is_left_whole():
    """EasyAnimate's second block (not MMDiT) returns the text's attention output unprojected."""
    model = build("EasyAnimateTransformer3DModel", heads=4)
    entries = tp_entries(model)
    assert "transformer_blocks.0.attn1" in entries and "transformer_blocks.1.attn1.to_q" not in entries
    assert not any(path.startswith("transformer_blocks.*.attn1.to_") and "add" not in path for path in entries)
    assert "transformer_blocks.*.ff.net.2" in entries  # its feed-forwards are sharded all the same


def test_recognised_feed_forward_names():
    entries = {k: type(v).__name__ for k, v in tp_entries(build("PRXTransformer2DModel", heads=4)).items()
               if not getattr(v, "gathered", False)}  # (its AdaLN modulation is sharded too, gathered)
    assert entries == {"blocks.*.gate_proj": "ColwiseParallel", "blocks.*.up_proj": "ColwiseParallel",
                       "blocks.*.down_proj": "RowwiseParallel"}
    mochi = tp_entries(build("MochiTransformer3DModel", heads=4))  # SwiGLU: gate and value halves
    assert mochi["transformer_blocks.*.ff.net.0.proj"].blocks == [1, 1]


def test_markdown_has_a_tp_column():
    rows = {"A": Row("A", "shipped", tp="verified"), "B": Row("B", "inferred", tp="refused: no tp entries"),
            "C": Row("C", "refused", "no tiny config")}
    lines = markdown(rows).splitlines()[2:]  # after the count line and a blank line
    assert lines[0].endswith("| TP2, TP2xU2 |")
    assert lines[2].endswith("| ✓ verified |") and lines[3].endswith("| refused: no tp entries |")
    assert lines[4].endswith("|  |")



def test_verify_runs_tp_layouts_beside_sp_ones():
    """``verify`` takes (ring, ulysses, tp) layouts as well as the (ring, ulysses) ones its callers give."""
    from meshsp.plans import get_plan
    from meshsp.plans.verify import verify

    cls = "PixArtTransformer2DModel"
    lines = verify(cls, get_plan(build(cls, heads=4)), layouts=[(1, 2), (1, 1, 2)], heads=4)
    assert lines[0].startswith("R1xU2: equal") and "parameter bytes" not in lines[0], lines
    assert lines[1].startswith("R1xU1xTP2: equal") and "parameter and buffer bytes per rank" in lines[1], lines
