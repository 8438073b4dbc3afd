"""``meshsp`` command line: ``demo``, ``bench``."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _demo(args) -> int:
    from meshsp.demo import run

    return run(seq=args.seq, heads=args.heads)


def _bench(args) -> int:
    if args.what == "attention":
        from meshsp.bench.attention import run

        run(seq=args.seq, heads=args.heads, head_dim=args.head_dim, repeats=args.repeats)
    else:
        from meshsp.bench.models import run

        print(f"transformer forward, {args.heads} heads of 16, fp32, 1 thread per rank, UAA plans, "
              f"median of {args.repeats}")
        run(args.families.split(","), grid=args.grid, txt=args.txt, heads=args.heads, repeats=args.repeats)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshsp", description="Sequence parallelism for diffusion transformers.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="SP attention on 4 CPU ranks vs the single-device result")
    demo.add_argument("--seq", type=int, default=2053)
    demo.add_argument("--heads", type=int, default=30)
    demo.set_defaults(func=_demo)

    bench = sub.add_parser("bench", help="benchmarks printed side by side")
    bench.add_argument("what", choices=["attention", "models"])
    bench.add_argument("--seq", type=int, default=8192, help="attention: sequence length")
    bench.add_argument("--heads", type=int, default=8)
    bench.add_argument("--families", default="flux,qwen-image,wan", help="models: comma-separated families")
    bench.add_argument("--grid", type=int, default=64, help="models: token grid side")
    bench.add_argument("--txt", type=int, default=256, help="models: text tokens")
    bench.add_argument("--head-dim", type=int, default=64)
    bench.add_argument("--repeats", type=int, default=5)
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
