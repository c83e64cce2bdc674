"""A batched L-BFGS: B independent smooth problems minimised side by side, each with its own history, line
search and stopping, the objective and gradient of the active ones evaluated together (one GEMM for many
fits on a GPU, or on a CPU's vector units).

The problems supply their objective, gradient, preconditioner (L-BFGS's initial inverse Hessian, refactored
from time to time) and convergence measure through :class:`BatchedProblems`; the site probe's logistic fits
(``fast_logistic.py``) are the one user. Nocedal & Wright, *Numerical Optimization* (2006), algorithm 7.4,
for the two-loop recursion; the line search below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

#: Curvature pairs kept (20 or 40 gave the logistic fits no fewer iterations)
LBFGS_HISTORY = 10
#: The line search: Armijo's sufficient decrease, else (the decrease lost in rounding) the approximate Wolfe
#: conditions of Hager & Zhang (SIAM J. Optim. 16, 2005): f(a) <= f(0) + eps |f(0)| and
#: sigma f'(0) <= f'(a) <= (2 delta - 1) f'(0)
ARMIJO = 1e-4
APPROX_WOLFE_EPS = 1e-6
WOLFE_DELTA = 0.1
WOLFE_SIGMA = 0.9
#: The default schedule: the preconditioner is refactored after the first iterations, then every few
#: (:func:`refresh_early_then_every_few`)
CURVATURE_REFRESH_FIRST = 4
CURVATURE_REFRESH_EVERY = 8


class BatchedProblems(Protocol):
    """What :func:`batched_lbfgs` asks of its B problems, parameters (b, *shape) for b of them at a time."""

    device: torch.device
    dtype: torch.dtype
    #: when set, :meth:`value_grad` records what :meth:`refresh_preconditioner` refactors
    record_curvature: bool

    def value_grad(self, theta: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Objective (b,) and gradient (b, *shape) of the problems ``idx`` (b,) at ``theta`` (b, *shape)."""
        ...

    def precondition(self, v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """The initial inverse Hessian of the problems ``idx`` times ``v`` (b, *shape)."""
        ...

    def refresh_preconditioner(self, idx: torch.Tensor) -> None:
        """Refactor the preconditioner of the problems ``idx`` from their last recorded evaluation."""
        ...

    def gradient_max_norm(self, grad: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """(b,): the quantity the tolerance applies to."""
        ...


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products (B,) of two (B, D) tensors."""
    return (a * b).sum(dim=1)


def line_search(batch: BatchedProblems, idx: torch.Tensor, shape: tuple[int, int], x0: torch.Tensor,
                 f0: torch.Tensor, g0: torch.Tensor, d: torch.Tensor, gd: torch.Tensor,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backtracking from step 1 along ``d`` (b, D) for the problems ``idx`` at ``x0`` (b, D) with objective
    ``f0``, gradient ``g0`` and slope ``gd`` = g0ᵀd < 0. Returns the accepted points, objectives and gradients
    (the start where none was found) and which problems found none (b,). A problem's last evaluation is its
    accepted step (what :meth:`BatchedProblems.value_grad` records)."""
    step = torch.ones(idx.numel(), dtype=x0.dtype, device=x0.device)
    x_new, f_new, g_new = x0.clone(), f0.clone(), g0.clone()
    pending = torch.ones(idx.numel(), dtype=torch.bool, device=x0.device)
    for _ in range(60):
        pidx = torch.nonzero(pending).flatten()
        if pidx.numel() == 0:
            break
        trial = torch.addcmul(x0[pidx], d[pidx], step[pidx, None])
        ft, gt = batch.value_grad(trial.view(-1, *shape), idx[pidx])
        gt = gt.reshape(trial.shape)
        f0p, gdp = f0[pidx], gd[pidx]
        ok = ft <= f0p + ARMIJO * step[pidx] * gdp
        # near the optimum the decrease falls below the objective's rounding (float32 stops ~1e-5 short of the
        # tolerance on Armijo alone): there accept a step whose slope satisfies Hager and Zhang's approximate
        # Wolfe conditions, slopes being accurate where objective differences are not
        slope = _dot(gt, d[pidx])
        ok |= ((ft <= f0p + APPROX_WOLFE_EPS * f0p.abs()) & (slope >= WOLFE_SIGMA * gdp)
               & (slope <= (2.0 * WOLFE_DELTA - 1.0) * gdp))
        okp = pidx[ok]
        x_new[okp], f_new[okp], g_new[okp] = trial[ok], ft[ok], gt[ok]
        pending[okp] = False
        step[pidx[~ok]] *= 0.5
    return x_new, f_new, g_new, pending


def refresh_early_then_every_few(iteration: int) -> bool:
    """Whether the preconditioner is refactored after this iteration: early, while the class probabilities
    move most, then every ``CURVATURE_REFRESH_EVERY`` iterations (a refactoring costs about one evaluation)."""
    return iteration < CURVATURE_REFRESH_FIRST or iteration % CURVATURE_REFRESH_EVERY == 0


def batched_lbfgs(batch: BatchedProblems, n_problems: int, shape: tuple[int, int], *, gtol: float,
                   max_iter: int, history: int = LBFGS_HISTORY, x0: torch.Tensor | None = None,
                   patience: int | None = None,
                   refresh_due: Callable[[int], bool] = refresh_early_then_every_few,
                   ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Minimise every problem of ``batch`` from ``x0`` (B, *shape) or zero, with :meth:`BatchedProblems.precondition`
    (scaled by gamma = sᵀy / yᵀH0y) as the initial inverse Hessian H0, factored at the start and after each
    iteration ``i`` (1, 2, ...) for which ``refresh_due(i)``. Returns parameters (B, *shape), the
    final gradient max-norms (B,) (:meth:`BatchedProblems.gradient_max_norm`) and the iterations used (B,).
    A problem stops once
    its gradient max-norm is <= ``gtol``, after ``max_iter`` iterations, when its line search can no longer
    decrease the objective (flat to rounding) or, given ``patience``, when its gradient max-norm has made no
    new low for ``patience`` iterations (rounding: the float32 phase). The objective and gradient are
    evaluated for the active problems only; the L-BFGS bookkeeping (cheap next to them) runs on the whole
    batch."""
    dev, dt = batch.device, batch.dtype
    B = n_problems
    D = shape[0] * shape[1]
    everyone = torch.arange(B, device=dev)
    x = torch.zeros(B, D, dtype=dt, device=dev) if x0 is None else x0.reshape(B, D).to(dt).clone()
    batch.record_curvature = True
    f, g = batch.value_grad(x.view(B, *shape), everyone)
    g = g.reshape(B, D)
    S = torch.zeros(history, B, D, dtype=dt, device=dev)  # steps
    Y = torch.zeros(history, B, D, dtype=dt, device=dev)  # gradient changes
    rho = torch.zeros(history, B, dtype=dt, device=dev)  # 1 / sᵀy; 0: an empty or skipped pair (a no-op below)
    gamma = torch.ones(B, dtype=dt, device=dev)

    def precondition(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return batch.precondition(v.view(-1, *shape), idx).reshape(v.shape)
    iters = np.zeros(B, dtype=np.int64)
    gmax = batch.gradient_max_norm(g.view(B, *shape), everyone)
    active = gmax > gtol
    if bool(active.any()):  # a phase that only checks a handed-over solution (float64 after float32) skips it
        batch.refresh_preconditioner(everyone)
    best = gmax.clone()
    stale = torch.zeros(B, dtype=torch.int64, device=dev)  # iterations since the gradient's last new low
    for it in range(max_iter):
        idx = torch.nonzero(active).flatten()
        if idx.numel() == 0:
            break
        batch.record_curvature = refresh_due(it + 1)
        # two-loop recursion over the stored pairs, newest first
        q = -g
        slots = [(it - 1 - j) % history for j in range(min(it, history))]
        coeffs = []
        for sl in slots:
            a = rho[sl] * _dot(S[sl], q)
            q = torch.addcmul(q, Y[sl], a[:, None], value=-1.0)
            coeffs.append(a)
        d = precondition(q, everyone) * gamma[:, None]
        for sl, a in zip(reversed(slots), reversed(coeffs)):
            beta = rho[sl] * _dot(Y[sl], d)
            d = torch.addcmul(d, S[sl], (a - beta)[:, None])
        gd = _dot(g, d)
        bad = gd >= 0  # not a descent direction (rounding): steepest descent instead
        d = torch.where(bad[:, None], -g, d)
        gd = torch.where(bad, -_dot(g, g), gd)
        x0, g0 = x[idx], g[idx]
        x_new, f_new, g_new, pending = line_search(batch, idx, shape, x0, f[idx], g0, d[idx], gd[idx])
        if batch.record_curvature:
            batch.refresh_preconditioner(idx)
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
        gmax[idx] = batch.gradient_max_norm(g_new.view(-1, *shape), idx)
        still = torch.zeros(B, dtype=torch.bool, device=dev)
        still[idx] = ~pending  # a failed line search: flat to rounding, the problem stops
        active = (gmax > gtol) & still
        if patience is not None:
            stale = torch.where(gmax < best, 0, stale + 1)
            best = torch.minimum(best, gmax)
            active &= stale <= patience
    return x.view(B, *shape), gmax.cpu().numpy(), iters
