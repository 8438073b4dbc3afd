"""Plot measured and predicted scaling into docs/scaling.png (needs matplotlib: pip install -e .[bench]).

Left: published end-to-end speedups (vLLM-Omni: Qwen-Image on H800 at 2048x2048 and on A100 at
1024x1024; cache-dit: FLUX on L20 at 1024x1024) as points, and meshsp's planner predictions of the
whole request for the same setups as lines. Right: SP-2 speedups measured on this project's 2-core CPU machine by
``meshsp bench models`` (numbers passed on the command line, or the README's defaults).

    python benchmarks/plot_scaling.py [--measured flux=1.91,1.95 qwen-image=1.85,1.79 ...]
"""

from __future__ import annotations

import argparse
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from meshsp.planner import PUBLISHED, predict  # noqa: E402

MEASURED = {  # family: (U2, R2) speedups from the README's `meshsp bench models` table
    "flux": (1.87, 1.99), "flux2": (1.87, 1.89), "qwen-image": (1.81, 1.86), "z-image": (1.79, 1.81),
    "wan": (1.79, 1.85), "sd3": (1.86, 1.89), "ltx": (1.79, 1.78), "hunyuan-video": (1.75, 1.85),
    "cogvideox": (1.75, 1.81),
}


def _degrees(kind: str, gpus: int) -> dict:
    if kind == "U2xR2" and gpus > 1:
        return {"ring": 2, "ulysses": gpus // 2}
    return {"ring": gpus, "ulysses": 1} if kind == "Ring" else {"ring": 1, "ulysses": gpus}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--measured", nargs="*", default=[], help="family=U2,R2 speedups")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parents[1] / "docs" / "scaling.png"))
    args = parser.parse_args()
    measured = dict(MEASURED)
    for item in args.measured:
        family, values = item.split("=")
        measured[family] = tuple(float(v) for v in values.split(","))

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    setups = {}
    for row in PUBLISHED:
        kind = "Ulysses" if row.ring == 1 else ("Ring" if row.ulysses == 1 else "U2xR2")
        setups.setdefault((row.model, row.hardware, row.interconnect, row.size, row.steps, kind), []).append(
            (row.ring * row.ulysses, row.speedup))
    for (model, hw, link, size, steps, kind), points in setups.items():
        label = f"{model} {hw.upper()} {link} {size}px {kind}"
        xs = [p for p, _ in points]
        line = left.plot(xs, [s for _, s in points], "o", label=f"{label} (published)")[0]
        grid = sorted({1, *xs})
        preds = [predict(model, hw, size, size, steps=steps, interconnect=link, **_degrees(kind, g)) for g in grid]
        left.plot(grid, preds, "--", color=line.get_color(), label=f"{label} (meshsp plan)")
    left.plot([1, 8], [1, 8], ":", color="gray", label="linear")
    left.set_xlabel("GPUs (sequence-parallel degree)")
    left.set_ylabel("speedup over 1 GPU")
    left.set_title("Published end-to-end speedups vs planner (whole request)")
    left.legend(fontsize=6)

    families = list(measured)
    xs = range(len(families))
    right.bar([x - 0.2 for x in xs], [measured[f][0] for f in families], width=0.4, label="U2")
    right.bar([x + 0.2 for x in xs], [measured[f][1] for f in families], width=0.4, label="R2")
    right.axhline(2.0, color="gray", linestyle=":", label="limit (2x)")
    right.set_xticks(list(xs), families, rotation=45, ha="right", fontsize=8)
    right.set_ylabel("speedup over 1 process")
    right.set_title("meshsp SP-2 measured on 2 CPU cores (gloo)")
    right.legend(fontsize=8)
    fig.tight_layout()
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
