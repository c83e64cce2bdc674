"""The site probe of the ``fast`` protocol: multinomial logistic regression fitted to convergence in torch.

Objective of one fit (scikit-learn's, divided by the number of training rows n):
``mean cross-entropy + ||W||² / (2 C n)``, the intercept unpenalised; binomial with one coefficient row
when a fit sees two classes, as scikit-learn. A fit has converged when the max-norm of this objective's
gradient is <= ``gtol`` (the quantity scikit-learn's ``lbfgs`` tests against ``tol``).

How the fold x C grid is solved (``docs/probes.md``, "How the fast site probe is solved"):

- the C grid is walked in ascending order; the fits of one C (one per fold) are ONE batched problem,
  each warm-started from its fold's solution at the previous C (the first from zero coefficients and the
  centred log class priors as intercepts); the refit on all rows starts from the mean of the fold
  solutions at the chosen C;
- an evaluation of the batch is one batched GEMM over the folds' training rows (zero-padded to the
  largest fold), a fused log-softmax and one batched GEMM back;
- batched L-BFGS (history 10, Armijo backtracking) on the whole batch at once; a fit that has stopped
  is evaluated along but no longer moves;
- the bulk of the iterations runs in float32; each fit is then polished in float64 (with the same
  L-BFGS history) to ``gtol``: the answer is the float64 optimum, float32 only finds the way there.

Nothing here imports scikit-learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from brainage_core.evaluation.fast_probes import LinearClassifier, _complement, balanced_accuracy_codes, best_index

#: Convergence of the logistic fits: max |gradient| of (mean cross-entropy + ||W||² / (2 C n)).
LOGISTIC_GTOL = 1e-6
LOGISTIC_MAX_ITER = 2000
LBFGS_HISTORY = 10
#: The float32 phase of a fit ends at this gradient max-norm (or when float32 can no longer decrease the
#: objective); the float64 polish takes it from there to ``gtol``.
FLOAT32_GTOL = 1e-4


class _Problems:
    """B = c x G penalised multinomial problems: c penalties for each of G folds; problem b = j G + g uses
    the training rows of fold g and the j-th penalty.

    ``X`` (G, n, q): per fold its training features with a last column of ones, zero-padded to the largest
    fold (``mask`` (G, n): 1 on real rows); ``codes`` (G, n). Per problem: penalty ``lam[b]`` =
    1 / (C n_g) on the coefficient rows (not the intercept row), the classes ``present[b]`` (K,) its rows
    hold (the others get logit -inf) and ``free[b]`` (K,) those with parameters (a binomial fit's
    reference class keeps logit 0). Parameters: (B, q, K). Every evaluation is ONE batched GEMM over the
    folds for all problems side by side, one fused log-softmax and one batched GEMM back.
    """

    def __init__(self, Xs: list[torch.Tensor], codes: list[np.ndarray], cs: np.ndarray, present: np.ndarray,
                 free: np.ndarray, dtype: torch.dtype):
        dev = Xs[0].device
        G, q = len(Xs), Xs[0].shape[1]
        sizes = [x.shape[0] for x in Xs]
        n = max(sizes)
        self.dtype, self.G, self.c = dtype, G, len(cs)
        self.X = torch.zeros(G, n, q, dtype=dtype, device=dev)
        self.codes = torch.zeros(G, n, dtype=torch.int64, device=dev)
        self.mask = torch.zeros(G, n, dtype=dtype, device=dev)
        for g, (x, code) in enumerate(zip(Xs, codes)):
            self.X[g, : x.shape[0]] = x
            self.codes[g, : x.shape[0]] = torch.as_tensor(code, device=dev)
            self.mask[g, : x.shape[0]] = 1.0
        self.padded = min(sizes) < n
        self.inv_n = torch.as_tensor(1.0 / np.asarray(sizes, dtype=np.float64), device=dev)  # (G,) float64
        lam = 1.0 / (np.repeat(np.asarray(cs, dtype=np.float64), G) * np.tile(np.asarray(sizes, np.float64), len(cs)))
        self.lam = torch.as_tensor(lam, device=dev)  # (B,) float64
        self.all_present = bool(present.all())
        # (G, 1, c, K): problem j G + g at [g, 0, j]
        self.offset = torch.as_tensor(np.where(present, 0.0, -math.inf), dtype=dtype, device=dev).view(
            len(cs), G, 1, -1).permute(1, 2, 0, 3)
        self.free = torch.as_tensor(free, dtype=dtype, device=dev)  # (B, K)
        self.all_free = bool(free.all())
        self.penal = torch.ones(q, 1, dtype=dtype, device=dev)
        self.penal[-1] = 0.0
        self.evaluations = 0  # fit evaluations (one problem's value and gradient = 1)

    def value_grad(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective (B,) float64 and gradient (B, q, K) of every problem at ``theta`` (B, q, K)."""
        B, q, k = theta.shape
        G, c = self.G, self.c
        n = self.X.shape[1]
        self.evaluations += B
        th = theta.view(c, G, q, k).permute(1, 2, 0, 3).reshape(G, q, c * k)
        z = torch.bmm(self.X, th).view(G, n, c, k)
        if not self.all_present:
            z = z + self.offset
        logp = torch.log_softmax(z, dim=3)
        true = self.codes[:, :, None, None].expand(G, n, c, 1)
        ll = logp.gather(3, true)[..., 0]  # (G, n, c)
        if self.padded:
            ll = ll * self.mask[:, :, None]
        ce = -ll.sum(dim=1, dtype=torch.float64) * self.inv_n[:, None]  # (G, c)
        resid = logp.exp_()
        resid.scatter_add_(3, true, torch.full((G, n, c, 1), -1.0, dtype=resid.dtype, device=resid.device))
        if self.padded:
            resid *= self.mask[:, :, None, None]
        gr = torch.bmm(self.X.transpose(1, 2), resid.view(G, n, c * k))  # (G, q, c K)
        gr = gr.view(G, q, c, k).permute(2, 0, 1, 3).reshape(B, q, k)
        gr = gr * self.inv_n.repeat(c).to(gr.dtype)[:, None, None] + self.lam.to(gr.dtype)[:, None, None] * (
            theta * self.penal)
        if not self.all_free:
            gr = gr * self.free[:, None, :]
        pen = ((theta * self.penal).double() ** 2).sum(dim=(1, 2))
        value = ce.T.reshape(B) + 0.5 * self.lam * pen
        return value, gr


class _BatchedLBFGS:
    """L-BFGS state of B problems (flat parameters (B, D)): iterate, value, gradient, history.

    Every operation runs on the whole batch (no per-problem gathers); a problem that has stopped
    (converged, flat, or out of iterations) is evaluated along but no longer moves. ``to(problems)`` moves
    the state to the same problems in another dtype (the float32 -> float64 polish), history kept.
    """

    def __init__(self, problems: _Problems, x0: torch.Tensor, shape: tuple[int, int], history: int | None = None):
        self.shape = shape
        self.history = history or LBFGS_HISTORY
        B, D = x0.shape
        dev, dt = x0.device, problems.dtype
        self.x = x0.to(dt).clone()
        self.S = torch.zeros(self.history, B, D, dtype=dt, device=dev)
        self.Y = torch.zeros(self.history, B, D, dtype=dt, device=dev)
        self.rho = torch.zeros(self.history, B, dtype=dt, device=dev)  # 0: an empty or skipped pair (a no-op)
        self.gamma = torch.ones(B, dtype=dt, device=dev)
        self.pairs = 0  # pairs written so far (ring buffer position)
        self.iters = torch.zeros(B, dtype=torch.int64, device=dev)
        self.flat = torch.zeros(B, dtype=torch.bool, device=dev)  # the line search could not decrease f
        self._evaluate(problems)

    def _evaluate(self, problems: _Problems) -> None:
        B = self.x.shape[0]
        f, g = problems.value_grad(self.x.view(B, *self.shape))
        self.f, self.g = f, g.reshape(B, -1)
        self.gmax = self.g.abs().amax(dim=1)
        self.problems = problems

    def to(self, problems: _Problems) -> None:
        dt = problems.dtype
        self.x, self.S, self.Y = self.x.to(dt), self.S.to(dt), self.Y.to(dt)
        self.rho, self.gamma = self.rho.to(dt), self.gamma.to(dt)
        self.flat.zero_()
        self._evaluate(problems)

    def _direction(self) -> torch.Tensor:
        """-H g by the two-loop recursion over the stored pairs, newest first."""
        q = -self.g
        m = min(self.pairs, self.history)
        slots = [(self.pairs - 1 - j) % self.history for j in range(m)]
        coeffs = []
        for sl in slots:
            a = self.rho[sl] * (self.S[sl] * q).sum(dim=1)
            q = q - a[:, None] * self.Y[sl]
            coeffs.append(a)
        d = q * self.gamma[:, None]
        for sl, a in zip(reversed(slots), reversed(coeffs)):
            beta = self.rho[sl] * (self.Y[sl] * d).sum(dim=1)
            d = d + (a - beta)[:, None] * self.S[sl]
        return d

    def minimise(self, gtol: float, max_iter: int) -> None:
        """Iterate every problem until its gradient max-norm is <= ``gtol``, ``max_iter`` iterations in all
        (this call and earlier ones), or its line search fails to decrease the objective (flat to rounding)."""
        problems, shape = self.problems, self.shape
        B, D = self.x.shape
        while True:
            active = (self.gmax > gtol) & ~self.flat & (self.iters < max_iter)
            if not bool(active.any()):
                return
            g0 = self.g
            d = self._direction()
            gd = (g0 * d).sum(dim=1)
            bad = gd >= 0  # not a descent direction (rounding): steepest descent instead
            d = torch.where(bad[:, None], -g0, d)
            gd = torch.where(bad, -(g0 * g0).sum(dim=1), gd)
            fresh = self.iters == 0
            step = torch.where(fresh, torch.clamp(1.0 / g0.abs().sum(dim=1), max=1.0), torch.ones_like(gd))
            step = torch.where(active, step, torch.zeros_like(step))
            x_new, f_new, g_new = self.x.clone(), self.f.clone(), g0.clone()
            pending = active.clone()
            for _ in range(60):  # Armijo backtracking, per problem
                trial = self.x + step[:, None] * d
                ft, gt = problems.value_grad(trial.view(B, *shape))
                ok = pending & (ft <= self.f + 1e-4 * step.double() * gd.double())
                x_new = torch.where(ok[:, None], trial, x_new)
                f_new = torch.where(ok, ft, f_new)
                g_new = torch.where(ok[:, None], gt.reshape(B, D), g_new)
                pending = pending & ~ok
                if not bool(pending.any()):
                    break
                step = torch.where(pending, step * 0.5, step)
            s_vec, y_vec = x_new - self.x, g_new - g0
            sy = (s_vec * y_vec).sum(dim=1)
            yy = (y_vec * y_vec).sum(dim=1)
            good = (sy > 1e-12 * torch.sqrt(yy * (s_vec * s_vec).sum(dim=1))) & active & ~pending
            slot = self.pairs % self.history
            self.S[slot], self.Y[slot] = s_vec, y_vec
            one = torch.ones_like(sy)
            self.rho[slot] = torch.where(good, 1.0 / torch.where(good, sy, one), torch.zeros_like(sy))
            self.gamma = torch.where(good, sy / torch.where(good, yy, one), self.gamma)
            self.pairs += 1
            self.x, self.f, self.g = x_new, f_new, g_new
            self.gmax = g_new.abs().amax(dim=1)
            self.iters += active.to(torch.int64)
            self.flat |= pending  # a failed line search: flat to rounding, the problem stops


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
    evaluations: int = 0  # objective + gradient evaluations of single fits, all stages together


def _masks(codes: np.ndarray, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes present in ``codes`` and those with parameters (binomial: one row, for the larger class)."""
    present = np.zeros(n_classes, dtype=bool)
    present[np.unique(codes)] = True
    free = present.copy()
    found = np.flatnonzero(present)
    if found.size == 2:
        free[found[0]] = False
    return present, free


def _initial(codes: np.ndarray, present: np.ndarray, free: np.ndarray, q: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """Zero coefficients, intercepts = the centred log class priors (the optimum of the intercepts alone
    when W = 0; centred: the intercepts of a multinomial fit are defined up to a constant, and from zero
    L-BFGS keeps their sum at 0, as scikit-learn's solution); binomial: log(n_1 / n_0)."""
    theta = torch.zeros(q, present.size, dtype=dtype, device=device)
    counts = np.bincount(codes, minlength=present.size).astype(np.float64)
    logp = np.zeros(present.size)
    logp[present] = np.log(counts[present] / counts.sum())
    if free.sum() == present.sum():
        logp[present] -= logp[present].mean()
    else:  # binomial: the reference class keeps logit 0
        logp[present] -= logp[present & ~free]
    theta[-1] = torch.as_tensor(logp, dtype=dtype, device=device)
    return theta


def _fit(
    Xs: list[torch.Tensor], codes: list[np.ndarray], cs: np.ndarray, x0: torch.Tensor, n_classes: int, *,
    gtol: float, max_iter: int, float32: bool,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, int]:
    """Minimise the problems (fold g, C ``cs[j]``), b = j G + g, from ``x0`` (B, q, K). Returns the
    solutions (B, q, K) float64, final gradient max-norms (B,), iterations (B,) and the single-fit evaluations."""
    masks = [_masks(c, n_classes) for c in codes]
    present = np.tile(np.stack([m[0] for m in masks]), (len(cs), 1))
    free = np.tile(np.stack([m[1] for m in masks]), (len(cs), 1))
    B, q, K = x0.shape
    evaluations = 0
    state = None
    if float32:
        p32 = _Problems(Xs, codes, cs, present, free, torch.float32)
        state = _BatchedLBFGS(p32, x0.reshape(B, -1), (q, K))
        state.minimise(max(gtol, FLOAT32_GTOL), max_iter)
        evaluations += p32.evaluations
        del p32
    p64 = _Problems(Xs, codes, cs, present, free, torch.float64)
    if state is None:
        state = _BatchedLBFGS(p64, x0.reshape(B, -1), (q, K))
    else:
        state.to(p64)
    state.minimise(gtol, max_iter)
    evaluations += p64.evaluations
    return state.x.view(B, q, K), state.gmax.cpu().numpy(), state.iters.cpu().numpy(), evaluations


def fast_logistic_search(
    X: torch.Tensor,
    labels: np.ndarray,
    cs: tuple[float, ...],
    folds: list[np.ndarray],
    *,
    gtol: float = LOGISTIC_GTOL,
    max_iter: int = LOGISTIC_MAX_ITER,
    warm_start: bool = True,
    float32: bool = True,
) -> LogisticSearch:
    """Grid search of multinomial logistic regression over ``cs`` by the mean balanced accuracy over
    ``folds`` (test rows per fold), then a refit on all rows with the chosen C.

    ``X`` (n, p) float64 on the device; ``labels`` (n,) any sortable labels (at least two distinct).
    A fold whose training rows hold one class only scores NaN (scikit-learn cannot fit it either).
    ``warm_start`` (walk the C grid in ascending order from the previous C's solution) and ``float32``
    (float32 bulk, float64 polish) change the cost, not the answer: every fit ends at gradient max-norm
    <= ``gtol`` in float64.
    """
    n, p = X.shape
    dev = X.device
    classes, codes = np.unique(labels, return_inverse=True)
    codes = codes.reshape(-1)
    K = classes.size
    q = p + 1
    Xa = torch.cat([X.to(torch.float64), torch.ones(n, 1, dtype=torch.float64, device=dev)], dim=1)
    fold_train = [_complement(n, test) for test in folds]
    fitted = [f for f, tr in enumerate(fold_train) if np.unique(codes[tr]).size >= 2]
    Xs = [Xa[torch.as_tensor(fold_train[f], device=dev)] for f in fitted]
    fold_codes = [codes[fold_train[f]] for f in fitted]
    inits = torch.stack([_initial(c, *_masks(c, K), q, torch.float64, dev) for c in fold_codes]) if fitted else None
    scores = np.full((len(folds), len(cs)), np.nan)
    gmax_all: list[float] = []
    iters_all: list[int] = []
    evaluations = 0
    solutions: dict[int, torch.Tensor] = {}  # C index -> (folds fitted, q, K)
    order = list(np.argsort(np.asarray(cs, dtype=np.float64), kind="stable"))
    stages = [[j] for j in order] if warm_start else [order]
    G = len(fitted)
    previous = inits  # the solutions at the previous C
    for stage in stages if fitted else []:
        c_of = np.asarray(cs, dtype=np.float64)[stage]
        x0 = previous.repeat(len(stage), 1, 1) if warm_start else inits.repeat(len(stage), 1, 1)
        theta, gmax, iters, ev = _fit(Xs, fold_codes, c_of, x0, K, gtol=gtol, max_iter=max_iter, float32=float32)
        gmax_all += gmax.tolist()
        iters_all += iters.tolist()
        evaluations += ev
        for s, j in enumerate(stage):
            solutions[j] = theta[s * G:(s + 1) * G]
        previous = solutions[stage[-1]]
    for j in solutions:
        for i, f in enumerate(fitted):
            test = folds[f]
            z = (Xa[torch.as_tensor(test, device=dev)] @ solutions[j][i]).cpu().numpy()
            z[:, ~_masks(fold_codes[i], K)[0]] = -np.inf
            scores[f, j] = balanced_accuracy_codes(codes[test], np.argmax(z, axis=1))
    mean_scores = np.mean(scores, axis=0)
    best = best_index(mean_scores)
    present, free = _masks(codes, K)
    if best in solutions and warm_start:
        x0 = (solutions[best].mean(dim=0) * torch.as_tensor(free, dtype=torch.float64, device=dev))[None]
    else:
        x0 = _initial(codes, present, free, q, torch.float64, dev)[None]
    theta, gmax, iters, ev = _fit([Xa], [codes], np.asarray([float(cs[best])]), x0, K, gtol=gtol, max_iter=max_iter,
                                  float32=float32)
    gmax_all += gmax.tolist()
    iters_all += iters.tolist()
    evaluations += ev
    w = theta[0].cpu().numpy()  # (q, K)
    if K == 2:
        coef, intercept = w[:p, 1:2].T, w[p, 1:2]
    else:
        coef, intercept = w[:p].T, w[p]
    model = LinearClassifier(np.ascontiguousarray(coef), np.asarray(intercept), classes, float(cs[best]))
    max_g = float(max(gmax_all))
    return LogisticSearch(model, float(cs[best]), float(mean_scores[best]), mean_scores, max_g <= gtol,
                          max_g, int(max(iters_all)), evaluations)
