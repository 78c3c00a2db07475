"""The experiments Trainer under mpirun, for tests/distributed/test_distributed.py.

``mpirun -n W python trainer_run.py --out DIR --epochs E [--resume]`` trains train_equivalence's
small CNN (no batch norm, float64) with ``minibasis.training.Trainer`` into the run
folder DIR. The Trainer itself joins the process group, shards the loader and averages the
gradients; only rank 0 writes the folder. ``run`` is also what the test calls in one process,
without mpirun, for the reference.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_equivalence as eq  # noqa: E402  (the model, data and hyper-parameters)

from minibasis import backend  # noqa: E402
from minibasis.data import DataLoader  # noqa: E402


def run(out: Path, epochs: int, resume: bool = False) -> None:
    from minibasis.training import RunFolder, Trainer

    previous = backend.default_dtype
    backend.default_dtype = np.float64  # the Trainer casts batches to the default dtype
    try:
        model = eq.build_model(False, eq.SEED)
        loader = DataLoader(eq.make_data(), eq.GLOBAL_BATCH, shuffle=True, seed=eq.SEED)
        trainer = Trainer(model, eq.make_optimizer(model), loader, epochs=epochs, folder=RunFolder(out, quiet=True),
                          stage="train", seed=0, progress=False)
        trainer.fit(resume=resume)
    finally:
        backend.default_dtype = previous


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    run(args.out, args.epochs, args.resume)
    return 0


if __name__ == "__main__":
    from minibasis import distributed as dist

    sys.exit(dist.finalize(main()))
