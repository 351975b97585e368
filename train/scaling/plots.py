"""PNG plots of a scaling sweep (matplotlib, Agg backend, imported here only: matplotlib is in
the `test` extra, not a core dependency).

- isoflops.png: loss vs N per budget with the approach-2 parabolas and their minima.
- envelope.png: training curves, loss vs FLOPs, with the approach-1 lower envelope.
- optimal_scaling.png: N_opt and D_opt vs C, each approach's power law, and Chinchilla's
  (0.50/0.50) and Kaplan's (0.73/0.27) exponents drawn through the data's centre for reference.
- parametric_contours.png: contours of the approach-3 L(N, D) with the runs, IsoFLOP lines and
  the efficient frontier (Hoffmann et al. 2022, Fig. 4 left panel).
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

import matplotlib  # noqa: I001 - the backend must be chosen before pyplot is imported.
matplotlib.use('Agg')
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from train import paths  # noqa: E402
from train.scaling import fit as fit_lib  # noqa: E402

_COLORS = plt.get_cmap('viridis')


def _color(i: int, n: int):
  return _COLORS(0.1 + 0.8 * i / max(n - 1, 1))


def plot_isoflops(rows, fits, path: str) -> str:
  done = [r for r in rows if r['status'] == 'done' and fit_lib.finite(r.get(fits['loss_key']))]
  budgets = sorted({r['budget'] for r in done})
  minima = {m['budget']: m for m in fits['approach2'].details['minima']} if 'approach2' in fits else {}
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  for i, c in enumerate(budgets):
    pts = sorted((r['params'], r[fits['loss_key']]) for r in done if r['budget'] == c)
    n, loss = np.array(pts).T
    ax.plot(n, loss, 'o', color=_color(i, len(budgets)), label=f'C = {c:.2g}')
    m = minima.get(c)
    if m:
      x = np.linspace(np.log(n.min()) - 0.2, np.log(n.max()) + 0.2, 100)
      ax.plot(np.exp(x), np.polyval(m['coef_n'], x), '-', color=_color(i, len(budgets)), lw=1)
      if np.isfinite(m['n_opt']):
        ax.plot(m['n_opt'], m['loss_min'], 'k*' if m['n_bracketed'] else 'kx', ms=9)
  ax.set(xscale='log', xlabel='parameters N', ylabel=fits['loss_key'].replace('_', ' '),
         title='IsoFLOP profiles (approach 2; * = fitted minimum)')
  ax.legend(fontsize=8)
  return _save(fig, path)


def plot_envelope(curves, fits, path: str) -> str:
  fig, ax = plt.subplots(figsize=(6.4, 4.4))
  sizes = sorted({c['params'] for c in curves})
  for c in curves:
    i = sizes.index(c['params'])
    ax.plot(c['flops'], c['loss'], '-', lw=0.8, alpha=0.7, color=_color(i, len(sizes)))
  if 'approach1' in fits:
    f = fits['approach1']
    ax.plot(f.flops, f.details['envelope_loss'], 'k-', lw=2, label='lower envelope (approach 1)')
    ax.legend(fontsize=8)
  ax.set(xscale='log', xlabel='training FLOPs C', ylabel='training loss',
         title='Loss vs compute (colour: model size)')
  lo = min((min(c['loss']) for c in curves), default=0)
  hi = np.percentile(np.concatenate([c['loss'] for c in curves]), 95) if curves else 1
  ax.set_ylim(lo - 0.05 * (hi - lo), hi)
  return _save(fig, path)


def plot_optimal(fits, path: str) -> str:
  fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
  approaches = [k for k in ('approach1', 'approach2', 'approach3') if k in fits]
  flops_all = np.concatenate([fits[k].flops for k in approaches if fits[k].flops.size] or [[1.0]])
  c = np.geomspace(flops_all.min() / 2, flops_all.max() * 2, 50)
  for ax, key, ref_key, label in ((axes[0], 'n', 'a', 'N_opt (parameters)'),
                                  (axes[1], 'd', 'b', 'D_opt (tokens)')):
    centre = None
    for j, name in enumerate(approaches):
      f = fits[name]
      exp = f.a if key == 'n' else f.b
      line = f.n_opt_at(c) if key == 'n' else f.d_opt_at(c)
      ax.plot(c, line, '-', color=f'C{j}', label=f'approach {name[-1]}: {ref_key} = {exp:.2f}')
      pts = f.n_opt if key == 'n' else f.d_opt
      if pts.size:  # Approach 1 has one optimum per envelope grid point: draw them small.
        ax.plot(f.flops, pts, 'o', color=f'C{j}', ms=2 if name == 'approach1' else 5, alpha=0.7)
      if centre is None:
        mid = np.sqrt(c[0] * c[-1])
        centre = (mid, float(f.n_opt_at(mid) if key == 'n' else f.d_opt_at(mid)))
    if centre:
      for ref, style in ((fit_lib.CHINCHILLA, ':'), (fit_lib.KAPLAN, '--')):
        name = 'Chinchilla' if ref is fit_lib.CHINCHILLA else 'Kaplan'
        ax.plot(c, centre[1] * (c / centre[0]) ** ref[ref_key], 'k' + style, lw=1,
                label=f'{name} {ref_key} = {ref[ref_key]:.2f} (slope only)')
    ax.set(xscale='log', yscale='log', xlabel='training FLOPs C', ylabel=label)
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.legend(fontsize=7)
  fig.suptitle('Compute-optimal model size and data')
  return _save(fig, path)


def plot_parametric(rows, fits, path: str) -> str:
  p = fits['parametric']
  done = [r for r in rows if r['status'] == 'done' and fit_lib.finite(r.get(fits['loss_key']))]
  n = np.array([r['params'] for r in done], float)
  d = np.array([r['tokens'] for r in done], float)
  loss = np.array([r[fits['loss_key']] for r in done], float)
  ln = np.linspace(np.log10(n.min()) - 0.5, np.log10(n.max()) + 0.5, 120)
  ld = np.linspace(np.log10(d.min()) - 0.5, np.log10(d.max()) + 0.5, 120)
  grid_n, grid_d = np.meshgrid(10 ** ln, 10 ** ld)
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  span = max(np.ptp(loss), 1e-3)  # Colour the data's loss range, not the far corners of the grid.
  levels = np.linspace(loss.min() - 0.25 * span, loss.max() + 0.5 * span, 21)
  cs = ax.contourf(grid_d, grid_n, p.predict(grid_n, grid_d), levels=levels, cmap='viridis_r',
                   extend='both')
  fig.colorbar(cs, ax=ax, label='predicted loss')
  ax.scatter(d, n, c=loss, cmap='viridis_r', vmin=cs.levels[0], vmax=cs.levels[-1],
             edgecolors='w', s=30, zorder=3)
  for c in sorted({r['budget'] for r in done}):  # Each budget's runs, joined: its IsoFLOP line.
    pts = sorted((r['params'], r['tokens']) for r in done if r['budget'] == c)
    ax.plot([p_[1] for p_ in pts], [p_[0] for p_ in pts], 'w:', lw=0.8)
  c_line = np.geomspace(6 * n.min() * d.min(), 6 * n.max() * d.max(), 50)
  n_opt, d_opt = p.frontier(c_line)
  ax.plot(d_opt, n_opt, 'r-', lw=2, label=f'efficient frontier (C = 6ND): N ∝ C^{p.a:.2f}')
  ax.set(xscale='log', yscale='log', xlabel='tokens D', ylabel='parameters N',
         xlim=(10 ** ld[0], 10 ** ld[-1]), ylim=(10 ** ln[0], 10 ** ln[-1]),
         title=f'L = {p.E:.2f} + {p.A:.3g}/N^{p.alpha:.2f} + {p.B:.3g}/D^{p.beta:.2f}')
  ax.legend(fontsize=8, loc='lower right')
  return _save(fig, path)


def plot_all(rows, curves, fits, out_dir: str) -> dict[str, str]:
  """Every plot the available fits allow; returns {name: path}."""
  out: dict[str, Any] = {}
  if any(r['status'] == 'done' for r in rows):
    out['IsoFLOP curves'] = plot_isoflops(rows, fits, paths.join(out_dir, 'isoflops.png'))
  if curves:
    out['loss vs compute'] = plot_envelope(curves, fits, paths.join(out_dir, 'envelope.png'))
  if any(k in fits for k in ('approach1', 'approach2', 'approach3')):
    out['N_opt and D_opt vs C'] = plot_optimal(fits, paths.join(out_dir, 'optimal_scaling.png'))
  if 'parametric' in fits:
    out['parametric fit'] = plot_parametric(rows, fits,
                                            paths.join(out_dir, 'parametric_contours.png'))
  return out


def _save(fig, path: str) -> str:
  """Renders `fig` in memory and writes it whole through train/paths.py (so `path` may be remote)."""
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, dpi=110, format=os.path.splitext(path)[1].lstrip('.') or 'png')
  plt.close(fig)
  paths.write_bytes(path, buf.getvalue())
  return path
