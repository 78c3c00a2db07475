"""Basis filters for BasisConv: the eigen basis of a trained layer and random orthonormal bases.

Conventions. A convolution weight has shape (M, C, kh, kw): M filters of C×kh×kw.
Each filter is flattened in (C, kh, kw) order -- the rows of ``weight.reshape(M, -1)``,
the same order im2col uses -- into a vector of dimension D = C·kh·kw, and the filter
matrix F (D × M) holds these vectors as columns (:func:`filter_matrix`). A basis is
a D × Q matrix with orthonormal columns; :func:`basis_as_filters` turns it into
Q filters of shape (C, kh, kw).

Everything here is host-side NumPy in float64; callers cast to their dtype.

Section 2.1 of the paper (compressing a trained layer): :func:`eigen_basis`.
Section 2.2 (learning from scratch with a fixed random basis):
:func:`random_orthonormal_basis`, :func:`best_random_basis` and the relative-error
bound :func:`random_basis_error_bounds` with its measured counterpart
:func:`relative_error`.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from minibasis import backend
from minibasis.checks import energy_threshold as check_energy_threshold, positive_int

__all__ = [
    "EigenBasis", "eigen_basis", "energy_ratios", "basis_count", "filter_matrix", "basis_as_filters",
    "random_orthonormal_basis", "filter_correlation", "relative_error",
    "expected_relative_error", "random_basis_error_bounds", "best_random_basis",
]

#: Absolute slack in the energy-threshold test ``ratio >= t - ENERGY_TOLERANCE``.
#: The energy ratios are cumulative sums of D float64 numbers divided by their total,
#: so they carry rounding errors of order D·eps (about 1e-12 for D = 4608); without
#: this slack a threshold that equals a ratio exactly could pick one basis vector too many.
ENERGY_TOLERANCE = 1e-12

#: Tolerance used to check that a basis handed to the error-bound functions is orthonormal.
ORTHONORMAL_TOLERANCE = 1e-6


# ---------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------
def _to_host(array) -> np.ndarray:
    """A host copy/view of a NumPy or CuPy array, or of the array held in ``.data`` by a Tensor/Parameter."""
    if isinstance(array, np.ndarray):
        return array
    held = getattr(array, "data", None)
    # Arrays have a .data of their own (a raw buffer or device pointer, with no shape or
    # dtype); only a wrapper's .data is itself an array.
    if held is not None and hasattr(held, "shape") and hasattr(held, "dtype"):
        array = held
    return backend.to_numpy(array)


def _host_float_array(name: str, array, ndim: int | None = None) -> np.ndarray:
    """``array`` (NumPy, CuPy or a Tensor) as a float64 host array, after checking its dtype."""
    host = _to_host(array)
    if not isinstance(host, np.ndarray):
        host = np.asarray(host)
    if ndim is not None and host.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {host.shape}")
    if not np.issubdtype(host.dtype, np.floating):
        raise ValueError(f"{name} must have a real floating dtype, got {host.dtype}")
    if not np.all(np.isfinite(host)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return host.astype(np.float64)


def _filters_as_rows(filters) -> np.ndarray:
    """An (M, D) float64 matrix from a filter set (M, D) or a weight (M, C, kh, kw)."""
    host = _host_float_array("filters", filters)
    if host.ndim < 2:
        raise ValueError(f"filters must be (M, D) or (M, C, kh, kw), got shape {host.shape}")
    return host.reshape(host.shape[0], -1)


def _check_orthonormal_basis(E, dim: int | None = None) -> np.ndarray:
    E = _host_float_array("E", E, ndim=2)
    d, q = E.shape
    if dim is not None and d != dim:
        raise ValueError(f"basis E must have {dim} rows (the filter dimension D), got shape {E.shape}")
    if q > d:
        raise ValueError(f"basis E of shape {E.shape} has more columns than rows; "
                         "Q orthonormal columns need Q <= D")
    deviation = np.abs(E.T @ E - np.eye(q)).max()
    if deviation > ORTHONORMAL_TOLERANCE:
        raise ValueError(f"basis E must have orthonormal columns (E^T E = I); "
                         f"max |E^T E - I| = {deviation:.3g} > {ORTHONORMAL_TOLERANCE}")
    return E


def _check_correlation(R) -> np.ndarray:
    R = _host_float_array("R", R, ndim=2)
    if R.shape[0] != R.shape[1]:
        raise ValueError(f"correlation R must be square (D, D), got shape {R.shape}")
    scale = np.abs(R).max()
    if np.abs(R - R.T).max() > 1e-10 * max(scale, np.finfo(np.float64).tiny):
        raise ValueError("correlation R must be symmetric")
    if not np.trace(R) > 0:
        raise ValueError(f"correlation R must have a positive trace, got {np.trace(R)!r}")
    return R


# ---------------------------------------------------------------------------
# Layout helpers
# ---------------------------------------------------------------------------
def filter_matrix(weight) -> np.ndarray:
    """F (D, M) float64: the filters of ``weight`` (M, C, kh, kw) as columns, flattened in (C, kh, kw) order."""
    w = _host_float_array("weight", weight, ndim=4)
    return w.reshape(w.shape[0], -1).T


def basis_as_filters(V, in_channels, kh, kw) -> np.ndarray:
    """Reshape a basis V (D, Q) into Q filters (Q, C, kh, kw), the inverse of :func:`filter_matrix`.

    Column j of V becomes filter j; D must equal C·kh·kw. The dtype of V is kept.
    """
    V = _to_host(V)
    if V.ndim != 2:
        raise ValueError(f"V must be 2-D (D, Q), got shape {V.shape}")
    c, kh, kw = (positive_int("in_channels", in_channels), positive_int("kh", kh),
                 positive_int("kw", kw))
    if V.shape[0] != c * kh * kw:
        raise ValueError(f"V has {V.shape[0]} rows but in_channels*kh*kw = {c}*{kh}*{kw} = {c * kh * kw}")
    return np.ascontiguousarray(V.T.reshape(V.shape[1], c, kh, kw))


# ---------------------------------------------------------------------------
# Eigen basis of a trained layer (section 2.1)
# ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class EigenBasis:
    """The truncated eigen decomposition of a convolution weight (M, C, kh, kw).

    Attributes (all float64, fresh arrays owned by this result):
        basis: (Q, C, kh, kw) eigen filters, orthonormal when flattened.
        coeffs: (M, Q) coefficients; ``coeffs @ basis.reshape(Q, -1)`` approximates
            ``weight.reshape(M, -1)`` (exactly, to rounding, when Q = rank).
        eigenvalues: (D,) all eigenvalues of F·Fᵀ, descending, >= 0.
        energy: retained fraction sum(eigenvalues[:Q]) / sum(eigenvalues).
        num_basis: Q.
        rank: numerical rank of F (the number of eigenvalues treated as non-zero).
    """

    basis: np.ndarray
    coeffs: np.ndarray
    eigenvalues: np.ndarray
    energy: float
    num_basis: int
    rank: int

    @property
    def vectors(self) -> np.ndarray:
        """The basis as a (D, Q) matrix with orthonormal columns (V_Q)."""
        return self.basis.reshape(self.num_basis, -1).T

    def reconstruct(self) -> np.ndarray:
        """The approximated weight V_Q·W reshaped to (M, C, kh, kw)."""
        flat = self.coeffs @ self.basis.reshape(self.num_basis, -1)
        return flat.reshape((self.coeffs.shape[0],) + self.basis.shape[1:])


def _singular_value_decomposition(F: np.ndarray):
    try:
        return np.linalg.svd(F, full_matrices=False)
    except np.linalg.LinAlgError:  # pragma: no cover - gesdd rarely fails to converge
        # gesvd is slower but converges in cases where divide-and-conquer does not.
        return scipy.linalg.svd(F, full_matrices=False, lapack_driver="gesvd")


def energy_ratios(eigenvalues) -> np.ndarray:
    """Cumulative energy fractions sum(λ[:q]) / sum(λ) for q = 1..D, of descending eigenvalues (D,).

    Dividing by the last cumulative sum (not a separate sum) makes the final ratio 1.0
    exactly, so any t <= 1 is reached within the D vectors.
    """
    cumulative = np.cumsum(np.asarray(eigenvalues, dtype=np.float64))
    return cumulative / cumulative[-1]


def basis_count(ratios, rank: int, energy_threshold) -> int:
    """Q at threshold t: the smallest count whose energy ratio reaches t, never more than ``rank``.

    ``ratios`` are :func:`energy_ratios`; the test is ``ratio >= t - ENERGY_TOLERANCE``
    (see :data:`ENERGY_TOLERANCE`), so t = 1 keeps exactly the numerical rank.
    """
    q = int(np.searchsorted(ratios, float(energy_threshold) - ENERGY_TOLERANCE, side="left")) + 1
    return min(q, int(rank))


def eigen_basis(weight, energy_threshold=None, num_basis=None) -> EigenBasis:
    """Eigen filters of a trained convolution weight, truncated by energy or by count.

    Args:
        weight: (M, C, kh, kw) real floating array (NumPy, CuPy, or anything with a
            ``.data`` array such as a Tensor/Parameter; it is copied to the host).
        energy_threshold: t in (0, 1]. Q is the smallest count whose energy ratio
            sum(λ[:Q]) / sum(λ) reaches t, compared as ``ratio >= t - ENERGY_TOLERANCE``
            (1e-12, to absorb rounding in the cumulative sums), and never more than the
            numerical rank. t = 1 therefore keeps exactly the numerical rank, and
            the layer is reproduced to rounding.
        num_basis: Q in [1, min(D, M)] directly. Exactly one of the two must be given.

    Returns:
        :class:`EigenBasis` with basis (Q, C, kh, kw), coeffs (M, Q), eigenvalues (D,),
        energy, num_basis and rank, all float64 whatever the input dtype.

    Method. With F (D × M) the filter matrix (:func:`filter_matrix`), the paper takes
    the eigenvectors of the uncentered Gram matrix F·Fᵀ. We compute the thin SVD
    F = U·diag(σ)·Vᵀ instead: F·Fᵀ = U·diag(σ²)·Uᵀ, so the left singular vectors are
    the eigenvectors of F·Fᵀ and σ² its eigenvalues (the remaining D − min(D, M)
    eigenvalues are exactly 0). Forming F·Fᵀ would square the condition number: its
    eigenvalues carry absolute errors of order eps·λ_max, so every λ below that is
    noise and its eigenvector unreliable, while the SVD yields each σ with an error of
    order eps·σ_max, i.e. λ = σ² with error of order eps·σ_max·σ, far below eps·λ_max
    for the small ones. The numerical rank uses the standard singular-value cut
    (as in ``numpy.linalg.matrix_rank``): σ_i > max(D, M)·eps·σ_max, i.e.
    λ_i > (max(D, M)·eps)²·λ_max.

    The coefficients are W = V_Qᵀ·F (Q × M), returned transposed as (M, Q).
    Each basis vector's sign is fixed so that its largest-magnitude entry (the first
    one on ties) is positive, which makes the result deterministic; the sign of the
    matching coefficient column follows, so the product is unchanged.
    """
    if (energy_threshold is None) == (num_basis is None):
        raise ValueError("give exactly one of energy_threshold and num_basis, got "
                         f"energy_threshold={energy_threshold!r}, num_basis={num_basis!r}")
    host = _host_float_array("weight", weight)
    if host.ndim != 4:
        raise ValueError(f"weight must be 4-D (M, C, kh, kw), got shape {host.shape}")
    m, c, kh, kw = host.shape
    if min(host.shape) < 1:
        raise ValueError(f"weight must not be empty, got shape {host.shape}")
    d = c * kh * kw
    F = host.reshape(m, d).T  # (D, M), columns = filters in im2col order

    if energy_threshold is not None:
        check_energy_threshold(energy_threshold)
    else:
        if isinstance(num_basis, bool) or not isinstance(num_basis, numbers.Integral) \
                or not 1 <= num_basis <= min(d, m):
            raise ValueError(f"num_basis must be an integer in [1, min(D, M)] = [1, {min(d, m)}] "
                             f"(D = C*kh*kw = {c}*{kh}*{kw} = {d}, M = {m}), got {num_basis!r}")

    U, sigma, _ = _singular_value_decomposition(F)
    sigma_max = sigma[0] if sigma.size else 0.0
    if not sigma_max > 0.0:
        raise ValueError(f"weight of shape {host.shape} is all zeros: it has no eigen basis")
    rank = int(np.count_nonzero(sigma > max(d, m) * np.finfo(np.float64).eps * sigma_max))

    eigenvalues = np.zeros(d)
    eigenvalues[: sigma.size] = np.maximum(sigma, 0.0) ** 2
    ratios = energy_ratios(eigenvalues)
    q = basis_count(ratios, rank, energy_threshold) if energy_threshold is not None else int(num_basis)

    V = U[:, :q].copy()
    # Deterministic signs: the largest-|.| entry of each column positive.
    pivots = np.argmax(np.abs(V), axis=0)
    signs = np.where(V[pivots, np.arange(q)] < 0, -1.0, 1.0)
    V *= signs
    coeffs = F.T @ V  # (M, Q) = (V_Qᵀ F)ᵀ

    return EigenBasis(
        basis=basis_as_filters(V, c, kh, kw),
        coeffs=coeffs,
        eigenvalues=eigenvalues,
        energy=float(ratios[q - 1]),
        num_basis=q,
        rank=rank,
    )


# ---------------------------------------------------------------------------
# Random bases and the paper's error bound (section 2.2)
# ---------------------------------------------------------------------------
def random_orthonormal_basis(dim, num_basis, seed=None) -> np.ndarray:
    """A Haar-distributed random (dim, num_basis) float64 matrix with orthonormal columns.

    QR of a standard Gaussian matrix G = Q·R, with each column of Q multiplied by the
    sign of the matching diagonal entry of R: that makes the factorization unique and
    the result uniformly (Haar) distributed on the Stiefel manifold, which plain QR
    (whose sign choice depends on LAPACK) is not. ``seed`` is anything
    ``numpy.random.default_rng`` accepts (an int, None, or a Generator, which is advanced);
    the same int seed gives the same basis.
    """
    dim = positive_int("dim", dim)
    num_basis = positive_int("num_basis", num_basis)
    if num_basis > dim:
        raise ValueError(f"num_basis ({num_basis}) must not exceed dim ({dim}): "
                         "there are at most dim orthonormal vectors")
    if not (seed is None or isinstance(seed, (np.random.Generator, np.random.BitGenerator, np.random.SeedSequence))):
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise TypeError(f"seed must be None, a non-negative int or a numpy.random.Generator, got {seed!r}")
        if seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed}")
    rng = np.random.default_rng(seed)
    gaussian = rng.standard_normal((dim, num_basis))
    q, r = np.linalg.qr(gaussian)
    signs = np.sign(np.diag(r))
    signs[signs == 0] = 1.0  # a zero diagonal has probability 0; keep the column as is
    return q * signs


def filter_correlation(filters) -> np.ndarray:
    """Sample correlation R = (1/M)·Σ_i h_i h_iᵀ (D, D), uncentered, of filters (M, D) or (M, C, kh, kw)."""
    H = _filters_as_rows(filters)
    return H.T @ H / H.shape[0]


def relative_error(filters, E) -> float:
    """Measured relative error of representing ``filters`` in the basis E (D, Q).

    Each filter h (a row of ``filters`` (M, D), or a filter of a weight (M, C, kh, kw))
    is replaced by its best approximation E·Eᵀ·h; the result is the pooled ratio
        Σ_i ‖h_i − E Eᵀ h_i‖² / Σ_i ‖h_i‖²,
    the sample estimate of E[ε] / E[‖h‖²] -- the quantity that
    :func:`random_basis_error_bounds` bounds. With R = :func:`filter_correlation` of the
    same filters it equals :func:`expected_relative_error` (R, E) exactly.
    """
    H = _filters_as_rows(filters)
    E = _check_orthonormal_basis(E, dim=H.shape[1])
    total = float(np.sum(H * H))
    if not total > 0:
        raise ValueError("filters are all zeros: the relative error is undefined")
    residual = H - (H @ E) @ E.T
    return float(np.sum(residual * residual)) / total


def expected_relative_error(R, E) -> float:
    """E[ε] / E[‖h‖²] = 1 − tr(Eᵀ R E) / tr(R) for filters with correlation R (D, D) and basis E (D, Q)."""
    R = _check_correlation(R)
    E = _check_orthonormal_basis(E, dim=R.shape[0])
    return 1.0 - float(np.trace(E.T @ R @ E)) / float(np.trace(R))


def random_basis_error_bounds(R, E) -> tuple[float, float]:
    """The paper's bounds (lower, upper) on the relative error of a basis E (D, Q).

    Derivation (section 2.2). Let h be a random ideal filter with correlation
    R = E[h hᵀ] (D, D), and E (D, Q) have orthonormal columns. The least-squares
    weights are w = Eᵀh, and since E Eᵀ is an orthogonal projector the error is
        ε = ‖h − E Eᵀ h‖² = ‖h‖² − ‖Eᵀ h‖² = hᵀh − hᵀ E Eᵀ h.
    Taking expectations, E[hᵀh] = tr(R) and E[hᵀ E Eᵀ h] = tr(Eᵀ R E). The Q×Q matrix
    Eᵀ R E is symmetric positive semi-definite, so its trace, the sum of its Q
    eigenvalues, lies in [Q·λ_min, Q·λ_max] with λ_min, λ_max its extreme eigenvalues.
    Hence the relative error E[ε] / E[‖h‖²] = 1 − tr(Eᵀ R E)/tr(R) satisfies
        1 − Q·λ_max / tr(R)  <=  E[ε] / tr(R)  <=  1 − Q·λ_min / tr(R).
    What is bounded is this ratio of expectations (the pooled error of
    :func:`relative_error`), not the mean of per-filter ratios. As the paper says, a
    large λ_min lowers the upper bound and a large λ_max lowers the lower bound.
    The lower bound is clipped at 0 (the error cannot be negative; with λ_max > tr(R)/Q
    the raw expression would be). The trace itself is exact -- see
    :func:`expected_relative_error`; the bounds describe the spread the paper reasons with.
    """
    R = _check_correlation(R)
    E = _check_orthonormal_basis(E, dim=R.shape[0])
    q = E.shape[1]
    projected = E.T @ R @ E
    eigenvalues = np.linalg.eigvalsh((projected + projected.T) / 2)  # ascending
    trace_r = float(np.trace(R))
    lower = max(0.0, 1.0 - q * float(eigenvalues[-1]) / trace_r)
    upper = 1.0 - q * float(eigenvalues[0]) / trace_r
    return lower, upper


def best_random_basis(dim, num_basis, R=None, candidates=8, seed=None) -> np.ndarray:
    """The best of ``candidates`` random orthonormal bases (dim, num_basis) under the paper's bound.

    Candidates are drawn one after another from ``numpy.random.default_rng(seed)`` with
    :func:`random_orthonormal_basis`, so the first candidate equals
    ``random_orthonormal_basis(dim, num_basis, seed)`` for an int seed.

    Criterion: the candidate with the smallest upper bound of
    :func:`random_basis_error_bounds` (the largest λ_min of Eᵀ R E), ties broken by
    the smallest lower bound (the largest λ_max), then by draw order. Without R
    (no knowledge of the filters) R is taken as the identity: then Eᵀ R E = I for
    every candidate, all tie, and the first candidate is returned.
    """
    dim = positive_int("dim", dim)
    num_basis = positive_int("num_basis", num_basis)
    candidates = positive_int("candidates", candidates)
    if num_basis > dim:
        raise ValueError(f"num_basis ({num_basis}) must not exceed dim ({dim})")
    if R is not None:
        R = _check_correlation(R)
        if R.shape[0] != dim:
            raise ValueError(f"R must be ({dim}, {dim}) for dim={dim}, got shape {R.shape}")
    rng = np.random.default_rng(seed)
    if R is None:
        # Every candidate ties under R = I, so drawing the others would only waste time.
        return random_orthonormal_basis(dim, num_basis, seed=rng)
    best, best_key = None, None
    for _ in range(candidates):
        E = random_orthonormal_basis(dim, num_basis, seed=rng)
        lower, upper = random_basis_error_bounds(R, E)
        key = (upper, lower)
        if best_key is None or key < best_key:
            best, best_key = E, key
    return best
