"""PNG plots of the experiments (matplotlib, imported only when a plot is drawn).

matplotlib is an optional dependency (``pip install 'minibasis[plot]'``). Without it the
commands still write their JSON/CSV results; :func:`save_plot` returns None and the caller
prints :data:`MISSING_MESSAGE` once. Every PNG is rendered in memory and written with
:func:`minibasis.serialization.atomic_write`, so an interrupted run never leaves a truncated image.
"""
from __future__ import annotations

import io as _stdio
import textwrap
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["MISSING_MESSAGE", "skip_reason", "PlotUnavailable", "matplotlib_pyplot", "save_plot", "plot_demo",
           "plot_retained_filters", "plot_accuracy_vs_retained", "plot_training_curves", "plot_accuracy_curves"]

MISSING_MESSAGE = "plots skipped: matplotlib is not installed (pip install 'minibasis[plot]')"


def skip_reason(history) -> str:
    """Why a training plot was not written: no epoch to draw, or :data:`MISSING_MESSAGE`."""
    return "no training plot: no epoch was trained" if not history else MISSING_MESSAGE


class PlotUnavailable(RuntimeError):
    """matplotlib cannot be imported."""


def matplotlib_pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend, or :class:`PlotUnavailable`."""
    try:
        import matplotlib
        matplotlib.use("Agg", force=True)  # files only: never open a window or need a display
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotUnavailable(MISSING_MESSAGE) from exc
    return plt


def save_plot(path: Path, draw: Callable, *args, **kwargs) -> Path | None:
    """Create a figure, ``draw(fig, *args, **kwargs)`` on it, write it as PNG atomically.

    Returns the path, or None when matplotlib is missing. Under mpirun only rank 0 draws and
    writes (the others return the path it writes).
    """
    from minibasis import distributed
    from minibasis.serialization import atomic_write

    if not distributed.is_main_process():
        return Path(path)

    try:
        plt = matplotlib_pyplot()
    except PlotUnavailable:
        return None
    fig = plt.figure(figsize=kwargs.pop("figsize", (6.4, 4.2)), dpi=100)
    try:
        draw(fig, *args, **kwargs)
        fig.tight_layout()
        buffer = _stdio.BytesIO()
        fig.savefig(buffer, format="png")
    finally:
        plt.close(fig)
    path = Path(path)
    with atomic_write(path, "wb") as f:
        f.write(buffer.getvalue())
    return path


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------
def _demo(fig, rows: Sequence[dict], baseline_acc: float | None, test_images: int | None):
    t = [r["threshold"] for r in rows]
    left, right = fig.subplots(1, 2)
    left.plot(t, [100 * r["mult_ratio_measured"] for r in rows], "o-", label="measured")
    left.plot(t, [100 * r["mult_ratio_formula"] for r in rows], "x--", label="formula: Σ (QD + MQ)·Ho·Wo over replaced convs\n+ Σ MD·Ho·Wo over kept ones")
    left.set_xlabel("energy threshold t")
    left.set_ylabel("conv multiplications (% of original)")
    left.invert_xaxis()
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    right.plot(t, [100 * r["test_acc"] for r in rows], "o-", color="C2", label="compressed, before fine-tuning")
    if baseline_acc is not None:
        right.axhline(100 * baseline_acc, color="gray", ls=":", label="original")
    right.set_xlabel("energy threshold t")
    right.set_ylabel("test accuracy (%)" + ("" if test_images is None else f", {test_images:,} test images"))
    right.invert_xaxis()
    right.grid(alpha=0.3)
    right.legend(fontsize=8)
    # Each t keeps a different set of directions and nothing is retrained, so accuracy need not
    # fall step by step as t falls; said on the figure so a reader does not take it for noise.
    right.set_title("not retrained: accuracy need not fall monotonically with t", fontsize=8)
    fig.suptitle("minibasis demo: compression of a small CNN (synthetic data)")


def plot_demo(path: Path, rows: Sequence[dict], baseline_acc: float | None = None,
              test_images: int | None = None) -> Path | None:
    """Measured vs formula conv multiplications, and accuracy, against the threshold."""
    return save_plot(path, _demo, rows, baseline_acc, test_images, figsize=(10, 4.2))


def _series(rows: Sequence[dict], key: str = "model"):
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r.get(key, "")), []).append(r)
    return groups


def _retained(fig, rows: Sequence[dict]):
    ax = fig.subplots()
    for i, (name, group) in enumerate(_series(rows).items()):
        t = [r["threshold"] for r in group]
        ax.plot(t, [r["retained_filters_pct"] for r in group], "o-", color=f"C{i}", label=f"{name}: retained filters")
        ax.plot(t, [100 * r["mult_ratio_measured"] for r in group], "x:", color=f"C{i}",
                label=f"{name}: conv multiplications (measured)")
    ax.set_xlabel("energy threshold t")
    ax.set_ylabel("% of the original")
    ax.set_title("Retained filters vs threshold (cf. the paper's Figure 2)")
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend()


def plot_retained_filters(path: Path, rows: Sequence[dict]) -> Path | None:
    """Retained filters (%) and measured conv multiplications (%) against t, one line per model."""
    return save_plot(path, _retained, rows)


def _accuracy(fig, rows: Sequence[dict], test_images: int | None = None):
    ax = fig.subplots()
    for name, group in _series(rows).items():
        ax.plot([r["retained_filters_pct"] for r in group], [100 * r["test_acc"] for r in group], "o-", label=name)
        for r in group:
            ax.annotate(f"{r['threshold']:g}", (r["retained_filters_pct"], 100 * r["test_acc"]),
                        textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("retained filters (% of the original)")
    ax.set_ylabel("test accuracy before fine-tuning (%)"
                  + ("" if test_images is None else f"\n{test_images:,} test images"))
    ax.set_title("Accuracy vs retained filters (labels: t)")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_accuracy_vs_retained(path: Path, rows: Sequence[dict], test_images: int | None = None) -> Path | None:
    """Test accuracy (before fine-tuning) against the percentage of retained filters."""
    return save_plot(path, _accuracy, rows, test_images)


def _wrapped(title: str, width: int) -> str:
    """``title`` broken into lines of at most ``width`` characters, so a long one is not cut off."""
    return "\n".join(textwrap.wrap(title, width)) if title else title


def _one_epoch(loss_ax, acc_ax, row: dict):
    """A single epoch as bars with their values (two lone dots would say nothing)."""
    bars = loss_ax.bar(["training loss"], [row["train_loss"]], color="C0")
    loss_ax.bar_label(bars, fmt="%.4f")
    labels, values = ["train"], [100 * row["train_acc"]]
    if "test_acc" in row:
        labels, values = labels + ["test"], values + [100 * row["test_acc"]]
    acc_ax.bar_label(acc_ax.bar(labels, values, color=["C0", "C1"][:len(values)]), fmt="%.2f %%")
    loss_ax.set_xlabel("epoch 1 (the only one)")
    acc_ax.set_xlabel("epoch 1 (the only one)")


def _curves(fig, history: Sequence[dict], title: str, references: dict | None):
    loss_ax, acc_ax = fig.subplots(1, 2)
    for i, (label, value) in enumerate((references or {}).items()):
        acc_ax.axhline(100 * value, ls=":", color=f"C{i + 2}", label=f"{label} ({100 * value:.2f} %)")
    loss_ax.set_ylabel("training loss")
    acc_ax.set_ylabel("accuracy (%)")
    loss_ax.grid(alpha=0.3)
    acc_ax.grid(alpha=0.3)
    fig.suptitle(_wrapped(title, 110))
    if len(history) == 1:
        _one_epoch(loss_ax, acc_ax, history[0])
        if references:
            acc_ax.legend(fontsize=8)
        return
    x = list(range(1, len(history) + 1))
    loss_ax.plot(x, [r["train_loss"] for r in history], "o-")
    loss_ax.set_xlabel("epoch")
    acc_ax.plot(x, [100 * r["train_acc"] for r in history], "o-", label="train")
    if any("test_acc" in r for r in history):
        acc_ax.plot([i for i, r in zip(x, history) if "test_acc" in r],
                    [100 * r["test_acc"] for r in history if "test_acc" in r], "s-", label="test")
    acc_ax.set_xlabel("epoch")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.get_major_locator().set_params(integer=True)
    # Stage boundaries (fine-tuning's step 1 → step 2), labelled with the stage that starts.
    stages = [r.get("stage") for r in history]
    for i in range(1, len(stages)):
        if stages[i] != stages[i - 1]:
            for ax in (loss_ax, acc_ax):
                ax.axvline(i + 0.5, color="gray", ls=":")
                ax.annotate(f"{stages[i]} →", (i + 0.5, 0), xycoords=("data", "axes fraction"), xytext=(3, 4),
                            textcoords="offset points", fontsize=8, color="gray")
    acc_ax.legend(fontsize=8)


def plot_training_curves(path: Path, history: Sequence[dict], title: str = "training",
                         references: dict[str, float] | None = None) -> Path | None:
    """Loss and accuracy per epoch (all stages of a run in order); ``references``: label →
    accuracy drawn as horizontal lines (e.g. the original network's)."""
    if not history:
        return None
    return save_plot(path, _curves, history, title, references, figsize=(10, 4.2))


def _accuracy_curves(fig, curves: dict, references: dict, title: str, xlabel: str, boundaries: Sequence[float]):
    ax = fig.subplots()
    for x in boundaries:  # stage changes (fine-tuning's step 1 → step 2)
        ax.axvline(x, color="gray", ls=":", lw=0.8)
    for label, points in curves.items():
        ax.plot([p[0] for p in points], [100 * p[1] for p in points], "o-", label=label)
    for i, (label, value) in enumerate(references.items()):
        ax.axhline(100 * value, ls=":", color=f"C{len(curves) + i}", label=f"{label} ({100 * value:.2f} %)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(_wrapped(title, 58))


def plot_accuracy_curves(path: Path, curves: dict[str, Sequence[tuple[float, float]]],
                         references: dict[str, float] | None = None, title: str = "", xlabel: str = "epoch",
                         boundaries: Sequence[float] = ()) -> Path | None:
    """Several runs' test accuracy per epoch on one axis: label → [(epoch, accuracy), ...];
    ``references``: label → accuracy (fraction) drawn as horizontal lines; ``boundaries``: x
    positions of dotted vertical lines (stage changes)."""
    return save_plot(path, _accuracy_curves, curves, references or {}, title, xlabel, tuple(boundaries))
