"""The ``fast`` site probe: multinomial logistic regression with scikit-learn's objective, all fold × C fits
batched on the features' device.

Objective per fit: ``C · Σ cross-entropy + ½‖W‖²`` (intercept unpenalised; binomial with one coefficient row
when a fit sees two classes, as scikit-learn does), solved on the per-row-mean scale (``mean CE + ‖W‖² /
(2 C n)``, the same minimiser). The search, on the same folds as the exact protocol:

1. the regularisation path: C ascending, each fold's fit started from its own fit at the next smaller C (the
   smallest from zero) and run to ``LOGISTIC_CV_GTOL``; its balanced accuracy on the fold's held-out rows
   scores that C. No fit ever sees a fold's held-out rows: a start from a fit on every row would leak them
   into a fit stopped short of its optimum (measured: mean CV BAcc 0.994 instead of the converged 0.987);
2. a close call, more than one C within ``LOGISTIC_CV_MARGIN`` of the best score: those C's fold fits are
   carried on to ``LOGISTIC_GTOL`` and scored again, so that stopping the scoring fits at scikit-learn's
   tolerance cannot decide between them, and so on until every C within the margin of the best is scored at
   ``LOGISTIC_GTOL`` (:func:`_to_refine`); C is then chosen by mean score (NaN last, ties to the smaller C);
3. the probe's model: the chosen C on every row, from the mean of its fold fits, to ``LOGISTIC_GTOL``.

The tolerances apply to the gradient's max-norm on the per-row-mean scale and the original (centred)
features, the quantity scikit-learn's ``lbfgs`` tests against ``tol``. ``LOGISTIC_CV_GTOL`` is its default
``tol``, at which it reports a fit converged; the model that predicts, and any close call, are held to the
100x tighter ``LOGISTIC_GTOL``. The solver, a batched L-BFGS (per-problem history and line search):

- converged when the gradient's max-norm is <= its tolerance, or stopped after ``max_iter`` iterations or
  when its line search can no longer decrease the objective (flat to rounding);
- in the whitened coordinates of every row (:class:`_WhitenedGroup`): an exact change of variables under
  which the features are uncorrelated with unit variance, as an encoder's nearly collinear, offset features
  are not; a fold's held-out rows are not computed at all;
- the scoring fits preconditioned by a Kronecker-factored Hessian refreshed from the current class
  probabilities (:meth:`_LogisticBatch.refresh_preconditioner`): weakly regularised fits on well-separated
  sites, where the curvature is far from its value at the start, converge in a fraction of the iterations;
- the fits to ``LOGISTIC_GTOL``, which start near their optimum, preconditioned by the exact class blocks of
  the Hessian there (:class:`_ClassBlockBatch`; on a CPU up to ``CLASS_BLOCKS_MAX_FEATURES`` features);
- float32 first (half the cost per iteration), with a line search that accepts steps by their slope when
  the objective's decrease is lost in rounding, then float64 to check the tolerance and finish (the scoring
  fits float32 brought to ``LOGISTIC_CV_GTOL`` are not checked again: that tolerance lies far above
  float32's rounding of the gradient).

docs/probes.md has the measurements (bench/probes.py). Nothing here imports scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from brainage_core.evaluation.batched_lbfgs import batched_lbfgs
from brainage_core.evaluation.fast_probes import (
    LinearClassifier,
    balanced_accuracy_codes,
    best_index,
    complement_indices,
)

#: Convergence of the probe's model (the chosen C on every row): max |gradient| of (mean cross-entropy +
#: ||W||² / (2 C n))
LOGISTIC_GTOL = 1e-6
#: Convergence of the fold fits along the path that score each C: scikit-learn's default ``tol`` for ``lbfgs``,
#: on the same quantity. Their scores can differ from converged fits' by a little (``LOGISTIC_CV_MARGIN``),
#: which only matters where two C's are that close
LOGISTIC_CV_GTOL = 1e-4
#: C values whose mean fold score at ``LOGISTIC_CV_GTOL`` is within this much balanced accuracy of the best are
#: a close call: their fold fits are carried on to ``LOGISTIC_GTOL`` and scored again before C is chosen.
#: Measured |score at 1e-4 - score at 1e-6|: <= 0.0011 on bench/probes.py's well-conditioned sets, <= 0.02 on
#: random labels with nearly as many features as rows (fits decided by flat directions), and up to 0.062 on its
#: ``--collinear 4`` set (eigenvalues over 14 decades), where the weakly regularised fits, stopped early, score
#: above their optimum: refined, they fall, and the C's then within the margin are refined in turn
LOGISTIC_CV_MARGIN = 0.05
LOGISTIC_MAX_ITER = 2000
#: The float32 phase of a float64 fit hands over to float64 after this many iterations, or once its
#: gradient max-norm has made no new low for ``FLOAT32_PATIENCE`` iterations: float32 rounding of the
#: gradient (amplified by the features' scale) can keep it above the tolerance for good
FLOAT32_MAX_ITER = 300
FLOAT32_PATIENCE = 20
#: The preconditioner's class curvature eigenvalues are floored at ``CURVATURE_FLOOR / K`` (1/K: their value at
#: uniform probabilities): on nearly separable sites the probabilities saturate, the mean curvature
#: underestimates that of the rows near a boundary, and unfloored steps overshoot (measured: 2.4x the time
#: on bench/probes.py's ``--site-strength 2 --scale 50`` set; floors of 0.003-0.03 all alike)
CURVATURE_FLOOR = 0.01
#: The model's fit on a CPU is preconditioned by the exact class blocks of its Hessian up to this many features
#: (:func:`_class_blocks_pay`): measured at 3,227 rows, 58 sites, 128 features 0.2 s instead of 0.44 s
CLASS_BLOCKS_MAX_FEATURES = 160


@dataclass
class _WhitenedGroup:
    """A row group (every row, or a fold's training rows) in the whitened coordinates of every row.

    With ``X - mean = U Σ Vᵀ`` (thin SVD over the n rows), ``Z = sqrt(n) U`` has ``ZᵀZ / n = I``, and
    logits ``(X - mean) W + b'`` equal ``Z W̃ + b'`` with ``W = V diag(1/s^½) W̃``, ``s = Σ² / n`` the
    variances along V. The penalty ``‖W‖²`` is ``Σ_j ‖W̃_j‖² / s_j`` (V is orthogonal), and the unpenalised
    intercept makes the centring exact (``b = b' - mean W``). Directions of numerically zero variance get
    zero columns and no penalty: their ``W̃_j`` stays 0, as ``W`` does there at the optimum.

    A fold's training rows (:meth:`rows`) keep the every-row coordinates: the change of variables is as exact
    on any subset of the rows, their ``ZᵀZ / n_g`` is near ``I`` (four fifths of the rows), and one SVD serves
    every fold (measured: 0.07 s of 1.1 s at 3,227 x 128, the fold scores alike).
    """

    Za: torch.Tensor  # (n_g, p+1): Z and a column of ones
    codes: torch.Tensor  # (n_g,) class codes
    mean: torch.Tensor  # (p,)
    to_w: torch.Tensor  # (p, p): V diag(1/s^½), W = to_w W̃
    to_wt: torch.Tensor  # (p, p): V diag(s^½), W̃ = to_wtᵀ W, and ∂f/∂W = to_wt ∂f/∂W̃
    inv_var: torch.Tensor  # (p,): 1/s_j, 0 for a direction of zero variance
    #: :meth:`in_dtype`'s tensors per (dtype, number of classes), built once for every fit on this group
    cast: dict = field(default_factory=dict, repr=False)

    def in_dtype(self, dtype: torch.dtype, n_classes: int) -> tuple[torch.Tensor, ...]:
        """``Za``, ``Zaᵀ onehot`` (p+1, K: the gradient's label term) and the logit offset (K, 1: -inf for a
        class absent from the group; None when every class is present) in ``dtype``."""
        key = (dtype, n_classes)
        if key not in self.cast:
            Za = self.Za.to(dtype)
            onehot = torch.nn.functional.one_hot(self.codes, n_classes).to(dtype)
            present = onehot.sum(dim=0) > 0
            offset = None if bool(present.all()) else torch.where(present, 0.0, -math.inf).to(dtype)[:, None]
            self.cast[key] = (Za, Za.T @ onehot, offset)
        return self.cast[key]

    @classmethod
    def of(cls, X: torch.Tensor, codes: torch.Tensor) -> _WhitenedGroup:
        """``X`` (n_g, p) float64, ``codes`` (n_g,)."""
        n_g, p = X.shape
        mean = X.mean(dim=0)
        U, sigma, Vh = torch.linalg.svd(X - mean, full_matrices=False)  # U (n_g, r), r = min(n_g, p)
        kept = sigma > sigma.amax() * max(n_g, p) * torch.finfo(X.dtype).eps  # numpy's matrix_rank tolerance
        std = torch.where(kept, sigma, 0.0) / math.sqrt(n_g)
        Z = torch.zeros(n_g, p, dtype=X.dtype, device=X.device)
        V = torch.zeros(p, p, dtype=X.dtype, device=X.device)
        r = sigma.numel()
        Z[:, :r] = U * (kept * math.sqrt(n_g))
        V[:, :r] = Vh.T
        std = torch.cat([std, std.new_zeros(p - r)])
        inv_std = torch.where(std > 0, 1.0 / torch.where(std > 0, std, 1.0), 0.0)
        Za = torch.cat([Z, Z.new_ones(n_g, 1)], dim=1)
        return cls(Za, codes, mean, V * inv_std, V * std, inv_std**2)

    def rows(self, index: torch.Tensor) -> _WhitenedGroup:
        """The rows ``index`` (n_g,) of this group, in the same coordinates."""
        return _WhitenedGroup(self.Za[index], self.codes[index], self.mean, self.to_w, self.to_wt, self.inv_var)

    def to_whitened(self, theta: torch.Tensor) -> torch.Tensor:
        """(b, p+1, K) ``[W; b]`` on the original features to this group's ``[W̃; b']``."""
        W, b = theta[:, :-1], theta[:, -1:]
        return torch.cat([self.to_wt.T @ W, b + self.mean @ W], dim=1)

    def to_original(self, theta: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_whitened`."""
        W = self.to_w @ theta[:, :-1]
        return torch.cat([W, theta[:, -1:] - self.mean @ W], dim=1)


class _LogisticBatch:
    """B independent penalised multinomial problems over row groups, each in its whitened coordinates.

    Problem b fits group ``group[b]`` (a :class:`_WhitenedGroup`, its data in ``dtype``) with penalty
    ``lam[b]`` = 1 / (C n_g), on the per-row-mean scale: ``mean CE + lam / 2 · Σ_j inv_var_j ‖W̃_j‖²``. Its
    classes are those present in its group (the others get logit -inf), of which ``free[b]`` (K,) have
    parameters (the reference class of a binomial fit keeps logit 0). Parameters (b, p+1, K); the problems
    of one group share two GEMMs over that group's rows, so a fold's held-out rows cost nothing.
    """

    def __init__(self, groups: list[_WhitenedGroup], group: torch.Tensor, lam: torch.Tensor, free: torch.Tensor,
                 n_classes: int, dtype: torch.dtype):
        self.dtype, self.device = dtype, groups[0].Za.device
        cast = [g.in_dtype(dtype, n_classes) for g in groups]
        self.Za, self.label_sums = [c[0] for c in cast], [c[1] for c in cast]
        # an absent class gets logit -inf; skipped (one pass less over (b, K, n)) when every class is present
        self.logit_offset = [c[2] for c in cast]
        self.group, self.lam, self.free = group, lam.to(dtype), free.to(dtype)
        self.true_class = [g.codes[None, None, :] for g in groups]  # (1, 1, n_g)
        #: (G, p+1, 1) the penalty's weight per parameter row (0: the intercept)
        self.penal = torch.stack([torch.cat([g.inv_var, g.inv_var.new_zeros(1)]) for g in groups])[:, :, None].to(dtype)
        self.to_wt = torch.stack([g.to_wt for g in groups]).to(dtype)
        B = len(group)
        #: set: :meth:`value_grad` records each problem's class curvature ``mean_i(diag p_i - p_i p_iᵀ)`` (K, K)
        self.record_curvature = True
        self.class_curvature = torch.zeros(B, n_classes, n_classes, dtype=dtype, device=self.device)
        self.eigvec = torch.eye(n_classes, dtype=dtype, device=self.device).repeat(B, 1, 1)
        self.denominator = torch.ones(B, self.Za[0].shape[1], n_classes, dtype=dtype, device=self.device)

    def _record(self, g: int, idx: torch.Tensor, prob: torch.Tensor) -> None:
        """Keep what :meth:`refresh_preconditioner` needs of the problems ``idx`` of group ``g`` from their
        class probabilities ``prob`` (b, K, n_g): the class curvature ``mean_i(diag p_i - p_i p_iᵀ)``."""
        n_g = prob.shape[2]
        self.class_curvature[idx] = torch.diag_embed(prob.mean(dim=2)) - torch.bmm(prob, prob.transpose(1, 2)) / n_g

    def refresh_preconditioner(self, idx: torch.Tensor) -> None:
        """Factor the preconditioner of the problems ``idx`` (b,) anew from their recorded class curvature A.

        The Hessian of a problem in whitened coordinates (rows of identity covariance) is approximated by
        ``I ⊗ A + diag(lam · inv_var) ⊗ I``, exact if the rows' features and class probabilities were
        independent (the Kronecker factorisation of K-FAC: Martens & Grosse, ICML 2015); with ``A = U Λ Uᵀ``
        its inverse is ``U`` per row, a division by ``Λ_k + lam inv_var_j``, and ``Uᵀ``. ``A`` is singular
        (logits shifted alike change nothing) and underestimates the curvature near saturation, hence a floor
        on ``Λ``."""
        A = self.class_curvature[idx] + torch.diag_embed(1.0 - self.free[idx])  # classes without parameters: apart
        eigval, self.eigvec[idx] = torch.linalg.eigh(A)
        floor = CURVATURE_FLOOR / A.shape[1]
        penalty = self.lam[idx, None, None] * self.penal[self.group[idx]]  # (b, p+1, 1)
        self.denominator[idx] = eigval.clamp_min(floor)[:, None, :] + penalty

    def precondition(self, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """L-BFGS's initial inverse Hessian times ``v`` (b, p+1, K) for the problems ``idx`` (b,)."""
        if idx.numel() == self.eigvec.shape[0]:  # every problem: no copies
            U, denominator, free = self.eigvec, self.denominator, self.free
        else:
            U, denominator, free = self.eigvec[idx], self.denominator[idx], self.free[idx]
        return ((v @ U) / denominator) @ U.transpose(1, 2) * free[:, None, :]

    def gradient_max_norm(self, grad: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(b,): the max-norm of the gradient (b, p+1, K) on the original (centred) features' scale, the
        quantity the tolerance applies to: ``∂f/∂W = V diag(s^½) ∂f/∂W̃``."""
        gw = self.to_wt[self.group[idx]] @ grad[:, :-1]
        return torch.maximum(gw.abs().amax(dim=(1, 2)), grad[:, -1].abs().amax(dim=1))

    def value_grad(self, theta: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective (b,) and gradient (b, p+1, K) of the problems ``idx`` (b,) at ``theta`` (b, p+1, K)."""
        groups = self.group[idx]
        found = torch.unique(groups).tolist()
        if len(found) == 1:
            return self._group_value_grad(found[0], theta, idx)
        value, grad = theta.new_empty(theta.shape[0]), torch.empty_like(theta)
        for g in found:
            pos = torch.nonzero(groups == g).flatten()
            value[pos], grad[pos] = self._group_value_grad(g, theta[pos], idx[pos])
        return value, grad

    def _group_value_grad(self, g: int, theta: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`value_grad` for problems of group ``g`` only. The logits are laid out classes x rows (b, K,
        n_g), which the CPU's BLAS runs faster than rows x classes for most K measured (bench/logit_layout.py,
        float32: K = 58 1.2x, K = 2 to 11 3.5-5x, K = 16, 64, 100, 128 within 10 %, K = 32 0.8x; float64 faster
        for every K); the CE comes from the same max-shifted exponentials as the probabilities (one ``exp``)."""
        b, q, k = theta.shape
        Za = self.Za[g]
        n_g = Za.shape[0]
        z = (theta.transpose(1, 2).reshape(b * k, q) @ Za.T).view(b, k, n_g)
        if self.logit_offset[g] is not None:
            z = z + self.logit_offset[g]
        top = z.amax(dim=1, keepdim=True)  # (b, 1, n_g)
        prob = (z - top).exp_()
        total = prob.sum(dim=1, keepdim=True)
        # CE_i = log Σ_k exp z_ik - z_i,true
        ce = (total.log() + top - z.gather(1, self.true_class[g].expand(b, 1, -1))).sum(dim=(1, 2)) / n_g
        lam, penal = self.lam[idx], self.penal[g]
        value = ce + 0.5 * lam * (theta * theta * penal).sum(dim=(1, 2))
        prob = prob.div_(total)
        if self.record_curvature:
            self._record(g, idx, prob)
        grad = (prob.view(b * k, n_g) @ Za).view(b, k, q).transpose(1, 2)
        grad = (grad - self.label_sums[g]) / n_g + lam[:, None, None] * theta * penal
        return value, grad * self.free[idx, None, :]


class _ClassBlockBatch(_LogisticBatch):
    """:class:`_LogisticBatch` preconditioned by the diagonal blocks of the Hessian, one per class, exactly.

    Block j is ``mean_i p_ij (1 - p_ij) za_i za_iᵀ + lam diag(penalty)`` ((p+1) x (p+1)) at the probabilities
    of the start, inverted once (Cholesky, float64) for the whole fit. Unlike the Kronecker factors it keeps
    how the rows near a class's boundary, where its curvature lies, differ from the rest; it drops the
    coupling between classes. Building the blocks costs about (p+1)/2 evaluations, so it pays where
    the Kronecker-preconditioned L-BFGS needs many more iterations than that: carrying a fit that is close
    already to a tight tolerance (measured at 3,227 x 128, 58 sites, C = 100, from 1e-4 to 1e-6: 8-9
    iterations instead of 84-88).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded: dict[int, tuple[int, torch.Tensor]] = {}  # problem -> (its group, its probabilities)
        q, k = self.Za[0].shape[1], self.free.shape[1]
        #: (B, K, p+1, p+1) the inverse of each class block
        self.inverse = torch.eye(q, dtype=self.dtype, device=self.device).repeat(len(self.group), k, 1, 1)

    def _record(self, g: int, idx: torch.Tensor, prob: torch.Tensor) -> None:
        for j, b in enumerate(idx.tolist()):
            self.recorded[b] = (g, prob[j])

    def refresh_preconditioner(self, idx: torch.Tensor) -> None:
        for b in idx.tolist():
            g, prob = self.recorded[b]
            Za = self.Za[g]
            weight = prob * (1.0 - prob) / Za.shape[0]  # (K, n_g)
            blocks = torch.empty(weight.shape[0], Za.shape[1], Za.shape[1], dtype=self.dtype, device=self.device)
            chunk = max(1, (1 << 19) // Za.numel())  # classes per step: a temporary that stays in cache
            for c in range(0, weight.shape[0], chunk):
                rows = Za[None] * weight[c:c + chunk, :, None].sqrt()
                torch.bmm(rows.transpose(1, 2), rows, out=blocks[c:c + chunk])
            blocks = blocks.double() + torch.diag_embed(self.lam[b].double() * self.penal[g, :, 0].double())[None]
            fixed = self.free[b] == 0  # classes without parameters: identity (their gradient is 0)
            blocks[fixed] = torch.eye(Za.shape[1], dtype=torch.float64, device=self.device)
            # a direction of zero variance has neither curvature nor penalty: a tiny ridge keeps the factor
            scale = blocks.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(1e-300)
            eye = torch.eye(Za.shape[1], dtype=torch.float64, device=self.device)
            factor = torch.linalg.cholesky(blocks + 1e-12 * scale[:, None, None] * eye)
            self.inverse[b] = torch.cholesky_inverse(factor).to(self.dtype)
        for b in idx.tolist():
            self.recorded.pop(b, None)

    def precondition(self, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        inverse = self.inverse if idx.numel() == self.inverse.shape[0] else self.inverse[idx]
        b, q, k = v.shape
        x = torch.bmm(inverse.view(b * k, q, q), v.permute(0, 2, 1).reshape(b * k, q, 1))  # per class
        return x.view(b, k, q).permute(0, 2, 1) * self.free[idx, None, :]


def _to_refine(mean_scores: np.ndarray, refined: list[int], margin: float = LOGISTIC_CV_MARGIN) -> list[int]:
    """The C indices whose fold fits are to be carried on to ``LOGISTIC_GTOL`` next, given the mean scores so far
    (those of ``refined`` at that tolerance; NaN: not scored): on a close call (more than one C within
    ``margin`` of the best), or once any C has been refined, every C within the margin of the best not refined
    yet. A refined best can fall below a C that lay outside the margin of its first score, which then is a
    contender too."""
    finite = np.isfinite(mean_scores)
    if not finite.any():
        return []
    top = mean_scores[finite].max()
    contenders = [j for j in range(mean_scores.size) if finite[j] and mean_scores[j] >= top - margin]
    if len(contenders) < 2 and not refined:
        return []
    return [j for j in contenders if j not in refined]


def _class_blocks_pay(p: int, device: torch.device) -> bool:
    """Whether the model's fit (from the scoring stage's solution to ``LOGISTIC_GTOL``) is preconditioned by
    :class:`_ClassBlockBatch`: building its blocks costs about (p+1)/2 evaluations, against the ~85 more
    iterations the Kronecker factors need (docs/probes.md), so on a CPU up to ``CLASS_BLOCKS_MAX_FEATURES``
    features; on a GPU, where the build is one large batched GEMM and an iteration is bound by latency,
    always."""
    return device.type == "cuda" or p <= CLASS_BLOCKS_MAX_FEATURES


@dataclass
class LogisticSearch:
    """Result of :func:`fast_logistic_search`."""

    model: LinearClassifier
    best_c: float
    best_score: float
    mean_scores: np.ndarray  # (n_C,) mean balanced accuracy per C (NaN where a fold could not be fit)
    converged: bool  # every fit reached its tolerance: the scoring fits ``cv_gtol``, the model ``gtol``
    max_gradient: float  # the model's final gradient max-norm
    max_cv_gradient: float  # largest final gradient max-norm over the scoring fits
    iterations: int  # largest iteration count over every fit
    refined: list[float]  # the C values whose fold fits were carried on to ``gtol`` (a close call), else empty


def _class_masks(codes: np.ndarray, groups: list[np.ndarray], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(G, K) each: the classes present in each group's rows, and those with parameters (the present ones
    less, for two classes, the first: scikit-learn's binomial fit has one coefficient row, for the second)."""
    present = np.zeros((len(groups), n_classes), dtype=bool)
    free = np.zeros_like(present)
    for g, rows in enumerate(groups):
        found = np.unique(codes[rows])
        present[g, found] = True
        free[g, found[1:] if found.size == 2 else found] = True
    return present, free


def _solve(X: torch.Tensor, codes: np.ndarray, groups: list[np.ndarray], whitened: list[_WhitenedGroup],
           problems: list[tuple[int, float]], n_classes: int, *, gtol: float, max_iter: int,
           x0: torch.Tensor | None = None, float32_suffices: bool = False, class_blocks: bool = False
           ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Fit each problem ``(g, C)`` of ``problems`` on the rows ``groups[g]`` of ``X`` (n, p) (``whitened[g]``:
    :meth:`_WhitenedGroup.rows`), from ``x0`` (B, p+1, K; ``[W; b]`` on ``X``) or zero.

    A float64 ``X`` is solved in two phases: float32 (half the cost per iteration)
    until the gradient max-norm is <= ``gtol``, float32 rounding stops it (line search, ``FLOAT32_PATIENCE``)
    or ``FLOAT32_MAX_ITER`` iterations have run; then float64, which checks the tolerance and goes on where
    float32 fell short. With ``float32_suffices`` (a tolerance far above float32's rounding of the gradient,
    such as ``LOGISTIC_CV_GTOL``), the problems float32 brought to the tolerance are not checked again.
    ``class_blocks``: preconditioned by :class:`_ClassBlockBatch` (factored once per phase), else by the
    Kronecker factors of :class:`_LogisticBatch` (refactored as the fit goes).
    Returns ``[W; b]`` (B, p+1, K) on ``X``, the final gradient max-norms, the iterations of both phases
    together and the present classes (B, K)."""
    dev, dt = X.device, X.dtype
    B = len(problems)
    group = np.array([g for g, _ in problems])
    present, free = (m[group] for m in _class_masks(codes, groups, n_classes))
    group_t, free_t = torch.as_tensor(group, device=dev), torch.as_tensor(free, device=dev)
    lam = torch.tensor([1.0 / (c * groups[g].size) for g, c in problems], dtype=dt, device=dev)

    kind = _ClassBlockBatch if class_blocks else _LogisticBatch
    schedule = {"refresh_due": lambda iteration: False} if class_blocks else {}

    def batch(dtype: torch.dtype, rows: torch.Tensor | slice = slice(None)) -> _LogisticBatch:
        return kind(whitened, group_t[rows], lam[rows], free_t[rows], n_classes, dtype)

    shape = (X.shape[1] + 1, n_classes)
    theta = None
    if x0 is not None:
        theta = torch.cat([whitened[g].to_whitened(x0[b:b + 1].to(dt)) for b, g in enumerate(group)])
        theta = theta * free_t.to(dt)[:, None, :]
    iters = np.zeros(B, dtype=np.int64)
    short = torch.arange(B, device=dev)  # the problems the last phase runs on
    if dt == torch.float64:
        theta, gmax, iters = batched_lbfgs(batch(torch.float32), B, shape, gtol=gtol, x0=theta,
                                            max_iter=min(max_iter, FLOAT32_MAX_ITER), patience=FLOAT32_PATIENCE,
                                            **schedule)
        theta = theta.to(dt)
        if float32_suffices:
            short = torch.nonzero(torch.as_tensor(gmax > gtol, device=dev)).flatten()
    if short.numel():
        sub = short.cpu().numpy()
        theta_s, gmax_s, polish = batched_lbfgs(batch(dt, short), short.numel(), shape, gtol=gtol,
                                                max_iter=max_iter, x0=theta[short], **schedule)
        theta[short] = theta_s
        gmax = gmax.astype(np.float64) if dt == torch.float64 else gmax_s
        gmax[sub] = gmax_s
        iters[sub] += polish
    theta = torch.cat([whitened[g].to_original(theta[b:b + 1]) for b, g in enumerate(group)])
    return theta, gmax, iters, present


def fast_logistic_search(
    X: torch.Tensor,
    labels: np.ndarray,
    cs: tuple[float, ...],
    folds: list[np.ndarray],
    *,
    gtol: float = LOGISTIC_GTOL,
    cv_gtol: float = LOGISTIC_CV_GTOL,
    max_iter: int = LOGISTIC_MAX_ITER,
) -> LogisticSearch:
    """Grid search of multinomial logistic regression over ``cs`` by the mean balanced accuracy over
    ``folds`` (test rows per fold), the fold fits converged to ``cv_gtol``, the chosen C fitted on all rows
    to ``gtol`` (the module docstring).

    ``X`` (n, p) float64 on the device; ``labels`` (n,) any sortable labels (at least two distinct).
    A fold whose training rows hold one class only scores NaN (scikit-learn cannot fit it either).
    """
    n, p = X.shape
    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    K = classes.size
    fold_train = [complement_indices(n, test) for test in folds]
    fitted = [f for f, tr in enumerate(fold_train) if np.unique(codes[tr]).size >= 2]
    groups = [np.arange(n)] + [fold_train[f] for f in fitted]  # every row, then each fitted fold's training rows
    every_row = _WhitenedGroup.of(X, torch.as_tensor(codes, device=X.device))
    whitened = [every_row] + [every_row.rows(torch.as_tensor(r, device=X.device)) for r in groups[1:]]
    blocks = _class_blocks_pay(p, X.device)
    scores = np.full((len(folds), len(cs)), np.nan)

    def score(j: int, theta: torch.Tensor, present: np.ndarray) -> None:
        """Balanced accuracy of the fold fits ``theta`` (one per fitted fold) at ``cs[j]`` on their held-out rows."""
        for b, f in enumerate(fitted):
            test = torch.as_tensor(folds[f], device=X.device)
            z = (X[test] @ theta[b, :p] + theta[b, p]).cpu().numpy()
            z[:, ~present[b]] = -np.inf
            scores[f, j] = balanced_accuracy_codes(codes[folds[f]], np.argmax(z, axis=1))

    path: list[torch.Tensor] = [X.new_empty(0)] * len(cs)  # (folds, p+1, K): each fold's fit at each C
    gmax_cv, gmax_tight, iters_all = [], [], []
    theta = None
    for j in np.argsort(cs, kind="stable") if fitted else []:  # the path: each fold's fit started from its fit
        problems = [(g, float(cs[j])) for g in range(1, len(groups))]  # at the next smaller C
        theta, gmax, iters, present = _solve(X, codes, groups, whitened, problems, K, gtol=cv_gtol,
                                             max_iter=max_iter, x0=theta, float32_suffices=True)
        gmax_cv += gmax.tolist()
        iters_all += iters.tolist()
        path[j] = theta
        score(j, theta, present)
    refined: list[int] = []  # a close call: fold fits carried on to gtol and scored again (_to_refine)
    while fitted and (todo := _to_refine(np.mean(scores, axis=0), refined)):
        problems = [(g, float(cs[j])) for j in todo for g in range(1, len(groups))]
        # Kronecker factors, not class blocks: building (B, K, p+1, p+1) inverses for many problems costs more
        # than it saves (measured: 25 fold fits on bench/probes.py's `sep` set 5.3 s with blocks, 1.0 s without)
        theta, gmax, iters, present = _solve(X, codes, groups, whitened, problems, K, gtol=gtol, max_iter=max_iter,
                                             x0=torch.cat([path[j] for j in todo]))
        gmax_tight += gmax.tolist()
        iters_all += iters.tolist()
        for i, j in enumerate(todo):
            score(j, theta[i * len(fitted):(i + 1) * len(fitted)], present[i * len(fitted):(i + 1) * len(fitted)])
        refined += todo
    mean_scores = np.mean(scores, axis=0)
    best = best_index(mean_scores)
    # the model, started from the mean of the folds' fits at that C (each is nearly the every-row fit)
    start = path[best].mean(dim=0, keepdim=True) if fitted else None
    theta, gmax, polish, _ = _solve(X, codes, groups[:1], whitened[:1], [(0, float(cs[best]))], K, gtol=gtol,
                                    max_iter=max_iter, x0=start, class_blocks=blocks)
    gmax_model = float(gmax[0])
    iters_all.append(int(polish[0]))
    w = theta[0].cpu().numpy()  # (p+1, K)
    if K == 2:
        coef, intercept = w[:p, 1:2].T, w[p, 1:2]
    else:
        coef, intercept = w[:p].T, w[p]
    model = LinearClassifier(np.ascontiguousarray(coef), np.asarray(intercept), classes, float(cs[best]))
    max_cv = float(max(gmax_cv, default=0.0))
    converged = max_cv <= cv_gtol and max(gmax_tight, default=0.0) <= gtol and gmax_model <= gtol
    return LogisticSearch(model, float(cs[best]), float(mean_scores[best]), mean_scores, converged, gmax_model,
                          max_cv, int(max(iters_all)), [float(cs[j]) for j in sorted(refined)])
