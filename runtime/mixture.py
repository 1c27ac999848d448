"""The mixture maths of MoE², one home per equation: arrays in, arrays out, no I/O.

- ``renormalise_on_subset``: the gating weights on a subset S, ``ω_n = g_n / Σ_{n'∈S} g_n'``
  (eq. 2; eq. 28 is the same on the top-k of S);
- ``top_k_weights``: Algorithm 3's top-k of S by gating value, renormalised (eq. 28);
- ``fused_log_likelihood``: ``log Σ_{n∈S} ω_n f_{n,y_t}`` per token, the term of eq. 13;
  ``fused_log_likelihood_on_subsets`` is the same for many subsets at once (the loss oracle);
- ``rest_mass``: the probability outside an expert's top-K (the ``rest`` of a slice, eq. 29).

The zero-sum rule, the same everywhere: the weights on S are used, divided by their sum, when
every one of them is finite and ``>= 0`` and their sum is finite and ``> 0``. Otherwise (all zero,
any negative, NaN or infinite weight on S) every member of S gets ``1 / |S|``: equal weights, the
majority-voting baseline. Weights outside S never matter and come out as 0; an empty S gives
all-zero weights (and a fused log-likelihood of ``-inf``).

The torch twin of ``fused_log_likelihood`` is ``moe2.gating.model.token_nll`` (held equal to it
in ``tests/test_gating_model.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

F64 = npt.NDArray[np.float64]

# Gates are raised to this before the vectorised eq. 2 (``floor_gates``). It is far below any
# positive float32 (1.4e-45), so a sum of gates on S of at least ~1e-134 is unchanged by it in
# float64, while an S whose gates are all zero gets exactly equal weights: the zero-sum rule.
GATE_FLOOR = 1e-150


def subset_indices(subset: Sequence[int] | npt.ArrayLike | None, n: int) -> npt.NDArray[np.intp]:
    """The expert indices of S, in the given order (all of ``0..n-1`` for None).

    Raises ValueError unless they are distinct and in ``0..n-1``.
    """
    if subset is None:
        return np.arange(n, dtype=np.intp)
    idx = np.asarray(subset, dtype=np.intp).reshape(-1)
    if len(set(idx.tolist())) != idx.size or (idx.size and (idx.min() < 0 or idx.max() >= n)):
        raise ValueError(f"subset {idx.tolist()} must be distinct expert indices in 0..{n - 1}")
    return idx


def renormalise_on_subset(
    weights: npt.ArrayLike, subset: Sequence[int] | npt.ArrayLike | None = None
) -> F64:
    """Eq. 2 (and eq. 28's renormalisation): weights ``(..., N)`` divided, per row, by their sum
    over the expert indices ``subset`` (None: all N), zero outside S; float64 out, same shape.

    A row whose weights on S are not all finite and ``>= 0`` with a finite positive sum gets equal
    weights ``1 / |S|`` on S (the zero-sum rule of this module).
    """
    w = np.asarray(weights, dtype=np.float64)
    idx = subset_indices(subset, w.shape[-1])
    out = np.zeros_like(w)
    out[..., idx] = _renormalised(w[..., idx])
    return out


def _renormalised(w: F64) -> F64:
    """The zero-sum rule along the last axis, which is S."""
    with np.errstate(over="ignore"):  # an overflowing sum is not finite: equal weights
        total = w.sum(axis=-1, keepdims=True)
    valid = (np.isfinite(w) & (w >= 0)).all(axis=-1, keepdims=True)
    valid &= np.isfinite(total) & (total > 0)
    equal = 1.0 / max(w.shape[-1], 1)
    with np.errstate(invalid="ignore"):
        out: F64 = np.where(valid, w / np.where(valid, total, 1.0), equal)
    return out


def top_k_weights(
    values: npt.ArrayLike, k: int | None, subset: Sequence[int] | npt.ArrayLike | None = None
) -> F64:
    """Algorithm 3 / eq. 28: per row of gating values ``(..., N)``, keep the ``k`` largest on S
    (``subset``: expert indices, None for all N), renormalised to sum to one; zero elsewhere.

    ``k`` None or 0, or at least ``|S|``, keeps all of S (eq. 2). Ties keep the order of
    ``subset``, so a choice is reproducible. Values that break the zero-sum rule on S count as
    equal: the first k of S then get ``1 / k`` each. Raises ValueError for ``k < 0``.
    """
    if k is not None and k < 0:
        raise ValueError(f"k must be >= 0 or None, got {k}")
    w = np.asarray(values, dtype=np.float64)
    idx = subset_indices(subset, w.shape[-1])
    on_s = renormalise_on_subset(w, idx)
    keep = idx.size if not k or k >= idx.size else k
    chosen = idx[np.argsort(-on_s[..., idx], axis=-1, kind="stable")[..., :keep]]
    out = np.zeros_like(on_s)
    np.put_along_axis(out, chosen, _renormalised(np.take_along_axis(on_s, chosen, -1)), -1)
    return out


def fused_log_likelihood(logprobs: npt.ArrayLike, weights: npt.ArrayLike) -> F64:
    """``log Σ_n ω_n f_{n,y_t}`` for each token t: the term of eq. 13 (eq. 3 at the gold token).

    ``logprobs`` (N, T) are ``log f_{n,y_t}``; ``weights`` (N,) are ω, ``>= 0`` (as
    ``renormalise_on_subset`` gives; zero outside S). A logsumexp, so tiny probabilities stay
    finite; ``-inf`` where every weighted probability is 0. Returns (T,).
    """
    lp = np.asarray(logprobs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        terms = lp + np.log(np.asarray(weights, dtype=np.float64))[:, None]
    top = terms.max(axis=0)
    safe = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out: F64 = safe + np.log(np.exp(terms - safe).sum(axis=0))
    return out


def floor_gates(gates: npt.ArrayLike) -> F64:
    """Gating values (finite, ``>= 0``) raised to ``GATE_FLOOR``, for
    ``fused_log_likelihood_on_subsets``."""
    g = np.asarray(gates, dtype=np.float64)
    if not np.all(np.isfinite(g)) or (g < 0).any():
        raise ValueError("gate values must be finite and >= 0")
    return np.maximum(g, GATE_FLOOR)


def fused_log_likelihood_on_subsets(gates: F64, weighted: F64, masks: npt.NDArray[np.bool_]) -> F64:
    """``fused_log_likelihood`` with ``renormalise_on_subset`` for many subsets at once (T, B).

    Token t's gating values floored (``gates[t] = floor_gates(g(x_t))``, (T, N)) and
    ``weighted[t, n] = gates[t, n] · f_{n,y_t}`` (T, N); ``masks`` (B, N) one boolean row per S.
    Entry (t, b) is ``log Σ_{n∈S} g_n f_n − log Σ_{n∈S} g_n``: two matrix products for all of
    them. The floor makes an S with all-zero gates come out with equal weights (the zero-sum
    rule); the empty S gives ``-inf``. Linear space, for speed: equal to the per-subset
    ``fused_log_likelihood`` while the experts' gold-token log-probabilities stay above about
    −700 (float64 underflow; real models' are a few nats), ``-inf`` below that where the
    logsumexp form would stay finite.
    """
    m = masks.astype(np.float64).T
    with np.errstate(divide="ignore", invalid="ignore"):
        out: F64 = np.log(weighted @ m) - np.log(gates @ m)
    out[:, ~masks.any(axis=1)] = -np.inf
    return out


def rest_mass(probs: npt.ArrayLike) -> float:
    """The probability outside the listed ids, ``1 − Σ p`` (a slice's ``rest``), at least 0: a
    listed mass that rounds above one leaves nothing, never a negative mass."""
    return max(0.0, 1.0 - float(np.sum(np.asarray(probs, dtype=np.float64))))
