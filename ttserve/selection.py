"""Data selection for test-time fine-tuning: exact SIFT and nearest neighbours.

The surrogate model (spec §1): a Gaussian process with the linear kernel k(x, x') = φ(x)ᵀφ(x') on
L2-normalised embeddings and observation noise λ. After observing picks X_n the summed posterior
variance of the m prompt targets is

    σ_n² = Σ_j k(x*_j, x*_j) − k_nᵀ (K_n + λ I)⁻¹ k_n.

SIFT (spec §2) greedily adds the candidate that minimises σ_{n+1}², WITH replacement: a repeated
pick is one more (noisy) observation of the same point and so one more gradient step on it.

Implementation: after picking x_i every covariance entry gets the rank-1 update
k(a, b) ← k(a, b) − k(a, x_i) k(x_i, b) / (k(x_i, x_i) + λ). We never materialise the updated K×K
matrix; we keep the update vectors u_t = k_t(·, x_t) / sqrt(k_t(x_t, x_t) + λ), so the current
column of a pick is G[:, i] − Σ_t u_t u_t[i] (a partial pivoted Cholesky). Per step that is O(nK)
plus O(Km) for the scores, after one K×K Gram matrix. All bookkeeping is float64; inputs may be
numpy arrays or torch tensors (on any device) and the arithmetic stays where the data is.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Selection", "sift", "nearest_neighbors", "posterior_variances"]

DEFAULT_LAMBDA = 0.01
# float32 Gram entries carry ~1e-7 relative error; once λ is within two orders of magnitude of that the
# posterior covariance stops being positive semi-definite (negative "variances", wrong picks), so below
# this λ the Gram matrix is computed in float64 (about twice the cost of the float32 GEMM).
FLOAT32_SAFE_LAMBDA = 1e-5


@dataclass(frozen=True)
class Selection:
    """The outcome of a selection strategy.

    indices: positions into the candidate matrix in selection order (repeats allowed for SIFT).
    variances: the summed posterior variance of the targets, length len(indices) + 1:
        variances[0] before any pick, variances[n] after the n-th pick.
    """

    indices: np.ndarray
    variances: np.ndarray
    lam: float
    strategy: str

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def uncertainty_reduction(self) -> float:
        """σ_0² − σ_n²: the quantity the paper finds predictive of the fine-tuning gain."""
        return float(self.variances[0] - self.variances[-1])

    def truncate(self, n: int) -> Selection:
        n = max(0, min(int(n), len(self.indices)))
        return Selection(self.indices[:n], self.variances[: n + 1], self.lam, self.strategy)

    def stop_adaptive(self, alpha: float) -> Selection:
        """Adaptive SIFT (spec §3): keep pick n while alpha·n·σ_n ≤ 1, cut at the first violation.

        σ_n is the square root of the summed variance after n picks. Because the rule truncates at
        the first violation (rather than filtering pick by pick) the kept picks are always a
        prefix. If alpha·1·σ_1 > 1 nothing is kept: the prompt is best served by the base model.
        """
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        n = np.arange(1, len(self.indices) + 1)
        sigma = np.sqrt(np.maximum(self.variances[1:], 0.0))
        violations = np.flatnonzero(alpha * n * sigma > 1.0)
        keep = int(violations[0]) if len(violations) else len(self.indices)
        return self.truncate(keep)


def sift(candidates: Any, query: Any, n: int, lam: float = DEFAULT_LAMBDA) -> Selection:
    """Exact greedy SIFT: n picks (with replacement) minimising the targets' posterior variance.

    candidates: [K, d] embeddings; query: [d] or [m, d] target embeddings (variances are summed).
    Ties are broken towards the lower candidate index.
    """
    n = _check_n(n)
    with _single_threaded_blas():
        posterior = _Posterior(candidates, query, lam, capacity=n)
        for _ in range(n):
            posterior.observe(posterior.best())
    return posterior.selection("sift")


def nearest_neighbors(candidates: Any, query: Any, n: int, lam: float = DEFAULT_LAMBDA) -> Selection:
    """The top-n candidates by inner product with the (mean) query, without replacement.

    Returns min(n, K) picks, with the posterior variance trajectory of those picks under the same
    lam so that SIFT and nearest-neighbour retrieval can be compared on one scale.
    """
    n = _check_n(n)
    with _single_threaded_blas():
        posterior = _Posterior(candidates, query, lam, capacity=min(n, len(candidates)))
        scores = posterior.cross.sum(1)  # Σ_j <x, x*_j> = m · <x, mean query>
        order = np.argsort(-_to_numpy(scores), kind="stable")
        for i in order[:n]:
            posterior.observe(int(i))
    return posterior.selection("knn")


def posterior_variances(candidates: Any, query: Any, picks: Any, lam: float = DEFAULT_LAMBDA) -> np.ndarray:
    """The summed posterior variance trajectory of a given sequence of picks (length len(picks) + 1)."""
    picks = np.asarray(picks, dtype=np.int64).reshape(-1)
    with _single_threaded_blas():
        posterior = _Posterior(candidates, query, lam, capacity=len(picks))
        for i in picks:
            if not 0 <= i < posterior.size:
                raise IndexError(f"pick {i} is out of range for {posterior.size} candidates")
            posterior.observe(int(i))
    return posterior.selection("given").variances


class _Posterior:
    """Joint GP posterior over K candidates and m targets, updated one observation at a time."""

    def __init__(self, candidates: Any, query: Any, lam: float, capacity: int):
        if not lam > 0 or not np.isfinite(lam):
            raise ValueError(f"lam must be a finite number > 0, got {lam}")
        C, Q = _as_float_pair(candidates, query, precise=lam < FLOAT32_SAFE_LAMBDA)
        if C.ndim != 2:
            raise ValueError(f"candidates must be [K, d], got shape {tuple(C.shape)}")
        if Q.ndim == 1:
            Q = Q[None, :]
        if Q.ndim != 2 or Q.shape[1] != C.shape[1]:
            raise ValueError(f"query must be [d] or [m, d] with d={C.shape[1]}, got shape {tuple(Q.shape)}")
        if C.shape[0] == 0 or Q.shape[0] == 0:
            raise ValueError("need at least one candidate and one query embedding")
        self.lam = float(lam)
        self.size = C.shape[0]
        # The Gram matrix and cross-covariances are computed in the input precision (one GEMM),
        # everything that accumulates updates is float64.
        self.gram = _float64(C @ C.T)
        self.cross = _float64(C @ Q.T)  # k_t(x, x*_j), [K, m]
        self.diag = _copy(_diagonal(self.gram))  # k_t(x, x), [K]
        self.target_var = _float64((Q * Q).sum(1))  # k_t(x*_j, x*_j), [m]
        self.updates = _zeros_like(self.gram, (capacity, self.size))  # row t holds u_t
        self.picks: list[int] = []
        self.variances: list[float] = [float(self.target_var.sum())]

    def best(self) -> int:
        """The candidate whose observation reduces the summed target variance the most."""
        gain = (self.cross * self.cross).sum(1) / (self.diag + self.lam)
        return int(gain.argmax())

    def observe(self, i: int) -> None:
        t = len(self.picks)
        # k_t(·, x_i): the Gram matrix is symmetric, so read row i (contiguous) for column i.
        U = self.updates[:t]
        column = self.gram[i] - U[:, i] @ U if t else self.gram[i]
        scale = float(self.diag[i] + self.lam) ** 0.5
        u = column / scale
        w = self.cross[i] / scale
        self.diag -= u * u
        self.cross -= u[:, None] * w[None, :]
        self.target_var -= w * w
        self.updates[t] = u
        self.picks.append(i)
        self.variances.append(float(self.target_var.sum()))

    def selection(self, strategy: str) -> Selection:
        return Selection(
            indices=np.asarray(self.picks, dtype=np.int64),
            variances=np.asarray(self.variances, dtype=np.float64),
            lam=self.lam,
            strategy=strategy,
        )


# --- numpy / torch glue: the algorithm above only uses operators both libraries share. ---

_blas_lock = threading.Lock()
_blas_users = 0
_blas_limiter: Any = None
_blas_libraries: Any = None  # found once: scanning the loaded libraries costs ~0.5 ms


@contextmanager
def _single_threaded_blas() -> Iterator[None]:
    """Run numpy's BLAS on one thread while any selection is running.

    The matrices are tiny (K×K, K ≤ a few thousand), so threading buys little, and in a process that also
    runs Faiss or torch (OpenMP pools that spin-wait after each call) a multi-threaded OpenBLAS fights
    them for the cores: measured on 2 cores, SIFT went from ~1.4 ms to 15-30 ms. One thread per
    selection and parallelism across requests is the right shape for a server. The limit is process-wide,
    so it is reference-counted: the first selection to start sets it, the last to finish restores it.
    """
    global _blas_users, _blas_limiter, _blas_libraries
    with _blas_lock:
        if _blas_users == 0:
            if _blas_libraries is None:
                from threadpoolctl import ThreadpoolController

                _blas_libraries = ThreadpoolController().select(user_api="blas")
            _blas_limiter = _blas_libraries.limit(limits=1)
        _blas_users += 1
    try:
        yield
    finally:
        with _blas_lock:
            _blas_users -= 1
            if _blas_users == 0:
                _blas_limiter.restore_original_limits()
                _blas_limiter = None


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _as_float_pair(candidates: Any, query: Any, precise: bool) -> tuple[Any, Any]:
    """Both inputs as one float dtype on one device; float64 when `precise`, else the input's own float."""
    if _is_torch(candidates) or _is_torch(query):
        import torch

        C = candidates.detach() if _is_torch(candidates) else torch.as_tensor(np.asarray(candidates))
        Q = query.detach() if _is_torch(query) else torch.as_tensor(np.asarray(query))
        dtype = torch.float64 if precise or C.dtype == torch.float64 else torch.float32
        return C.to(dtype), Q.to(device=C.device, dtype=dtype)
    C, Q = np.asarray(candidates), np.asarray(query)
    dtype = np.float64 if precise or C.dtype == np.float64 else np.float32
    return np.ascontiguousarray(C, dtype=dtype), np.ascontiguousarray(Q, dtype=dtype)


def _float64(x: Any) -> Any:
    if _is_torch(x):
        import torch

        return x.to(torch.float64)
    return x.astype(np.float64, copy=False)


def _copy(x: Any) -> Any:
    return x.clone() if _is_torch(x) else x.copy()


def _diagonal(x: Any) -> Any:
    return x.diagonal()


def _zeros_like(x: Any, shape: tuple[int, int]) -> Any:
    if _is_torch(x):
        import torch

        return torch.zeros(shape, dtype=x.dtype, device=x.device)
    return np.zeros(shape, dtype=x.dtype)


def _to_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if _is_torch(x) else np.asarray(x)


def _check_n(n: int) -> int:
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"n must be a non-negative integer, got {n!r}")
    return int(n)
