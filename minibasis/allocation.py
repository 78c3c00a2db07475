"""Choosing Q per layer under a multiplication budget: the paper's uniform threshold, or greedy.

:func:`minibasis.compress` with ``target_mult_ratio=R`` asks for the compressed model whose
whole-model conv multiplications per image are at most R times the original's. This module
makes the choice; ``compress`` measures what it needs (each layer's cost as a conv, and as a
BasisConv at Q = 1 and Q = 2, by running the model under :func:`minibasis.count_mults`), builds
the chosen model and measures it again: a plan is accepted only when that final measurement
meets the budget, otherwise the next plan of the sequence is tried.

* ``uniform`` (the paper's): one energy threshold t for every layer; the largest t whose
  measured ratio fits. The candidates are the given grid, or else every distinct t at which
  some layer's Q changes (the energy ratios of its eigen spectrum), so "largest" is exact.
* ``greedy``: start from the original network (every conv kept, t = 1 in effect) and repeatedly
  drop the basis vector with the smallest *normalized eigenvalue per multiplication saved*,
  λ_q / Σλ (the layer's share of energy lost) divided by the measured multiplications that vector
  costs, until the budget is met. A layer stays a plain conv while that is cheaper than its basis
  at every Q it could keep. Dropping vectors from Q = min(D, M) saves nothing until the BasisConv
  becomes cheaper than the conv, so one vector at a time would never leave the conv (a few
  vectors of tiny energy, scored against almost no saving); the first move on a layer is
  therefore one step from the conv to the Q, among 1 .. min(rank, the largest Q whose BasisConv
  costs fewer multiplications than the conv), whose dropped vectors have the smallest summed
  normalized eigenvalue per multiplication saved (the lower convex hull of the layer's
  energy-against-multiplications curve), and that step is scored by that ratio. After it, one
  vector at a time. Ties go to the layer first in module order. Each layer's normalized
  eigenvalues decrease, so per layer the scores only grow: greedy spends the budget on the
  layers whose spectrum falls fastest.

The objective both are judged by is the sum over the layers considered of the energy fraction
kept (1 for a conv kept as it is); greedy takes the cheapest energy first, uniform keeps the same
fraction everywhere.

* ``sensitivity`` (data-driven): greedy's moves, scored by *measured loss* instead of energy. On a
  calibration set (a few hundred training images), each compressible conv alone is replaced by its
  eigen BasisConv at a grid of Q (:data:`SENSITIVITY_THRESHOLDS`' counts, 1 and the rank) and the
  cross-entropy increase over the original's, Δ(Q) ≥ 0, is measured (Δ(rank) = 0: t = 1 is exact).
  Between grid points Δ is interpolated linearly and made non-increasing in Q; the loss a vector
  adds when dropped, Δ(q − 1) − Δ(q), takes the place of its normalized eigenvalue
  (:func:`sensitivity_shares`). Layers are measured one at a time, so the criterion assumes their
  losses add; the final model is measured like any other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from minibasis import formulas
from minibasis.basis import basis_count

__all__ = ["ALLOCATIONS", "BudgetError", "LayerCosts", "minimum_mults", "uniform_plans", "greedy_plans",
           "plan_mults", "SENSITIVITY_THRESHOLDS", "sensitivity_grid", "sensitivity_shares"]

ALLOCATIONS = ("uniform", "greedy", "sensitivity")

#: The energy thresholds whose Q (with 1 and the rank) the sensitivity allocation measures per layer.
SENSITIVITY_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99)

#: A plan maps each compressible conv's module path to Q (replace by a BasisConv with Q
#: eigen filters) or to None (keep the conv).
Plan = dict


class BudgetError(ValueError):
    """A multiplication budget that no allocation (or no threshold of the given grid) can meet."""


@dataclass(frozen=True)
class LayerCosts:
    """One compressible conv: its eigen spectrum and its measured multiplications per image.

    ``ratios``: cumulative energy fractions (:func:`minibasis.basis.energy_ratios`, shape (D,));
    ``shares``: each eigenvalue over the layer's total, λ_q / Σλ (D,), descending;
    ``conv_mults``: the layer as a conv; ``basis_mults(q) = basis_fixed + q · per_vector``, the
    two constants measured from the BasisConv at Q = 1 and Q = 2.
    """

    path: str
    M: int
    C: int
    kernel: tuple[int, int]
    ratios: np.ndarray
    shares: np.ndarray
    rank: int
    conv_mults: int
    basis_fixed: int
    per_vector: int

    @property
    def max_q(self) -> int:
        return min(self.M, len(self.ratios))

    def basis_mults(self, q: int) -> int:
        return self.basis_fixed + q * self.per_vector

    def mults(self, q: int | None) -> int:
        """Multiplications per image with Q = q, or as the conv (q None)."""
        return self.conv_mults if q is None else self.basis_mults(q)

    def energy(self, q: int | None) -> float:
        """Energy fraction kept: 1 for the conv, sum(λ[:q]) / sum(λ) for a basis of q."""
        return 1.0 if q is None else float(self.ratios[q - 1])

    def profitable(self, q: int) -> bool:
        """The paper's rule, as :func:`minibasis.compress` applies it: Q/M + Q/D < 1."""
        return formulas.mult_ratio(self.M, q, self.C, self.kernel) < 1


def plan_mults(layers: list[LayerCosts], plan: Plan, other_mults: int) -> int:
    """The multiplications a plan is expected to cost: ``other_mults`` (every conv op outside the
    compressible layers, measured) plus each layer's measured cost at its Q."""
    return other_mults + sum(layer.mults(plan[layer.path]) for layer in layers)


def minimum_mults(layers: list[LayerCosts], other_mults: int, skip_unprofitable: bool) -> int:
    """The fewest multiplications any allocation reaches: every layer at Q = 1 (or kept as a
    conv where even that costs more and ``skip_unprofitable`` allows keeping it)."""
    return other_mults + sum(min(layer.conv_mults, layer.basis_mults(1)) if skip_unprofitable
                             else layer.basis_mults(1) for layer in layers)


def _fits(mults: int, before: int, target: float) -> bool:
    return mults / before <= target


def uniform_plans(layers: list[LayerCosts], other_mults: int, before: int, target: float,
                  skip_unprofitable: bool, thresholds=None) -> Iterator[tuple[float, Plan]]:
    """(t, plan) for every candidate threshold whose expected cost fits, largest t first.

    Candidates: ``thresholds`` (a grid), or every distinct energy ratio of every layer up to its
    rank (the values of t at which some layer's Q changes), plus 1.0. Q per layer is
    :func:`minibasis.basis.basis_count` (as :func:`~minibasis.basis.eigen_basis` picks it); a
    layer is kept as a conv where ``skip_unprofitable`` and Q/M + Q/D ≥ 1.
    """
    if thresholds is None:
        values = {1.0}
        for layer in layers:
            values.update(float(r) for r in layer.ratios[:layer.rank])
        thresholds = values
    for t in sorted(set(float(t) for t in thresholds), reverse=True):
        plan = {}
        for layer in layers:
            q = basis_count(layer.ratios, layer.rank, t)
            plan[layer.path] = q if not skip_unprofitable or layer.profitable(q) else None
        if _fits(plan_mults(layers, plan, other_mults), before, target):
            yield t, plan


def _first_move(layer: LayerCosts) -> tuple[float, int] | None:
    """(score, Q) of leaving the conv for a BasisConv, or None when no Q is cheaper than the conv.

    Q ranges over 1 .. min(rank, the largest Q cheaper than the conv); the one whose dropped
    vectors have the smallest summed share per multiplication saved wins (the larger Q on ties).
    """
    cheaper = [q for q in range(1, min(layer.max_q, layer.rank) + 1) if layer.basis_mults(q) < layer.conv_mults]
    if not cheaper:
        return None
    lost_beyond = np.cumsum(layer.shares[::-1])[::-1]   # lost_beyond[q] = sum of shares[q:]
    scored = [(float(lost_beyond[q]) / (layer.conv_mults - layer.basis_mults(q)), -q) for q in cheaper]
    score, minus_q = min(scored)
    return score, -minus_q


def _next_move(layer: LayerCosts, q: int | None) -> tuple[float, int] | None:
    """(score, new Q) of this layer's next drop, or None when it has none left."""
    if q is None:
        return _first_move(layer)
    if q <= 1 or layer.per_vector <= 0:
        return None
    return float(layer.shares[q - 1]) / layer.per_vector, q - 1


def greedy_plans(layers: list[LayerCosts], other_mults: int, before: int, target: float,
                 skip_unprofitable: bool) -> Iterator[Plan]:
    """Plans of the greedy sequence whose expected cost fits: the first one, then one per further drop.

    The start is every layer kept as a conv (``skip_unprofitable``) or at Q = rank (t = 1,
    ``skip_unprofitable=False``: every layer replaced); each step applies the move with the
    smallest score (module order on ties) described in the module docstring. The caller takes
    the first plan whose *measured* cost fits; the later ones exist for when it does not.
    """
    plan: Plan = {layer.path: None if skip_unprofitable else layer.rank for layer in layers}
    moves = {layer.path: _next_move(layer, plan[layer.path]) for layer in layers}
    mults = plan_mults(layers, plan, other_mults)
    while True:
        if _fits(mults, before, target):
            yield dict(plan)
        candidates = [(moves[layer.path][0], index, layer) for index, layer in enumerate(layers)
                      if moves[layer.path] is not None]
        if not candidates:
            return
        _, _, layer = min(candidates, key=lambda c: (c[0], c[1]))
        old_q, new_q = plan[layer.path], moves[layer.path][1]
        mults += layer.mults(new_q) - layer.mults(old_q)
        plan[layer.path] = new_q
        moves[layer.path] = _next_move(layer, new_q)


def sensitivity_grid(layer: LayerCosts) -> list[int]:
    """The Q < rank at which the sensitivity allocation measures ``layer``'s loss (ascending)."""
    qs = {1} | {basis_count(layer.ratios, layer.rank, t) for t in SENSITIVITY_THRESHOLDS}
    return sorted(q for q in qs if q < layer.rank)


def sensitivity_shares(layer: LayerCosts, measured: dict[int, float]) -> np.ndarray:
    """Per-vector loss increases (D,) from the measured Δ(Q) (``measured``: Q → loss increase).

    Δ(rank) = 0 and Δ(Q) = 0 for Q ≥ rank; between measured points Δ is linear in Q, then made
    non-increasing (a larger basis never scores as losing more). Entry j (0-based) is
    Δ(j) − Δ(j + 1), the loss of going from Q = j + 1 to Q = j, so that the sum of the entries from
    q on equals Δ(q), as the normalized eigenvalues sum to the energy lost; entry 0 (Q = 0 does
    not exist) is 0. Negative measurements (a replaced layer that happened to lower the loss) count as 0.
    """
    dim = len(layer.ratios)
    points = {q: max(0.0, float(v)) for q, v in measured.items() if 1 <= q < layer.rank}
    points[layer.rank] = 0.0
    qs = sorted(points)
    delta = np.zeros(dim + 1)  # delta[q] for q = 0 .. D
    delta[1:layer.rank + 1] = np.interp(np.arange(1, layer.rank + 1), qs, [points[q] for q in qs])
    delta[1:] = np.maximum.accumulate(delta[1:][::-1])[::-1]  # non-increasing in Q
    shares = np.zeros(dim)
    shares[1:] = delta[1:dim] - delta[2:dim + 1]
    return shares
