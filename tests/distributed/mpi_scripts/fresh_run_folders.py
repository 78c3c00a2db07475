"""``minibasis train`` under mpirun into fresh run folders, then into a finished one.

Every rank calls the command line's ``main`` for each folder (the same code path as
``mpirun -n 2 python -m minibasis train ... --output DIR``, without paying the start-up of a
new mpirun for each) and records what ``main`` returned, and what it printed on stderr, in
``<out>/rank<R>.json``. The training plot is left out (three quarters of a run's time, drawn
by rank 0 after everything else). Used by tests/distributed/test_mpirun_run_folders.py.
"""
import contextlib
import io
import json
import sys
from pathlib import Path

from minibasis import cli
from minibasis import distributed as dist
from minibasis.experiments import plots

TRAIN = ["train", "--dataset", "synthetic", "--epochs", "1", "--train-subset", "8", "--limit", "8",
         "--batch-size", "8", "--quiet"]


def main(out: Path, fresh: int) -> int:
    dist.init()
    plots.plot_training_curves = lambda *args, **kwargs: None
    outcomes = []
    folders = [out / f"fresh-{i}" for i in range(fresh)] + [out / "fresh-0"]  # the last: a finished run
    for folder in folders:
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr):
            code = cli.main(TRAIN + ["--output", str(folder)])
        outcomes.append({"folder": folder.name, "code": code, "stderr": stderr.getvalue()})
        dist.barrier()
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(outcomes, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))
