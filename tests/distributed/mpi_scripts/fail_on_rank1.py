"""Rank 1 fails while the other ranks wait in a collective that can never complete.

Mode "raise": rank 1 raises; ``minibasis.distributed``'s excepthook must abort every rank.
Mode "exit": rank 1 ends with ``sys.exit(dist.finalize(3))``, as a CLI verb returning an error
code does; ``finalize`` must abort every rank. Without either, rank 0 would block in
``allreduce_gradients`` forever. Used by tests/distributed/test_distributed.py under a time limit.
"""
import sys

import numpy as np

import minibasis
from minibasis import distributed as dist
from minibasis import nn


def main(mode: str) -> int:
    dist.init()
    model = nn.Linear(4, 2)
    dist.broadcast_parameters(model)
    if dist.get_rank() == 1:
        if mode == "raise":
            raise RuntimeError("deliberate failure on rank 1")
        return 3
    out = model(minibasis.tensor(np.ones((3, 4), dtype=np.float32))).sum()
    out.backward()
    dist.allreduce_gradients(model)  # rank 1 never joins: would hang without the abort
    print("rank", dist.get_rank(), "passed the collective: the abort did not happen", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(dist.finalize(main(sys.argv[1] if len(sys.argv) > 1 else "raise")))
