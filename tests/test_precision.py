"""bf16 and fp16: the sequence-parallel output is as close to a float64 reference as the
single-device output in the same dtype (same seeded weights and inputs)."""

import pytest
import rank_tasks
import torch

from meshsp.tiny import FAMILIES

LAYOUTS = {"U2": (2, 1, 2), "R2": (2, 2, 1), "U2xR2": (4, 2, 2)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_low_precision_error_no_worse_than_single_device(pools, family, layout, dtype):
    world, ring, ulysses = LAYOUTS[layout]
    for res in pools(world).run(rank_tasks.dtype_parity, family, ring, ulysses, dtype):
        # RMS error over the output; 1.5x allows for rounding in another order (merge, exchange).
        assert res["parallel"] <= 1.5 * res["single"] + 1e-6 * res["scale"], res
