"""A generation stopped between transformer forwards (``meshsp.stop``): by its deadline or by
``Engine.stop()``, on every rank at the same forward, the ranks kept; and what a stopped call leaves
behind: nothing (the step cache is reset on every rank)."""

import threading
import time

import numpy as np
import pytest

from meshsp.config import ParallelConfig
from meshsp.engine import Engine, SamplingParams
from meshsp.launch import RankFailure
from meshsp.stop import CallStopped

SMALL = SamplingParams(num_inference_steps=3, width=64, height=48, seed=3)
OTHER = SamplingParams(num_inference_steps=3, width=48, height=64, seed=4)
LONG = SamplingParams(num_inference_steps=400, width=256, height=256, seed=5)
PROMPT = "a red dog on a chair"


def _array(images) -> np.ndarray:
    return np.asarray(images[0]).astype(int)


@pytest.fixture(scope="module")
def cached():
    engine = Engine("tiny-qwen-image", ParallelConfig(ulysses_degree=2, ulysses_mode="advanced_uaa"),
                    cache="first-block", cache_options={"threshold": 0.2})
    yield engine
    engine.close()


def _stopped(call) -> CallStopped:
    with pytest.raises(RankFailure) as info:
        call()
    exc = info.value
    assert not exc.pool_failed and set(exc.exceptions) == {0, 1}
    reasons = {type(e).__name__: (e.reason, e.forwards) for e in exc.exceptions.values()}
    assert len(set(reasons.values())) == 1, reasons  # every rank stopped at the same forward
    return exc.exceptions[0]


def test_a_deadline_stops_every_rank_at_one_forward_and_the_cache_forgets_it(cached):
    engine = cached
    before, other = _array(engine.generate(PROMPT, SMALL)), _array(engine.generate(PROMPT, OTHER))
    pids = engine.worker_pids
    t0 = time.monotonic()
    stop = _stopped(lambda: engine.generate(PROMPT, LONG, timeout_s=1.5))
    assert stop.reason == "timeout" and 0 < stop.forwards < 400 and time.monotonic() - t0 < 5
    assert engine.worker_pids == pids
    # The cache's state of the stopped 256x256 call is gone: both sizes come out as before.
    assert np.array_equal(_array(engine.generate(PROMPT, SMALL)), before)
    assert np.array_equal(_array(engine.generate(PROMPT, OTHER)), other)


def test_stop_from_another_thread(cached):
    engine = cached
    threading.Timer(1.0, engine.stop).start()
    stop = _stopped(lambda: engine.generate(PROMPT, LONG, timeout_s=None))
    assert stop.reason == "cancelled"
    assert engine.generate(PROMPT, SMALL, timeout_s=None)  # a stop asked for one call is not kept


def test_one_process_raises_call_stopped_itself():
    with Engine("tiny-qwen-image") as engine:
        with pytest.raises(CallStopped, match="deadline passed"):
            engine.generate(PROMPT, LONG, timeout_s=0.5)
        assert engine.generate(PROMPT, SMALL)
