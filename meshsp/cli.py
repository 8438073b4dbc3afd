"""``meshsp`` command line: ``demo``, ``selftest``, ``generate``, ``serve``, ``plan``, ``bench``, ``train``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _selftest(args) -> int:
    if args.routes:
        from meshsp.ops.kernel import routes_markdown

        print(routes_markdown())
        return 0
    from meshsp.selftest import run

    return run(device=args.device, pipelines=not args.no_pipelines, ranks=args.ranks, json_path=args.json)


def _world_sizes(text: str) -> tuple[int, ...]:
    """``--ranks 2,4`` -> (2, 4); ``0`` -> () (no multi-rank checks)."""
    try:
        return tuple(n for n in (int(part) for part in text.split(",") if part.strip()) if n)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected world sizes such as 2,4; got {text!r}") from None


def _demo(args) -> int:
    from meshsp.demo import run

    return run(seq=args.seq, heads=args.heads)


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    """The flags of ``meshsp generate`` and ``examples/offline_inference/text_to_image``."""
    parser.add_argument("--model", default="tiny-qwen-image",
                        help="diffusers pipeline directory or hub id, or an embedded tiny pipeline "
                             "(tiny-qwen-image, tiny-flux, tiny-wan)")
    parser.add_argument("--prompt", default="a cat sitting on a windowsill")
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--ulysses-degree", type=int, default=1)
    parser.add_argument("--ring-degree", type=int, default=1)
    parser.add_argument("--ulysses-mode", default="strict", choices=["strict", "default", "advanced_uaa"])
    parser.add_argument("--cfg-parallel-size", type=int, default=1)
    parser.add_argument("--tensor-parallel-size", "--tp", type=int, default=1,
                        help="shard the transformer's weights over this many ranks (the mesh's tp axis)")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--num-inference-steps", type=int, default=4)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--num-frames", type=int, default=None, help="video pipelines only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="output.png")
    add_timeout_args(parser)
    add_dtype_arg(parser)


def _seconds_or_none(text: str) -> float | None:
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds or 'none', got {text!r}")
    return value


def add_timeout_args(parser: argparse.ArgumentParser, request_default: float = 3600.0) -> None:
    """``--timeout`` (one collective), ``--request-timeout`` (a generation's deadline) and
    ``--stuck-timeout`` (the grace after it before the ranks count as stuck)."""
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds one collective may wait before the process group gives up (default 600)")
    parser.add_argument("--request-timeout", type=_seconds_or_none, default=request_default, metavar="SECONDS",
                        help="a generation's deadline: past it, it is stopped at the next transformer forward on "
                             f"every rank and the ranks stay up; 'none' for no limit (default {request_default:g})")
    parser.add_argument("--stuck-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how much longer than --request-timeout the ranks may take to reach that forward (a "
                             "step, a VAE decode) before they are taken to be stuck and stopped (default 300)")


def parallel_config(args):
    """The ``ParallelConfig`` of ``generate``'s and ``serve``'s flags.

    Example::

        parallel_config(build_parser().parse_args(["generate", "--request-timeout", "none"])).request_timeout_s  # None
    """
    from meshsp.config import ParallelConfig

    return ParallelConfig(ulysses_degree=args.ulysses_degree, ring_degree=args.ring_degree,
                          ulysses_mode=args.ulysses_mode, cfg_degree=args.cfg_parallel_size,
                          tensor_parallel_size=args.tensor_parallel_size, timeout_s=args.timeout,
                          request_timeout_s=args.request_timeout, stuck_timeout_s=args.stuck_timeout)


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    """Flags shared by generate, serve and the examples: precision, where text is encoded, where the
    text encoders and VAE are kept."""
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="weights and compute (default: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--encode-text-once", action="store_true",
                        help="only rank 0 loads and runs the text encoders; the embeddings are broadcast")
    parser.add_argument("--no-vae-parallel", dest="vae_parallel", action="store_false",
                        help="decode with the whole VAE on every rank (default: split into row bands across the ranks)")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="diffusers' tiled VAE decode; with more than one rank its tiles are shared out")
    parser.add_argument("--cache", default=None, choices=["first-block", "taylorseer", "mag", "pab", "faster", "sea"],
                        help="diffusers' step cache, its skip decisions agreed across the ranks of a forward")
    parser.add_argument("--cache-threshold", type=float, default=None,
                        help="the cache's threshold (first-block, mag, sea; default: diffusers')")
    parser.add_argument("--cpu-offload", action="store_true",
                        help="keep the text encoders and VAE in CPU memory on every rank; their layers move to "
                             "the rank's GPU only while they run (diffusers' group offloading), so the "
                             "transformer has the GPU")


def run_generate(args) -> int:
    """Generate one image (or video frames) and write it; output on rank 0 only."""
    import time

    from meshsp.engine import Engine, SamplingParams

    config = parallel_config(args)
    params = SamplingParams(num_inference_steps=args.num_inference_steps, width=args.width,
                            height=args.height, seed=args.seed, guidance_scale=args.guidance_scale,
                            negative_prompt=args.negative_prompt, num_frames=args.num_frames)
    t0 = time.perf_counter()
    with Engine(args.model, config, dtype=args.dtype, encode_text_once=args.encode_text_once,
                cpu_offload=args.cpu_offload, vae_parallel=args.vae_parallel, vae_tiling=args.vae_tiling,
                **cache_kwargs(args)) as engine:
        load_s = time.perf_counter() - t0
        images = engine.generate(args.prompt, params)
        if images is None:  # not rank 0 under torchrun
            return 0
        weights = engine.weights_info()[0]
        frames = images[0] if isinstance(images[0], list) else None
        if frames is not None:
            frames[0].save(args.output, save_all=True, append_images=frames[1:], duration=125, loop=0)
        else:
            images[0].save(args.output)
        cfg = f"cfg={config.cfg_degree}, " if config.cfg_degree > 1 else ""
        tp = f", tp={config.tensor_parallel_size}" if config.tensor_parallel_size > 1 else ""
        print(f"{engine.pipeline_class} on mesh ({cfg}ring={config.ring_degree}, ulysses={config.ulysses_degree}{tp}, "
              f"mode={config.ulysses_mode}), {config.world_size} rank(s), {str(engine.dtype).removeprefix('torch.')}: load {load_s:.1f} s, "
              f"generate {engine.last_seconds:.2f} s = {engine.last_seconds / params.num_inference_steps * 1e3:.0f} ms "
              f"per step including text encoding and VAE decode ({params.num_inference_steps} steps, "
              f"{params.width}x{params.height}); wrote {args.output}")
        print(f"rank 0 weights: {_weights_line(weights)}; VAE decode split over {engine.vae_ranks} rank(s)")
        if engine.last_cache is not None:
            counts = engine.last_cache
            print(f"{args.cache} cache: {counts['skipped']} of {counts['calls']} cached block calls skipped")
    return 0


def cache_kwargs(args) -> dict:
    """``Engine``'s ``cache`` and ``cache_options`` from ``--cache`` / ``--cache-threshold``."""
    if args.cache is None:
        if args.cache_threshold is not None:
            raise SystemExit("--cache-threshold needs --cache.")
        return {}
    options = {"threshold": args.cache_threshold} if args.cache_threshold is not None else {}
    return {"cache": args.cache, "cache_options": options}


def _weights_line(weights: dict) -> str:
    """``Engine.weights_info()`` of one rank in a line: each model's MiB and where it is kept."""
    mib = lambda n: f"{n / 2**20:,.1f} MiB"
    parts = [f"{name} {mib(w['bytes'])} on {w['device']}" + (" (offloaded)" if w["offloaded"] else "")
             for name, w in weights.items()]
    resident = sum(w["bytes"] for w in weights.values() if not w["offloaded"])
    return ", ".join(parts) + f"; resident {mib(resident)}"


def _serve(args) -> int:
    """Serve from a plain process (the engine spawns its workers) or under torchrun, where rank 0
    serves HTTP and the other ranks follow it (``Engine.lead`` / ``Engine.follow``)."""
    import os
    import signal

    from meshsp.engine import Engine
    from meshsp.cache import check_batching
    from meshsp.serve import Limits, serve
    from meshsp.serve.guard import ENV_API_KEY, api_key_from

    config = parallel_config(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and world != config.world_size:
        raise SystemExit(f"torchrun started {world} processes but the mesh needs {config.world_size} "
                         f"(cfg x ring x ulysses x tp); make them equal.")
    limits = Limits(max_size=args.max_size, max_n=args.max_n, max_steps=args.max_steps,
                    default_size=args.default_size, default_steps=args.default_steps, max_frames=args.max_frames,
                    default_frames=args.default_frames, max_batch_size=args.max_batch_size,
                    max_body_bytes=args.max_body_bytes)
    check_batching(args.max_batch_size, args.cache)
    api_key = api_key_from(args.api_key)  # before any rank starts
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1") and os.environ.get("RANK", "0") == "0":
        print(f"warning: serving on {args.host} without an API key: anyone who can reach it can spend the GPUs; "
              f"set --api-key or {ENV_API_KEY}.", file=sys.stderr)
    engine = Engine(args.model, config, dtype=args.dtype, encode_text_once=args.encode_text_once,
                    cpu_offload=args.cpu_offload, vae_parallel=args.vae_parallel, vae_tiling=args.vae_tiling,
                    **cache_kwargs(args))
    if world > 1 and int(os.environ.get("RANK", "0")) != 0:
        # torchrun passes SIGTERM to every rank: the followers finish the running request and exit
        # when rank 0, shutting down, tells them to.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        engine.follow()
        return 0
    if world > 1:
        engine.lead()
    return serve(engine, args.model, host=args.host, port=args.port, limits=limits, video_dir=args.video_dir,
                 api_key=api_key, metrics_public=args.metrics_public, request_timeout_s=args.request_timeout,
                 video_timeout_s=args.video_timeout, shutdown_timeout_s=args.shutdown_timeout,
                 video_retention_s=args.video_retention, video_max_jobs=args.video_max_jobs)


def _plan(args) -> int:
    from meshsp.planner import MODELS, recommend, tokens

    if args.output and not args.infer:
        raise SystemExit("meshsp plan: --output goes with --infer")
    if args.infer and args.coverage:
        raise SystemExit("meshsp plan: --infer and --coverage are separate runs; give one")
    if args.infer:
        return _infer_plan(args)
    if args.published:
        from meshsp.planner import published_markdown

        print(published_markdown())
        return 0
    if args.markdown and not args.coverage:
        raise SystemExit("meshsp plan: --markdown goes with --coverage")
    if args.coverage:
        from meshsp.plans.coverage import coverage, markdown
        from meshsp.zoo import NOT_DIT

        rows = coverage()
        print(markdown(rows))
        if args.markdown:
            return 0
        dits = [r for c, r in rows.items() if c not in NOT_DIT]
        print(f"\n{sum(r.status != 'refused' for r in dits)} of {len(dits)} diffusion transformers have a plan.")
        return 0
    if not args.model:
        raise SystemExit("meshsp plan: --model is required (or --infer / --coverage)")
    if args.check:
        return _check_plan(args)
    try:
        rows = recommend(args.model, args.hardware, args.width, args.height, args.gpus, frames=args.frames,
                         interconnect=args.interconnect, steps=args.steps)
    except ValueError as exc:
        raise SystemExit(f"meshsp plan: {exc}") from exc
    memory = _plan_memory(args, rows) if (args.gpu_memory is not None or args.json) else None
    if args.json:
        import json

        print(json.dumps([{"cfg": r["cfg"], "ring": r["ring"], "ulysses": r["ulysses"], "tp": r["tp"],
                           "ulysses_mode": r["ulysses_mode"], "predicted_speedup": round(r["speedup"], 3),
                           "memory_gib": memory and {k: round(v, 2) for k, v in memory[_layout(r)].items()},
                           "fits": _fits(args, memory, r)} for r in rows], indent=1))
        return 0
    s = tokens(MODELS[args.model], args.width, args.height, args.frames)
    print(f"{args.model} {args.width}x{args.height}" + (f"x{args.frames}f" if args.frames > 1 else "")
          + f" ({s} tokens) on {args.gpus} x {args.hardware} over {args.interconnect}; predicted speedup "
          f"of the whole request ({args.steps} steps, text encoding and VAE decode) over 1 GPU (meshsp/planner.py)"
          + (f"; GiB per rank in {args.dtype} (meshsp/memory.py), {args.gpu_memory:g} GiB per GPU:" if memory else ":"))
    # The fastest layout that fits (the fastest of all when memory is not asked about).
    best = next((r for r in rows if _fits(args, memory, r) is not False), rows[0])
    for r in rows:
        mark = "  <- recommended" if r is best else ""
        mem = ""
        if memory:
            m = memory[_layout(r)]
            mem = (f"  weights {m['weights']:.1f} + activations {m['activations']:.1f} + text encoder "
                   f"{m['text_encoder']:.1f}, VAE decode {m['vae']:.1f} -> {m['total']:.1f} GiB "
                   f"{'fits' if _fits(args, memory, r) else 'DOES NOT FIT'}")
        print(f"  cfg={r['cfg']} ring={r['ring']} ulysses={r['ulysses']} tp={r['tp']} ({r['ulysses_mode']}): "
              f"{r['speedup']:.2f}x{mark}{mem}")
    if memory and args.gpu_memory is not None and not _fits(args, memory, best):
        least = min(rows, key=lambda r: memory[_layout(r)]["total"])
        print(f"No layout fits in {args.gpu_memory:g} GiB: the smallest, cfg={least['cfg']} ring={least['ring']} "
              f"ulysses={least['ulysses']} tp={least['tp']}, needs {memory[_layout(least)]['total']:.1f} GiB per rank.")
    print(f"meshsp generate --model ... --cfg-parallel-size {best['cfg']} --ring-degree {best['ring']} "
          f"--ulysses-degree {best['ulysses']} --tensor-parallel-size {best['tp']} --ulysses-mode {best['ulysses_mode']}")
    return 0


def _plan_memory(args, rows) -> dict | None:
    """Per-rank memory of each row's (ring, ulysses), counted on the meta device (meshsp.memory)."""
    import torch

    from meshsp.memory import FAMILIES, estimate

    if args.model not in FAMILIES:
        if args.gpu_memory is not None:
            raise SystemExit(f"meshsp plan: no memory model for {args.model!r}; known: {sorted(FAMILIES)}")
        return None
    layouts = sorted({_layout(r) for r in rows})
    return estimate(args.model, args.width, args.height, frames=args.frames, dtype=getattr(torch, args.dtype),
                    layouts=layouts, vae_ranks=args.gpus)  # the engine splits the decode across every rank


def _fits(args, memory, row) -> bool | None:
    if memory is None or args.gpu_memory is None:
        return None
    return memory[_layout(row)]["total"] <= args.gpu_memory


def _layout(row: dict) -> tuple[int, int, int]:
    return row["ring"], row["ulysses"], row["tp"]


def _model_class(name_or_dir: str) -> str:
    """A diffusers class name, or the class of a diffusers model (or pipeline) directory."""
    import json
    import pathlib

    folder = pathlib.Path(name_or_dir)
    if not folder.exists():
        return name_or_dir
    folder = folder / "transformer" if (folder / "transformer").is_dir() else folder
    return json.loads((folder / "config.json").read_text())["_class_name"]


def _infer_plan(args) -> int:
    """Infer a plan for a class, verify it on 2 and 4 CPU ranks, write it as YAML."""
    from meshsp.plans import infer_plan
    from meshsp.plans.verify import verify
    from meshsp.zoo import ZOO, build

    cls = _model_class(args.infer)
    if cls not in ZOO:
        raise SystemExit(f"meshsp plan --infer: no tiny config for {cls!r} to trace; known: {sorted(ZOO)}. "
                         "From Python: meshsp.plans.infer_plan(model, make_inputs).")
    try:
        plan = infer_plan(build(cls, heads=3))
    except ValueError as exc:
        raise SystemExit(f"meshsp plan --infer: refused: {exc}") from exc
    print(f"{cls}: plan inferred; verifying on gloo ranks (tiny random weights, odd grid, batch 2):", file=sys.stderr)
    from meshsp.launch import RankFailure

    try:
        lines = verify(cls, plan, layouts=((1, 2), (2, 2)))
    except RankFailure as exc:
        raise SystemExit(f"meshsp plan --infer: the inferred plan fails on gloo ranks: {exc}") from exc
    for line in lines:
        print("  " + line, file=sys.stderr)
    text = f"# Inferred by `meshsp plan --infer {cls}` and verified on 2 and 4 CPU ranks.\n" + plan.to_yaml()
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(text)
    return 0


def _check_plan(args) -> int:
    """Validate a YAML plan against a model (a tiny family or a diffusers model directory), no run."""
    from meshsp.plans import load_plan
    from meshsp.tiny import FAMILIES, build_transformer

    plan = load_plan(args.check)
    if args.model in FAMILIES:
        model = build_transformer(args.model)
    else:
        import json
        import pathlib

        import diffusers
        import torch

        folder = pathlib.Path(args.model)
        folder = folder / "transformer" if (folder / "transformer").is_dir() else folder
        config = json.loads((folder / "config.json").read_text())
        cls = getattr(diffusers, config["_class_name"])
        with torch.device("meta"):
            model = cls.from_config(config)
    plan.validate(model)
    print(f"{args.check}: valid for {type(model).__name__} ({len(plan)} entries)")
    return 0


def _bench(args) -> int:
    grid, txt = (48, 64) if args.what == "train" else (64, 256)
    args.grid, args.txt = args.grid or grid, args.txt or txt
    if args.repeats is None:
        args.repeats = {"vae": 1, "serve": 3}.get(args.what, 5)
    if args.what == "vae":
        from meshsp.bench.vae import run as run_vae

        width, _, height = args.clip.partition("x")
        run_vae(tuple(args.vaes.split(",")), sizes=tuple(int(s) for s in args.sizes.split(",")), frames=args.frames,
                clip=(int(width), int(height)), repeats=args.repeats, e2e_model=args.e2e_model,
                e2e_size=args.e2e_size)
    elif args.what == "serve":
        from meshsp.bench import cache as bench_cache
        from meshsp.bench import serve as bench_serve

        print(f"serve: {args.serve_model} on U{args.usp} ({args.ulysses_mode}), {args.clients} clients x "
              f"{args.requests} requests, {args.serve_size}², {args.serve_steps} steps; max batch "
              f"{args.batch_sizes}; the servers run one after the other")
        rows = bench_serve.run(args.serve_model, clients=args.clients, requests=args.requests,
                               batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")), size=args.serve_size,
                               steps=args.serve_steps, ulysses=args.usp, ulysses_mode=args.ulysses_mode)
        print(bench_serve.format_rows(rows))
        if args.cache_kinds:
            kinds = tuple(args.cache_kinds.split(","))
            print(f"\nstep caches: {args.cache_model} on U{args.usp}, {args.cache_size}², {args.cache_steps} steps, "
                  f"median of {args.repeats} (request up to the latents)")
            options = {"first-block": {"threshold": args.cache_threshold}} if args.cache_threshold else None
            print(bench_cache.format_rows(bench_cache.run(args.cache_model, size=args.cache_size, steps=args.cache_steps,
                                                          repeats=args.repeats, ulysses=args.usp,
                                                          ulysses_mode=args.ulysses_mode, kinds=kinds,
                                                          options=options)))
    elif args.what == "train":
        from meshsp.bench.train import run as run_train

        run_train(args.family, grid=args.grid, txt=args.txt, heads=args.heads, repeats=args.repeats)
    elif args.what == "attention":
        from meshsp.bench.attention import run

        run(seq=args.seq, heads=args.heads, head_dim=args.head_dim, repeats=args.repeats)
    elif args.what == "perf":
        from meshsp.bench.perf import run

        print(f"perf: transformer forward, {args.heads} heads of 16, grid {args.grid}, {args.txt} text tokens, "
              f"fp32, 1 thread per rank, median of {args.repeats} after warm-up")
        run(args.families.split(","), grid=args.grid, txt=args.txt, heads=args.heads, repeats=args.repeats)
    elif args.real_width:
        from meshsp.bench.realwidth import run_real_width

        run_real_width(args.families.split(","), dtypes=tuple(args.dtypes.split(",")), tokens=args.tokens,
                       txt=args.txt, repeats=args.repeats)
    else:
        from meshsp.bench.models import run

        print(f"transformer forward, {args.heads} heads of 16, fp32, 1 thread per rank, UAA plans, "
              f"median of {args.repeats}")
        run(args.families.split(","), grid=args.grid, txt=args.txt, heads=args.heads, repeats=args.repeats)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshsp", description="Sequence parallelism for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    st = sub.add_parser("selftest", help="meshsp's attention code on one device and on gloo ranks, tiny pipelines")
    st.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    st.add_argument("--no-pipelines", "--kernels-only", dest="no_pipelines", action="store_true",
                    help="skip the pipeline generations")
    st.add_argument("--ranks", type=_world_sizes, default=None,
                    help="world sizes of the gloo checks, e.g. 2,4 (default: 2 on cpu, 2,4 on cuda; 0: none)")
    st.add_argument("--json", default=None, metavar="PATH", help="also write the JSON summary to PATH")
    st.add_argument("--routes", action="store_true",
                    help="print the local kernel's routing table (markdown) and exit; runs nothing")
    st.set_defaults(func=_selftest)

    demo = sub.add_parser("demo", help="SP attention on 4 CPU ranks vs the single-device result")
    demo.add_argument("--seq", type=int, default=2053)
    demo.add_argument("--heads", type=int, default=30)
    demo.set_defaults(func=_demo)

    gen = sub.add_parser("generate", help="generate an image with a sequence-parallel transformer")
    add_generate_args(gen)
    gen.set_defaults(func=run_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible image and video server over sequence-parallel workers "
                         "(from a plain process, or under torchrun: rank 0 serves)")
    srv.add_argument("model", help="pipeline directory, hub id or tiny-* name; also the served model name")
    srv.add_argument("--ulysses-degree", "--usp", type=int, default=1)
    srv.add_argument("--ring-degree", "--ring", type=int, default=1)
    srv.add_argument("--ulysses-mode", default="strict", choices=["strict", "default", "advanced_uaa"])
    srv.add_argument("--cfg-parallel-size", type=int, default=1)
    srv.add_argument("--tensor-parallel-size", "--tp", type=int, default=1)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--max-size", type=int, default=1024, help="largest width or height a request may ask")
    srv.add_argument("--max-n", type=int, default=4)
    srv.add_argument("--max-steps", type=int, default=100)
    srv.add_argument("--default-size", type=int, default=256)
    srv.add_argument("--default-steps", type=int, default=4)
    srv.add_argument("--max-frames", type=int, default=129, help="video: most frames a job may ask")
    srv.add_argument("--default-frames", type=int, default=9, help="video: frames of a job that names none")
    srv.add_argument("--max-batch-size", type=int, default=1,
                     help="queued requests with the same size, steps, frames and guidance mode run as one batch "
                          "of up to this many images (default 1: one request at a time)")
    srv.add_argument("--video-dir", default=None,
                     help="video pipelines: where the MP4s and job records are kept, across restarts (default: "
                          "./meshsp-videos/<model>)")
    srv.add_argument("--video-retention", type=_seconds_or_none, default=None, metavar="SECONDS",
                     help="video pipelines: finished jobs older than this are removed with their MP4 (default: kept)")
    srv.add_argument("--video-max-jobs", type=int, default=None,
                     help="video pipelines: at most this many finished jobs are kept, the oldest removed first")
    srv.add_argument("--video-timeout", type=_seconds_or_none, default=3600.0, metavar="SECONDS",
                     help="video pipelines: a job's deadline from its start; past it, the job is stopped "
                          "(failed, code timeout) and the ranks stay up; 'none' for no limit (default 3600)")
    srv.add_argument("--shutdown-timeout", type=float, default=15.0, metavar="SECONDS",
                     help="on SIGTERM, how long the running batch may take to finish before it is stopped "
                          "(queued requests are answered at once; default 15)")
    srv.add_argument("--api-key", default=None,
                     help="every endpoint but /health needs 'Authorization: Bearer <key>' (default: the "
                          "MESHSP_API_KEY environment variable; none: open)")
    srv.add_argument("--metrics-public", action="store_true", help="/metrics answers without the API key")
    srv.add_argument("--max-body-bytes", type=int, default=1 << 20,
                     help="largest request body, in bytes (413 above it; default 1 MiB)")
    add_timeout_args(srv, request_default=600.0)
    add_dtype_arg(srv)
    srv.set_defaults(func=_serve)

    plan = sub.add_parser("plan", help="recommend ulysses/ring/cfg degrees; --check a plan file; --infer a "
                          "plan for a diffusers class; --coverage of every class")
    plan.add_argument("--model", help="model family (qwen-image, flux, wan, ...), or with "
                      "--check a tiny family or a diffusers model directory")
    plan.add_argument("--infer", metavar="MODEL_DIR_OR_CLASS",
                      help="infer a plan for this diffusers class (or model directory), verify it on 2 and 4 "
                           "CPU ranks, print it as YAML (or write --output)")
    plan.add_argument("--output", metavar="PLAN.yaml", help="with --infer: write the plan here")
    plan.add_argument("--coverage", action="store_true",
                      help="print which diffusers transformer classes have a plan (shipped, converted, inferred)")
    plan.add_argument("--markdown", action="store_true",
                      help="with --coverage: the table alone, as docs/models.md holds it")
    plan.add_argument("--published", action="store_true",
                      help="the published runs against the planner's predictions, as docs/planning.md holds them")
    plan.add_argument("--width", type=int, default=1024)
    plan.add_argument("--height", type=int, default=1024)
    plan.add_argument("--frames", type=int, default=1)
    plan.add_argument("--gpus", type=int, default=8)
    plan.add_argument("--steps", type=int, default=50, help="denoising steps of the request the speedup is of")
    plan.add_argument("--hardware", default="h100", help="h100, h800, h200, a100, l20")
    plan.add_argument("--interconnect", default="nvlink", choices=["nvlink", "pcie", "ib"])
    plan.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                      help="per-GPU memory: each layout's per-rank memory is estimated and checked against it")
    plan.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                      help="weights and activations for the memory estimate")
    plan.add_argument("--json", action="store_true", help="print the layouts as a JSON list")
    plan.add_argument("--check", metavar="PLAN.yaml", help="validate this plan against --model; no run")
    plan.set_defaults(func=_plan)

    bench = sub.add_parser("bench", help="benchmarks printed side by side")
    bench.add_argument("what", choices=["attention", "models", "perf", "train", "vae", "serve"])
    bench.add_argument("--seq", type=int, default=8192, help="attention: sequence length")
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--families", default="flux,qwen-image,wan", help="models: comma-separated families")
    bench.add_argument("--grid", type=int, default=None, help="models: token grid side (default 64; train: 48)")
    bench.add_argument("--txt", type=int, default=None, help="models: text tokens (default 256; train: 64)")
    bench.add_argument("--family", default="qwen-image", choices=["qwen-image", "flux", "wan"],
                       help="train: the model of the training step")
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=None, help="default 5; vae: 1")
    bench.add_argument("--real-width", action="store_true",
                       help="models: each family at its real hidden size and heads, 1 block per stack")
    bench.add_argument("--dtypes", default="float32,bfloat16", help="models --real-width: comma-separated")
    bench.add_argument("--tokens", type=int, default=2048, help="models --real-width: image tokens")
    bench.add_argument("--vaes", default="flux,qwen-image,wan", help="vae: comma-separated VAEs")
    bench.add_argument("--sizes", default="512,1024", help="vae: square image sizes in pixels, comma-separated")
    bench.add_argument("--frames", type=int, default=5, help="vae: frames of the video VAEs' clip (1 + 4k)")
    bench.add_argument("--clip", default="480x272", help="vae: WIDTHxHEIGHT of the video VAEs' clip")
    bench.add_argument("--e2e-model", default="tiny-qwen-image", help="vae: the pipeline of the whole-request "
                       "comparison ('' skips it)")
    bench.add_argument("--e2e-size", type=int, default=1024, help="vae: image size of the whole request")
    bench.add_argument("--serve-model", default="tiny-qwen-image", help="serve: the served pipeline")
    bench.add_argument("--usp", type=int, default=2, help="serve: the servers' (and caches') Ulysses degree")
    bench.add_argument("--ulysses-mode", default="advanced_uaa", choices=["strict", "default", "advanced_uaa"])
    bench.add_argument("--clients", type=int, default=8, help="serve: concurrent clients")
    bench.add_argument("--requests", type=int, default=4, help="serve: requests per client, one after another")
    bench.add_argument("--batch-sizes", default="1,4", help="serve: --max-batch-size of each server, comma-separated")
    bench.add_argument("--serve-size", type=int, default=256, help="serve: image size of every request")
    bench.add_argument("--serve-steps", type=int, default=8)
    bench.add_argument("--cache-kinds", default="first-block,taylorseer,mag,pab,faster",
                       help="serve: step caches compared with no cache ('' skips them)")
    bench.add_argument("--cache-model", default="tiny-qwen-image")
    bench.add_argument("--cache-size", type=int, default=768)
    bench.add_argument("--cache-steps", type=int, default=20)
    bench.add_argument("--cache-threshold", type=float, default=None, help="serve: first-block's threshold")
    bench.set_defaults(func=_bench)

    from meshsp.train.cli import add_train_args, run_train

    trn = sub.add_parser("train", help="fine-tune a pipeline's transformer (flow matching) on data x sequence-"
                         "parallel ranks: FSDP2, LoRA, checkpoints, the trained pipeline exported")
    add_train_args(trn)
    trn.set_defaults(func=run_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
