"""A rank that raises or exits while the others wait in a collective is heard within seconds (the
process group's timeout is 600 s here), and a call's own timeout is not the collective timeout."""

import time

import pytest
from conftest import assert_gone

import failure_tasks
from meshsp.launch import RankFailure, WorkerPool

PG_TIMEOUT_S = 600  # what a caller would wait without the pool's grace
GRACE_S = 0.5
HEARD_WITHIN_S = 15  # a generous hang check: grace + kill take about GRACE_S + 0.5 s


def _pool(world: int, **kw) -> WorkerPool:
    return WorkerPool(world, pg_timeout_s=kw.pop("pg_timeout_s", PG_TIMEOUT_S), error_grace_s=GRACE_S, **kw)


# On 4 ranks one pool (each is ~10 s to start on 2 cores): the three others wait in an all-reduce,
# an all-to-all and a P2P receive with the rank that raises.
CASES = [(2, "all_reduce", 1), (2, "all_to_all", 0), (2, "p2p", 1), (4, "mixed", 3)]


@pytest.mark.parametrize("world,kind,culprit", CASES, ids=[f"{w}ranks-{k}" for w, k, _ in CASES])
def test_a_rank_raising_while_others_wait_is_heard_at_once(world, kind, culprit):
    pool = _pool(world)
    pids = pool.pids
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as info:
        pool.run(failure_tasks.fail_while_others_wait, kind, culprit, timeout=PG_TIMEOUT_S)
    elapsed = time.monotonic() - t0
    exc = info.value
    assert elapsed < HEARD_WITHIN_S, elapsed
    assert exc.pool_failed and list(exc.errors) == [culprit] and "CUDA out of memory" in exc.errors[culprit]
    first_line = str(exc).splitlines()[0]
    assert first_line.startswith(f"rank {culprit} raised RuntimeError('CUDA out of memory"), first_line
    assert "every worker was stopped" in first_line
    assert pool.failure() == first_line  # what a server reports as down
    with pytest.raises(RankFailure, match=f"workers are gone: rank {culprit} raised"):
        pool.run(failure_tasks.every_rank_raises)
    pool.close()
    assert_gone(pids)
    print(f"{world} ranks, {kind}: heard in {elapsed:.2f} s")


def test_a_rank_exiting_mid_call_is_heard_at_once():
    pool = _pool(2)
    pids = pool.pids
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank\(s\) \[1\] died \(exit codes \[3\]\)") as info:
        pool.run(failure_tasks.fail_while_others_wait, "all_reduce", 1, "exit", timeout=PG_TIMEOUT_S)
    assert time.monotonic() - t0 < HEARD_WITHIN_S
    assert info.value.pool_failed and not info.value.errors
    pool.close()
    assert_gone(pids)


def test_ranks_that_finish_within_the_grace_keep_the_pool(pools):
    pool = pools(2)
    with pytest.raises(RankFailure, match="rank 1 raised") as info:
        pool.run(failure_tasks.fail_alone_others_finish, 1, timeout=60)
    assert not info.value.pool_failed and list(info.value.errors) == [1]
    with pytest.raises(RankFailure, match="rank 0 raised") as info:  # an error every rank raises alike
        pool.run(failure_tasks.every_rank_raises, timeout=60)
    assert not info.value.pool_failed and sorted(info.value.errors) == [0, 1]
    assert pool.failure() is None and pool.run(failure_tasks.longer_than_collective_timeout, 0, timeout=60) == [4, 4]


def test_the_call_timeout_is_not_the_collective_timeout():
    pool = _pool(2, pg_timeout_s=1)
    pids = pool.pids
    # A call longer than the process group's timeout is fine: each collective in it is short.
    assert pool.run(failure_tasks.longer_than_collective_timeout, 1.5, timeout=60) == [4, 4]
    t0 = time.monotonic()
    with pytest.raises(RankFailure, match=r"no answer from rank\(s\) \[0, 1\] within the call's timeout of 1 s"):
        pool.run(time.sleep, 60, timeout=1)
    assert time.monotonic() - t0 < 5 and pool.failure() is not None
    pool.close()
    assert_gone(pids)
