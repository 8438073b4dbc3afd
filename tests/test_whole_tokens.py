"""WholeTokens: a processor that pads from the length it sees and masks from whole-sequence
statistics (flex_attention with a BlockMask and score_mod at global indices, or SDPA with a
pairwise mask) runs on gathered inputs, each rank computing its slice of the query rows: equal to
one process in float64 on U2, R2, U4 and U2xR2, with the bytes and the row shares as stated."""

import math

import pytest

import whole_tasks

CASES = [dict(kind="flex", B=2, S=13), dict(kind="sdpa", B=2, S=13), dict(kind="flex", B=1, S=3)]
DEGREES = [(2, 1, 2), (2, 2, 1), (4, 1, 4), (4, 2, 2)]


@pytest.mark.parametrize("world,ring,ulysses", DEGREES, ids=[f"R{r}xU{u}" for _, r, u in DEGREES])
def test_rows_of_whole_sequence_attention_equal_one_process(pools, world, ring, ulysses):
    per_rank = pools(world).run(whole_tasks.whole_parity, ring, ulysses, CASES)
    h, d = whole_tasks.H, whole_tasks.D
    for i, case in enumerate(CASES):
        results = [r[i] for r in per_rank]
        b, s = case["B"], case["S"]
        n = math.ceil(s / whole_tasks.PAD) * whole_tasks.PAD  # the query rows of the padded call
        # Each rank computed its rows of the call, and together every row once.
        assert sum(r["tokens"][0] for r in results) == n and all(r["tokens"][1] == n for r in results)
        assert max(r["tokens"][0] for r in results) == -(-n // world)
        # Sent: the input shard (P - 1) times, and the output rows (+ flex's float64 lse rows).
        rows = -(-n // world) * (world - 1) * b * h * 8
        expected = b * -(-s // world) * h * d * 8 * (world - 1) + rows * d + (rows if case["kind"] == "flex" else 0)
        assert all(r["bytes"] == expected for r in results), (expected, [r["bytes"] for r in results])
        # The same processor on a shard alone gives another result: the check can fail.
        if s >= world:
            assert max(r["alone_diff"] for r in results) > 1e-3, results
