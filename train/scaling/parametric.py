"""Approach 3 (Hoffmann et al. 2022, §3.3 and App. D.2): fit L(N, D) = E + A/N^α + B/D^β.

The fit follows Chinchilla's recipe as replicated by Besiroglu et al. 2024 (Epoch, "Chinchilla
Scaling: A replication attempt"), in log space with A = e^a, B = e^b, E = e^e:

    minimise  Σ_i w_i · Huber_δ( log L_i − LSE(a − α·log N_i, b − β·log D_i, e) ),  δ = 1e-3,

summed (not averaged: a mean shrinks the objective ~240× and lets optimisers stop early, which
Epoch identify as why Hoffmann's own fit did not converge), from every start of Chinchilla's grid
a, b ∈ {0, 5, …, 25}, e ∈ {−1, −.5, …, 1}, α, β ∈ {0, .5, …, 2}, keeping the best.

The optimiser is BFGS with an Armijo backtracking line search and the exact analytic gradient,
vectorised over starts (and over bootstrap draws, via integer point weights w_i), in float64
numpy. Finite-difference gradients stall within ~20 iterations on this objective (see
shared/data/chinchilla_epoch/README.md); exact gradients reach the optimum.

Frontier (Hoffmann et al. Eq. 4, with C = 6·N·D): N_opt = G·(C/6)^a, D_opt = G⁻¹·(C/6)^b,
G = (αA/(βB))^{1/(α+β)}, a = β/(α+β), b = α/(α+β).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import numpy as np

HUBER_DELTA = 1e-3
PARAM_NAMES = ('a', 'b', 'e', 'alpha', 'beta')


def chinchilla_init_grid() -> np.ndarray:
  """[4500, 5] starts (a, b, e, α, β): Hoffmann et al. 2022 App. D.2."""
  grid = itertools.product(np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.01, 0.5),
                           np.arange(0, 2.01, 0.5), np.arange(0, 2.01, 0.5))
  return np.array(list(grid), dtype=np.float64)


@dataclasses.dataclass(frozen=True)
class ParametricFit:
  A: float
  B: float
  E: float
  alpha: float
  beta: float
  objective: float  # Summed Huber loss at the optimum.

  @property
  def a(self) -> float:
    """N_opt ∝ C^a."""
    return self.beta / (self.alpha + self.beta)

  @property
  def b(self) -> float:
    """D_opt ∝ C^b."""
    return self.alpha / (self.alpha + self.beta)

  def predict(self, n, d) -> np.ndarray:
    n, d = np.asarray(n, np.float64), np.asarray(d, np.float64)
    return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

  def frontier(self, flops) -> tuple[np.ndarray, np.ndarray]:
    """(N_opt, D_opt) minimising the predicted loss at C = 6·N·D (Hoffmann et al. Eq. 4)."""
    g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
    c6 = np.asarray(flops, np.float64) / 6.0
    return g * c6 ** self.a, c6 ** self.b / g

  def as_dict(self) -> dict[str, float]:
    return dict(dataclasses.asdict(self), a=self.a, b=self.b)

  @classmethod
  def from_vector(cls, x, objective: float) -> 'ParametricFit':
    a, b, e, alpha, beta = (float(v) for v in x)
    return cls(A=float(np.exp(a)), B=float(np.exp(b)), E=float(np.exp(e)), alpha=alpha, beta=beta,
               objective=float(objective))


def huber_objective(x_PK: np.ndarray, log_n: np.ndarray, log_d: np.ndarray, log_loss: np.ndarray,
                    weights_PM: np.ndarray | None = None, delta: float = HUBER_DELTA):
  """Summed Huber loss of each parameter row and its exact gradient: ([P], [P, 5]).

  Rows of x are (a, b, e, α, β); M data points; weights_PM (default 1) weight each point per row.
  """
  a, b, e, alpha, beta = (col[:, None] for col in x_PK.T)
  terms_3PM = np.stack(np.broadcast_arrays(a - alpha * log_n, b - beta * log_d, e))
  top_PM = terms_3PM.max(axis=0)
  soft_3PM = np.exp(terms_3PM - top_PM)
  total_PM = soft_3PM.sum(axis=0)
  pred_PM = top_PM + np.log(total_PM)
  soft_3PM /= total_PM                      # d pred / d term_k (softmax weights)
  r_PM = log_loss - pred_PM
  abs_r = np.abs(r_PM)
  h_PM = np.where(abs_r <= delta, 0.5 * r_PM * r_PM, delta * (abs_r - 0.5 * delta))
  dh_dpred_PM = -np.clip(r_PM, -delta, delta)
  if weights_PM is not None:
    h_PM = h_PM * weights_PM
    dh_dpred_PM = dh_dpred_PM * weights_PM
  g0, g1, g2 = (dh_dpred_PM * soft_3PM[k] for k in range(3))
  grad_PK = np.stack([g0.sum(1), g1.sum(1), g2.sum(1), -(g0 * log_n).sum(1),
                      -(g1 * log_d).sum(1)], axis=1)
  return h_PM.sum(axis=1), grad_PK


def bfgs(fun_grad: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
         x0_PK: np.ndarray, max_iter: int = 1000, gtol: float = 1e-12, stall_iters: int = 30,
         stall_rtol: float = 1e-11):
  """Minimises P independent problems at once: fun_grad(x_QK, rows_Q) -> (f_Q, g_QK) for the
  problem rows `rows_Q`. BFGS on the inverse Hessian, Armijo backtracking, reset on a non-descent
  direction. A row stops when its gradient is tiny, its line search fails, or its objective
  improved by less than `stall_rtol` (relative) over the last `stall_iters` iterations.
  Returns (x_PK, f_P, iterations_P)."""
  x = np.array(x0_PK, dtype=np.float64)
  num, k = x.shape
  rows = np.arange(num)
  f, g = fun_grad(x, rows)
  eye = np.eye(k)
  h_inv = np.tile(eye, (num, 1, 1))
  active = np.isfinite(f)
  iters = np.zeros(num, dtype=int)
  history = [f.copy()]
  for it in range(max_iter):
    idx = np.flatnonzero(active)
    if idx.size == 0:
      break
    xi, fi, gi, hi = x[idx], f[idx], g[idx], h_inv[idx]
    p = -np.einsum('pij,pj->pi', hi, gi)
    slope = (p * gi).sum(1)
    uphill = ~(slope < 0)
    if uphill.any():  # Not a descent direction: forget the curvature, take steepest descent.
      hi[uphill] = eye
      p[uphill] = -gi[uphill]
      slope[uphill] = -(gi[uphill] ** 2).sum(1)
    step = np.ones(idx.size)
    f_new, g_new = np.full(idx.size, np.inf), np.zeros_like(gi)
    accepted = np.zeros(idx.size, dtype=bool)
    for _ in range(60):
      todo = np.flatnonzero(~accepted)
      if todo.size == 0:
        break
      fv, gv = fun_grad(xi[todo] + step[todo, None] * p[todo], idx[todo])
      ok = np.isfinite(fv) & (fv <= fi[todo] + 1e-4 * step[todo] * slope[todo])
      f_new[todo[ok]], g_new[todo[ok]] = fv[ok], gv[ok]
      accepted[todo[ok]] = True
      step[todo[~ok]] *= 0.5
    s = step[:, None] * p
    y = g_new - gi
    sy = (s * y).sum(1)
    update = accepted & (sy > 1e-30)
    if update.any():
      rho = (1.0 / sy[update])[:, None, None]
      v = eye - rho * np.einsum('pi,pj->pij', s[update], y[update])
      hi[update] = (np.einsum('pij,pjk,plk->pil', v, hi[update], v)
                    + rho * np.einsum('pi,pj->pij', s[update], s[update]))
    moved = idx[accepted]
    x[moved], f[moved], g[moved] = xi[accepted] + s[accepted], f_new[accepted], g_new[accepted]
    h_inv[idx] = hi
    iters[idx] += 1
    history.append(f.copy())
    done = ~accepted | (np.abs(g[idx]).max(1) < gtol)
    if it >= stall_iters:
      before = history[-1 - stall_iters][idx]
      done |= (before - f[idx]) <= stall_rtol * np.maximum(np.abs(f[idx]), 1e-300)
    active[idx[done]] = False
  return x, f, iters


def fit_parametric(n, d, loss, *, starts: np.ndarray | None = None, weights=None,
                   delta: float = HUBER_DELTA, max_iter: int = 1000, screen_iters: int = 20,
                   keep: int = 128) -> ParametricFit:
  """Approach 3 fit of final losses `loss` of runs with N params and D tokens (module doc).

  `starts` [S, 5] rows (a, b, e, α, β); default Chinchilla's 4500-point grid. `weights` [M]
  multiplies each point's Huber term (bootstrap counts). Two stages for speed: every start gets
  `screen_iters` BFGS iterations, then the best `keep` run to convergence. On the Epoch data all
  4500 starts run to convergence give the same optimum (989 of them reach it), in ~10x the time.
  """
  log_n, log_d, log_loss = _logs(n, d, loss)
  starts = chinchilla_init_grid() if starts is None else np.atleast_2d(np.asarray(starts, float))
  w = None if weights is None else np.asarray(weights, np.float64)[None, :]

  def fun_grad(x_q, rows):
    return huber_objective(x_q, log_n, log_d, log_loss, w, delta)

  if len(starts) > keep:
    x, f, _ = bfgs(fun_grad, starts, max_iter=screen_iters)
    starts = x[np.argsort(np.where(np.isfinite(f), f, np.inf))[:keep]]
  x, f, _ = bfgs(fun_grad, starts, max_iter=max_iter)
  best = int(np.nanargmin(f))
  return ParametricFit.from_vector(x[best], f[best])


def fit_parametric_weighted(n, d, loss, weights_RM: np.ndarray, start: np.ndarray,
                            delta: float = HUBER_DELTA, max_iter: int = 1000) -> list[ParametricFit]:
  """One fit per weight row (R bootstrap draws at once), each from `start` [5]."""
  log_n, log_d, log_loss = _logs(n, d, loss)
  weights_RM = np.asarray(weights_RM, np.float64)
  x0 = np.tile(np.asarray(start, np.float64), (len(weights_RM), 1))
  x, f, _ = bfgs(lambda x_q, rows: huber_objective(x_q, log_n, log_d, log_loss, weights_RM[rows],
                                                   delta), x0, max_iter=max_iter)
  return [ParametricFit.from_vector(xi, fi) for xi, fi in zip(x, f)]


def as_vector(fit: ParametricFit) -> np.ndarray:
  return np.array([np.log(fit.A), np.log(fit.B), np.log(fit.E), fit.alpha, fit.beta])


def _logs(n, d, loss):
  n, d, loss = (np.asarray(v, np.float64).ravel() for v in (n, d, loss))
  if not (n.size == d.size == loss.size) or n.size < 5:
    raise ValueError(f'approach 3 needs at least 5 runs with N, D and loss each; got {n.size}, '
                     f'{d.size}, {loss.size}')
  if (n <= 0).any() or (d <= 0).any() or (loss <= 0).any() or not np.isfinite(loss).all():
    raise ValueError('approach 3 needs positive N and D and positive finite losses')
  return np.log(n), np.log(d), np.log(loss)
