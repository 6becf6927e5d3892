"""Figures for docs/RESULTS.md (PNG, matplotlib's Agg backend chosen inside each function).

- `pareto_plot`: quality against speed for every decoder, with the Pareto front drawn through
  the points no other point beats on both axes.
- `eos_confidence_plot`: mean confidence on EOS vs content tokens per block size (ECHO's reason
  for its EOS loss: a one-step decoder is least sure where the report ends). The numbers come from
  `echocxr.eval.evaluate.eos_confidence` (see there for what "confidence" is).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def pareto_front(points: Sequence[tuple[float, float]], *, x_higher_better: bool = True) -> list[int]:
    """Indices of the points no other point matches or beats on both axes (y: higher is better),
    ordered along x."""
    sign = 1.0 if x_higher_better else -1.0
    front = []
    for i, (xi, yi) in enumerate(points):
        if any(
            j != i and sign * xj >= sign * xi and yj >= yi and (sign * xj > sign * xi or yj > yi)
            for j, (xj, yj) in enumerate(points)
        ):
            continue
        front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def pareto_plot(
    points: Sequence[dict],
    path: str | Path,
    *,
    x: str = "tokens_per_s",
    y: str = "rougeL_coco",
    title: str = "",
) -> Path:
    """Scatter of decoders (each dict: "label", x, y) with the Pareto front. x "forwards_per_token"
    counts as lower-is-better; any other x as higher-is-better. Points missing a value are left out
    (listed in the caption)."""
    plt = _pyplot()
    usable = [p for p in points if _finite(p.get(x)) and _finite(p.get(y))]
    missing = [p.get("label", "?") for p in points if p not in usable]
    lower_better = x == "forwards_per_token"
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    xy = [(float(p[x]), float(p[y])) for p in usable]
    ax.scatter([a for a, _ in xy], [b for _, b in xy], color="tab:blue", zorder=3)
    for p, (a, b) in zip(usable, xy):
        ax.annotate(p["label"], (a, b), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(xy, x_higher_better=not lower_better)
    if len(front) > 1:
        ax.plot(
            [xy[i][0] for i in front], [xy[i][1] for i in front], color="tab:red", lw=1, label="Pareto front"
        )
        ax.legend(fontsize=8)
    ax.set_xlabel(x.replace("_", " ") + (" (lower is faster)" if lower_better else ""))
    ax.set_ylabel(y)
    ax.set_title(title or f"{y} vs {x}", fontsize=9)
    if missing:
        fig.text(0.01, 0.01, "no value: " + ", ".join(missing), fontsize=6)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def eos_confidence_plot(by_block: dict, path: str | Path, *, title: str = "") -> Path:
    """Grouped bars: per block size, mean confidence of EOS and of content tokens with ±1 standard
    error. by_block: {block_size: {"eos": mean, "content": mean, "eos_se", "content_se", "eos_n",
    "content_n"}} as `eos_confidence` returns per block size."""
    plt = _pyplot()
    sizes = sorted(by_block, key=int)
    fig, ax = plt.subplots(figsize=(5.6, 4.0), dpi=120)
    width = 0.38
    for k, (kind, color) in enumerate((("content", "tab:blue"), ("eos", "tab:orange"))):
        xs = [i + (k - 0.5) * width for i in range(len(sizes))]
        means = [by_block[s][kind] for s in sizes]
        errs = [by_block[s].get(f"{kind}_se", 0.0) for s in sizes]
        ax.bar(
            xs, means, width, yerr=errs, color=color, label="EOS" if kind == "eos" else "content", capsize=3
        )
        for xx, s in zip(xs, sizes):
            ax.text(xx, 0.01, f"n={by_block[s].get(f'{kind}_n', '?')}", ha="center", fontsize=6, rotation=90)
    ax.set_xticks(range(len(sizes)))
    ax.set_xticklabels([f"B={s}" for s in sizes])
    ax.set_ylim(0, 1)
    ax.set_ylabel("mean p(reference token), block masked")
    ax.set_title(title or "EOS vs content confidence by block size", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _save(plt, fig, path: str | Path) -> Path:
    """Lay out `fig`, write it to `path` (parent folders created) and free it; returns the path."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
