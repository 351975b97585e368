"""Scaling-law fitters (train/scaling/fit.py, parametric.py) and the report (report.py)."""
import csv
import json
import os

import numpy as np
import pytest

from train.scaling import fit, parametric, report

DATA = os.path.join(os.path.dirname(__file__), '..', '..', '..', 'shared', 'data', 'chinchilla_epoch')
DATA = os.environ.get('PALMAX_CHINCHILLA_DATA', os.path.normpath(DATA))
if not os.path.isdir(DATA):
  DATA = '/work/shared/data/chinchilla_epoch'
# A spread-out ~50-start subset of Chinchilla's grid: enough for the small synthetic problems (the
# Epoch refit test uses the whole grid).
FEW_STARTS = parametric.chinchilla_init_grid()[::97]
# Epoch's headline estimate (Besiroglu et al. 2024): the "true" law of the synthetic tests.
TRUE = parametric.ParametricFit(A=482.01, B=2085.43, E=1.817, alpha=0.3478, beta=0.3658, objective=0)


def _epoch_points():
  """README recipe: 245 digitised points, drop the 5 highest losses, D = C / (6 N)."""
  with open(os.path.join(DATA, 'svg_extracted_data.csv')) as f:
    rows = list(csv.DictReader(f))
  n = np.array([float(r['Model Size']) for r in rows])
  c = np.array([float(r['Training FLOP']) for r in rows])
  loss = np.array([float(r['loss']) for r in rows])
  keep = loss < np.sort(loss)[-5]
  return n[keep], c[keep] / (6 * n[keep]), loss[keep]


@pytest.fixture(scope='module')
def epoch_fit():
  if not os.path.isfile(os.path.join(DATA, 'svg_extracted_data.csv')):
    pytest.skip(f'Chinchilla/Epoch data not found in {DATA}')
  n, d, loss = _epoch_points()
  assert n.size == 240
  return (n, d, loss), parametric.fit_parametric(n, d, loss)


def test_approach3_reproduces_epoch_refit(epoch_fit):
  """Chinchilla's grid + exact-gradient BFGS on summed Huber (δ=1e-3) gives Epoch's refit."""
  _, got = epoch_fit
  with open(os.path.join(DATA, 'expected_fits.json')) as f:
    want = json.load(f)['pure_huber_240pts_refit']
  for name in ('A', 'B', 'E', 'alpha', 'beta'):
    assert getattr(got, name) == pytest.approx(want[name], rel=0.02), name
  # The published refit: A≈478, B≈2143, E≈1.817, α≈0.347, β≈0.367, and it is the same optimum.
  assert (got.A, got.B, got.E) == pytest.approx((478, 2143, 1.817), rel=0.02)
  assert (got.alpha, got.beta) == pytest.approx((0.347, 0.367), rel=0.02)
  assert got.objective == pytest.approx(want['objective_sum'], rel=1e-3)
  assert got.a == pytest.approx(0.514, abs=0.002)


def test_exact_gradient_single_start_does_not_stall(epoch_fit):
  """From Hoffmann's published values, finite-difference L-BFGS-B stalls at the start point
  (README pitfall); exact gradients reach the optimum."""
  (n, d, loss), best = epoch_fit
  start = [np.log(406.4), np.log(410.7), np.log(1.69), 0.34, 0.28]
  got = parametric.fit_parametric(n, d, loss, starts=start)
  assert got.objective == pytest.approx(best.objective, rel=1e-6)
  assert got.B == pytest.approx(best.B, rel=1e-3)


def test_gradient_matches_autodiff():
  import jax
  import jax.numpy as jnp
  n, d, loss = _epoch_points() if os.path.isdir(DATA) else (np.geomspace(1e8, 1e10, 9),) * 2 + (
      np.linspace(3, 2, 9),)
  x = np.array([[6.0, 7.5, 0.6, 0.35, 0.37], [3.0, 1.0, -0.5, 0.8, 0.2]])
  f, g = parametric.huber_objective(x, np.log(n), np.log(d), np.log(loss))

  def objective(p):
    pred = jax.scipy.special.logsumexp(jnp.stack(
        [p[0] - p[3] * jnp.log(n), p[1] - p[4] * jnp.log(d), jnp.full(n.shape, p[2])]), axis=0)
    r = jnp.log(loss) - pred
    return jnp.sum(jnp.where(jnp.abs(r) <= 1e-3, 0.5 * r * r, 1e-3 * (jnp.abs(r) - 0.5e-3)))

  with jax.enable_x64(True):
    value_and_grad = jax.jit(jax.value_and_grad(objective))
    for i in range(2):
      want_f, want_g = value_and_grad(jnp.asarray(x[i]))
      assert f[i] == pytest.approx(float(want_f), rel=1e-12)
      np.testing.assert_allclose(g[i], np.asarray(want_g), rtol=1e-9, atol=1e-15)


def test_frontier_matches_published_allocations():
  # Hoffmann et al. TeX values at Gopher's budget: 40.4B parameters, 2.38T tokens (FACTS.md [C]).
  tex = parametric.ParametricFit(A=np.exp(6.0073404), B=np.exp(6.0179186), E=1.6934,
                                 alpha=0.33917, beta=0.28491, objective=0)
  n, d = tex.frontier(5.76e23)
  assert (n, d) == pytest.approx((40.4e9, 2.38e12), rel=0.01)
  # Epoch's headline: ~24.6 tokens/parameter at 6e18, 21.6 at 1e21, 18.4 at 5.76e23, 17.1 at 1e25.
  for c, ratio in ((6e18, 24.6), (1e21, 21.6), (5.76e23, 18.4), (1e25, 17.1)):
    n, d = TRUE.frontier(c)
    assert d / n == pytest.approx(ratio, rel=0.02)
    assert 6 * n * d == pytest.approx(c, rel=1e-9)


def _synthetic_isoflops(seed=0, noise=0.005, law=TRUE):
  """7 IsoFLOP budgets 1e18-1e21; sizes within ±0.6 decades of the true optimum on a fixed
  grid; D = C / 6N; log-normal loss noise."""
  rng = np.random.default_rng(seed)
  sizes = np.geomspace(1e7, 1e11, 41)
  rows = []
  for c in np.geomspace(1e18, 1e21, 7):
    n_opt, _ = law.frontier(c)
    for n in sizes[np.abs(np.log10(sizes / n_opt)) <= 0.6]:
      d = c / (6 * n)
      rows.append((n, d, c, float(law.predict(n, d)) * np.exp(rng.normal(0, noise))))
  return [np.array(v) for v in zip(*rows)]


def _synthetic_curves(seed=0):
  """31 model sizes, each a loss curve over 1e8-1e12 tokens (a per-run offset and per-point noise)."""
  rng = np.random.default_rng(seed)
  curves = []
  for n in np.geomspace(1e7, 1e10, 31):
    d = np.geomspace(1e8, 1e12, 81)
    loss = TRUE.predict(n, d) * np.exp(rng.normal(0, 0.002) + rng.normal(0, 0.001, d.size))
    curves.append(fit.Curve(n, 6 * n, 6 * n * d, loss))
  return curves


def test_all_three_approaches_recover_the_true_exponents():
  n, d, c, loss = _synthetic_isoflops()
  a1 = fit.approach1(_synthetic_curves(), flops_range=(1e18, 1e21), bootstrap=20)
  a2 = fit.approach2(n, d, c, loss, c, bootstrap=100)
  a3, law = fit.approach3(n, d, loss, bootstrap=20, starts=FEW_STARTS)
  for est in (a1, a2, a3):
    assert est.a == pytest.approx(TRUE.a, abs=0.03), est.approach
    assert est.b == pytest.approx(TRUE.b, abs=0.03), est.approach
    assert est.a_ci[0] <= est.a_ci[1] and est.b_ci[0] <= est.b_ci[1]
    assert est.a_ci[0] - 0.02 <= est.a <= est.a_ci[1] + 0.02
  assert a2.details['all_bracketed']
  assert (law.alpha, law.beta) == pytest.approx((TRUE.alpha, TRUE.beta), abs=0.03)
  # The frontier and tokens per parameter "for any budget" agree with the true law's.
  c_new = 1e22
  n_true, d_true = TRUE.frontier(c_new)
  for est in (a2, a3):
    assert est.n_opt_at(c_new) == pytest.approx(n_true, rel=0.25)
    assert est.tokens_per_param_at(c_new) == pytest.approx(d_true / n_true, rel=0.5)


def test_power_law_and_parabola_minimum_are_exact_without_noise():
  x = np.geomspace(1e18, 1e21, 5)
  assert fit.fit_power_law(x, 3.0 * x ** 0.42) == pytest.approx((0.42, 3.0), rel=1e-9)
  n = np.geomspace(1e8, 1e10, 7)
  loss = 2.0 + 0.1 * (np.log(n) - np.log(1e9)) ** 2
  (m,) = fit.isoflop_minima(n, 1e20 / (6 * n), np.full(7, 1e20), loss, np.full(7, 1e20))
  assert m['n_opt'] == pytest.approx(1e9, rel=1e-9) and m['n_bracketed']
  (m,) = fit.isoflop_minima(n[:3], 1e20 / (6 * n[:3]), np.full(3, 1e20), loss[:3], np.full(3, 1e20))
  assert not m['n_bracketed']  # The minimum lies beyond the largest size trained.


def test_fitters_refuse_too_little_data():
  with pytest.raises(ValueError, match='approach 1 needs at least 3'):
    fit.approach1(_synthetic_curves()[:2])
  with pytest.raises(ValueError, match='approach 2 needs at least 2 budgets'):
    fit.approach2([1e8, 2e8, 4e8], [1e9] * 3, [1e18] * 3, [3.0, 2.9, 3.1], [1e18] * 3)
  with pytest.raises(ValueError, match='approach 3 needs at least 5'):
    parametric.fit_parametric([1e8, 2e8], [1e9, 1e9], [3.0, 2.9])
  with pytest.raises(ValueError, match='positive'):
    parametric.fit_parametric([1e8] * 5, [1e9] * 5, [3.0, 2.9, -1, 2, 2])


def test_report_states_exponents_and_says_when_they_differ(tmp_path):
  """A Kaplan-like law (a ≈ 0.73): the report gives a, b with intervals and says they differ."""
  kaplan_like = parametric.ParametricFit(A=400.0, B=2000.0, E=1.8, alpha=0.13, beta=0.36, objective=0)
  n, d, c, loss = _synthetic_isoflops(seed=1, noise=0.002, law=kaplan_like)
  rows = [{'name': f'p{i}', 'status': 'done', 'budget': ci, 'params': ni, 'non_embedding_params': ni * 0.8,
           'tokens': di, 'flops': ci, 'tokens_per_param': di / ni, 'steps': 1000, 'eval_loss': li}
          for i, (ni, di, ci, li) in enumerate(zip(n, d, c, loss))]
  rows.append(dict(rows[0], name='broken', status='failed', eval_loss=None))
  fits = report.run_fits(rows, [], bootstrap=20, approach3_starts=FEW_STARTS)
  assert fits['approach2'].a > 0.6 and fits['approach3'].a == pytest.approx(kaplan_like.a, abs=0.03)
  assert 'approach1' in fits['skipped']   # No curves were given.
  text = report.render_report(rows, fits, report.frontier_rows(fits, [1e20]), {})
  assert 'differ' in text and 'not forced' in text and 'failed: broken' in text
  assert f'{fits["approach3"].a:.3f}' in text and '[' in text   # a with its interval.
