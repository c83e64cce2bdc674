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
FLOAT32_GTOL = 1e-6
#: The line search: Armijo's sufficient decrease, else (the decrease lost in rounding) the approximate Wolfe
#: conditions of Hager & Zhang (SIAM J. Optim. 16, 2005): f(a) <= f(0) + eps |f(0)| and
#: sigma f'(0) <= f'(a) <= (2 delta - 1) f'(0)
ARMIJO = 1e-4
APPROX_WOLFE_EPS = 1e-6
WOLFE_DELTA = 0.1
WOLFE_SIGMA = 0.9
FLOAT32_MAX_ITER = 300


@dataclass
class _WhitenedGroup:
    """One row group (a fold's training rows, or every row) in whitened coordinates.

    With ``X_g - mean = U Σ Vᵀ`` (thin SVD over the n_g rows), ``Z = sqrt(n_g) U`` has ``ZᵀZ / n_g = I``, and
    logits ``(X_g - mean) W + b'`` equal ``Z W̃ + b'`` with ``W = V diag(1/s^½) W̃``, ``s = Σ² / n_g`` the
    variances along V. The penalty ``‖W‖²`` is ``Σ_j ‖W̃_j‖² / s_j`` (V is orthogonal), and the unpenalised
    intercept makes the centring exact (``b = b' - mean W``). Directions of numerically zero variance get
    zero columns and no penalty: their ``W̃_j`` stays 0, as ``W`` does there at the optimum.
    """

    Za: torch.Tensor  # (n_g, p+1): Z and a column of ones
    codes: torch.Tensor  # (n_g,) class codes
    mean: torch.Tensor  # (p,)
    to_w: torch.Tensor  # (p, p): V diag(1/s^½), W = to_w W̃
    to_wt: torch.Tensor  # (p, p): V diag(s^½), W̃ = to_wtᵀ W, and ∂f/∂W = to_wt ∂f/∂W̃
    inv_var: torch.Tensor  # (p,): 1/s_j, 0 for a direction of zero variance

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
        self.Za = [g.Za.to(dtype) for g in groups]
        self.ZaT = [z.T.contiguous() for z in self.Za]
        self.group, self.lam, self.free = group, lam.to(dtype), free.to(dtype)
        self.true_class = [g.codes[:, None, None] for g in groups]  # (n_g, 1, 1)
        onehot = [torch.nn.functional.one_hot(g.codes, n_classes).to(dtype) for g in groups]
        #: Zaᵀ onehot (p+1, K) per group: the gradient's label term, computed once
        self.label_sums = [zt @ y for zt, y in zip(self.ZaT, onehot)]
        # an absent class gets logit -inf; skipped (one pass less over (n, b, K)) when every class is present
        present = [y.sum(dim=0) > 0 for y in onehot]
        self.logit_offset = [None if bool(m.all()) else torch.where(m, 0.0, -math.inf).to(dtype) for m in present]
        #: (G, p+1, 1) the penalty's weight per parameter row (0: the intercept)
        self.penal = torch.stack([torch.cat([g.inv_var, g.inv_var.new_zeros(1)]) for g in groups])[:, :, None].to(dtype)
        self.to_wt = torch.stack([g.to_wt for g in groups]).to(dtype)

    def initial_inverse_hessian(self, n_classes: int) -> torch.Tensor:
        """(B, p+1, 1): the inverse of each problem's Hessian diagonal at uniform class probabilities (data
        curvature ~1/K per row and unit variance in whitened coordinates, plus the penalty), L-BFGS's H0."""
        return 1.0 / (1.0 / n_classes + self.lam[:, None, None] * self.penal[self.group])

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
        """:meth:`value_grad` for problems of group ``g`` only. The passes over the (n_g, b, K) logits (which,
        with the two GEMMs, set the cost) are kept to two: ``log_softmax`` and its in-place ``exp``."""
        b, q, k = theta.shape
        Za = self.Za[g]
        n_g = Za.shape[0]
        z = (Za @ theta.permute(1, 0, 2).reshape(q, b * k)).view(n_g, b, k)
        if self.logit_offset[g] is not None:
            z = z + self.logit_offset[g]
        logp = torch.log_softmax(z, dim=2)
        ce = logp.gather(2, self.true_class[g].expand(-1, b, 1)).sum(dim=(0, 2)).neg_() / n_g
        lam, penal = self.lam[idx], self.penal[g]
        value = ce + 0.5 * lam * (theta * theta * penal).sum(dim=(1, 2))
        prob = logp.exp_()
        grad = (self.ZaT[g] @ prob.view(n_g, b * k)).view(q, b, k).permute(1, 0, 2)
        grad = (grad - self.label_sums[g]) / n_g + lam[:, None, None] * theta * penal
        return value, grad * self.free[idx, None, :]


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products (B,) of two (B, D) tensors."""
    return (a * b).sum(dim=1)


@dataclass
class _LbfgsMemory:
    """The curvature pairs of a batched L-BFGS run, handed from its float32 phase to its float64 polish
    (a polish that starts with an empty memory spends its first iterations relearning the curvature)."""

    S: torch.Tensor  # (history, B, D) steps
    Y: torch.Tensor  # (history, B, D) gradient changes
    rho: torch.Tensor  # (history, B) 1 / sᵀy; 0 marks an empty or skipped pair (a no-op in the recursion)
    gamma: torch.Tensor  # (B,) scale of the initial inverse Hessian
    count: int  # pairs written so far (the ring's next slot is count % history)

    @classmethod
    def empty(cls, history: int, B: int, D: int, dtype: torch.dtype, device: torch.device) -> _LbfgsMemory:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)
        return cls(zeros(history, B, D), zeros(history, B, D), zeros(history, B),
                   torch.ones(B, dtype=dtype, device=device), 0)

    def to(self, dtype: torch.dtype) -> _LbfgsMemory:
        return _LbfgsMemory(self.S.to(dtype), self.Y.to(dtype), self.rho.to(dtype), self.gamma.to(dtype), self.count)


def _batched_lbfgs(batch: _LogisticBatch, n_problems: int, shape: tuple[int, int], *, gtol: float,
                   max_iter: int, h_inv: torch.Tensor, history: int = LBFGS_HISTORY,
                   x0: torch.Tensor | None = None, memory: _LbfgsMemory | None = None,
                   ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, _LbfgsMemory]:
    """Minimise every problem of ``batch`` from ``x0`` (B, p+1, K) or zero, with ``h_inv`` (B, p+1, 1;
    :meth:`_LogisticBatch.initial_inverse_hessian`, scaled by gamma = sᵀy / yᵀH0y) as the initial inverse Hessian H0
    and the curvature pairs of ``memory`` (a previous run's, else none). Returns parameters (B, p+1, K), the
    final gradient max-norms (B,), the iterations used (B,) and the memory. A problem stops once its gradient
    max-norm is <= ``gtol`` (or after ``max_iter`` iterations, or when its line search can no longer decrease
    the objective: flat to rounding). The objective and gradient are evaluated for the active problems only;
    the L-BFGS bookkeeping (cheap next to them) runs on the whole batch."""
    dev, dt = batch.device, batch.dtype
    B = n_problems
    D = shape[0] * shape[1]
    x = torch.zeros(B, D, dtype=dt, device=dev) if x0 is None else x0.reshape(B, D).to(dt).clone()
    f, g = batch.value_grad(x.view(B, *shape), torch.arange(B, device=dev))
    g = g.reshape(B, D)
    mem = _LbfgsMemory.empty(history, B, D, dt, dev) if memory is None else memory.to(dt)
    S, Y, rho, gamma, done = mem.S, mem.Y, mem.rho, mem.gamma, mem.count

    def precondition(v: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        m = h_inv if rows is None or rows.numel() == h_inv.shape[0] else h_inv[rows]  # no copy when all active
        return (m * v.view(-1, *shape)).reshape(v.shape)
    iters = np.zeros(B, dtype=np.int64)
    gmax = batch.gradient_max_norm(g.view(B, *shape), torch.arange(B, device=dev))
    active = gmax > gtol
    for it in range(max_iter):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        # two-loop recursion over the stored pairs, newest first
        q = -g
        k = done + it
        slots = [(k - 1 - j) % history for j in range(min(k, history))]
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
            gt = gt.reshape(-1, D)
            f0p, gdp = f0[pidx], gd_a[pidx]
            ok = ft <= f0p + ARMIJO * step[pidx] * gdp
            # near the optimum the decrease falls below the objective's rounding (float32 stops ~1e-5 short of
            # the tolerance on Armijo alone): there accept a step whose slope satisfies Hager and Zhang's
            # approximate Wolfe conditions, slopes being accurate where objective differences are not
            slope = _dot(gt, d_a[pidx])
            ok |= ((ft <= f0p + APPROX_WOLFE_EPS * f0p.abs()) & (slope >= WOLFE_SIGMA * gdp)
                   & (slope <= (2.0 * WOLFE_DELTA - 1.0) * gdp))
            okp = pidx[ok]
            x_new[okp], f_new[okp], g_new[okp] = trial[ok], ft[ok], gt[ok]
            pending[okp] = False
            step[pidx[~ok]] *= 0.5
        s_vec, y_vec = x_new - x0, g_new - g0
        sy = _dot(s_vec, y_vec)
        yy = _dot(y_vec, y_vec)
        good = (sy > 1e-12 * torch.sqrt(yy * _dot(s_vec, s_vec))) & ~pending
        slot = k % history
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
        gmax[idx] = batch.gradient_max_norm(g_new.view(-1, *shape), idx)
        still = torch.zeros(B, dtype=torch.bool, device=dev)
        still[idx] = ~pending  # a failed line search: flat to rounding, the problem stops
        active = (gmax > gtol) & still
    mem.count = done + int(iters.max(initial=0))
    return x.view(B, *shape), gmax.cpu().numpy(), iters, mem


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


def _solve(X: torch.Tensor, codes: np.ndarray, groups: list[np.ndarray], problems: list[tuple[int, float]],
           n_classes: int, *, gtol: float, max_iter: int, x0: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, np.ndarray, np.ndarray, np.ndarray]:
    """Fit each problem ``(g, C)`` of ``problems`` on the rows ``groups[g]`` of ``X`` (n, p), from ``x0``
    (B, p+1, K; ``[W; b]`` on ``X``) or zero.

    A float64 ``X`` is solved in two phases sharing one preconditioner and the L-BFGS memory: float32 (half
    the cost per iteration) until the gradient max-norm is <= max(``gtol``, ``FLOAT32_GTOL``), the line search
    fails in float32 rounding or ``FLOAT32_MAX_ITER`` iterations have run; then float64, which checks the
    tolerance and goes on where float32 fell short. Returns ``[W; b]`` (B, p+1, K) on ``X``, the final
    gradient max-norms, the iterations of both phases together and the present classes (B, K)."""
    dev, dt = X.device, X.dtype
    B = len(problems)
    group = np.array([g for g, _ in problems])
    present, free = (m[group] for m in _class_masks(codes, groups, n_classes))
    codes_t = torch.as_tensor(codes, device=dev)
    whitened = [_WhitenedGroup.of(X[r], codes_t[r]) for r in (torch.as_tensor(r, device=dev) for r in groups)]
    group_t, free_t = torch.as_tensor(group, device=dev), torch.as_tensor(free, device=dev)
    lam = torch.tensor([1.0 / (c * groups[g].size) for g, c in problems], dtype=dt, device=dev)

    def batch(dtype: torch.dtype) -> _LogisticBatch:
        return _LogisticBatch(whitened, group_t, lam, free_t, n_classes, dtype)

    shape = (X.shape[1] + 1, n_classes)
    theta = None
    if x0 is not None:
        theta = torch.cat([whitened[g].to_whitened(x0[b:b + 1].to(dt)) for b, g in enumerate(group)])
        theta = theta * free_t.to(dt)[:, None, :]
    iters = np.zeros(B, dtype=np.int64)
    final = batch(dt)
    h_inv = final.initial_inverse_hessian(n_classes)
    memory = None
    if dt == torch.float64:
        theta, _, iters, memory = _batched_lbfgs(
            batch(torch.float32), B, shape, gtol=max(gtol, FLOAT32_GTOL), max_iter=min(max_iter, FLOAT32_MAX_ITER),
            h_inv=h_inv.float(), x0=theta)
    theta, gmax, polish, _ = _batched_lbfgs(final, B, shape, gtol=gtol, max_iter=max_iter, h_inv=h_inv, x0=theta,
                                            memory=memory)
    theta = torch.cat([whitened[g].to_original(theta[b:b + 1]) for b, g in enumerate(group)])
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
    ``folds`` (test rows per fold), the chosen C fitted on all rows.

    ``X`` (n, p) float64 on the device; ``labels`` (n,) any sortable labels (at least two distinct).
    A fold whose training rows hold one class only scores NaN (scikit-learn cannot fit it either).
    """
    n, p = X.shape
    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    K = classes.size
    # every C on every row first: the chosen C's refit, and a start for each fold's fits
    full, gmax, iters, _ = _solve(X, codes, [np.arange(n)], [(0, float(c)) for c in cs], K, gtol=gtol,
                                  max_iter=max_iter)
    gmax_all, iters_all = gmax.tolist(), iters.tolist()
    fold_train = [complement_indices(n, test) for test in folds]
    fitted = [f for f, tr in enumerate(fold_train) if np.unique(codes[tr]).size >= 2]
    scores = np.full((len(folds), len(cs)), np.nan)
    if fitted:
        problems = [(i, float(c)) for i in range(len(fitted)) for c in cs]
        theta, gmax, iters, present = _solve(X, codes, [fold_train[f] for f in fitted], problems, K, gtol=gtol,
                                             max_iter=max_iter, x0=full.repeat(len(fitted), 1, 1))
        gmax_all += gmax.tolist()
        iters_all += iters.tolist()
        for b in range(len(problems)):
            f, j = fitted[b // len(cs)], b % len(cs)
            test = torch.as_tensor(folds[f], device=X.device)
            z = (X[test] @ theta[b, :p] + theta[b, p]).cpu().numpy()
            z[:, ~present[b]] = -np.inf
            scores[f, j] = balanced_accuracy_codes(codes[folds[f]], np.argmax(z, axis=1))
    mean_scores = np.mean(scores, axis=0)
    best = best_index(mean_scores)
    theta = full[best:best + 1]
    w = theta[0].cpu().numpy()  # (p+1, K)
    if K == 2:
        coef, intercept = w[:p, 1:2].T, w[p, 1:2]
    else:
        coef, intercept = w[:p].T, w[p]
    model = LinearClassifier(np.ascontiguousarray(coef), np.asarray(intercept), classes, float(cs[best]))
    max_g = float(max(gmax_all))
    return LogisticSearch(model, float(cs[best]), float(mean_scores[best]), mean_scores, max_g <= gtol,
                          max_g, int(max(iters_all)))
