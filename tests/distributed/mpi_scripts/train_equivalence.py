"""Data-parallel training of a small CNN, for tests/distributed/test_distributed.py.

Run as ``mpirun -n W python train_equivalence.py --out DIR`` (W must divide GLOBAL_BATCH): every
rank trains two variants (no batch norm; synchronized batch norm) on its 1/W slice of every
global batch and writes ``DIR/rank{r}_{variant}.npz``: its final state_dict, the sample indices
it saw in each epoch, and the global per-epoch loss sums. Rank 0 also writes
``DIR/counts_{variant}.json``: global multiplication counts of the first step.

``reference_run`` (imported by the test, never launched) is the single-process run the
distributed one must reproduce: plain ``DataLoader`` with the global batch, plain ``BatchNorm2d``,
no ``minibasis.distributed`` at all.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

import minibasis
from minibasis import nn, optim
from minibasis.data import DataLoader
from minibasis.functions import cross_entropy

NUM_SAMPLES, NUM_CLASSES, GLOBAL_BATCH, EPOCHS = 24, 5, 8, 2
SEED, LR, MOMENTUM, WEIGHT_DECAY = 7, 0.1, 0.9, 1e-4
VARIANTS = ("plain", "syncbn")


def make_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    images = rng.normal(size=(NUM_SAMPLES, 3, 8, 8))
    labels = rng.integers(0, NUM_CLASSES, size=NUM_SAMPLES)
    return images, labels


def build_model(batch_norm: bool, seed: int) -> nn.Module:
    """Conv-[BN]-ReLU-MaxPool-Conv-[BN]-ReLU-GAP-Linear, in float64."""
    minibasis.manual_seed(seed)
    norm = (lambda c: [nn.BatchNorm2d(c)]) if batch_norm else (lambda c: [])
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *norm(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(4, 6, 3, padding=1), *norm(6), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, NUM_CLASSES))
    for p in model.parameters():
        p.data = p.data.astype(np.float64)
    for module in model.modules():
        for name, array in list(module._buffers.items()):
            module._buffers[name] = array.astype(np.float64)
    return model


def make_optimizer(model):
    return optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)


def forward_backward(model, x, y):
    loss = cross_entropy(model(minibasis.tensor(x)), y)
    loss.backward()
    return float(loss.item())


def reference_run(variant: str) -> dict:
    """One process, global batch: final state, per-epoch loss sums, first-step counts."""
    model = build_model(variant == "syncbn", SEED)
    opt = make_optimizer(model)
    loader = DataLoader(make_data(), GLOBAL_BATCH, shuffle=True, seed=SEED)
    loss_sums, counts = [], None
    for _ in range(EPOCHS):
        total = 0.0
        for step, (x, y) in enumerate(loader):
            opt.zero_grad()
            if counts is None:
                with minibasis.count_mults() as counter:
                    loss = forward_backward(model, x, y)
                counts = counter.as_dict()
            else:
                loss = forward_backward(model, x, y)
            opt.step()
            total += loss * len(y)
        loss_sums.append(total)
    state = {k: minibasis.to_numpy(v) for k, v in model.state_dict().items()}
    return {"state": state, "loss_sums": loss_sums, "counts": counts}


def distributed_run(variant: str, out: Path) -> None:
    from minibasis import distributed as dist

    rank = dist.get_rank()
    # Deliberately different initial weights per rank: broadcast_parameters must fix them.
    model = build_model(variant == "syncbn", SEED if rank == 0 else SEED + 1000 + rank)
    dist.broadcast_parameters(model)
    if variant == "syncbn":
        model = dist.convert_sync_batchnorm(model)
    opt = make_optimizer(model)
    loader = dist.ShardedDataLoader(make_data(), GLOBAL_BATCH, shuffle=True, seed=SEED)
    images = make_data()[0]
    seen, loss_sums, counts = [], [], None
    for epoch in range(EPOCHS):
        total, indices = 0.0, []
        for x, y in loader:
            # Recover which samples this rank got (the data are distinct random floats).
            indices.extend(int(np.flatnonzero((images == xi).all(axis=(1, 2, 3)))[0]) for xi in np.asarray(x))
            opt.zero_grad()
            if counts is None:
                with minibasis.count_mults() as counter:
                    loss = forward_backward(model, x, y)
                counts = dist.global_counts(counter)
            else:
                loss = forward_backward(model, x, y)
            dist.allreduce_gradients(model, bucket_bytes=256)  # tiny buckets: several per step
            opt.step()
            total += loss * len(y)
        seen.append(indices)
        loss_sums.append(dist.allreduce_metrics({"loss_sum": total})["loss_sum"])
    state = {k: minibasis.to_numpy(v) for k, v in model.state_dict().items()}
    np.savez(out / f"rank{rank}_{variant}.npz", seen=np.array(seen), loss_sums=np.array(loss_sums),
             **{f"state/{k}": v for k, v in state.items()})
    if dist.is_main_process():
        (out / f"counts_{variant}.json").write_text(json.dumps(counts))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from minibasis import distributed as dist

    dist.init()
    for variant in VARIANTS:
        distributed_run(variant, args.out)


if __name__ == "__main__":
    main()
