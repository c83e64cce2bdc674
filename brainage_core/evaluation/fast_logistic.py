"""The ``fast`` site probe: multinomial logistic regression with scikit-learn's objective, all fold × C fits
batched into one problem on the features' device.

Objective per fit: ``C · Σ cross-entropy + ½‖W‖²`` (intercept unpenalised; binomial with one coefficient row
when a fit sees two classes, as scikit-learn does), solved on the per-row-mean scale (``mean CE + ‖W‖² /
(2 C n)``, the same minimiser). The same folds as the exact protocol, balanced accuracy to choose C (NaN
last, ties to the smaller C), then the chosen C refit on every row, starting from the mean of its fold
solutions. The solver, a batched L-BFGS (per-problem history, Armijo backtracking):

- converged when the gradient's max-norm is <= ``LOGISTIC_GTOL`` (the quantity scikit-learn's ``lbfgs``
  tests against ``tol``), or stopped after ``max_iter`` iterations or when its line search can no longer
  decrease the objective (flat to rounding);
- on centred features, an exact reparametrisation (the intercept is unpenalised: ``b = b' - mean W``);
- preconditioned: its initial inverse Hessian is the inverse of the feature Gram matrix at uniform class
  probabilities (:meth:`_LogisticBatch.inverse_curvature`), which an encoder's collinear features need;
- float32 first (half the cost per iteration), polished in float64 to the same tolerance.

docs/probes.md has the measurements (bench/probes.py). Nothing here imports scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from brainage_core.evaluation.fast_probes import (
    LinearClassifier,
    balanced_accuracy_codes,
    best_index,
    complement_indices,
)

#: Convergence of the logistic fits: max |gradient| of (mean cross-entropy + ||W||² / (2 C n)).
LOGISTIC_GTOL = 1e-6
LOGISTIC_MAX_ITER = 2000
LBFGS_HISTORY = 10
#: The float32 phase of a float64 fit stops at this gradient max-norm (float32 rounding often stops it
#: between 1e-5 and 1e-6 anyway) or after this many iterations: on nearly separable sites with large
#: features an unbounded float32 phase crept on for its whole ``max_iter`` (bench/probes.py --scale 50)
FLOAT32_GTOL = 1e-5
FLOAT32_MAX_ITER = 300


class _LogisticBatch:
    """B independent penalised multinomial problems sharing the rows ``Xa`` (n, p+1; last column ones).

    Problem b: sample weights ``weight[:, b]`` (n,) (1 / n_train on its training rows, else 0), penalty
    ``lam[b]`` = 1 / (C n_train) on the coefficient rows (not the intercept row), classes ``present[b]``
    (K,) (the others get logit -inf) of which ``free[b]`` have parameters (the reference class of a
    binomial fit keeps logit 0). Parameters: (b, p+1, K); every product with ``Xa`` is one GEMM over
    the b problems side by side.
    """

    def __init__(self, Xa: torch.Tensor, codes: torch.Tensor, weight: torch.Tensor, lam: torch.Tensor,
                 present: torch.Tensor, free: torch.Tensor):
        self.Xa, self.XaT, self.weight, self.lam = Xa, Xa.T.contiguous(), weight, lam
        self.free = free
        self.true_class = codes[:, None, None]  # (n, 1, 1)
        # an absent class gets logit -inf; skipped (one pass less over (n, b, K)) when every class is present
        self.logit_offset = None if bool(present.all()) else torch.where(present, 0.0, -math.inf).to(Xa.dtype)
        self.penal = torch.ones(Xa.shape[1], 1, dtype=Xa.dtype, device=Xa.device)
        self.penal[-1] = 0.0

    def inverse_curvature(self, n_classes: int) -> torch.Tensor:
        """(B, p+1, p+1): the inverse of each problem's Hessian block at uniform class probabilities
        (curvature ~1/K per row), ``(Xaᵀ diag(w) Xa / K + lam · diag(penalised))⁻¹``, the same for every
        class. As L-BFGS's initial inverse Hessian it undoes the features' correlations and scales (an
        encoder's features are often nearly collinear), which plain L-BFGS pays for in iterations."""
        # in float64: with nearly collinear features and a small lam, h is ill-conditioned
        Xa, weight = self.Xa.double(), self.weight.double()
        gram = torch.einsum("ib,ij,ik->bjk", weight, Xa, Xa) / n_classes
        h = gram + torch.diag_embed(self.lam.double()[:, None] * self.penal.double()[:, 0][None])
        return torch.linalg.inv(h).to(self.Xa.dtype)

    def logits(self, theta: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(n, b, K) logits of the problems ``idx`` at ``theta`` (b, p+1, K)."""
        b, q, k = theta.shape
        z = (self.Xa @ theta.permute(1, 0, 2).reshape(q, b * k)).view(-1, b, k)
        return z if self.logit_offset is None else z + self.logit_offset[idx][None]

    def value_grad(self, theta: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective (b,) and gradient (b, p+1, K) of the problems ``idx`` at ``theta`` (b, p+1, K).

        The passes over the (n, b, K) logits (which, not the two GEMMs, dominate the cost) are kept to
        three: ``log_softmax``, its in-place ``exp`` and the weighting; the one-hot term is a scatter."""
        b, q, k = theta.shape
        logp = torch.log_softmax(self.logits(theta, idx), dim=2)  # (n, b, K)
        w = self.weight[:, idx]  # (n, b)
        nll = -logp.gather(2, self.true_class.expand(-1, b, 1))[:, :, 0]
        # a row outside problem b's training rows (w = 0) may hold a class absent from it: nll = inf there
        ce = torch.where(w > 0, nll, torch.zeros((), dtype=nll.dtype, device=nll.device))
        lam = self.lam[idx]
        pen = (theta * theta * self.penal).sum(dim=(1, 2))
        value = (w * ce).sum(dim=0) + 0.5 * lam * pen
        resid = logp.exp_().mul_(w[:, :, None])  # w * softmax
        resid.scatter_add_(2, self.true_class.expand(-1, b, 1), -w[:, :, None])  # - w * onehot
        grad = (self.XaT @ resid.view(-1, b * k)).view(q, b, k).permute(1, 0, 2)
        grad = (grad + lam[:, None, None] * theta * self.penal) * self.free[idx, None, :]
        return value, grad


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products (B,) of two (B, D) tensors."""
    return (a * b).sum(dim=1)


def _batched_lbfgs(batch: _LogisticBatch, n_problems: int, shape: tuple[int, int], *, gtol: float,
                   max_iter: int, h_inv: torch.Tensor, history: int = LBFGS_HISTORY,
                   x0: torch.Tensor | None = None) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Minimise every problem of ``batch`` from ``x0`` (B, p+1, K) or zero, with ``h_inv`` (B, p+1, p+1;
    :meth:`_LogisticBatch.inverse_curvature`, scaled by gamma = sᵀy / yᵀH0y) as the initial inverse Hessian H0.
    Returns parameters (B, p+1, K), the final gradient
    max-norms (B,) and the iterations used (B,). A problem stops once its gradient max-norm is <= ``gtol``
    (or after ``max_iter`` iterations, or when its line search can no longer decrease the objective:
    flat to rounding). The objective and gradient are evaluated for the active problems only; the
    L-BFGS bookkeeping (cheap next to them) runs on the whole batch."""
    Xa = batch.Xa
    dev, dt = Xa.device, Xa.dtype
    B = n_problems
    D = shape[0] * shape[1]
    x = torch.zeros(B, D, dtype=dt, device=dev) if x0 is None else x0.reshape(B, D).to(dt).clone()
    f, g = batch.value_grad(x.view(B, *shape), torch.arange(B, device=dev))
    g = g.reshape(B, D)
    S = torch.zeros(history, B, D, dtype=dt, device=dev)
    Y = torch.zeros(history, B, D, dtype=dt, device=dev)
    rho = torch.zeros(history, B, dtype=dt, device=dev)  # 0: an empty or skipped pair (a no-op below)

    def precondition(v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        m = h_inv if rows is None or rows.numel() == h_inv.shape[0] else h_inv[rows]  # no copy when all active
        return (m @ v.view(-1, *shape)).reshape(v.shape)
    gamma = torch.ones(B, dtype=dt, device=dev)
    iters = np.zeros(B, dtype=np.int64)
    gmax = g.abs().amax(dim=1)
    active = gmax > gtol
    for it in range(max_iter):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        # two-loop recursion over the stored pairs, newest first
        q = -g
        slots = [(it - 1 - j) % history for j in range(min(it, history))]
        coeffs = []
        for sl in slots:
            a = rho[sl] * _dot(S[sl], q)
            q = torch.addcmul(q, Y[sl], a[:, None], value=-1.0)
            coeffs.append(a)
        d = precondition(q) * gamma[:, None]
        for sl, a in zip(reversed(slots), reversed(coeffs)):
            beta = rho[sl] * _dot(Y[sl], d)
            d = torch.addcmul(d, S[sl], (a - beta)[:, None])
        gd = _dot(g, d)
        bad = gd >= 0  # not a descent direction (rounding): steepest descent instead
        d = torch.where(bad[:, None], -g, d)
        gd = torch.where(bad, -_dot(g, g), gd)
        step = torch.ones(idx.numel(), dtype=dt, device=dev)
        x0, f0, g0, d_a, gd_a = x[idx], f[idx], g[idx], d[idx], gd[idx]
        x_new, f_new, g_new = x0.clone(), f0.clone(), g0.clone()
        pending = torch.ones(idx.numel(), dtype=torch.bool, device=dev)
        for _ in range(60):  # Armijo backtracking, per problem
            pidx = torch.nonzero(pending).flatten()
            if pidx.numel() == 0:
                break
            trial = torch.addcmul(x0[pidx], d_a[pidx], step[pidx, None])
            ft, gt = batch.value_grad(trial.view(-1, *shape), idx[pidx])
            ok = ft <= f0[pidx] + 1e-4 * step[pidx] * gd_a[pidx]
            okp = pidx[ok]
            x_new[okp], f_new[okp], g_new[okp] = trial[ok], ft[ok], gt.reshape(-1, D)[ok]
            pending[okp] = False
            step[pidx[~ok]] *= 0.5
        s_vec, y_vec = x_new - x0, g_new - g0
        sy = _dot(s_vec, y_vec)
        yy = _dot(y_vec, y_vec)
        good = (sy > 1e-12 * torch.sqrt(yy * _dot(s_vec, s_vec))) & ~pending
        slot = it % history
        S[slot].zero_()
        Y[slot].zero_()
        rho[slot].zero_()
        S[slot, idx], Y[slot, idx] = s_vec, y_vec
        one = torch.ones_like(sy)
        rho[slot, idx] = torch.where(good, 1.0 / torch.where(good, sy, one), torch.zeros_like(sy))
        ypy = _dot(precondition(y_vec, idx), y_vec)
        gamma[idx] = torch.where(good, sy / torch.where(good, ypy, one), gamma[idx])
        x[idx], f[idx], g[idx] = x_new, f_new, g_new
        iters[idx.cpu().numpy()] += 1
        gmax[idx] = g_new.abs().amax(dim=1)
        still = torch.zeros(B, dtype=torch.bool, device=dev)
        still[idx] = ~pending  # a failed line search: flat to rounding, the problem stops
        active = (gmax > gtol) & still
    return x.view(B, *shape), gmax.cpu().numpy(), iters


@dataclass
class LogisticSearch:
    """Result of :func:`fast_logistic_search`."""

    model: LinearClassifier
    best_c: float
    best_score: float
    mean_scores: np.ndarray  # (n_C,) mean balanced accuracy per C (NaN where a fold could not be fit)
    converged: bool
    max_gradient: float  # largest final gradient max-norm over every fit
    iterations: int  # largest iteration count over every fit


def _problem_masks(codes: np.ndarray, rows_list: list[np.ndarray], n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    present = np.zeros((len(rows_list), n_classes), dtype=bool)
    for b, rows in enumerate(rows_list):
        present[b, np.unique(codes[rows])] = True
    free = present.copy()
    for b in range(len(rows_list)):
        found = np.flatnonzero(present[b])
        if found.size == 2:  # binomial, as scikit-learn: one coefficient row, for the larger class
            free[b, found[0]] = False
    return present, free


def _solve(Xa: torch.Tensor, codes: np.ndarray, rows_list: list[np.ndarray], cs: list[float], n_classes: int,
           *, gtol: float, max_iter: int, x0: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Fit problem b on the rows ``rows_list[b]`` with ``cs[b]``, from ``x0`` (B, p+1, K) or zero.

    A float64 ``Xa`` is solved in two phases: float32 until the gradient max-norm is <= max(``gtol``,
    ``FLOAT32_GTOL``), float32 rounding stops the line search or ``FLOAT32_MAX_ITER`` iterations have run
    (half the cost per iteration, and most of the iterations), then float64 from there to ``gtol``. Both
    phases share one preconditioner. Returns the parameters, the final gradient max-norms,
    the iterations of both phases together (each phase at most ``max_iter``) and the present classes."""
    dev, dt = Xa.device, Xa.dtype
    n = Xa.shape[0]
    B = len(rows_list)
    present, free = _problem_masks(codes, rows_list, n_classes)
    codes_t, present_t = torch.as_tensor(codes, device=dev), torch.as_tensor(present, device=dev)

    def batch(dtype: torch.dtype) -> _LogisticBatch:
        weight = torch.zeros(n, B, dtype=dtype, device=dev)
        lam = torch.zeros(B, dtype=dtype, device=dev)
        for b, (rows, c) in enumerate(zip(rows_list, cs)):
            weight[torch.as_tensor(rows, device=dev), b] = 1.0 / rows.size
            lam[b] = 1.0 / (c * rows.size)
        return _LogisticBatch(Xa.to(dtype), codes_t, weight, lam, present_t,
                              torch.as_tensor(free, device=dev).to(dtype))

    shape = (Xa.shape[1], n_classes)
    theta = None if x0 is None else x0 * torch.as_tensor(free, device=dev).to(x0.dtype)[:, None, :]
    iters = np.zeros(B, dtype=np.int64)
    final = batch(dt)
    h_inv = final.inverse_curvature(n_classes)
    if dt == torch.float64:
        theta, _, iters = _batched_lbfgs(batch(torch.float32), B, shape, gtol=max(gtol, FLOAT32_GTOL),
                                         max_iter=min(max_iter, FLOAT32_MAX_ITER), h_inv=h_inv.float(), x0=theta)
    theta, gmax, polish = _batched_lbfgs(final, B, shape, gtol=gtol, max_iter=max_iter, h_inv=h_inv, x0=theta)
    return theta, gmax, iters + polish, present


def fast_logistic_search(
    X: torch.Tensor,
    labels: np.ndarray,
    cs: tuple[float, ...],
    folds: list[np.ndarray],
    *,
    gtol: float = LOGISTIC_GTOL,
    max_iter: int = LOGISTIC_MAX_ITER,
) -> LogisticSearch:
    """Grid search of multinomial logistic regression over ``cs`` by the mean balanced accuracy over
    ``folds`` (test rows per fold), then a refit on all rows with the chosen C.

    ``X`` (n, p) float64 on the device; ``labels`` (n,) any sortable labels (at least two distinct).
    A fold whose training rows hold one class only scores NaN (scikit-learn cannot fit it either).
    """
    n, p = X.shape
    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    K = classes.size
    # Centred features: an exact reparametrisation, as the intercept is unpenalised (logits X W + b equal
    # (X - mean) W + b' with b' = b + mean W). A common offset of the features (an encoder's unnormalised
    # outputs) otherwise makes the fits so ill-conditioned that L-BFGS needs thousands of iterations.
    mean = X.mean(dim=0)
    Xa = torch.cat([X - mean, torch.ones(n, 1, dtype=X.dtype, device=X.device)], dim=1)
    fold_train = [complement_indices(n, test) for test in folds]
    fittable = [np.unique(codes[tr]).size >= 2 for tr in fold_train]
    rows_list, c_list, where = [], [], []
    for f, tr in enumerate(fold_train):
        if not fittable[f]:
            continue
        for j, c in enumerate(cs):
            rows_list.append(tr)
            c_list.append(float(c))
            where.append((f, j))
    scores = np.full((len(folds), len(cs)), np.nan)
    gmax_all: list[float] = []
    iters_all: list[int] = []
    if rows_list:
        theta, gmax, iters, present = _solve(Xa, codes, rows_list, c_list, K, gtol=gtol, max_iter=max_iter)
        gmax_all += gmax.tolist()
        iters_all += iters.tolist()
        for b, (f, j) in enumerate(where):
            test = folds[f]
            z = (Xa[torch.as_tensor(test, device=X.device)] @ theta[b]).cpu().numpy()
            z[:, ~present[b]] = -np.inf
            scores[f, j] = balanced_accuracy_codes(codes[test], np.argmax(z, axis=1))
    mean_scores = np.mean(scores, axis=0)
    best = best_index(mean_scores)
    warm = None
    if rows_list:  # the refit starts from the mean of the chosen C's fold solutions: about half the iterations
        warm = theta[[b for b, (_, j) in enumerate(where) if j == best]].mean(dim=0, keepdim=True)
    theta, gmax, iters, present = _solve(Xa, codes, [np.arange(n)], [float(cs[best])], K, gtol=gtol,
                                         max_iter=max_iter, x0=warm)
    gmax_all += gmax.tolist()
    iters_all += iters.tolist()
    w = theta[0].cpu().numpy()  # (p+1, K), for the centred features
    w[p] -= mean.cpu().numpy() @ w[:p]  # b = b' - mean W
    if K == 2:
        coef, intercept = w[:p, 1:2].T, w[p, 1:2]
    else:
        coef, intercept = w[:p].T, w[p]
    model = LinearClassifier(np.ascontiguousarray(coef), np.asarray(intercept), classes, float(cs[best]))
    max_g = float(max(gmax_all))
    return LogisticSearch(model, float(cs[best]), float(mean_scores[best]), mean_scores, max_g <= gtol,
                          max_g, int(max(iters_all)))
