"""Step caches (meshsp.cache): with every parallel mode the output equals one process with the same
diffusers cache, every rank of a forward takes the same branches, and the agreement costs one tiny
collective per forward where a decision depends on tensors.

Each layout runs a few denoising steps of tiny Qwen-Image, Flux and Wan transformers (with classifier-
free guidance: a "cond" and an "uncond" call per step) and of tiny pipelines; the reference is the
same loop on one process with diffusers' hooks as they are.
"""

import pytest
import rank_tasks
import torch

from meshsp import ParallelConfig
from meshsp.cache import CACHE_KINDS, cache_config, check_cache, enable_cache

STEPS = 6
OPTIONS = {
    "taylorseer": dict(cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=torch.float32),
    "mag": dict(mag_ratios=[1.0] * STEPS, threshold=0.06),
    "pab": dict(spatial_attention_timestep_skip_range=(-1, 1001)),
    "faster": {},
    "sea": dict(threshold=0.5),
}
# FirstBlockCache thresholds per (family, heads): these random-weight models' residual ratios lie
# around 0.3-0.5 (Qwen-Image, Flux) and 0.1 (Wan); each threshold skips some steps but not all.
FIRST_BLOCK = {("qwen-image", None): 0.45, ("flux", None): 0.35, ("wan", None): 0.1, ("qwen-image", 3): 0.4,
               ("flux", 3): 0.3, ("wan", 3): 0.2, ("qwen-image", 6): 0.5, ("qwen-image", 4): 0.42}
FAMILIES = ("qwen-image", "flux", "wan")


def case(family: str, kind: str, heads: int | None = None, cfg: bool = True) -> dict:
    options = dict(threshold=FIRST_BLOCK[family, heads]) if kind == "first-block" else OPTIONS[kind]
    return dict(family=family, kind=kind, heads=heads, cfg=cfg, steps=STEPS, options=options)


EVERY_KIND = [case(f, k) for f in FAMILIES for k in CACHE_KINDS if k != "sea" or f == "wan"]
PER_BRANCH = ("first-block", "taylorseer", "mag", "sea")  # state per cache_context: CFG parallel allowed

# id: (world, degrees, ulysses_mode, cases)
LAYOUTS = {
    "U2": (2, dict(ulysses_degree=2), "strict", EVERY_KIND),
    "R2": (2, dict(ring_degree=2), "strict", [case(f, "first-block") for f in FAMILIES]
           + [case("wan", "sea"), case("flux", "pab")]),
    "CFG2": (2, dict(cfg_degree=2), "strict", [c for c in EVERY_KIND if c["kind"] in PER_BRANCH]),
    "TP2": (2, dict(tensor_parallel_size=2), "strict", [case("qwen-image", "first-block", heads=4),
                                                       case("flux", "taylorseer", heads=4), case("wan", "mag", heads=4)]),
    # 3 heads on 2 Ulysses ranks: advanced_uaa
    "U2xR2-uaa": (4, dict(ulysses_degree=2, ring_degree=2), "advanced_uaa",
                  [case(f, "first-block", heads=3) for f in FAMILIES]
                  + [case("qwen-image", "mag", heads=3), case("wan", "pab", heads=3), case("wan", "sea", heads=3)]),
    # (Flux shards its inputs at the root, before meshsp.cfg's hook sees them: not combined with cfg here.)
    "CFG2xU2-uaa": (4, dict(cfg_degree=2, ulysses_degree=2), "advanced_uaa",
                    [case("qwen-image", "first-block", heads=3), case("wan", "first-block", heads=3),
                     case("wan", "sea", heads=3), case("wan", "taylorseer", heads=3)]),
    # 3 heads per tp rank on 2 Ulysses ranks; the tp ranks' replicated statistics are counted once
    "TP2xU2-uaa": (4, dict(tensor_parallel_size=2, ulysses_degree=2), "advanced_uaa",
                   [case("qwen-image", "first-block", heads=6), case("flux", "pab", heads=6)]),
}


def _agreements(kind: str, forwards_per_branch: int, branches: int, group: int) -> int:
    """Agreement collectives one rank issues: one per forward that decides from tensors."""
    if group == 1:
        return 0
    if kind == "first-block":  # from each branch's second forward (the first has nothing to compare)
        return (forwards_per_branch - 1) * branches
    return forwards_per_branch * branches if kind == "sea" else 0


def check_layout(results: list[list[dict]], cases: list[dict], world: int, cfg: int) -> None:
    group = world // cfg  # ranks that share one forward
    for i, c in enumerate(cases):
        per_rank = [r[i] for r in results]
        ref = per_rank[0]["ref_counts"]
        halves = [per_rank[h * group]["counts"] for h in range(cfg)]
        what = f"{c['family']} {c['kind']}: {[r['counts'] for r in per_rank]} vs one process {ref}"
        # parity (1e-5 of the scale) is asserted on every rank inside the task
        assert max(r["diff"] for r in per_rank) <= 1e-5, what
        # every rank of a forward took the same branches; the halves together took one process's
        assert all(r["counts"] == halves[rank // group] for rank, r in enumerate(per_rank)), what
        assert sum(h["skipped"] for h in halves) == ref["skipped"] > 0, what
        assert sum(h["calls"] for h in halves) == ref["calls"], what
        if c["kind"] == "first-block":  # no decision came within rounding of the threshold
            assert per_rank[0]["margin"] > 1e-4, per_rank[0]["margin"]
        branches = 1 if cfg > 1 else 1 + c["cfg"]
        n = _agreements(c["kind"], c["steps"], branches, group)
        item = 16 if c["kind"] == "first-block" else 4  # two float64 sums / one int32 vote
        assert [r["agree_calls"] for r in per_rank] == [n] * world, what
        assert [r["agree_bytes"] for r in per_rank] == [n * item * (group - 1)] * world, what


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cache_equals_one_process(pools, layout):
    world, degrees, mode, cases = LAYOUTS[layout]
    results = pools(world).run(rank_tasks.cache_parity, cases, mode, **degrees, timeout=600)
    check_layout(results, cases, world, degrees.get("cfg_degree", 1))


def test_shards_that_would_disagree_take_the_whole_tensors_branch(pools):
    """Residual shards built so that rank 0's own ratio is above the threshold and rank 1's below:
    diffusers' decision per shard differs across the ranks (a hang or a wrong image); meshsp's is
    the whole tensor's on both, with one collective."""
    results = pools(2).run(rank_tasks.cache_shards_disagree)
    for rank0, rank1 in zip(*results):  # the whole ratio above the threshold, then below
        assert rank0["own"] is True and rank1["own"] is False
        assert rank0["agreed"] == rank1["agreed"] == rank0["whole"]
        assert rank0["calls"] == rank1["calls"] == 1
    assert [r["whole"] for r in results[0]] == [True, False]


def test_what_the_layout_cannot_run_is_refused_before_any_collective(pools):
    messages = pools(2).run(rank_tasks.cache_refusals)
    assert messages[0] == messages[1]
    pab, faster, sea, mag = messages[0]
    assert "cache kind 'pab' keeps one state for the 'cond' and 'uncond' calls" in pab and "cfg_degree" in pab
    assert "cache kind 'faster'" in faster
    assert "cache kind 'sea'" in sea and "tensor_parallel_size > 1" in sea
    assert "calibrate on one process" in mag and "mag_ratios" in mag


PIPELINES = {
    # id: (world, pipeline, call, degrees, ulysses_mode, cases)
    "qwen-image-U2": (2, "tiny-qwen-image", dict(prompt=["a cat"], negative_prompt=["blurry"], true_cfg_scale=4.0,
                                                 num_inference_steps=8, width=64, height=48),
                      dict(ulysses_degree=2), "advanced_uaa",
                      [dict(kind="first-block", options={"threshold": 0.4}), dict(kind="mag", options={"mag_ratios": [1.0] * 4}),
                       dict(kind="taylorseer", options={"taylor_factors_dtype": torch.float32})]),
    "flux-R2": (2, "tiny-flux", dict(prompt=["a cat"], num_inference_steps=8, width=64, height=48),
                dict(ring_degree=2), "advanced_uaa",
                [dict(kind="first-block", options={"threshold": 0.4}), dict(kind="pab"), dict(kind="faster")]),
    "wan-CFG2xU2": (4, "tiny-wan", dict(prompt=["a cat"], negative_prompt=["blurry"], guidance_scale=5.0,
                                        num_inference_steps=8, width=64, height=48, num_frames=5),
                    dict(cfg_degree=2, ulysses_degree=2), "advanced_uaa",
                    [dict(kind="first-block", options={"threshold": 0.2}), dict(kind="sea", options={"threshold": 0.5})]),
}


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_cache_equals_one_process(pools, name):
    """enable_pipeline_cache on a tiny pipeline called as a user would (the pipeline's own loop, its
    current_timestep for pab/faster, prepare() for MagCache's schedule): final latents equal."""
    world, pipeline, call, degrees, mode, cases = PIPELINES[name]
    results = pools(world).run(rank_tasks.cache_pipeline_parity, pipeline, cases, call, mode, **degrees, timeout=600)
    cfg = degrees.get("cfg_degree", 1)
    group = world // cfg
    for i, c in enumerate(cases):
        per_rank = [r[i] for r in results]
        halves = [per_rank[h * group]["counts"] for h in range(cfg)]
        ref = per_rank[0]["ref_counts"]
        assert sum(h["skipped"] for h in halves) == ref["skipped"] > 0, (c, per_rank)
        assert all(r["counts"] == halves[rank // group] for rank, r in enumerate(per_rank)), (c, per_rank)
        if c["kind"] == "first-block":
            assert per_rank[0]["margin"] > 1e-4
        n = _agreements(c["kind"], call["num_inference_steps"], 1 if cfg > 1 else 1 + ("negative_prompt" in call), group)
        assert [r["agree_calls"] for r in per_rank] == [n] * world, (c, per_rank)


# --- one process ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", CACHE_KINDS)
def test_one_process_is_diffusers_own_cache(kind):
    """Without a mesh, enable_cache is diffusers' hooks exactly (bit for bit), counted; remove()
    gives the model back without them."""
    from meshsp.tiny import build_transformer

    family = "wan" if kind == "sea" else "qwen-image"
    clock = [1000.0]
    options = dict(threshold=FIRST_BLOCK[family, None]) if kind == "first-block" else dict(OPTIONS[kind])
    if kind in ("pab", "faster"):
        options["current_timestep_callback"] = lambda: clock[0]
    ours, theirs, plain = (build_transformer(family) for _ in range(3))
    cache = enable_cache(ours, kind, None, **options)
    theirs.enable_cache(cache_config(kind, **options))
    got = rank_tasks._denoise_with_cache(ours, family, STEPS, True, dict(h=4, w=4, txt=8, frames=2), clock)
    want = rank_tasks._denoise_with_cache(theirs, family, STEPS, True, dict(h=4, w=4, txt=8, frames=2), clock)
    assert torch.equal(got, want)
    assert cache.counts["skipped"] > 0 and cache.counts["calls"] == cache.counts["computed"] + cache.counts["skipped"]
    cache.remove()
    assert not ours.is_cache_enabled
    none = rank_tasks._denoise_with_cache(plain, family, 2, False, dict(h=4, w=4, txt=8, frames=2), clock)
    assert torch.equal(rank_tasks._denoise_with_cache(ours, family, 2, False, dict(h=4, w=4, txt=8, frames=2), clock), none)


def test_bad_kinds_and_options_are_refused_with_the_fix():
    from meshsp.tiny import build_transformer

    model = build_transformer("qwen-image")
    cases = [
        (dict(kind="teacache"), "unknown cache kind 'teacache'; known: ['first-block'"),
        (dict(kind="text-kv"), "cache kind 'text-kv' is not offered"),
        (dict(kind="taylorseer", threshold=0.1), "takes no option(s) ['threshold']; its options are"),
        (dict(kind="pab"), "needs current_timestep_callback"),
        (dict(kind="faster", is_guidance_distilled=False, current_timestep_callback=lambda: 0.0), "is_guidance_distilled"),
        (dict(kind="mag"), "needs mag_ratios for QwenImageTransformer2DModel"),
        (dict(kind="sea"), "diffusers has an adapter for Wan text-to-video only"),
        (dict(kind="first-block", threshold="high"), "cache kind 'first-block'"),
        (dict(kind="taylorseer", cache_identifiers=["^nothing$"]), "found no module of QwenImageTransformer2DModel"),
    ]
    for kwargs, text in cases:
        with pytest.raises(ValueError) as info:
            enable_cache(model, **kwargs)
            pytest.fail(f"{kwargs} was accepted")
        assert text in str(info.value), str(info.value)
        assert not model.is_cache_enabled
    enable_cache(model, "first-block", threshold=0.1)
    with pytest.raises(ValueError, match="already has a cache"):
        enable_cache(model, "first-block", threshold=0.1)


def test_check_cache_refuses_from_the_degrees_alone():
    """What a launcher can check before it starts ranks: the kind, the options, the degrees."""
    check_cache("first-block", {"threshold": 0.1}, ParallelConfig(cfg_degree=2, ulysses_degree=2))
    check_cache("pab", {"spatial_attention_block_skip_range": 3}, ParallelConfig(ulysses_degree=2))
    check_cache("mag", {"threshold": None})  # the ratios are the model's: checked when enabled
    for kind, options, config, text in [
        ("pab", {}, ParallelConfig(cfg_degree=2), "keeps one state for the 'cond' and 'uncond' calls"),
        ("sea", {}, ParallelConfig(tensor_parallel_size=2), "tensor_parallel_size > 1"),
        ("mag", {"calibrate": True}, ParallelConfig(ulysses_degree=2), "calibrate on one process"),
        ("first-block", {"threshold": -1}, None, "threshold must be a non-negative number, got -1"),
        ("pab", {"spatial_attention_block_skip_range": 0}, None, "must be an integer >= 1, got 0"),
        ("fbc", {}, None, "unknown cache kind 'fbc'"),
    ]:
        with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")):
            check_cache(kind, options, config)


def test_prepare_follows_the_request_step_count():
    from meshsp.tiny import build_transformer

    cache = enable_cache(build_transformer("flux"), "mag")  # diffusers' Flux ratios (28 steps) by default
    assert len(cache.config.mag_ratios) == 28
    cache.prepare(8)
    assert cache.config.num_inference_steps == 8 and len(cache.config.mag_ratios) == 8
    assert cache.config.mag_ratios[0] == 1.0 and cache.config.mag_ratios[-1] == pytest.approx(0.89062)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive integer"):
        cache.prepare(0)


def test_bench_cache_runs():
    """meshsp.bench.cache end to end on a small request: every row exact against one process."""
    from meshsp.bench.cache import format_rows, run

    rows = run(size=128, steps=4, repeats=1, kinds=("first-block", "sea"), options={"first-block": {"threshold": 0.5}})
    none, fbc, sea = rows
    assert [r["cache"] for r in rows] == ["none", "first-block", "sea"]
    assert fbc["skipped"] > 0 and fbc["agree"] == 3 and none["agree"] == 0
    assert max(none["latent_diff"], fbc["latent_diff"]) <= 1e-5 and fbc["pixel_diff_single"] <= 1
    assert "seconds" not in sea and "Wan text-to-video only" in sea["note"]
    table = format_rows(rows)
    assert "first-block" in table and "refused" in table
