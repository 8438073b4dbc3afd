"""The benchmarks run end to end on small shapes, and their byte counts equal the closed forms.

(Timings are printed by the benchmarks, never asserted: this only checks that they run and count.)
"""

import pytest

from meshsp.bench import attention, models, perf, realwidth, train, vae


def test_bench_attention_counts_theory_bytes(capsys):
    rows = attention.run(seq=96, heads=4, head_dim=8, repeats=1)
    assert [r["mode"] for r in rows] == ["U2", "R2"]
    assert all(r["bytes"] == r["theory"] > 0 and r["sp_s"] > 0 for r in rows), rows
    assert "ceiling" in capsys.readouterr().out
    masked = {(r["mode"], r["mask"]): r for r in rows[-1]["masked"]}
    assert all(r["bytes"] == r["theory"] for r in masked.values()), masked  # skipped blocks counted
    assert masked["R2", "causal"]["bytes"][1] == 0 and masked["R2", "causal"]["imbalance"] > 1.4
    assert masked["R2", "causal zigzag"]["imbalance"] < 1.05 and abs(masked["R2", "causal"]["work"] - 0.5) < 0.01
    assert masked["R2", "documents"]["bytes"] == [0, 0]  # no document crosses the ring halves


def test_bench_models_and_perf_run(capsys):
    rows = models.run(["z-image"], grid=8, txt=8, heads=4, repeats=1)
    assert rows[0]["single_s"] > 0 and rows[0]["U2"] > 0 and rows[0]["R2"] > 0
    (row,) = perf.run(["flux"], grid=8, txt=8, heads=4, repeats=1, compiled=False)  # compile: test_compile.py
    for name in ("U2", "R2", "TP2", "TP2xU2"):  # TP's all-reduces included
        sent = sum(v for k, v in row[f"{name}_bytes"].items() if k != "consensus")
        assert sent == row[f"{name}_theory"] > 0, row
        assert not row[f"{name}_mb"] < 0  # NaN where /proc/self/clear_refs cannot be written
    assert row["TP2_params_mb"] < 0.75 * row["single_params_mb"]
    # diffusers' Ulysses runs here; its ring refuses CPU attention with a message, reported as such
    assert isinstance(row["diffusers_U2"], float)
    assert isinstance(row["diffusers_R2"], float) or "return_lse" in row["diffusers_R2"]
    assert "meshsp/diffusers" in capsys.readouterr().out


def test_bench_real_width_runs(capsys):
    # SD3 medium is the narrowest real config (24 x 64); bf16 runs the cast (and fp32-kept) path
    (row,) = realwidth.run_real_width(["sd3"], dtypes=("bfloat16",), tokens=32, txt=8, repeats=1)
    assert row["family"] == "sd3" and row["dtype"] == "bfloat16"
    assert row["single_s"] > 0 and row["U2"] > 0 and row["R2"] > 0 and row["U2_speedup"] > 0, row
    for name in ("U2", "R2"):
        assert not row[f"{name}_mem_ratio"] <= 0  # NaN where /proc/self/clear_refs cannot be written
    assert "R2 mem" in capsys.readouterr().out


def test_bench_vae_split_equals_whole_and_request_runs(capsys):
    # the real-size Flux VAE on an 8x8 latent (2 rows per rank at 4 ranks); a 1-step tiny request
    decode, request = vae.run(("flux",), sizes=(64,), repeats=1, e2e_model="tiny-flux", e2e_size=128, e2e_steps=1,
                              e2e_repeats=1)
    assert decode["latent"] == (1, 16, 8, 8) and decode["single_s"] > 0 and decode["max_diff"] < 1e-4, decode
    for world in vae.WORLDS:
        assert decode[f"split_{world}_s"] > 0 and decode[f"bytes_{world}"] > 0, decode
        assert not decode[f"mb_{world}"] <= 0  # NaN where /proc/self/clear_refs cannot be written
    assert request["vae_ranks"] == 2 and request["split_s"] > 0 and request["whole_s"] > 0, request
    assert "max diff" in capsys.readouterr().out
    with pytest.raises(ValueError, match="1 \\+ a multiple of 4"):
        vae.cases(("wan",), (), 4, (480, 272))


def test_real_width_shapes_give_the_token_count():
    for family in realwidth.REAL_WIDTH:
        s = realwidth.real_shapes(family, 2048, 256)
        scale = realwidth.LATENT_PER_TOKEN.get(family, 1)
        assert s.get("frames", 1) * s["h"] * s["w"] == 2048 * scale**2 and s["txt"] == 256, (family, s)
    with pytest.raises(ValueError, match="near-square"):
        realwidth.real_shapes("flux", 2 * 1021, 256)  # 2 x a prime: a 2 x 1021 strip


def test_bench_serve_runs_both_servers(capsys):
    from meshsp.cli import main

    assert main(["bench", "serve", "--clients", "2", "--requests", "2", "--batch-sizes", "1,2", "--serve-size", "64",
                 "--serve-steps", "2", "--cache-kinds", ""]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.split() and line.split()[0] in ("1", "2")]
    assert [r[0] for r in rows] == ["1", "2"] and all(r[2] == "4" for r in rows), lines  # 4 requests each
    assert all(int(r[-1]) <= 1 for r in rows), lines  # images equal to the one-at-a-time server's


def test_bench_train_bytes_equal_theory_and_memory_shrinks(capsys, pools):
    # the session's pool for both: saved bytes are exact under any allocator (peaks are not asserted)
    rows = train.run("qwen-image", grid=8, txt=8, heads=4, repeats=1, pool=pools(2), memory_pool=pools(2))
    single, u2, r2 = rows
    assert [r["mode"] for r in rows] == ["1 proc", "U2", "R2"] and single["forward_bytes"] == 0
    for row in (u2, r2):
        assert row["step_s"] > 0 and row["ceiling"] > 0 and row["grads"] == single["grads"] > 20, row
        assert row["forward_bytes"] == row["forward_theory"] > 0 and row["forward_ratio"] == 1.0, row
        assert row["backward_bytes"] == row["backward_theory"] > 0 and row["backward_ratio"] == 1.0, row
        # checkpointing's recomputation exchanges the forward's bytes once more in the backward
        assert row["checkpoint_backward_bytes"] == row["checkpoint_backward_theory"], row
        assert row["saved_mb"] < 0.6 * single["saved_mb"], row
        assert not row["peak_mb"] < 0  # NaN where /proc/self/clear_refs cannot be written
    # R2's backward: K/V again plus the fp32 dk/dv sums, so more than U2's forward-reversed bytes
    assert r2["backward_bytes"] > u2["backward_bytes"] and r2["forward_bytes"] == u2["forward_bytes"]
    for row in rows:
        assert row["saved_mb_ckpt"] < 0.5 * row["saved_mb"], row
    assert "ceiling" in capsys.readouterr().out
    with pytest.raises(ValueError, match="byte count"):
        train.run("sd3", grid=8, txt=8)


def test_train_theory_bytes_closed_form():
    theory_bytes = train.theory_bytes
    shapes = dict(h=4, w=4, txt=8)  # 24 attention tokens, 64 channels, output 16 tokens x 16
    ulysses = theory_bytes("qwen-image", 4, shapes, 2, 256, 1, 2)
    half = 12 * 64 // 2 * 4  # half of one local q, k, v or out (fp32)
    assert ulysses == {"forward": 2 * 4 * half, "backward": 2 * 4 * half + 256 * 4 // 2}
    ring = theory_bytes("qwen-image", 4, shapes, 2, 256, 2, 1)
    block = 2 * 12 * 64 * 4  # the local K and V
    assert ring == {"forward": 2 * block, "backward": 2 * (block + 2 * block) + 256 * 4 // 2}
    assert theory_bytes("wan", 4, shapes, 2, 256, 1, 2)["forward"] == 2 * 4 * 8 * 64 // 2 * 4  # text not in it
