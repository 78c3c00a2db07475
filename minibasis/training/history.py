"""Reading finished (or still running) run folders back: per-epoch history and a summary.

A run folder written by :class:`minibasis.training.Trainer` (``minibasis train``,
``minibasis finetune``) holds ``metrics-<stage>.json`` after every epoch and, once the run
has finished, ``results.json`` with the whole history and what the run measured (learnable
parameters, multiplications, final accuracy). :func:`load_run` reads either, so a run can be
compared while it is still going::

    from minibasis.training import load_run
    conv, basis = load_run("runs/table3-conv"), load_run("runs/table3-basis")
    print(conv.final_test_acc, basis.final_test_acc, conv.seconds / 3600)

Files from elsewhere are data: only JSON is read, and a folder that holds no metrics is a
``ValueError`` naming it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from minibasis.training.run_folder import read_json

__all__ = ["RunHistory", "load_run"]


@dataclasses.dataclass(frozen=True)
class RunHistory:
    """One run folder's per-epoch rows (all stages, in training order) and its results, if finished.

    ``rows``: dicts with at least ``stage``, ``epoch``, ``train_loss``, ``train_acc``,
    ``seconds`` and, where the run evaluated, ``test_acc`` (a fraction). ``results`` is
    ``results.json`` (None while the run is unfinished), ``config`` its ``config.json``.
    """

    path: Path
    rows: tuple
    results: dict | None
    config: dict | None

    @property
    def finished(self) -> bool:
        return self.results is not None

    @property
    def epochs(self) -> int:
        """Epochs completed, over all stages."""
        return len(self.rows)

    @property
    def stages(self) -> tuple:
        """(stage, epochs) in training order, e.g. (("step1", 15), ("step2", 10))."""
        counts: dict = {}
        for row in self.rows:
            counts[row["stage"]] = counts.get(row["stage"], 0) + 1
        return tuple(counts.items())

    @property
    def seconds(self) -> float:
        """Training wall time summed over the epochs (evaluation included, set-up excluded)."""
        return float(sum(row.get("seconds", 0.0) for row in self.rows))

    def test_curve(self) -> list[tuple[int, float]]:
        """[(epoch over all stages, test accuracy)] for the epochs that were evaluated."""
        return [(i, row["test_acc"]) for i, row in enumerate(self.rows, start=1) if "test_acc" in row]

    @property
    def final_test_acc(self) -> float | None:
        curve = self.test_curve()
        return curve[-1][1] if curve else None

    @property
    def best_test_acc(self) -> tuple[int, float] | None:
        """(epoch, accuracy) of the best evaluated epoch (the first, on ties)."""
        curve = self.test_curve()
        return max(curve, key=lambda point: (point[1], -point[0])) if curve else None

    def stage_boundaries(self) -> list[float]:
        """x positions (epoch + 0.5) where the stage changes, for plots."""
        return [i + 0.5 for i in range(1, len(self.rows)) if self.rows[i]["stage"] != self.rows[i - 1]["stage"]]


def load_run(folder) -> RunHistory:
    """The :class:`RunHistory` of the run folder ``folder``; ``ValueError`` when it holds no metrics."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder (expected a run folder of minibasis train or finetune)")
    results, config = read_json(path / "results.json"), read_json(path / "config.json")
    if isinstance(results, dict) and isinstance(results.get("history"), list):
        rows = results["history"]
    else:
        results = None
        stages = [p.name[len("metrics-"):-len(".json")] for p in path.glob("metrics-*.json")]
        rows = []
        # Fine-tuning writes metrics-step1 and metrics-step2, training metrics-train: sorted
        # names are training order (no verb mixes "train" with steps).
        for stage in sorted(stages):
            part = read_json(path / f"metrics-{stage}.json")
            if not isinstance(part, list):
                raise ValueError(f"{path / f'metrics-{stage}.json'} does not hold a list of epoch rows")
            rows.extend(part)
    if not rows:
        raise ValueError(f"{path} holds no per-epoch metrics (no results.json history, no metrics-*.json): "
                         "is it a run folder of minibasis train or finetune that finished an epoch?")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or "stage" not in row or "epoch" not in row:
            raise ValueError(f"{path}: epoch row {i + 1} is not a metrics row (needs 'stage' and 'epoch')")
        if "test_acc" in row and not isinstance(row["test_acc"], (int, float)):
            raise ValueError(f"{path}: epoch row {i + 1} has a non-numeric test_acc {row['test_acc']!r}")
    return RunHistory(path, tuple(rows), results, config if isinstance(config, dict) else None)
