"""minibasis.basis: eigen basis (section 2.1) and random bases with the paper's error bound (section 2.2).

References are computed independently: filter vectors stacked by hand, eigenvalues by
numpy.linalg.eigvalsh of F·Fᵀ, energies by cumulative sums of those.
"""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minibasis import basis as mb

seeds = st.integers(0, 2**32 - 1)
layer_shapes = st.tuples(st.integers(1, 12), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3))


def reference_filter_matrix(weight):
    """F (D, M): one column per filter, entries in (C, kh, kw) order, built element by element."""
    m, c, kh, kw = weight.shape
    F = np.empty((c * kh * kw, m))
    for f in range(m):
        row = 0
        for ch in range(c):
            for i in range(kh):
                for j in range(kw):
                    F[row, f] = weight[f, ch, i, j]
                    row += 1
    return F


def reference_eigenvalues(weight):
    F = reference_filter_matrix(np.asarray(weight, dtype=np.float64))
    return np.clip(np.linalg.eigvalsh(F @ F.T)[::-1], 0.0, None)


def random_weight(shape, seed, rank=None):
    """A weight (M, C, kh, kw); with ``rank``, the product of (M, rank) and (rank, D) Gaussians."""
    rng = np.random.default_rng(seed)
    m, c, kh, kw = shape
    if rank is None:
        return rng.standard_normal(shape)
    return (rng.standard_normal((m, rank)) @ rng.standard_normal((rank, c * kh * kw))).reshape(shape)


def flat_basis(result):
    return result.basis.reshape(result.num_basis, -1)


# ---------------------------------------------------------------------------
# Eigen basis
# ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(shape=layer_shapes, seed=seeds, t=st.floats(0.01, 1.0))
def test_threshold_picks_the_smallest_q_reaching_t(shape, seed, t):
    weight = random_weight(shape, seed)
    m, c, kh, kw = shape
    result = mb.eigen_basis(weight, energy_threshold=t)
    lam = reference_eigenvalues(weight)
    ratios = np.cumsum(lam) / lam.sum()
    q = result.num_basis
    assert 1 <= q <= min(c * kh * kw, m)
    assert ratios[q - 1] >= t - 1e-9
    if q > 1:
        assert ratios[q - 2] < t + 1e-9
    assert result.energy == pytest.approx(ratios[q - 1], abs=1e-12)
    assert result.basis.shape == (q, c, kh, kw)
    assert result.coeffs.shape == (m, q)


@settings(max_examples=40, deadline=None)
@given(shape=layer_shapes, seed=seeds, t=st.floats(0.05, 1.0), low_rank=st.booleans())
def test_reconstruction_error_is_the_sum_of_discarded_eigenvalues(shape, seed, t, low_rank):
    m, c, kh, kw = shape
    rank = max(1, min(m, c * kh * kw) // 2) if low_rank else None
    weight = random_weight(shape, seed, rank)
    result = mb.eigen_basis(weight, energy_threshold=t)
    lam = reference_eigenvalues(weight)
    reconstruction = (result.coeffs @ flat_basis(result)).reshape(shape)
    error = np.sum((reconstruction - weight) ** 2)
    discarded = lam[result.num_basis:].sum()
    assert abs(error - discarded) <= 1e-9 * max(discarded, 0.0) + 1e-12 * lam.sum()
    np.testing.assert_allclose(result.reconstruct(), reconstruction, rtol=0, atol=1e-12 * np.abs(weight).max())


@settings(max_examples=40, deadline=None)
@given(shape=layer_shapes, seed=seeds, data=st.data())
def test_threshold_one_reproduces_the_layer_and_keeps_the_rank(shape, seed, data):
    m, c, kh, kw = shape
    d = c * kh * kw
    rank = data.draw(st.integers(1, min(m, d)), label="rank")
    weight = random_weight(shape, seed, rank)
    result = mb.eigen_basis(weight, energy_threshold=1.0)
    assert result.rank == rank == result.num_basis
    assert result.energy == pytest.approx(1.0, abs=1e-12)
    relative = np.linalg.norm(result.reconstruct() - weight) / np.linalg.norm(weight)
    assert relative <= 1e-10


@pytest.mark.parametrize("shape", [(4, 3, 3, 3), (64, 2, 2, 2), (10, 1, 1, 1), (1, 2, 3, 3)])
def test_threshold_one_exact_for_both_sides_of_d_versus_m(shape):
    # (4, 3, 3, 3): D = 27 > M; (64, 2, 2, 2): D = 8 < M; D = 1; M = 1.
    weight = random_weight(shape, 7)
    result = mb.eigen_basis(weight, energy_threshold=1.0)
    assert result.num_basis == min(shape[0], int(np.prod(shape[1:])))
    np.testing.assert_allclose(result.reconstruct(), weight, rtol=0, atol=1e-12 * np.abs(weight).max())


@settings(max_examples=30, deadline=None)
@given(shape=layer_shapes, seed=seeds, dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_eigenvalues_match_eigvalsh_and_basis_is_orthonormal(shape, seed, dtype):
    weight = random_weight(shape, seed).astype(dtype)
    m, c, kh, kw = shape
    d = c * kh * kw
    result = mb.eigen_basis(weight, num_basis=min(d, m))
    lam = reference_eigenvalues(weight)
    assert result.eigenvalues.dtype == np.float64 and result.eigenvalues.shape == (d,)
    assert np.all(result.eigenvalues >= 0) and np.all(np.diff(result.eigenvalues) <= 0)
    np.testing.assert_allclose(result.eigenvalues, lam, rtol=1e-10, atol=1e-12 * lam[0])
    for array in (result.basis, result.coeffs):
        assert array.dtype == np.float64
    V = reference_filter_matrix(result.basis)  # (D, Q): the basis filters flattened by hand
    np.testing.assert_allclose(V.T @ V, np.eye(result.num_basis), atol=1e-12)
    # Each basis vector is an eigenvector of F·Fᵀ with its eigenvalue.
    F = reference_filter_matrix(weight.astype(np.float64))
    np.testing.assert_allclose(F @ F.T @ V, V * result.eigenvalues[: result.num_basis],
                               atol=1e-9 * lam[0])
    # Coefficients are the projections W = V_Qᵀ F, stored transposed.
    np.testing.assert_allclose(result.coeffs, (V.T @ F).T, atol=1e-12 * np.abs(F).max() * d)


@settings(max_examples=30, deadline=None)
@given(shape=layer_shapes, seed=seeds)
def test_deterministic_with_sign_convention(shape, seed):
    weight = random_weight(shape, seed)
    first = mb.eigen_basis(weight, energy_threshold=0.9)
    second = mb.eigen_basis(weight.copy(), energy_threshold=0.9)
    np.testing.assert_array_equal(first.basis, second.basis)
    np.testing.assert_array_equal(first.coeffs, second.coeffs)
    for vector in flat_basis(first):
        assert vector[np.argmax(np.abs(vector))] > 0
    # Flipping the sign of the weight flips the coefficients, not the basis.
    flipped = mb.eigen_basis(-weight, energy_threshold=0.9)
    np.testing.assert_allclose(flipped.basis, first.basis, atol=1e-10)
    np.testing.assert_allclose(flipped.coeffs, -first.coeffs, atol=1e-10)


def test_known_decomposition_by_hand():
    # Two 1x1x2 filters (D = 2, M = 2): F = [[3, 0], [0, 1]] -> F Fᵀ = diag(9, 1).
    weight = np.array([[[[3.0]], [[0.0]]], [[[0.0]], [[1.0]]]])
    result = mb.eigen_basis(weight, energy_threshold=0.9)
    assert result.num_basis == 1 and result.energy == pytest.approx(0.9)
    np.testing.assert_allclose(result.eigenvalues, [9.0, 1.0])
    np.testing.assert_allclose(result.basis.reshape(-1), [1.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(result.coeffs, [[3.0], [0.0]], atol=1e-15)
    # A threshold just above 0.9 needs the second vector.
    assert mb.eigen_basis(weight, energy_threshold=0.9 + 1e-6).num_basis == 2


def test_threshold_equal_to_an_exact_ratio_survives_rounding():
    # Eigenvalues 0.2, 0.1, 0.1: the ratios are exactly 1/2 and 3/4, but in floating point
    # they come out a hair below (0.49999999999999994); t = 0.5 must still stop at Q = 1.
    weight = np.zeros((3, 3, 1, 1))
    weight[[0, 1, 2], [0, 1, 2], 0, 0] = np.sqrt([0.2, 0.1, 0.1])
    assert mb.eigen_basis(weight, energy_threshold=0.5).num_basis == 1
    assert mb.eigen_basis(weight, energy_threshold=0.75).num_basis == 2
    assert mb.eigen_basis(weight, energy_threshold=0.5 + 1e-6).num_basis == 2


def test_accepts_objects_holding_a_data_array():
    class Holder:  # stands in for a Tensor / Parameter
        def __init__(self, data):
            self.data = data

    weight = random_weight((6, 2, 3, 3), 3).astype(np.float32)
    via_holder = mb.eigen_basis(Holder(weight), num_basis=4)
    direct = mb.eigen_basis(weight, num_basis=4)
    np.testing.assert_array_equal(via_holder.coeffs, direct.coeffs)


def test_filter_matrix_and_basis_as_filters_follow_the_im2col_order():
    weight = random_weight((5, 3, 2, 4), 11)
    F = mb.filter_matrix(weight)
    np.testing.assert_array_equal(F, reference_filter_matrix(weight))
    np.testing.assert_array_equal(mb.basis_as_filters(F, 3, 2, 4), weight)
    with pytest.raises(ValueError, match=r"V has 24 rows but in_channels\*kh\*kw = 3\*3\*3 = 27"):
        mb.basis_as_filters(F, 3, 3, 3)


@pytest.mark.parametrize("kwargs, message", [
    (dict(energy_threshold=0.0), r"energy_threshold must be in \(0, 1\], got 0.0"),
    (dict(energy_threshold=1.5), r"energy_threshold must be in \(0, 1\], got 1.5"),
    (dict(energy_threshold=-0.2), r"energy_threshold must be in \(0, 1\], got -0.2"),
    (dict(energy_threshold=float("nan")), r"energy_threshold must be in \(0, 1\], got nan"),
    (dict(), "give exactly one of energy_threshold and num_basis, got energy_threshold=None, num_basis=None"),
    (dict(energy_threshold=0.9, num_basis=2), "got energy_threshold=0.9, num_basis=2"),
    (dict(num_basis=0), r"num_basis must be an integer in \[1, min\(D, M\)\] = \[1, 6\].*got 0"),
    (dict(num_basis=7), r"D = C\*kh\*kw = 2\*2\*2 = 8, M = 6\), got 7"),
    (dict(num_basis=2.0), r"got 2.0"),
])
def test_bad_arguments(kwargs, message):
    weight = random_weight((6, 2, 2, 2), 0)
    with pytest.raises(ValueError, match=message):
        mb.eigen_basis(weight, **kwargs)


@pytest.mark.parametrize("weight, message", [
    (np.ones((4, 9)), r"weight must be 4-D \(M, C, kh, kw\), got shape \(4, 9\)"),
    (np.ones((4, 1, 3, 3, 1)), r"got shape \(4, 1, 3, 3, 1\)"),
    (np.ones((4, 1, 3, 3), dtype=np.int64), "weight must have a real floating dtype, got int64"),
    (np.ones((4, 1, 3, 3), dtype=np.complex128), "got complex128"),
    (np.zeros((4, 1, 3, 3)), r"weight of shape \(4, 1, 3, 3\) is all zeros"),
    (np.full((4, 1, 3, 3), np.nan), "NaN or infinite"),
])
def test_bad_weights(weight, message):
    with pytest.raises(ValueError, match=message):
        mb.eigen_basis(weight, energy_threshold=0.9)


# ---------------------------------------------------------------------------
# Random bases and the error bound
# ---------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(dim=st.integers(1, 60), data=st.data(), seed=seeds)
def test_random_basis_orthonormal_and_deterministic(dim, data, seed):
    q = data.draw(st.integers(1, dim), label="num_basis")
    E = mb.random_orthonormal_basis(dim, q, seed=seed)
    assert E.shape == (dim, q) and E.dtype == np.float64
    np.testing.assert_allclose(E.T @ E, np.eye(q), atol=1e-6)
    np.testing.assert_array_equal(E, mb.random_orthonormal_basis(dim, q, seed=seed))
    # The sign fix makes Eᵀ G upper triangular with a positive diagonal, G the Gaussian draw.
    G = np.random.default_rng(seed).standard_normal((dim, q))
    assert np.all(np.diag(E.T @ G) > 0)


def test_different_seeds_give_different_bases():
    assert not np.allclose(mb.random_orthonormal_basis(20, 5, seed=1), mb.random_orthonormal_basis(20, 5, seed=2))


def test_random_basis_is_isotropic():
    # Haar: every column is uniform on the sphere, so E[x] = 0 and E[E Eᵀ] = (Q/D) I.
    # (Plain QR without the sign fix fails the first check: LAPACK fixes the sign of R.)
    dim, q, draws = 6, 2, 600
    bases = np.stack([mb.random_orthonormal_basis(dim, q, seed=s) for s in range(draws)])
    standard_error = np.sqrt(1.0 / dim / draws)
    assert np.abs(bases.mean(axis=0)).max() < 5 * standard_error
    projector_mean = np.einsum("nij,nkj->ik", bases, bases) / draws
    np.testing.assert_allclose(projector_mean, (q / dim) * np.eye(dim), atol=0.06)


def test_error_bounds_by_hand():
    # R = diag(4, 3, 2, 1), E = first two axes: Eᵀ R E = diag(4, 3), tr R = 10, Q = 2.
    R = np.diag([4.0, 3.0, 2.0, 1.0])
    E = np.eye(4)[:, :2]
    lower, upper = mb.random_basis_error_bounds(R, E)
    assert lower == pytest.approx(1 - 2 * 4 / 10)
    assert upper == pytest.approx(1 - 2 * 3 / 10)
    assert mb.expected_relative_error(R, E) == pytest.approx(1 - 7 / 10)


@settings(max_examples=40, deadline=None)
@given(m=st.integers(1, 30), d=st.integers(1, 20), data=st.data(), seed=seeds)
def test_bound_holds_for_any_filter_set_with_its_sample_correlation(m, d, data, seed):
    q = data.draw(st.integers(1, d), label="num_basis")
    rng = np.random.default_rng(seed)
    filters = rng.standard_normal((m, d)) * rng.uniform(0.1, 3.0, size=d)
    E = mb.random_orthonormal_basis(d, q, seed=rng)
    R = mb.filter_correlation(filters)
    np.testing.assert_allclose(R, sum(np.outer(h, h) for h in filters) / m, rtol=1e-12, atol=1e-12)
    # Measured pooled error, computed here filter by filter.
    residuals = [h - E @ (E.T @ h) for h in filters]
    measured = sum(r @ r for r in residuals) / sum(h @ h for h in filters)
    assert mb.relative_error(filters, E) == pytest.approx(measured, rel=1e-10, abs=1e-12)
    lower, upper = mb.random_basis_error_bounds(R, E)
    assert lower - 1e-10 <= measured <= upper + 1e-10
    assert mb.expected_relative_error(R, E) == pytest.approx(measured, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bound_holds_for_correlated_gaussian_filters(seed):
    # Filters h = L z with R = L Lᵀ having a decaying spectrum, in a random orientation.
    d, q, samples = 16, 4, 20_000
    rng = np.random.default_rng(seed)
    orientation = mb.random_orthonormal_basis(d, d, seed=rng)
    spectrum = 0.7 ** np.arange(d)
    R = orientation @ np.diag(spectrum) @ orientation.T
    L = orientation * np.sqrt(spectrum)
    filters = rng.standard_normal((samples, d)) @ L.T
    E = mb.random_orthonormal_basis(d, q, seed=rng)
    lower, upper = mb.random_basis_error_bounds(R, E)
    expected = 1 - np.trace(E.T @ R @ E) / np.trace(R)
    measured = mb.relative_error(filters, E)
    assert measured == pytest.approx(expected, abs=0.02)  # law of large numbers
    assert lower < measured < upper
    # The bounds are not vacuous here: each side leaves room around the measurement.
    assert upper - lower > 0.05


@settings(max_examples=20, deadline=None)
@given(seed=seeds, candidates=st.integers(1, 6))
def test_best_random_basis_minimizes_the_upper_bound(seed, candidates):
    d, q = 10, 3
    spectrum = 0.6 ** np.arange(d)
    R = np.diag(spectrum)
    best = mb.best_random_basis(d, q, R=R, candidates=candidates, seed=seed)
    rng = np.random.default_rng(seed)
    drawn = [mb.random_orthonormal_basis(d, q, seed=rng) for _ in range(candidates)]
    # Upper bound recomputed here from the smallest eigenvalue of Eᵀ R E.
    uppers = [1 - q * np.linalg.eigvalsh(E.T @ R @ E)[0] / spectrum.sum() for E in drawn]
    np.testing.assert_array_equal(best, drawn[int(np.argmin(uppers))])
    assert mb.random_basis_error_bounds(R, best)[1] <= mb.random_basis_error_bounds(R, drawn[0])[1]


def test_best_random_basis_without_correlation_is_the_first_draw():
    np.testing.assert_array_equal(mb.best_random_basis(12, 4, seed=5), mb.random_orthonormal_basis(12, 4, seed=5))


@pytest.mark.parametrize("call, message", [
    (lambda: mb.random_orthonormal_basis(4, 5), r"num_basis \(5\) must not exceed dim \(4\)"),
    (lambda: mb.random_orthonormal_basis(0, 1), "dim must be a positive integer, got 0"),
    (lambda: mb.best_random_basis(6, 2, candidates=0), "candidates must be a positive integer, got 0"),
    (lambda: mb.best_random_basis(6, 2, R=np.eye(5)), r"R must be \(6, 6\) for dim=6, got shape \(5, 5\)"),
    (lambda: mb.random_basis_error_bounds(np.eye(4), np.ones((4, 2))), "orthonormal columns"),
    (lambda: mb.random_basis_error_bounds(np.eye(4), np.eye(5)[:, :2]), r"must have 4 rows .* got shape \(5, 2\)"),
    (lambda: mb.random_basis_error_bounds(np.triu(np.ones((3, 3))), np.eye(3)[:, :1]), "symmetric"),
    (lambda: mb.random_basis_error_bounds(np.zeros((3, 3)), np.eye(3)[:, :1]), "positive trace"),
    (lambda: mb.relative_error(np.zeros((3, 4)), np.eye(4)[:, :2]), "all zeros"),
    (lambda: mb.relative_error(np.ones(4), np.eye(4)[:, :2]), r"filters must be \(M, D\)"),
])
def test_bad_arguments_for_random_bases(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.gpu
def test_cupy_weight_gives_the_same_host_result():
    cupy = pytest.importorskip("cupy")
    import minibasis

    try:
        minibasis.use("cupy")
    except RuntimeError as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    weight = random_weight((8, 3, 3, 3), 4).astype(np.float32)
    on_device = mb.eigen_basis(cupy.asarray(weight), energy_threshold=0.8)
    on_host = mb.eigen_basis(weight, energy_threshold=0.8)
    assert isinstance(on_device.basis, np.ndarray) and isinstance(on_device.coeffs, np.ndarray)
    np.testing.assert_array_equal(on_device.coeffs, on_host.coeffs)
