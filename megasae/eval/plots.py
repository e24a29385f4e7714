"""density.png and l0.png: the pictures a person reads before the numbers. Agg only: no display needed."""

from __future__ import annotations

import io

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLORS = {"all": "tab:blue", "text": "tab:green", "image": "tab:orange"}


def _figure(num_targets: int) -> tuple[Figure, list]:
    fig = Figure(figsize=(6.4, 3.2 * num_targets), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(np.atleast_1d(fig.subplots(num_targets, 1)))


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def density_png(result: dict) -> bytes:
    """Per target: a histogram of log10 firing frequency over the latents that fired, per token group."""
    fig, axes = _figure(len(result["targets"]))
    for ax, (path, target) in zip(axes, result["targets"].items()):
        for group, stats in target["groups"].items():
            frequency = np.asarray(stats["firing_frequency"])
            if not stats["tokens"] or not (frequency > 0).any():
                continue
            ax.hist(np.log10(frequency[frequency > 0]), bins=50, histtype="step", color=COLORS[group],
                    label=f"{group}: {100 * stats['dead_fraction']:.1f}% dead")
        ax.set(title=f"{path}: {target['num_latents']} latents", xlabel="log10 firing frequency",
               ylabel="latents")
        ax.legend(loc="best")
    return _png(fig)


def l0_png(result: dict) -> bytes:
    """Per target: the fraction of tokens with each number of active latents, per token group."""
    fig, axes = _figure(len(result["targets"]))
    for ax, (path, target) in zip(axes, result["targets"].items()):
        for group, stats in target["groups"].items():
            counts = np.asarray(stats["l0_histogram"], dtype=float)
            if not stats["tokens"]:
                continue
            ax.stairs(counts / counts.sum(), np.arange(counts.size + 1) - 0.5, color=COLORS[group],
                      label=f"{group}: mean {stats['l0']:.1f}")
        ax.set(title=f"{path}: k = {target['k']}", xlabel="active latents per token (L0)",
               ylabel="fraction of tokens")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper left")
    return _png(fig)
