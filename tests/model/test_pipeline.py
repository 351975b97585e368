"""Pipeline schedules (model/pipeline.py): the schedule table, the bubble fraction, numerical
equivalence with the plain scan on one device, and errors for what cannot be split.
(Sharded multi-step training with pipelines: tests/train/test_parallel_training.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import pipeline, transformer
from model.config import MoEConfig
from model.pipeline import PipelineConfig, PipelineError
from tests.conftest import random_tokens, tiny_model_config

SCHEDULES = [PipelineConfig(2, 2), PipelineConfig(4, 4), PipelineConfig(4, 1), PipelineConfig(3, 5),
             PipelineConfig(2, 4, 'circular', 2), PipelineConfig(4, 4, 'circular', 2),
             PipelineConfig(2, 3, 'circular', 3)]


@pytest.mark.parametrize('p', SCHEDULES, ids=str)
def test_schedule_visits_every_chunk_once_in_order_and_bubble_matches_formula(p):
  table = pipeline.schedule_table(p)
  done = {}  # microbatch -> chunks (repeat * S + stage) in the order they ran
  when = {}  # (microbatch, chunk) -> iteration
  for t, row in enumerate(table):
    for s, (m, r) in enumerate(row):
      if m >= 0:
        done.setdefault(m, []).append(r * p.stages + s)
        when[m, r * p.stages + s] = t
  chunks = p.stages * p.repeats
  assert sorted(done) == list(range(p.microbatches))
  for m, order in done.items():
    assert order == list(range(chunks))              # Depth order, each chunk once.
    for c in range(1, chunks):                       # Each after its predecessor...
      assert when[m, c] > when[m, c - 1]
      if c % p.stages:                               # ...the very next iteration within a pass.
        assert when[m, c] == when[m, c - 1] + 1
  idle = float(np.mean(table[..., 0] < 0))
  assert idle == pytest.approx(p.bubble_fraction)
  if p.repeats == 1:  # GPipe: (S-1)/(M+S-1), Huang et al. 2019.
    assert p.bubble_fraction == pytest.approx((p.stages - 1) / (p.microbatches + p.stages - 1))


def test_circular_shrinks_the_bubble_by_the_repeats():
  gpipe, circ = PipelineConfig(4, 8), PipelineConfig(4, 8, 'circular', 4)
  assert gpipe.bubble_fraction == pytest.approx(3 / 11)
  assert circ.bubble_fraction == pytest.approx(3 / 35)


def _loss_and_grads(model, tokens, pcfg):
  graphdef, params = nnx.split(model)

  def loss(p):
    logits, _, aux = nnx.merge(graphdef, p).forward(tokens)
    return jnp.mean(logits ** 2), aux

  with pipeline.use_pipeline(pcfg):
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


_MODELS = {}


def _model(**kw):
  key = repr(sorted(kw.items()))
  if key not in _MODELS:
    _MODELS[key] = transformer.build(tiny_model_config(**kw), seed=1)
  return _MODELS[key]


# Local/global layers and parallel blocks: per-layer windows ride through the stages too.
VARIED = dict(num_layers=4, block='parallel', layer_pattern='LG', sliding_window=4)


@pytest.mark.parametrize('pcfg', [
    PipelineConfig(2, 4, 'circular', 2),
    pytest.param(PipelineConfig(4, 8), marks=pytest.mark.slow),
    pytest.param(PipelineConfig(2, 2), marks=pytest.mark.slow)], ids=str)
def test_pipelined_forward_and_grads_equal_plain_scan(pcfg):
  model = _model(**VARIED)
  tokens = random_tokens(0, (8, 10), 61)
  (ref, _), ref_g = _loss_and_grads(model, tokens, None)
  (got, _), got_g = _loss_and_grads(model, tokens, pcfg)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(got_g), jax.tree.leaves(ref_g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_pipelined_moe_stats_are_microbatch_means():
  """Dropless routing is per token, so loads and router z-losses averaged over equal-sized
  microbatches equal the full-batch values, per layer in depth order."""
  cfg = tiny_model_config(num_layers=4, moe=MoEConfig(num_experts=4, top_k=2, expert_mlp_dim=16,
                                                      dispatch='dropless'))
  model = transformer.build(cfg, seed=2)
  tokens = random_tokens(3, (8, 6), 61)
  (ref, ref_aux), _ = _loss_and_grads(model, tokens, None)
  (got, got_aux), _ = _loss_and_grads(model, tokens, PipelineConfig(2, 2, 'circular', 2))
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  for key in ('load', 'router_z_loss'):
    np.testing.assert_allclose(got_aux['stack0']['block0'][key], ref_aux['stack0']['block0'][key],
                               rtol=1e-5, atol=1e-7)


def test_decoding_with_a_cache_ignores_the_pipeline():
  model = _model(**VARIED)
  tokens = random_tokens(0, (2, 5), 61)
  cache = transformer.init_cache(model.cfg, 2, 8)
  graphdef, params = nnx.split(model)
  f = lambda p, c: nnx.merge(graphdef, p)(tokens, c)[0]
  ref = jax.jit(f)(params, cache)
  with pipeline.use_pipeline(PipelineConfig(2, 2)):
    np.testing.assert_allclose(jax.jit(f)(params, cache), ref, rtol=1e-6)


def test_bad_pipeline_settings_fail_clearly():
  dense4 = tiny_model_config(num_layers=4).layer_groups()
  with pytest.raises(PipelineError, match=r'num_layers=4 .* not divisible by config.pipeline.stages=3'):
    PipelineConfig(3, 3).check_fits(dense4)
  with pytest.raises(PipelineError, match=r'stages=4 x config.pipeline.circular_repeats=2'):
    PipelineConfig(4, 4, 'circular', 2).check_fits(dense4)
  with pytest.raises(PipelineError, match='not divisible by config.pipeline.microbatches=3'):
    PipelineConfig(2, 3).check_fits(dense4, batch=8)
  with pytest.raises(PipelineError, match='microbatch of 4 rows .* 8 batch shards'):
    PipelineConfig(2, 2).check_fits(dense4, batch=8, batch_shards=8)
  mixed = tiny_model_config(num_layers=4, moe=MoEConfig(num_experts=4, top_k=2, expert_mlp_dim=16,
                                                        first_dense_layers=2)).layer_groups()
  with pytest.raises(PipelineError, match='one scanned layer group.*first_dense_layers'):
    PipelineConfig(2, 2).check_fits(mixed)
  with pytest.raises(PipelineError, match='microbatches=2 must be >= config.pipeline.stages=4'):
    PipelineConfig(4, 2, 'circular', 2).validate()
  with pytest.raises(PipelineError, match="schedule='1f1b'"):
    PipelineConfig.from_config({'schedule': '1f1b'})
  with pytest.raises(PipelineError, match='must equal the mesh pipeline axis size 4'):
    PipelineConfig.from_config({'stages': 2}, mesh_pipeline=4)


def test_moe_every_other_layer_names_the_units_that_do_not_divide():
  # 6 layers with MoE every 2nd one scan as 3 units of 2 layers: 6 layers divide by 2 stages but
  # 3 units do not, so the message must say units and what would fit (a multiple of 4 layers).
  moe6 = tiny_model_config(num_layers=6, moe=MoEConfig(num_experts=4, top_k=2, expert_mlp_dim=16,
                                                       interval=2)).layer_groups()
  assert moe6 == ((3, 'DM'),)
  with pytest.raises(PipelineError) as e:
    PipelineConfig(2, 2).check_fits(moe6)
  msg = str(e.value)
  assert 'num_layers=6 is 3 scanned units of 2 layers' in msg
  assert 'config.model.moe.interval=2' in msg
  assert '3 units do not split evenly over config.pipeline.stages=2' in msg
  assert 'use a multiple of 4 layers' in msg and '\n' not in msg
  with pytest.raises(PipelineError, match=r'use a multiple of 8 layers .*2 stages x 2 repeats'):
    PipelineConfig(2, 2, 'circular', 2).check_fits(moe6)
  PipelineConfig(2, 2).check_fits(tiny_model_config(num_layers=8, moe=MoEConfig(
      num_experts=4, top_k=2, expert_mlp_dim=16, interval=2)).layer_groups())   # 4 units: fits
  p = PipelineConfig.from_config({'stages': 0, 'microbatches': 0}, mesh_pipeline=4)
  assert (p.stages, p.microbatches, p.repeats) == (4, 4, 1)
  # The forward checks too, before tracing any layer.
  model = _model(**VARIED)
  with pipeline.use_pipeline(PipelineConfig(3, 3)), pytest.raises(PipelineError, match='stages=3'):
    model(random_tokens(0, (3, 4), 61))
