"""The planner's model and the `meshsp plan` command."""

import subprocess
import sys

import pytest

from meshsp.planner import HARDWARE, MODELS, PUBLISHED, predict, predict_step, recommend, request_time


@pytest.mark.parametrize("model", sorted(MODELS))
def test_predictions_are_sane(model):
    for gpus in (2, 4, 8):
        rows = recommend(model, "h100", 1024, 1024, gpus, frames=49 if MODELS[model].frame_scale > 1 else 1)
        assert rows == sorted(rows, key=lambda r: -r["speedup"])
        assert all(r["cfg"] * r["ring"] * r["ulysses"] * r["tp"] == gpus for r in rows)
        assert all(MODELS[model].heads % r["tp"] == 0 for r in rows)
        assert all(0.0 < r["speedup"] <= gpus + 1e-9 for r in rows)


def test_long_sequences_scale_and_short_ones_do_not():
    assert recommend("wan", "h100", 1280, 720, 8, frames=81)[0]["speedup"] > 6
    assert recommend("qwen-image", "h100", 2048, 2048, 8)[0]["speedup"] > 4
    assert recommend("sd3", "h100", 512, 512, 8)[0]["speedup"] < 1  # 1280 tokens: the collectives cost more


def test_slower_links_and_smaller_images_scale_worse():
    fast = predict("flux", "a100", 1024, 1024, ulysses=8, interconnect="nvlink")
    slow = predict("flux", "a100", 1024, 1024, ulysses=8, interconnect="pcie")
    small = predict("flux", "a100", 512, 512, ulysses=8, interconnect="pcie")
    assert fast > slow > small


def test_published_rows_within_15_percent():
    for row in PUBLISHED:
        got = predict(row.model, row.hardware, row.size, row.size, steps=row.steps, ring=row.ring,
                      ulysses=row.ulysses, interconnect=row.interconnect)
        assert abs(got / row.speedup - 1) <= 0.15, (row, got)


def test_more_steps_approach_the_per_step_speedup():
    kw = dict(ulysses=4, interconnect="pcie")
    per_step = predict_step("flux", "l20", 1024, 1024, **kw)
    gaps = [abs(predict("flux", "l20", 1024, 1024, steps=n, **kw) - per_step) for n in (1, 4, 28, 1000)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.01 < gaps[0]
    one = request_time("flux", "l20", 1024, 1024, steps=28, interconnect="pcie")
    assert one.total == one.text + 28 * one.step + one.vae and one.text > 0 and one.vae > 0


def test_ulysses_ahead_of_ring_for_qwen_image_2048_on_8_nvlink_gpus():
    for hw in ("h100", "h800"):
        rows = recommend("qwen-image", hw, 2048, 2048, 8, interconnect="nvlink")
        assert rows[0]["ring"] == 1, rows[0]
        for cfg in (1, 2):
            same = [r for r in rows if r["cfg"] == cfg]
            uly = next(r for r in same if r["ring"] == 1)
            assert all(uly["speedup"] > r["speedup"] for r in same if r["ring"] > 1), (hw, cfg)


def test_h200_is_known():
    assert "h200" in HARDWARE
    assert predict("qwen-image", "h200", 2048, 2048, ulysses=8) > 1
    out = subprocess.run([sys.executable, "-m", "meshsp.cli", "plan", "--model", "qwen-image", "--width", "2048",
                          "--height", "2048", "--gpus", "8", "--hardware", "h200", "--steps", "20"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "h200" in out.stdout and "20 steps" in out.stdout, out.stderr


def test_bad_planner_input():
    with pytest.raises(ValueError, match="unknown model family"):
        recommend("sdxl", "h100", 1024, 1024, 4)
    with pytest.raises(ValueError, match="unknown hardware 'tpu'"):
        recommend("flux", "tpu", 1024, 1024, 4)
    with pytest.raises(ValueError, match="interconnect must be nvlink, pcie or ib, got 'tcp'"):
        predict("flux", "h100", 1024, 1024, ulysses=2, interconnect="tcp")
    with pytest.raises(ValueError, match="l20 has no nvlink link; use one of"):
        recommend("flux", "l20", 1024, 1024, 4, interconnect="nvlink")
    for steps in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"steps must be a positive integer, got {steps!r}"):
            predict("flux", "h100", 1024, 1024, ulysses=2, steps=steps)
    with pytest.raises(ValueError, match="flux makes one transformer call a step"):
        predict("flux", "h100", 1024, 1024, cfg=2)
    bad = subprocess.run([sys.executable, "-m", "meshsp.cli", "plan", "--model", "flux", "--hardware", "l20",
                          "--gpus", "2"], capture_output=True, text=True)
    assert bad.returncode != 0 and "l20 has no nvlink link" in bad.stderr


def test_plan_cli_and_check():
    out = subprocess.run([sys.executable, "-m", "meshsp.cli", "plan", "--model", "qwen-image", "--width", "2048",
                          "--height", "2048", "--gpus", "8", "--hardware", "h800"], capture_output=True, text=True)
    assert out.returncode == 0 and "<- recommended" in out.stdout and "--ulysses-degree" in out.stdout
    ok = subprocess.run([sys.executable, "-m", "meshsp.cli", "plan", "--check",
                         "meshsp/plans/WanTransformer3DModel.yaml", "--model", "wan"], capture_output=True, text=True)
    assert ok.returncode == 0 and "valid for WanTransformer3DModel" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "meshsp.cli", "plan", "--check",
                          "meshsp/plans/WanTransformer3DModel.yaml", "--model", "flux"], capture_output=True, text=True)
    assert bad.returncode != 0 and "matches no module of FluxTransformer2DModel" in bad.stderr


def test_live_bytes_follows_allocations_and_frees():
    import torch

    from meshsp.memory import LiveBytes

    with LiveBytes() as live:
        a = torch.empty(1024, 256, device="meta")  # 1 MiB
        b = a * 2  # another
        view = b[:10]  # a view costs nothing
        del a
        c = torch.empty(512, 256, device="meta")  # 0.5 MiB while b is alive
        del b, c, view
    assert live.peak == 2 * 2**20 and live.live == 0


def test_memory_per_rank_weights_exact_and_activations_shrink_with_degree():
    import torch

    from meshsp.memory import GIB, estimate

    with torch.device("meta"):
        params = sum(p.numel() for p in __import__("diffusers").FluxTransformer2DModel().parameters())
    mem = estimate("flux", 1024, 1024, layouts=[(1, 1), (1, 2), (2, 2)])
    for layout in mem.values():  # sequence parallelism leaves every weight on every rank (bf16)
        assert abs(layout["weights"] - params * 2 / GIB) < 1e-6
    acts = [mem[k]["activations"] for k in [(1, 1), (1, 2), (2, 2)]]
    assert acts[0] > acts[1] > acts[2] > 0, acts
    assert all(m["total"] > m["weights"] + m["text_encoder"] for m in mem.values())


def test_plan_json_has_memory_and_fit():
    import json

    out = subprocess.run([sys.executable, "-m", "meshsp.cli", "plan", "--model", "flux", "--width", "1024",
                          "--height", "1024", "--gpus", "2", "--gpu-memory", "24", "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    assert {(r["cfg"], r["ring"], r["ulysses"], r["tp"]) for r in rows} == {(1, 2, 1, 1), (1, 1, 2, 1), (1, 1, 1, 2)}
    for r in rows:
        assert set(r["memory_gib"]) == {"weights", "activations", "text_encoder", "vae", "total"}
        assert r["fits"] is False and r["predicted_speedup"] > 1  # 22 GiB of Flux weights + T5 > 24 GiB


def test_tensor_parallel_layouts_hold_less_weight_per_rank():
    """Memory per layout with tp: weights counted on meta after the plan's tp section is applied."""
    import torch

    from meshsp.memory import estimate

    mem = estimate("flux", 1024, 1024, dtype=torch.bfloat16, layouts=[(1, 2), (1, 1, 2), (1, 2, 2)])
    assert mem[(1, 1, 2)]["weights"] < 0.7 * mem[(1, 2)]["weights"]
    assert mem[(1, 2, 2)]["weights"] == mem[(1, 1, 2)]["weights"]
    assert mem[(1, 2, 2)]["activations"] < mem[(1, 1, 2)]["activations"]  # tokens split too
    assert predict("flux", "h100", 1024, 1024, tp=2) > 1
    with pytest.raises(ValueError, match="tp must divide flux's 24 heads"):
        predict("flux", "h100", 1024, 1024, tp=5)


def test_split_vae_decode_in_the_plans():
    """meshsp splits the decode across every rank: less VAE memory and time per rank."""
    import torch

    from meshsp.memory import estimate

    whole = estimate("flux", 1024, 1024, dtype=torch.bfloat16, layouts=[(1, 2)])[(1, 2)]["vae"]
    split = estimate("flux", 1024, 1024, dtype=torch.bfloat16, layouts=[(1, 2)], vae_ranks=4)[(1, 2)]["vae"]
    assert split < 0.6 * whole
    assert predict("flux", "h100", 2048, 2048, ulysses=4, vae_ranks=4) > predict("flux", "h100", 2048, 2048, ulysses=4)
