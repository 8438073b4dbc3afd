"""One GPU per NCCL rank, refused before any process group with more ranks than GPUs; the mesh's
device follows the backend (gloo: CPU, on a GPU host too). The GPU count is mocked: no GPU here."""

import contextlib
import multiprocessing
from unittest import mock

import pytest
import torch.distributed as dist

import failure_tasks
from meshsp import ParallelConfig, init_sp_mesh
from meshsp.cli import build_parser, parallel_config
from meshsp.engine import Engine
from meshsp.launch import WorkerPool
from meshsp.loading import rank_device
from meshsp.mesh import check_gpus, default_device_type


def _gpus(count: int) -> contextlib.ExitStack:
    """This process sees ``count`` GPUs; selecting one or starting a process group fails the test."""
    stack = contextlib.ExitStack()
    for patch in (mock.patch("torch.cuda.is_available", return_value=count > 0),
                  mock.patch("torch.cuda.device_count", return_value=count),
                  mock.patch("torch.cuda.set_device", side_effect=AssertionError("a GPU was selected")),
                  mock.patch.object(dist, "init_process_group", side_effect=AssertionError("a process group started"))):
        stack.enter_context(patch)
    return stack


def test_check_gpus_names_both_counts_and_the_fix():
    with _gpus(2):
        check_gpus(2, "nccl")
        check_gpus(8, "gloo")  # CPU ranks need no GPU
        with pytest.raises(ValueError, match=r"4 ranks on this node with the NCCL backend need one GPU each, but 2 "
                                             r"GPU\(s\) are visible; start at most 2 rank\(s\) per node") as info:
            check_gpus(4, "nccl")
        assert "device='cpu'" in str(info.value)
    with _gpus(0), pytest.raises(ValueError, match=r"but 0 GPU\(s\) are visible"):
        check_gpus(1, "nccl")


def test_worker_pool_refuses_before_spawning():
    before = set(multiprocessing.active_children())
    with _gpus(2), pytest.raises(ValueError, match="3 ranks on this node"):
        WorkerPool(3, backend="nccl")
    assert set(multiprocessing.active_children()) == before


def test_engine_refuses_more_ranks_than_gpus_before_spawning():
    before = set(multiprocessing.active_children())
    with _gpus(2), pytest.raises(ValueError, match="4 ranks on this node"):
        Engine("no/such-model", ParallelConfig(ulysses_degree=4), device="cuda")
    assert set(multiprocessing.active_children()) == before


def test_init_sp_mesh_and_rank_device_refuse_under_a_launcher(monkeypatch):
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    with _gpus(2):
        assert default_device_type() == "cuda"  # no process group yet: GPUs present
        with pytest.raises(ValueError, match="4 ranks on this node"):
            init_sp_mesh(ParallelConfig(ulysses_degree=4))
        with pytest.raises(ValueError, match="4 ranks on this node"):
            rank_device("cuda")
        assert str(rank_device("cpu")) == "cpu"
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two nodes of two ranks
        monkeypatch.setenv("LOCAL_RANK", "1")
        with mock.patch("torch.cuda.set_device") as chosen:
            assert rank_device("cuda").index == 1 and chosen.call_args.args == (1,)


def test_the_mesh_device_follows_a_gloo_backend_on_a_gpu_host(pools):
    for res in pools(2).run(failure_tasks.device_on_a_gpu_host, timeout=60):
        assert res["default"] == "cpu" and res["mesh"] == "cpu", res
        assert "does not match the process group's backend 'gloo'" in res["refusal"], res


def test_request_timeout_flag():
    parse = build_parser().parse_args
    for command, default in ((["generate"], 3600), (["serve", "tiny-flux"], 600)):
        assert parallel_config(parse(command)).request_timeout_s == default
        assert parallel_config(parse([*command, "--request-timeout", "none"])).request_timeout_s is None
        config = parallel_config(parse([*command, "--request-timeout", "7200", "--timeout", "60"]))
        assert (config.request_timeout_s, config.timeout_s) == (7200, 60)
        with pytest.raises(SystemExit):
            parse([*command, "--request-timeout", "0"])


class _RecordingPool:
    """Stands in for WorkerPool: records the timeout of each call."""

    calls: list = []

    def __init__(self, world_size, *, backend, pg_timeout_s):
        self.calls.append(("collective", pg_timeout_s))

    def run(self, fn, *args, timeout):
        self.calls.append((fn.__name__, timeout))
        if fn.__name__ == "_worker_load":
            return [{"pipeline": "P", "video": False, "size_multiple": 16, "vae_ranks": 2, "frame_multiple": 1}]
        return [([["image"]], 1.0, {}, None)]

    def failure(self):
        return None

    def close(self):
        pass


def test_the_engine_times_calls_apart_from_collectives(monkeypatch):
    monkeypatch.setattr("meshsp.engine.WorkerPool", _RecordingPool)
    _RecordingPool.calls = []
    config = ParallelConfig(ulysses_degree=2, timeout_s=600, request_timeout_s=None, load_timeout_s=7200)
    engine = Engine("no/such-model", config, device="cpu")
    assert engine.generate("a cat") == ["image"]
    assert _RecordingPool.calls == [("collective", 600), ("_worker_load", 7200), ("_worker_generate", None)]


@pytest.mark.parametrize("field", ["timeout_s", "request_timeout_s", "load_timeout_s"])
def test_timeouts_are_validated(field):
    with pytest.raises(ValueError, match=f"{field} must be a positive number of seconds"):
        ParallelConfig(**{field: 0})
    if field != "timeout_s":
        assert getattr(ParallelConfig(**{field: None}), field) is None
