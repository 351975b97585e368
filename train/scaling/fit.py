"""Compute-optimal scaling exponents by Chinchilla's three approaches, with bootstrap intervals.

Hoffmann et al. 2022 ("Training Compute-Optimal Large Language Models"), §3:
- Approach 1: the lower envelope of loss vs FLOPs over all training curves; at each FLOP count the
  run on the envelope gives N_opt(C) and D_opt(C); fit N_opt ∝ C^a, D_opt ∝ C^b.
- Approach 2: per IsoFLOP budget, a parabola of loss in log N (and in log D) locates the minimum;
  fit power laws to the minima.
- Approach 3: the parametric law L(N, D) = E + A/N^α + B/D^β (parametric.py); a = β/(α+β),
  b = α/(α+β).
Intervals are bootstrap percentiles (10th-90th by default, as in Chinchilla's Table 2) over runs
resampled with replacement (within each budget for approach 2).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import numpy as np

from train.scaling import parametric

CI_PERCENTILES = (10.0, 90.0)
# Published exponents of N_opt ∝ C^a and D_opt ∝ C^b (report.py and plots.py compare against them).
CHINCHILLA = {'a': 0.50, 'b': 0.50}     # Hoffmann et al. 2022 Table 2 (approaches 1 and 2).
KAPLAN = {'a': 0.73, 'b': 0.27}         # Kaplan et al. 2020, as quoted in Chinchilla Table 2.


def finite(v) -> bool:
  """Whether `v` is a finite Python number (None, strings and NaN/inf are not)."""
  return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class Curve:
  """One run's training curve: loss after `flops` FLOPs (increasing), N params, FLOPs/token."""
  params: float
  flops_per_token: float
  flops: np.ndarray
  loss: np.ndarray


@dataclasses.dataclass
class ExponentFit:
  """N_opt = n_coef·C^a and D_opt = d_coef·C^b from one approach, with bootstrap intervals."""
  approach: str
  a: float
  b: float
  n_coef: float
  d_coef: float
  a_ci: tuple[float, float] = (float('nan'), float('nan'))
  b_ci: tuple[float, float] = (float('nan'), float('nan'))
  flops: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))   # the optima used
  n_opt: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
  d_opt: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))
  details: dict = dataclasses.field(default_factory=dict)

  def n_opt_at(self, flops) -> np.ndarray:
    return self.n_coef * np.asarray(flops, np.float64) ** self.a

  def d_opt_at(self, flops) -> np.ndarray:
    return self.d_coef * np.asarray(flops, np.float64) ** self.b

  def tokens_per_param_at(self, flops) -> np.ndarray:
    return self.d_opt_at(flops) / self.n_opt_at(flops)

  def summary(self) -> dict[str, Any]:
    return {'approach': self.approach, 'a': self.a, 'a_ci': list(self.a_ci), 'b': self.b,
            'b_ci': list(self.b_ci), 'n_coef': self.n_coef, 'd_coef': self.d_coef,
            'optima': [{'flops': float(c), 'n_opt': float(n), 'd_opt': float(d)}
                       for c, n, d in zip(self.flops, self.n_opt, self.d_opt)],
            **{k: v for k, v in self.details.items() if _jsonable(v)}}


def fit_power_law(x, y) -> tuple[float, float]:
  """(exponent, coefficient) of y = coefficient · x^exponent, least squares in log-log."""
  lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
  if lx.size < 2 or np.ptp(lx) == 0:
    raise ValueError(f'a power law needs at least 2 distinct x values, got {lx.size}')
  slope, intercept = np.polyfit(lx, ly, 1)
  return float(slope), float(np.exp(intercept))


def _percentiles(values: Sequence[float], ci) -> tuple[float, float]:
  v = np.asarray([x for x in values if np.isfinite(x)])
  if v.size < 2:
    return (float('nan'), float('nan'))
  lo, hi = np.percentile(v, ci)
  return (float(lo), float(hi))


def _bootstrap(estimate: Callable[[np.ndarray], tuple[float, float] | None], draws_of_indices,
               ci) -> tuple[tuple[float, float], tuple[float, float], int]:
  a_s, b_s = [], []
  for idx in draws_of_indices:
    try:
      ab = estimate(idx)
    except (ValueError, np.linalg.LinAlgError, FloatingPointError):
      ab = None
    if ab is not None:
      a_s.append(ab[0])
      b_s.append(ab[1])
  return _percentiles(a_s, ci), _percentiles(b_s, ci), len(a_s)


# ---- Approach 1 ----------------------------------------------------------------------------------


def smooth(values, window: int) -> np.ndarray:
  """Centred moving average whose window shrinks symmetrically at the ends (so the last point,
  the run's final loss, is not averaged with earlier, higher losses)."""
  v = np.asarray(values, np.float64)
  half = max(int(window), 1) // 2
  out = np.empty_like(v)
  for i in range(v.size):
    h = min(half, i, v.size - 1 - i)
    out[i] = v[i - h:i + h + 1].mean()
  return out


def lower_envelope(curves: Sequence[Curve], flops_grid: np.ndarray) -> dict[str, np.ndarray]:
  """At each C of the grid, the run with the lowest loss at C (loss interpolated linearly in
  log FLOPs along each curve; only curves spanning C take part). Grid points where fewer than
  two curves take part are dropped."""
  out = {k: [] for k in ('flops', 'loss', 'n_opt', 'd_opt', 'run')}
  for c in np.asarray(flops_grid, np.float64):
    best, best_loss, count = -1, np.inf, 0
    for i, cv in enumerate(curves):
      if cv.flops[0] <= c <= cv.flops[-1]:
        count += 1
        value = np.interp(np.log(c), np.log(cv.flops), cv.loss)
        if value < best_loss:
          best, best_loss = i, value
    if count >= 2:
      out['flops'].append(c)
      out['loss'].append(best_loss)
      out['n_opt'].append(curves[best].params)
      out['d_opt'].append(c / curves[best].flops_per_token)
      out['run'].append(best)
  return {k: np.asarray(v) for k, v in out.items()}


def approach1(curves: Sequence[Curve], flops_range: tuple[float, float] | None = None,
              num_points: int = 60, smooth_window: int = 5, bootstrap: int = 0, seed: int = 0,
              ci=CI_PERCENTILES) -> ExponentFit:
  """Fits N_opt, D_opt ∝ C^a, C^b on the lower envelope between `flops_range` (default: from
  the smallest to the largest final FLOPs of the runs, where runs end near the envelope).
  Curves are first smoothed (`smooth`, as Chinchilla smooth theirs) over `smooth_window` points."""
  curves = [Curve(c.params, c.flops_per_token, np.asarray(c.flops, np.float64),
                  smooth(c.loss, smooth_window)) for c in curves if len(c.flops) >= 2]
  if len(curves) < 3:
    raise ValueError(f'approach 1 needs at least 3 training curves, got {len(curves)}')
  finals = np.array([c.flops[-1] for c in curves])
  lo, hi = flops_range or (finals.min(), finals.max())
  if not hi > lo:
    raise ValueError(f'approach 1 needs a FLOP range, got [{lo:.3g}, {hi:.3g}]')
  grid = np.geomspace(lo, hi, num_points)

  def estimate(idx):
    env = lower_envelope([curves[i] for i in idx], grid)
    if env['flops'].size < 2 or np.unique(env['n_opt']).size < 2:
      return None
    return fit_power_law(env['flops'], env['n_opt'])[0], fit_power_law(env['flops'], env['d_opt'])[0]

  env = lower_envelope(curves, grid)
  if np.unique(env['n_opt']).size < 2:
    raise ValueError('approach 1: one run is optimal across the whole FLOP range; the envelope '
                     'has no slope (add sizes or widen the budgets)')
  a, n_coef = fit_power_law(env['flops'], env['n_opt'])
  b, d_coef = fit_power_law(env['flops'], env['d_opt'])
  rng = np.random.default_rng(seed)
  draws = (rng.integers(0, len(curves), len(curves)) for _ in range(bootstrap))
  a_ci, b_ci, used = _bootstrap(estimate, draws, ci)
  return ExponentFit('approach1', a, b, n_coef, d_coef, a_ci, b_ci, env['flops'], env['n_opt'],
                     env['d_opt'], {'envelope_loss': env['loss'], 'bootstrap_used': used})


# ---- Approach 2 ----------------------------------------------------------------------------------


def isoflop_minima(params, tokens, flops, loss, budget) -> list[dict[str, Any]]:
  """Per budget: parabolas of loss in log N and in log D, their minima, and whether each minimum
  lies inside the sizes trained (bracketed)."""
  params, tokens, flops, loss, budget = (np.asarray(v, np.float64) for v in
                                         (params, tokens, flops, loss, budget))
  out = []
  for c in np.unique(budget):
    m = budget == c
    if np.unique(params[m]).size < 3:
      continue
    entry = {'budget': float(c), 'flops': float(np.exp(np.log(flops[m]).mean())),
             'points': int(m.sum())}
    for key, x in (('n', np.log(params[m])), ('d', np.log(tokens[m]))):
      if np.unique(x).size < 3:  # e.g. equal token counts: no parabola in that variable.
        entry.update({f'coef_{key}': [0.0, 0.0, 0.0], f'{key}_opt': float('nan'),
                      f'{key}_bracketed': False})
        continue
      coef = np.polyfit(x, loss[m], 2)
      entry[f'coef_{key}'] = [float(v) for v in coef]
      convex = coef[0] > 0
      x_opt = -coef[1] / (2 * coef[0]) if convex else np.nan
      entry[f'{key}_opt'] = float(np.exp(x_opt)) if convex else float('nan')
      entry[f'{key}_bracketed'] = bool(convex and x.min() <= x_opt <= x.max())
    entry['loss_min'] = float(np.polyval(entry['coef_n'], np.log(entry['n_opt']))) if np.isfinite(
        entry['n_opt']) else float('nan')
    out.append(entry)
  return out


def _approach2_exponents(minima: list[dict[str, Any]], require_bracketed: bool):
  use = [m for m in minima if np.isfinite(m['n_opt']) and np.isfinite(m['d_opt'])]
  if require_bracketed:
    use = [m for m in use if m['n_bracketed'] and m['d_bracketed']]
  if len(use) < 2:
    return None
  c = np.array([m['flops'] for m in use])
  a, n_coef = fit_power_law(c, [m['n_opt'] for m in use])
  b, d_coef = fit_power_law(c, [m['d_opt'] for m in use])
  return a, b, n_coef, d_coef, use


def approach2(params, tokens, flops, loss, budget, bootstrap: int = 0, seed: int = 0,
              ci=CI_PERCENTILES) -> ExponentFit:
  """IsoFLOP parabolas, then power laws over the budgets' minima. Minima outside the sizes
  trained are left out when at least two budgets are bracketed (flagged in `details`)."""
  params, tokens, flops, loss, budget = (np.asarray(v, np.float64) for v in
                                         (params, tokens, flops, loss, budget))
  minima = isoflop_minima(params, tokens, flops, loss, budget)
  fitted = _approach2_exponents(minima, require_bracketed=True)
  all_bracketed = fitted is not None and len(fitted[4]) == len(minima)
  if fitted is None:
    fitted = _approach2_exponents(minima, require_bracketed=False)
  if fitted is None:
    convex = sum(np.isfinite(m['n_opt']) and np.isfinite(m['d_opt']) for m in minima)
    raise ValueError(f'approach 2 needs at least 2 budgets with >= 3 sizes and a convex IsoFLOP '
                     f'parabola; got {len(minima)} budgets with 3+ sizes, {convex} convex')
  a, b, n_coef, d_coef, used = fitted
  groups = [np.flatnonzero(budget == c) for c in np.unique(budget)]
  rng = np.random.default_rng(seed)

  def draws():
    for _ in range(bootstrap):  # Resample runs within each budget (stratified bootstrap).
      yield np.concatenate([rng.choice(g, g.size) for g in groups])

  def estimate(idx):
    mins = isoflop_minima(params[idx], tokens[idx], flops[idx], loss[idx], budget[idx])
    got = _approach2_exponents(mins, True) or _approach2_exponents(mins, False)
    return None if got is None else got[:2]

  a_ci, b_ci, n_used = _bootstrap(estimate, draws(), ci)
  return ExponentFit('approach2', a, b, n_coef, d_coef, a_ci, b_ci,
                     np.array([m['flops'] for m in used]), np.array([m['n_opt'] for m in used]),
                     np.array([m['d_opt'] for m in used]),
                     {'minima': minima, 'all_bracketed': all_bracketed, 'bootstrap_used': n_used})


# ---- Approach 3 ----------------------------------------------------------------------------------


def approach3(params, tokens, loss, bootstrap: int = 0, seed: int = 0, ci=CI_PERCENTILES,
              starts: np.ndarray | None = None,
              flops_for_optima: Sequence[float] = ()) -> tuple[ExponentFit, parametric.ParametricFit]:
  """The parametric fit (Chinchilla grid + BFGS), bootstrap refits warm-started at the estimate.
  The power-law coefficients are those of Hoffmann et al. Eq. 4 (C = 6·N·D)."""
  params, tokens, loss = (np.asarray(v, np.float64) for v in (params, tokens, loss))
  fit = parametric.fit_parametric(params, tokens, loss, starts=starts)
  g = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / (fit.alpha + fit.beta))
  n_coef, d_coef = g * 6.0 ** -fit.a, 6.0 ** -fit.b / g
  a_ci = b_ci = (float('nan'), float('nan'))
  boot: dict[str, Any] = {}
  if bootstrap:
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(loss), np.full(len(loss), 1.0 / len(loss)), size=bootstrap)
    fits = parametric.fit_parametric_weighted(params, tokens, loss, weights,
                                              parametric.as_vector(fit))
    a_ci = _percentiles([f.a for f in fits], ci)
    b_ci = _percentiles([f.b for f in fits], ci)
    for name in ('A', 'B', 'E', 'alpha', 'beta'):
      boot[f'{name}_ci'] = list(_percentiles([getattr(f, name) for f in fits], ci))
  c = np.asarray(flops_for_optima, np.float64)
  n_opt, d_opt = fit.frontier(c) if c.size else (np.zeros(0), np.zeros(0))
  details = {'parametric': fit.as_dict(), **boot}
  return ExponentFit('approach3', fit.a, fit.b, n_coef, d_coef, a_ci, b_ci, c, n_opt, d_opt,
                     details), fit


def _jsonable(v) -> bool:
  return isinstance(v, (int, float, str, bool, list, dict)) or v is None
