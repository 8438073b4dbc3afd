"""Shipped plans that cut sequences in units or keep local segments, on gloo ranks beyond the coverage grid:
Wan-Animate on uneven frames and on fewer frames than ranks, HiDream on a square grid (no image mask)."""

import pytest

from meshsp.plans.verify import grid_for, parity


ANIMATE = "WanAnimateTransformer3DModel"


@pytest.mark.parametrize("ring,ulysses", [(1, 2), (2, 1)])
def test_wan_animate_on_uneven_frames(pools, ring, ulysses):
    """3 latent frames on 2 ranks: 2 and 1 whole frames, the face adapter exact on each."""
    grid = {**grid_for(ANIMATE), "frames": 2}
    shares = sorted(r["share"] for r in pools(2).run(parity, ANIMATE, ring, ulysses, grid=grid))
    assert shares == pytest.approx([1 / 3, 2 / 3])


def test_wan_animate_refuses_fewer_frames_than_ranks_on_every_rank(pools):
    import rank_tasks

    msgs = pools(4).run(rank_tasks.raises, "fewer_frames_than_ranks", ANIMATE, timeout=120)
    assert len(set(msgs)) == 1 and "has 3 units (whole frames, say), so some of the 4" in msgs[0], msgs


@pytest.mark.parametrize("ring,ulysses", [(1, 2), (2, 1)])
def test_hidream_square_grid_has_no_image_mask(pools, ring, ulysses):
    """A square latent is not padded to max_seq: no hidden_states_masks reach the blocks."""
    cls = "HiDreamImageTransformer2DModel"
    results = pools(2).run(parity, cls, ring, ulysses, grid={**grid_for(cls), "h": 4, "w": 4})
    assert sum(r["share"] for r in results) == pytest.approx(1.0)
