"""IsoFLOP planner (train/scaling/plan.py) and the bundled sweep configs."""
import math

import pytest

from configs.sweeps import cpu
from model.config import ConfigError, ModelConfig
from train import optim
from train.scaling import counting, plan


def _cfg(**sweep):
  cfg = cpu.get_config()
  cfg.sweep.update(sweep)
  return cfg


def test_cpu_sweep_plan_invariants():
  cfg = _cfg()
  points = plan.plan_sweep(cfg)
  budgets = sorted({p.budget for p in points})
  assert len(budgets) >= 3 and len(points) == len(budgets) * cfg.sweep.sizes_per_budget >= 15
  for p in points:
    point_cfg = plan.point_config(cfg, p)
    assert 'sweep' not in point_cfg and 'sweep' in cfg
    model = ModelConfig.from_dict(point_cfg.model.to_dict())
    # FLOPs per token are the model's own (PaLM App. B), and C = that x D within half a step.
    assert p.flops_per_token == model.flops_per_token(cfg.data.seq_len)
    assert p.params == model.param_count()
    assert abs(p.flops - p.budget) <= 0.5 * p.flops_per_token * p.tokens_per_step
    assert abs(p.flops / p.budget - 1) < 0.05
    # The schedule is exactly the run: steps x batch x seq = D, warmup a fraction, decay to 10%.
    t = point_cfg.train
    assert t.steps * t.batch_size * point_cfg.data.seq_len == p.tokens
    assert t.steps >= cfg.sweep.min_steps
    assert t.warmup_steps == max(1, round(cfg.sweep.warmup_fraction * t.steps))
    _, schedule = optim.make_optimizer(t, t.steps)
    assert float(schedule(t.steps)) == pytest.approx(0.1 * t.lr, rel=1e-5)
    assert model.num_heads * cfg.sweep.head_dim == model.d_model and model.num_kv_heads == model.num_heads
    assert model.mlp_dim % cfg.sweep.mlp_multiple == 0 and model.mlp_dim >= 8 / 3 * model.d_model
  for c in budgets:
    sizes = [p.params for p in points if p.budget == c]
    assert sizes == sorted(set(sizes))
    # The window brackets the tokens-per-parameter guess, so the minimum can be found.
    ratios = [p.tokens_per_param for p in points if p.budget == c]
    assert min(ratios) <= cfg.sweep.tokens_per_param <= max(ratios)


def test_cpu_sweep_fits_the_time_budget():
  """At the config's assumed throughput the sweep needs well under an hour on 2 cores."""
  cfg = _cfg()
  points = plan.plan_sweep(cfg)
  seconds = sum(p.flops for p in points) / cfg.sweep.flops_per_s + len(points) * cfg.sweep.overhead_s
  assert seconds < 40 * 60
  text = plan.format_plan(points, cfg.sweep.flops_per_s, cfg.sweep.overhead_s)
  assert all(p.name in text for p in points) and 'est. min' in text


def test_window_moves_with_the_budget_and_power_batch_rule():
  cfg = _cfg(batch_rule='power', batch_exponent=0.3, batch_multiple=4, lr_width_exponent=0.5)
  points = plan.plan_sweep(cfg)
  budgets = sorted({p.budget for p in points})
  smallest = [min(p.params for p in points if p.budget == c) for c in budgets]
  assert smallest == sorted(smallest) and smallest[-1] > smallest[0]
  batches = [next(p.batch_size for p in points if p.budget == c) for c in budgets]
  assert batches == sorted(batches) and batches[-1] > batches[0]
  assert all(b % 4 == 0 for b in batches)
  for p in points:  # lr = lr * (reference width / d)^0.5
    want = cfg.train.lr * math.sqrt(cfg.sweep.lr_reference_width / p.overrides['model.d_model'])
    assert p.overrides['train.lr'] == pytest.approx(want, rel=1e-3)


@pytest.mark.parametrize('value,want', [
    ((1e12, 1e13), [1e12, 1e13]), ('3e12, 1e12', [1e12, 3e12]), ([5e11], [5e11]),
    ('logspace:1e12:1e14:3', [1e12, 1e13, 1e14])])
def test_budget_formats(value, want):
  assert plan.parse_budgets(value) == pytest.approx(want)


@pytest.mark.parametrize('value,message', [
    ('lots', 'config.sweep.budgets'), ('logspace:1e12:1e13', 'config.sweep.budgets'),
    ((), 'is empty'), ((1e12, -1.0), 'positive'), ((1e12, 1e12), 'repeated'),
    (('1e12', None), 'config.sweep.budgets')])
def test_bad_budgets_name_the_field(value, message):
  with pytest.raises(ConfigError, match=message):
    plan.parse_budgets(value)


@pytest.mark.parametrize('sweep,message', [
    (dict(ladder=()), 'config.sweep.ladder is empty'),
    (dict(ladder=((64,),)), 'config.sweep.ladder entry'),
    (dict(ladder=((36, 2), (64, 2), (80, 2))), 'not a multiple of config.sweep.head_dim'),
    (dict(ladder=((64, 2), (32, 1), (96, 3)), sizes_per_budget=3), 'must increase'),
    (dict(sizes_per_budget=30), 'config.sweep.ladder has'),
    (dict(sizes_per_budget=0), 'config.sweep.sizes_per_budget'),
    (dict(batch_rule='sqrtish'), 'config.sweep.batch_rule'),
    (dict(kv_heads=3), 'config.sweep.kv_heads'),
    (dict(budgets='1e9'), 'min_steps'),
    (dict(tokens_per_param=0.0), 'config.sweep.tokens_per_param'),
])
def test_bad_sweep_config_names_the_field(sweep, message):
  with pytest.raises(ConfigError, match=message):
    plan.plan_sweep(_cfg(**sweep))


def test_no_sweep_section():
  cfg = cpu.get_config()
  with cfg.unlocked():
    del cfg['sweep']
  with pytest.raises(ConfigError, match='config.sweep'):
    plan.plan_sweep(cfg)


def test_chinchilla_like_reference_plan():
  """The TPU-scale reference plan: Chinchilla's 9 budgets 6e18-3e21 (Hoffmann et al. §3.2)."""
  from configs.sweeps import chinchilla_like
  cfg = chinchilla_like.get_config()
  points = plan.plan_sweep(cfg)
  budgets = sorted({p.budget for p in points})
  assert len(budgets) == 9 and budgets[0] == pytest.approx(6e18) and budgets[-1] == pytest.approx(3e21)
  for c in budgets:
    ratios = [p.tokens_per_param for p in points if p.budget == c]
    assert min(ratios) < 20 < max(ratios)
  for p in points:
    assert p.flops_per_token == counting.training_flops_per_token(
        plan.point_config(cfg, p).model, cfg.data.seq_len)
