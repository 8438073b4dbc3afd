"""Failure behaviour: every bad configuration or input raises the same error on every rank, fast."""

import time

import pytest

import rank_tasks

CATALOGUE = [
    ("config:ulysses_degree=0", "ulysses_degree must be a positive integer"),
    ("config:ring_degree=-1", "ring_degree must be a positive integer"),
    ("config:ulysses_mode='fast'", "ulysses_mode must be one of"),
    ("config:cfg_degree=3", "cfg_degree must be 1 or 2"),
    ("config:timeout_s=0", "timeout_s must be a positive"),
    ("mesh:world", "the process world size is"),
    ("mesh:cfg-world", "the process world size is"),
    ("plan:style", "unknown style 'Nope'"),
    ("plan:mode", "ulysses_mode must be one of"),
    ("plan:path", "matches no module"),
    ("plan:dim", "cannot shard 'img_ids'"),
    ("plan:arg", "has no argument 'latents'"),
    ("model:strict", "ulysses_mode='advanced_uaa'"),
    ("strict:heads", "ulysses_degree values that work here: [1]"),
    ("strict:seq", "do not split into equal shards"),
    ("attention:gqa_groups", "multiple of key-value heads"),
    ("attention:gqa_flag", "enable_gqa=True"),
    ("attention:causal_and_mask", "not both"),
    ("attention:dropout", "dropout_p=0"),
    ("attention:replicated", "sharded along its sequence dim"),
    ("attention:mask_dtype", "boolean key-padding [B, 1, 1, S_k]"),
    ("attention:mask_full", "pairwise"),
    ("attention:mixed", "must all be DTensors"),
    ("attention:seq_dim", "sharded along its sequence dim"),
    ("local:wrong_layout", "the layouts give it"),
    ("local:mask_shape", "boolean key-padding mask"),
    ("local:dtype_mix", "share a dtype"),
    ("differ:seq", "the SP ranks were given different inputs"),
    ("differ:batch", "the SP ranks were given different inputs"),
    ("differ:layout", "the SP ranks were given different inputs"),
    ("differ:local-length", "raised on SP rank"),
    ("differ:heads", "the SP ranks were given different inputs"),
    ("sampling", "height must be a positive integer"),
]


@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("case,text", CATALOGUE, ids=[c for c, _ in CATALOGUE])
def test_catalogue_raises_on_every_rank(pools, world, case, text):
    pool = pools(world)
    t0 = time.monotonic()
    # The pool's timeout is the watchdog: a hang fails the test instead of blocking CI.
    messages = pool.run(rank_tasks.raises, "catalogue", case, timeout=30)
    assert time.monotonic() - t0 < 30
    assert len(messages) == world and all(text in m for m in messages), messages
    if case.startswith("differ:"):
        assert len(set(messages)) == 1, messages  # the very same error everywhere
