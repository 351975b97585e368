"""IsoFLOP sweep planner: compute budgets × a model-shape ladder → one training run per point.

For each budget C the planner picks `sizes_per_budget` rungs of the ladder around the size whose
tokens per parameter is closest to `tokens_per_param` (Chinchilla's ~20; Hoffmann et al. 2022,
Table 3), `rung_stride` rungs apart, so that the IsoFLOP minimum is bracketed (the fit reports
whether it was). Each point trains on D = C / flops_per_token tokens (PaLM App. B FLOPs, see
counting.py), rounded to whole steps of `batch · seq_len` tokens; its learning-rate schedule is
exactly its own length (warmup, then cosine to 10%: a cycle longer than the run hurts, Hoffmann
et al. Fig. A1).

The `config.sweep` fields (configs/sweeps/cpu.py shows them all):
  budgets            FLOPs: a sequence of numbers, '2e11,6e11' or 'logspace:LO:HI:COUNT'.
  ladder             ((d_model, num_layers[, num_heads]), ...), increasing in size.
  head_dim           num_heads = d_model / head_dim unless the rung gives num_heads.
  kv_heads           0 = multi-head (= num_heads); else this many KV heads (1 = multi-query).
  mlp_ratio, mlp_multiple   mlp_dim = mlp_ratio · d_model rounded up to a multiple.
  sizes_per_budget, rung_stride, tokens_per_param   which rungs each budget trains.
  batch_rule         'fixed' (train.batch_size) or 'power': batch_size · (C / C_min)^batch_exponent,
                     rounded to a multiple of batch_multiple.
  lr_width_exponent  lr = train.lr · (lr_reference_width / d_model)^exponent (0 = one lr).
  warmup_fraction, min_steps, log_points.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Sequence

from model.config import ConfigError
from train.scaling import counting

MODEL_KEYS = ('d_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim')


@dataclasses.dataclass(frozen=True)
class SweepPoint:
  name: str
  budget: float                 # Target FLOPs C.
  overrides: dict[str, Any]     # Dotted config keys -> values ('model.d_model': 64, ...).
  params: int                   # Total N (embeddings included).
  non_embedding_params: int
  active_params: int
  flops_per_token: float
  seq_len: int
  batch_size: int
  steps: int

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len

  @property
  def tokens(self) -> int:
    return self.steps * self.tokens_per_step

  @property
  def flops(self) -> float:
    """Actual C = flops_per_token · D (within half a step of the budget)."""
    return self.flops_per_token * self.tokens

  @property
  def tokens_per_param(self) -> float:
    return self.tokens / self.params

  def as_dict(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), tokens=self.tokens, flops=self.flops,
                tokens_per_param=self.tokens_per_param)


def parse_budgets(value: Any) -> list[float]:
  """Budgets in FLOPs from a sequence, '1e12,3e12' or 'logspace:LO:HI:COUNT'; sorted, distinct."""
  field = 'config.sweep.budgets'
  try:
    if isinstance(value, str):
      text = value.strip()
      if text.startswith('logspace:'):
        lo, hi, count = text.split(':')[1:]
        count = int(count)
        if count < 1:
          raise ValueError
        step = (math.log10(float(hi)) - math.log10(float(lo))) / max(count - 1, 1)
        budgets = [10 ** (math.log10(float(lo)) + i * step) for i in range(count)]
      else:
        budgets = [float(v) for v in text.split(',') if v.strip()]
    else:
      budgets = [float(v) for v in value]
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={value!r} is not a budget list; expected numbers in FLOPs, "
                      "e.g. (2e11, 6e11, 2e12), '2e11,6e11' or 'logspace:2e11:2e12:3'") from None
  if not budgets:
    raise ConfigError(f'{field} is empty; give at least one compute budget in FLOPs')
  if any(not math.isfinite(c) or c <= 0 for c in budgets):
    raise ConfigError(f'{field}={value!r}: every budget must be a positive finite FLOP count')
  budgets = sorted(budgets)
  if any(b / a < 1 + 1e-9 for a, b in zip(budgets, budgets[1:])):
    raise ConfigError(f'{field}={value!r} has repeated budgets')
  return budgets


def rung_model(base_model: dict[str, Any], rung: Sequence[int], sweep) -> dict[str, Any]:
  """cfg.model of one ladder rung (d_model, num_layers[, num_heads]) under the shape rule."""
  if not isinstance(rung, (tuple, list)) or len(rung) not in (2, 3) or not all(
      isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in rung):
    raise ConfigError(f'config.sweep.ladder entry {rung!r}: expected (d_model, num_layers) or '
                      '(d_model, num_layers, num_heads) of positive ints')
  d_model, num_layers = rung[0], rung[1]
  head_dim = int(sweep.head_dim)
  if len(rung) == 3:
    num_heads = rung[2]
  elif d_model % head_dim:
    raise ConfigError(f'config.sweep.ladder entry {tuple(rung)}: d_model={d_model} is not a multiple '
                      f'of config.sweep.head_dim={head_dim}; give num_heads as a third value')
  else:
    num_heads = d_model // head_dim
  kv = int(sweep.kv_heads) or num_heads
  if num_heads % kv:
    raise ConfigError(f'config.sweep.kv_heads={sweep.kv_heads} does not divide num_heads={num_heads} '
                      f'of ladder entry {tuple(rung)}')
  multiple = int(sweep.mlp_multiple)
  mlp_dim = multiple * math.ceil(float(sweep.mlp_ratio) * d_model / multiple)
  model = dict(base_model)
  model.update(d_model=d_model, num_layers=num_layers, num_heads=num_heads, num_kv_heads=kv,
               head_dim=head_dim, mlp_dim=mlp_dim)
  return model


def _batch_size(sweep, base_batch: int, budget: float, smallest: float) -> int:
  if sweep.batch_rule == 'fixed':
    return base_batch
  if sweep.batch_rule == 'power':
    multiple = int(sweep.batch_multiple)
    raw = base_batch * (budget / smallest) ** float(sweep.batch_exponent)
    return max(multiple, multiple * round(raw / multiple))
  raise ConfigError(f"config.sweep.batch_rule={sweep.batch_rule!r}; expected 'fixed' or 'power'")


def plan_sweep(cfg) -> list[SweepPoint]:
  """All points of the sweep in `cfg.sweep`, smallest budget first, smallest model first."""
  if 'sweep' not in cfg:
    raise ConfigError('the config has no sweep section (config.sweep); see configs/sweeps/cpu.py')
  sweep = cfg.sweep
  budgets = parse_budgets(sweep.budgets)
  ladder = list(sweep.ladder or ())
  if not ladder:
    raise ConfigError('config.sweep.ladder is empty; give (d_model, num_layers) rungs, smallest first')
  sizes, stride = int(sweep.sizes_per_budget), int(sweep.rung_stride)
  if sizes < 1 or stride < 1:  # Approach 2 needs >= 3 sizes per budget; the fit says so if not.
    raise ConfigError(f'config.sweep.sizes_per_budget={sizes} and config.sweep.rung_stride={stride} '
                      'must be >= 1')
  seq_len = int(cfg.data.seq_len)
  base_model = cfg.model.to_dict()
  models = [counting.as_model_config(rung_model(base_model, r, sweep)) for r in ladder]
  counts = [counting.param_counts(m) for m in models]
  fpts = [counting.training_flops_per_token(m, seq_len) for m in models]
  if any(b.total <= a.total for a, b in zip(counts, counts[1:])):
    raise ConfigError('config.sweep.ladder must increase in parameter count; got '
                      f'{[c.total for c in counts]}')
  span = (sizes - 1) * stride + 1
  if span > len(ladder):
    raise ConfigError(f'config.sweep.ladder has {len(ladder)} rungs but sizes_per_budget={sizes} '
                      f'with rung_stride={stride} needs {span}')
  ratio = float(sweep.tokens_per_param)
  if ratio <= 0:
    raise ConfigError(f'config.sweep.tokens_per_param={ratio} must be > 0')

  points = []
  for budget in budgets:
    batch = _batch_size(sweep, int(cfg.train.batch_size), budget, budgets[0])
    # The rung whose tokens/param at this budget is nearest the guess is the window's centre.
    misfit = [abs(math.log(budget / f / c.total / ratio)) for f, c in zip(fpts, counts)]
    centre = min(range(len(ladder)), key=misfit.__getitem__)
    first = min(max(centre - (span - 1) // 2, 0), len(ladder) - span)
    for i in range(first, first + span, stride):
      steps = max(1, round(budget / fpts[i] / (batch * seq_len)))
      if steps < int(sweep.min_steps):
        raise ConfigError(
            f'config.sweep.budgets: budget {budget:.3g} gives ladder rung {tuple(ladder[i])} only '
            f'{steps} steps of {batch}x{seq_len} tokens (< config.sweep.min_steps={sweep.min_steps}); '
            'raise the budget, lower the batch or use smaller rungs')
      m = models[i]
      lr = float(cfg.train.lr) * (float(sweep.lr_reference_width) / m.d_model) ** float(
          sweep.lr_width_exponent)
      overrides = {f'model.{k}': getattr(m, k) for k in MODEL_KEYS}
      overrides.update({
          'train.steps': steps, 'train.batch_size': batch, 'train.lr': float(f'{lr:.4g}'),
          'train.warmup_steps': max(1, round(float(sweep.warmup_fraction) * steps)),
          'train.log_every': max(1, steps // int(sweep.log_points)),
          'train.eval_every': 0, 'train.checkpoint_every': 0})
      points.append(SweepPoint(
          name=f'C{budget:.3g}_d{m.d_model}_L{m.num_layers}'.replace('+', ''), budget=budget,
          overrides=overrides, params=counts[i].total,
          non_embedding_params=counts[i].non_embedding, active_params=counts[i].active,
          flops_per_token=fpts[i], seq_len=seq_len, batch_size=batch, steps=steps))
  return points


def point_config(cfg, point: SweepPoint):
  """The ordinary training config of one point: `cfg` without its sweep section, overridden."""
  out = copy.deepcopy(cfg)
  if 'sweep' in out:
    with out.unlocked():  # Configs from config_flags are locked.
      del out['sweep']
  for key, value in point.overrides.items():
    section, name = key.split('.')
    out[section][name] = value
  return out


def format_plan(points: Sequence[SweepPoint], flops_per_s: float = 0.0,
                overhead_s: float = 0.0) -> str:
  """The plan as a fixed-width table; with `flops_per_s` > 0 an estimated time per point."""
  head = (f'{"point":<24} {"C (target)":>10} {"C (actual)":>10} {"d":>4} {"L":>3} {"H":>3} '
          f'{"N":>14} {"N non-emb":>14} {"FLOPs/tok":>9} {"D tokens":>9} {"D/N":>6} {"batch":>5} '
          f'{"steps":>6} {"lr":>8}')
  if flops_per_s > 0:
    head += f' {"est. min":>8}'
  lines = [head, '-' * len(head)]
  total_s = 0.0
  for p in points:
    o = p.overrides
    line = (f'{p.name:<24} {p.budget:>10.3g} {p.flops:>10.3g} {o["model.d_model"]:>4} '
            f'{o["model.num_layers"]:>3} {o["model.num_heads"]:>3} {p.params:>14,} '
            f'{p.non_embedding_params:>14,} {p.flops_per_token:>9.3g} {p.tokens:>9.3g} '
            f'{p.tokens_per_param:>6.1f} {p.batch_size:>5} {p.steps:>6} {o["train.lr"]:>8.3g}')
    if flops_per_s > 0:
      seconds = p.flops / flops_per_s + overhead_s
      total_s += seconds
      line += f' {seconds / 60:>8.1f}'
    lines.append(line)
  budgets = sorted({p.budget for p in points})
  lines.append(f'{len(points)} points, {len(budgets)} budgets, total {sum(p.flops for p in points):.3g} '
               'training FLOPs' + (f', estimated {total_s / 60:.0f} min at {flops_per_s:.3g} FLOP/s '
                                   f'+ {overhead_s:.0f} s per point' if flops_per_s > 0 else ''))
  return '\n'.join(lines)
