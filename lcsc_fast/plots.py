"""PNG plots of a coefficient search: the coefficient pattern and the score against evaluations.

plot_coefficients draws the merge coefficients over the checkpoints' training steps, like Fig. 5
of the LCSC paper; plot_search draws the best score so far against the number of objective
evaluations, with the baselines (last, uniform, EMA) as labelled horizontal lines.

matplotlib is imported inside the functions, never when lcsc_fast is imported, and only its Agg
canvas is used: a Figure drawn straight onto a FigureCanvasAgg, without pyplot. So plotting
works headless, and calling these functions from a notebook or GUI program neither switches that
program's backend nor leaves figures open in pyplot's global registry.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

__all__ = ["plot_coefficients", "plot_search"]

_DPI = 120


def plot_coefficients(steps: Sequence[int], coefficients: Sequence[float], path,
                      baselines: Mapping[str, Sequence[float]] | None = None) -> str:
    """Write a PNG of coefficient against checkpoint step to path; returns path.

    steps: the training step of each checkpoint; coefficients: one per checkpoint (the searched
    merge). baselines: optional name -> coefficients (e.g. {"ema*": [...]}) drawn dashed on top,
    for comparison.
    """
    steps = [int(s) for s in steps]
    coefficients = _floats(coefficients, "coefficients")
    if len(coefficients) != len(steps):
        raise ValueError(f"plot_coefficients: {len(coefficients)} coefficients for "
                         f"{len(steps)} steps; pass one coefficient per checkpoint")
    baselines = {str(k): _floats(v, f"baselines[{k!r}]") for k, v in (baselines or {}).items()}
    for name, w in baselines.items():
        if len(w) != len(steps):
            raise ValueError(f"plot_coefficients: baseline {name!r} has {len(w)} coefficients "
                             f"for {len(steps)} steps")

    fig, ax = _figure()
    ax.axhline(0.0, color="0.6", linewidth=0.8, zorder=1)
    # Markers show where the checkpoints are; with hundreds they would merge into a band.
    marker = "o" if len(steps) <= 120 else None
    ax.plot(steps, coefficients, marker=marker, markersize=3.5, linewidth=1.4, color="C0",
            label=f"LCSC (sum {math.fsum(coefficients):.6g})", zorder=3)
    for k, (name, w) in enumerate(baselines.items()):
        ax.plot(steps, w, linestyle="--", linewidth=1.1, color=f"C{k + 1}", label=name,
                zorder=2)
    ax.set_xlabel("training step of the checkpoint")
    ax.set_ylabel("coefficient")
    ax.set_title(f"Merge coefficients over {len(steps)} checkpoints")
    ax.legend(loc="best", fontsize="small")
    ax.grid(True, alpha=0.25)
    return _save(fig, path)


def plot_search(history: Sequence[Mapping], baselines: Mapping[str, float], path) -> str:
    """Write a PNG of the best score so far against objective evaluations to path; returns path.

    history: the search's entries (dicts with "evaluation" and "best_score", as in
    SearchResult.history or history.jsonl); baselines: name -> score, drawn as labelled
    horizontal lines. Non-finite scores are left out. The y axis is logarithmic when every
    score drawn is positive and they span more than a factor of 10.
    """
    points = [(int(e["evaluation"]), float(e["best_score"])) for e in history]
    points = [(x, y) for x, y in points if math.isfinite(y)]
    lines = {str(k): float(v) for k, v in baselines.items() if math.isfinite(float(v))}
    values = [y for _, y in points] + list(lines.values())

    fig, ax = _figure()
    if points:
        xs, ys = zip(*points)
        ax.step(xs, ys, where="post", linewidth=1.8, color="black", zorder=3,
                label=f"LCSC search (best {ys[-1]:.4g})")
    else:
        ax.text(0.5, 0.5, "no finite score yet", transform=ax.transAxes, ha="center")
    # The EMA grid's lines are many and close together; "last", "uniform" and "ema*" (the best
    # EMA) are what a reader compares against, so they get colours and the grid stays grey.
    key = {"ema*": ("C3", "-", 1.6), "last": ("C0", "--", 1.3), "uniform": ("C2", "--", 1.3)}
    for name, value in sorted(lines.items(), key=lambda kv: kv[1]):
        color, style, width = key.get(name, ("0.55", ":", 1.0))
        ax.axhline(value, color=color, linestyle=style, linewidth=width, zorder=2,
                   label=f"{name} ({value:.4g})")
    positive = bool(values) and min(values) > 0
    if positive and max(values) > 10 * min(values):
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # evaluations are counted
    ax.set_xlabel("objective evaluations")
    ax.set_ylabel("score (lower is better)")
    ax.set_title("Best score so far, with the baselines")
    ax.grid(True, alpha=0.25, which="both")
    if points or lines:
        # Outside the axes: up to ten baselines would cover the curve.
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
                  borderaxespad=0)
    return _save(fig, path)


def _floats(values, what: str) -> list[float]:
    try:
        return [float(v) for v in values]
    except (TypeError, ValueError):
        raise TypeError(f"{what}: expected a sequence of numbers") from None


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig, path) -> str:
    path = os.fspath(path)
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def plot_image_grid(images, path, title: str = "", columns: int = 8) -> str:
    """Write a PNG of images [n, 1, H, W] with values in [-1, 1] as a grey grid; returns path."""
    import numpy as np

    x = np.asarray(images.detach().cpu().float().clamp(-1, 1) if hasattr(images, "detach")
                   else images, dtype=np.float32)
    if x.ndim != 4 or x.shape[1] != 1 or len(x) == 0:
        raise ValueError(f"plot_image_grid: expected [n, 1, H, W] images, got {x.shape}")
    n, _, h, w = x.shape
    rows = -(-n // columns)
    mosaic = np.full((rows * (h + 1) + 1, columns * (w + 1) + 1), -1.0, dtype=np.float32)
    for k in range(n):
        r, c = divmod(k, columns)
        mosaic[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + c * (w + 1):1 + c * (w + 1) + w] = x[k, 0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.0, 4.0 * rows / columns + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.imshow(mosaic, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    if title:
        ax.set_title(title, fontsize="small")
    return _save(fig, path)
