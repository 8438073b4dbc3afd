"""torch.compile: SP attention is one graph with no break; a compiled parallelized model is exact."""

import rank_tasks


def test_sp_attention_compiles_fullgraph_without_breaks(pools):
    errs = pools(4).run(rank_tasks.compiled_attention, 2, 2, timeout=600)  # hybrid U2xR2, uneven
    assert max(errs) < 2e-6


def test_compiled_parallel_flux_matches_eager_single_device(pools):
    errs = pools(2).run(rank_tasks.compiled_model, "flux", 1, 2, timeout=600)
    assert max(errs) < 1e-5


def test_training_step_through_sp_attention_compiles_fullgraph(pools):
    """Forward and backward of SP attention in one compiled graph (U2xR2, uneven), gradients exact."""
    errs = pools(4).run(rank_tasks.compiled_training_step, 2, 2, timeout=600)
    assert max(errs) < 2e-5
