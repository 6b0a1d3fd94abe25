"""Tests for ttserve.selection: exact greedy SIFT, nearest neighbours and adaptive stopping.

The reference below recomputes the posterior variance of every candidate at every step with a
direct linear solve, independently of the rank-1 updates that ttserve.selection uses.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from ttserve.selection import Selection, nearest_neighbors, posterior_variances, sift


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def random_problem(seed: int, K: int, d: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    candidates = unit(rng.standard_normal((K, d)))
    query = unit(rng.standard_normal((m, d)))
    return candidates, query


# --- brute-force reference -------------------------------------------------------------------


def brute_variance(candidates, query, picks, lam) -> float:
    """Σ_j q_j·q_j − k_jᵀ (X Xᵀ + λI)⁻¹ k_j for the multiset of rows `picks`."""
    C = np.asarray(candidates, dtype=np.float64)
    Q = np.atleast_2d(np.asarray(query, dtype=np.float64))
    prior = float((Q * Q).sum())
    if len(picks) == 0:
        return prior
    X = C[list(picks)]
    k = X @ Q.T
    return prior - float((k * np.linalg.solve(X @ X.T + lam * np.eye(len(X)), k)).sum())


def brute_trajectory(candidates, query, picks, lam) -> np.ndarray:
    picks = list(picks)
    return np.array([brute_variance(candidates, query, picks[:t], lam) for t in range(len(picks) + 1)])


def brute_objectives(candidates, query, prefix, lam) -> np.ndarray:
    """The summed posterior variance after adding each candidate to `prefix` (one solve each)."""
    C = np.asarray(candidates, dtype=np.float64)
    Q = np.atleast_2d(np.asarray(query, dtype=np.float64))
    K = len(C)
    X = np.concatenate(
        [np.broadcast_to(C[list(prefix)], (K, len(prefix), C.shape[1])), C[:, None, :]], axis=1
    )
    A = X @ X.transpose(0, 2, 1) + lam * np.eye(X.shape[1])
    k = X @ Q.T  # [K, t+1, m]
    return float((Q * Q).sum()) - (k * np.linalg.solve(A, k)).sum(axis=(1, 2))


def brute_greedy(candidates, query, n, lam) -> tuple[list[int], float]:
    """Greedy picks by brute force, and the smallest relative gap between best and runner-up."""
    picks: list[int] = []
    gap = np.inf
    for _ in range(n):
        objective = brute_objectives(candidates, query, picks, lam)
        order = np.argsort(objective, kind="stable")
        if len(order) > 1:
            gap = min(gap, (objective[order[1]] - objective[order[0]]) / objective[order[0]])
        picks.append(int(order[0]))
    return picks, gap


def assert_matches_brute_force(selection, candidates, query, n, lam, tie_rtol=1e-9) -> None:
    """Every pick is the brute-force argmin given the previous picks (or ties it within tie_rtol)."""
    assert len(selection.indices) == n
    assert selection.indices.dtype == np.int64
    scale = float((np.atleast_2d(query) ** 2).sum())
    prefix: list[int] = []
    for t, pick in enumerate(selection.indices.tolist()):
        objective = brute_objectives(candidates, query, prefix, lam)
        best = int(np.argmin(objective))
        if pick != best:
            assert objective[pick] - objective[best] <= tie_rtol * scale, (
                f"step {t}: sift picked {pick} (variance {objective[pick]!r}), "
                f"brute force picked {best} (variance {objective[best]!r})"
            )
        prefix.append(pick)
    np.testing.assert_allclose(
        selection.variances, brute_trajectory(candidates, query, prefix, lam), rtol=1e-6, atol=1e-10 * scale
    )


# --- 1. SIFT equals brute-force greedy -------------------------------------------------------


@pytest.mark.parametrize("lam", [1e-4, 1e-2, 1.0, 100.0])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("d", [8, 32])
@pytest.mark.parametrize("K", [5, 30, 60])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sift_matches_brute_force(seed, K, d, m, lam):
    candidates, query = random_problem(seed, K, d, m)
    n = 12  # > K=5 and > d=8, so repeats and a fully spanned space both occur
    assert_matches_brute_force(sift(candidates, query, n, lam), candidates, query, n, lam)


@pytest.mark.parametrize("seed", [0, 1])
def test_sift_matches_brute_force_on_unnormalised_embeddings(seed):
    rng = np.random.default_rng(100 + seed)
    candidates = rng.standard_normal((25, 12)) * rng.uniform(0.2, 3.0, (25, 1))
    query = rng.standard_normal((2, 12)) * np.array([[0.5], [2.0]])
    assert_matches_brute_force(sift(candidates, query, 10, 0.05), candidates, query, 10, 0.05)


def test_sift_matches_independent_brute_force_greedy_exactly():
    candidates, query = random_problem(7, 40, 16, 2)
    picks, gap = brute_greedy(candidates, query, 15, 0.01)
    assert gap > 1e-6  # no near-ties, so the index sequences must agree exactly
    selection = sift(candidates, query, 15, 0.01)
    np.testing.assert_array_equal(selection.indices, picks)
    np.testing.assert_allclose(
        selection.variances, brute_trajectory(candidates, query, picks, 0.01), rtol=1e-9
    )


def test_ties_break_towards_lower_index():
    b = unit(np.array([1.0, 0.2, 0.0]))
    candidates = np.stack([unit(np.array([0.0, 0.0, 1.0])), b, b, b])
    query = unit(np.array([1.0, 0.1, 0.05]))
    picks = sift(candidates, query, 5, 0.01).indices.tolist()
    assert picks[0] == 1 and picks.count(1) >= 2
    assert 2 not in picks and 3 not in picks  # copies of b are always taken at the lowest index
    assert nearest_neighbors(candidates, query, 3).indices.tolist() == [1, 2, 3]


# --- 2. duplicated data ----------------------------------------------------------------------


def duplicated_corpus(seed: int, d: int = 32, copies: int = 20, others: int = 80):
    rng = np.random.default_rng(seed)
    query = unit(rng.standard_normal(d))
    duplicate = unit(query + 0.5 * unit(rng.standard_normal(d)))  # inner product ≈ 0.9 with the query
    relevance = rng.uniform(0.0, 0.7, others)[:, None]
    rest = unit(relevance * query + np.sqrt(1 - relevance**2) * unit(rng.standard_normal((others, d))))
    candidates = np.concatenate([np.repeat(duplicate[None], copies, axis=0), rest])[
        rng.permutation(copies + others)
    ]
    return candidates, query, duplicate


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_duplicates_fool_nearest_neighbours_but_not_sift(seed):
    candidates, query, duplicate = duplicated_corpus(seed)
    is_copy = np.all(candidates == duplicate, axis=1)
    assert is_copy.sum() == 20

    knn = nearest_neighbors(candidates, query, 20, lam=0.01)
    assert set(knn.indices.tolist()) == set(np.flatnonzero(is_copy).tolist())

    chosen = sift(candidates, query, 20, lam=0.01)
    copies_picked = int(is_copy[chosen.indices].sum())
    assert 1 <= copies_picked <= 2
    assert is_copy[chosen.indices[0]]  # the most relevant document is still picked first
    assert chosen.variances[-1] < knn.variances[-1]


# --- 3. extreme regularisation -----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("K", [10, 30])
def test_tiny_lambda_picks_are_all_distinct(seed, K):
    # K <= d keeps the candidates linearly independent, so no new pick is ever worthless.
    candidates, query = random_problem(seed, K, 32, 1)
    chosen = sift(candidates, query[0], K, lam=1e-6)
    assert sorted(chosen.indices.tolist()) == list(range(K))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_huge_lambda_keeps_repicking_the_nearest_neighbour(seed):
    rng = np.random.default_rng(seed)
    candidates = unit(rng.standard_normal((40, 16)))
    query = unit(candidates[17] + 0.3 * unit(rng.standard_normal(16)))
    scores = candidates @ query
    nearest = int(np.argmax(scores))
    assert np.argmax(np.abs(scores)) == nearest  # the gain depends on the squared inner product

    assert sift(candidates, query, 20, lam=1e4).indices.tolist() == [nearest] * 20
    # Control: the same data at the default lambda does diversify.
    assert len(set(sift(candidates, query, 20, lam=0.01).indices.tolist())) > 1


# --- 4. multi-target queries -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multi_target_objective_is_the_sum_of_variances(seed):
    rng = np.random.default_rng(seed)
    candidates = unit(rng.standard_normal((30, 16)))
    query = unit(rng.standard_normal((4, 16))) * rng.uniform(0.5, 2.0, (4, 1))
    chosen = sift(candidates, query, 10, lam=0.1)
    assert_matches_brute_force(chosen, candidates, query, 10, 0.1)
    per_target = sum(brute_trajectory(candidates, q, chosen.indices, 0.1) for q in query)
    np.testing.assert_allclose(chosen.variances, per_target, rtol=1e-9)


def test_multi_target_picks_do_not_depend_on_target_order():
    candidates, query = random_problem(3, 30, 16, 3)
    forward = sift(candidates, query, 10, 0.01)
    backward = sift(candidates, query[::-1].copy(), 10, 0.01)
    np.testing.assert_array_equal(forward.indices, backward.indices)
    np.testing.assert_allclose(forward.variances, backward.variances, rtol=1e-12)


@pytest.mark.parametrize("select", [sift, nearest_neighbors])
def test_single_query_vector_equals_one_row_matrix(select):
    candidates, query = random_problem(4, 30, 16, 1)
    flat = select(candidates, query[0], 8, 0.01)
    matrix = select(candidates, query, 8, 0.01)
    np.testing.assert_array_equal(flat.indices, matrix.indices)
    np.testing.assert_allclose(flat.variances, matrix.variances, rtol=1e-12)


@pytest.mark.parametrize("lam", [1e-4, 1e-2, 1.0])
@pytest.mark.parametrize("m", [1, 3])
def test_variance_trajectory_is_non_increasing_and_starts_at_prior(m, lam):
    rng = np.random.default_rng(11)
    candidates = unit(rng.standard_normal((50, 8)))
    query = rng.standard_normal((m, 8)) * 1.7  # not unit norm: the prior is Σ_j |q_j|²
    prior = float((query**2).sum())
    random_picks = rng.integers(0, 50, 30)
    for variances in (
        sift(candidates, query, 30, lam).variances,
        nearest_neighbors(candidates, query, 30, lam).variances,
        posterior_variances(candidates, query, random_picks, lam),
    ):
        assert variances[0] == pytest.approx(prior, rel=1e-12)
        assert np.all(np.diff(variances) <= 1e-12 * prior)
        assert variances[-1] >= -1e-12 * prior


# --- 5. nearest neighbours -----------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_nearest_neighbours_are_top_n_by_summed_inner_product(seed, m):
    candidates, query = random_problem(seed, 40, 16, m)
    expected = np.argsort(-(candidates @ query.mean(0)))[:10]
    knn = nearest_neighbors(candidates, query, 10, lam=0.01)
    np.testing.assert_array_equal(knn.indices, expected)
    np.testing.assert_allclose(
        knn.variances, posterior_variances(candidates, query, knn.indices, 0.01), rtol=1e-12
    )
    np.testing.assert_allclose(knn.variances, brute_trajectory(candidates, query, expected, 0.01), rtol=1e-9)


def test_nearest_neighbours_rank_by_signed_inner_product():
    query = unit(np.array([1.0, 0.0, 0.0, 0.0]))
    candidates = np.stack([-query, unit(np.array([0.9, 0.1, 0, 0])), unit(np.array([0.3, 1.0, 0, 0]))])
    assert nearest_neighbors(candidates, query, 2).indices.tolist() == [1, 2]


def test_nearest_neighbours_returns_at_most_k_distinct_picks():
    candidates, query = random_problem(5, 7, 8, 1)
    knn = nearest_neighbors(candidates, query, 50, lam=0.01)
    assert sorted(knn.indices.tolist()) == list(range(7))
    assert len(knn.variances) == 8


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("seed", range(5))
def test_first_sift_pick_is_never_worse_than_first_nearest_neighbour(seed, m):
    # One greedy step minimises over every single pick, so n=1 is where the comparison provably holds.
    candidates, query = random_problem(seed, 40, 8, m)
    first = sift(candidates, query, 1, lam=0.5)
    assert first.variances[-1] <= nearest_neighbors(candidates, query, 1, lam=0.5).variances[-1] + 1e-12
    assert first.variances[-1] == pytest.approx(brute_objectives(candidates, query, [], 0.5).min(), rel=1e-9)


# --- 6. adaptive stopping and truncation -------------------------------------------------------------


def make_selection(variances) -> Selection:
    variances = np.asarray(variances, dtype=np.float64)
    return Selection(np.arange(10, 10 + len(variances) - 1, dtype=np.int64), variances, 0.01, "sift")


def test_stop_adaptive_cuts_at_first_violation_even_if_later_picks_pass():
    # alpha·n·σ_n for n = 1..5 with alpha = 1: 0.5, 0.89, 1.16 (violation), 0.4, 0.2
    chosen = make_selection([1.0, 0.25, 0.2, 0.15, 0.01, 0.0016])
    kept = chosen.stop_adaptive(1.0)
    assert kept.indices.tolist() == [10, 11]
    np.testing.assert_array_equal(kept.variances, [1.0, 0.25, 0.2])


def test_stop_adaptive_keeps_everything_when_the_rule_always_holds():
    chosen = make_selection([1.0, 0.01, 0.004, 0.001])
    kept = chosen.stop_adaptive(2.0)  # 0.2, 0.253, 0.19
    assert kept.indices.tolist() == [10, 11, 12]
    np.testing.assert_array_equal(kept.variances, chosen.variances)


def test_stop_adaptive_keeps_nothing_when_the_first_pick_violates():
    kept = make_selection([9.0, 4.0, 0.0001]).stop_adaptive(1.0)
    assert len(kept) == 0 and kept.indices.dtype == np.int64
    np.testing.assert_array_equal(kept.variances, [9.0])
    assert kept.uncertainty_reduction == 0.0


def test_stop_adaptive_boundary_is_inclusive():
    # alpha·n·σ_n = 0.5·1·2 = 1 and 0.5·2·1 = 1 exactly: kept; then 0.5·3·σ_3 slightly above 1: cut.
    kept = make_selection([9.0, 4.0, 1.0, 4 / 9 + 1e-9]).stop_adaptive(0.5)
    assert kept.indices.tolist() == [10, 11]


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_stop_adaptive_rejects_non_positive_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        make_selection([1.0, 0.5]).stop_adaptive(alpha)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0, 20.0])
def test_stop_adaptive_on_a_real_selection_is_the_longest_valid_prefix(alpha):
    candidates, query = random_problem(0, 60, 16, 1)
    chosen = sift(candidates, query, 30, lam=0.01)
    kept = chosen.stop_adaptive(alpha)
    n = len(kept)
    np.testing.assert_array_equal(kept.indices, chosen.indices[:n])
    np.testing.assert_array_equal(kept.variances, chosen.variances[: n + 1])
    steps = np.arange(1, 31)
    rule = alpha * steps * np.sqrt(np.maximum(chosen.variances[1:], 0)) <= 1
    assert rule[:n].all()
    assert n == 30 or not rule[n]


def test_truncate_and_uncertainty_reduction():
    chosen = make_selection([1.0, 0.6, 0.3, 0.2])
    assert chosen.uncertainty_reduction == pytest.approx(0.8)
    two = chosen.truncate(2)
    assert two.indices.tolist() == [10, 11]
    np.testing.assert_array_equal(two.variances, [1.0, 0.6, 0.3])
    assert two.uncertainty_reduction == pytest.approx(0.7)
    assert len(chosen.truncate(99)) == 3 and len(chosen.truncate(-1)) == 0


# --- 7. torch inputs ---------------------------------------------------------------------------------


def well_separated_problem():
    """A problem whose greedy choices are far from ties, so float32 rounding cannot flip a pick."""
    candidates, query = random_problem(21, 30, 16, 2)
    _, gap = brute_greedy(candidates, query, 10, 0.05)
    assert gap > 1e-4
    return candidates, query


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("select", [sift, nearest_neighbors])
def test_torch_input_gives_the_same_selection_as_numpy(select, dtype):
    candidates, query = well_separated_problem()
    reference = select(candidates, query, 10, 0.05)
    chosen = select(torch.tensor(candidates, dtype=dtype), torch.tensor(query, dtype=dtype), 10, 0.05)
    assert isinstance(chosen.indices, np.ndarray) and chosen.indices.dtype == np.int64
    assert isinstance(chosen.variances, np.ndarray) and chosen.variances.dtype == np.float64
    np.testing.assert_array_equal(chosen.indices, reference.indices)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    np.testing.assert_allclose(chosen.variances, reference.variances, rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("torch_side", ["query", "candidates"])
def test_mixed_numpy_and_torch_inputs(torch_side):
    candidates, query = well_separated_problem()
    reference = sift(candidates, query, 10, 0.05)
    if torch_side == "query":
        chosen = sift(candidates, torch.tensor(query), 10, 0.05)
    else:
        chosen = sift(torch.tensor(candidates), query, 10, 0.05)
    np.testing.assert_array_equal(chosen.indices, reference.indices)
    np.testing.assert_allclose(chosen.variances, reference.variances, rtol=1e-10)


def test_posterior_variances_accepts_torch_input():
    candidates, query = well_separated_problem()
    picks = [3, 3, 7, 0]
    np.testing.assert_allclose(
        posterior_variances(torch.tensor(candidates), torch.tensor(query), torch.tensor(picks), 0.05),
        brute_trajectory(candidates, query, picks, 0.05),
        rtol=1e-9,
    )


def test_inputs_are_not_modified():
    candidates, query = random_problem(2, 20, 8, 2)
    numpy_copy = (candidates.copy(), query.copy())
    tensors = (torch.tensor(candidates), torch.tensor(query))
    tensor_copy = (tensors[0].clone(), tensors[1].clone())
    sift(candidates, query, 10, 0.01)
    sift(*tensors, 10, 0.01)
    np.testing.assert_array_equal(candidates, numpy_copy[0])
    np.testing.assert_array_equal(query, numpy_copy[1])
    assert torch.equal(tensors[0], tensor_copy[0]) and torch.equal(tensors[1], tensor_copy[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_input_gives_the_same_selection_as_numpy(dtype):
    candidates, query = well_separated_problem()
    reference = sift(candidates, query, 10, 0.05)
    chosen = sift(
        torch.tensor(candidates, dtype=dtype, device="cuda"),
        torch.tensor(query, dtype=dtype, device="cuda"),
        10,
        0.05,
    )
    np.testing.assert_array_equal(chosen.indices, reference.indices)
    np.testing.assert_allclose(chosen.variances, reference.variances, rtol=1e-4)
    mixed = sift(candidates, torch.tensor(query, dtype=dtype, device="cuda"), 10, 0.05)
    np.testing.assert_array_equal(mixed.indices, reference.indices)


# --- 8. input validation -----------------------------------------------------------------------------


@pytest.mark.parametrize("select", [sift, nearest_neighbors])
@pytest.mark.parametrize("lam", [0.0, -0.01, float("nan"), float("inf")])
def test_rejects_invalid_lambda(select, lam):
    candidates, query = random_problem(0, 5, 4, 1)
    with pytest.raises(ValueError, match="lam"):
        select(candidates, query, 3, lam)


@pytest.mark.parametrize("select", [sift, nearest_neighbors])
@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_rejects_invalid_n(select, n):
    candidates, query = random_problem(0, 5, 4, 1)
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        select(candidates, query, n)


@pytest.mark.parametrize("select", [sift, nearest_neighbors])
def test_rejects_mismatched_dimensions(select):
    candidates, _ = random_problem(0, 5, 4, 1)
    with pytest.raises(ValueError, match=r"query must be \[d\] or \[m, d\] with d=4"):
        select(candidates, np.ones(5), 2)
    with pytest.raises(ValueError, match="query must be"):
        select(candidates, np.ones((2, 2, 4)), 2)
    with pytest.raises(ValueError, match=r"candidates must be \[K, d\]"):
        select(np.ones(4), np.ones(4), 2)


@pytest.mark.parametrize("select", [sift, nearest_neighbors])
def test_rejects_empty_candidates_and_queries(select):
    with pytest.raises(ValueError, match="at least one candidate"):
        select(np.zeros((0, 4)), np.ones(4), 2)
    with pytest.raises(ValueError, match="at least one candidate and one query"):
        select(np.ones((3, 4)), np.zeros((0, 4)), 2)


def test_posterior_variances_rejects_out_of_range_picks():
    candidates, query = random_problem(0, 5, 4, 1)
    with pytest.raises(IndexError):
        posterior_variances(candidates, query, [0, 5], 0.01)
    with pytest.raises(IndexError):
        posterior_variances(candidates, query, [-1], 0.01)


@pytest.mark.parametrize("select", [sift, nearest_neighbors])
def test_zero_picks(select):
    candidates, query = random_problem(0, 5, 4, 2)
    chosen = select(candidates, query * 2.0, 0)
    assert chosen.indices.shape == (0,) and chosen.indices.dtype == np.int64
    np.testing.assert_allclose(chosen.variances, [8.0], rtol=1e-12)
    assert chosen.uncertainty_reduction == 0.0
    assert len(chosen.stop_adaptive(1.0)) == 0
    np.testing.assert_allclose(posterior_variances(candidates, query, [], 0.01), [2.0], rtol=1e-12)


# --- 9. thread safety ----------------------------------------------------------------------------------


@pytest.fixture
def frequent_thread_switches():
    # Force the interpreter to interleave threads often, so shared mutable state would show up.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_concurrent_sift_calls_match_sequential_results(frequent_thread_switches):
    problems = []
    for seed in range(24):
        candidates, query = random_problem(seed, 100, 32, 1 + seed % 3)
        if seed >= 16:
            candidates, query = torch.tensor(candidates), torch.tensor(query)
        problems.append((candidates, query, 100, 0.01 * (1 + seed % 4)))
    sequential = [sift(*problem) for problem in problems]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for _ in range(10):
            concurrent = list(pool.map(lambda problem: sift(*problem), problems))
            for expected, got in zip(sequential, concurrent, strict=True):
                np.testing.assert_array_equal(got.indices, expected.indices)
                np.testing.assert_allclose(got.variances, expected.variances, rtol=1e-12)


def test_concurrent_selections_restore_blas_threads():
    """SIFT runs BLAS single-threaded; overlapping calls must leave the process's setting as it was."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    problems = [random_problem(seed, 60, 16, 2) for seed in range(24)]
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda p: sift(p[0], p[1], 20), problems))
        assert blas_threads() == before == [2] * len(before)
