import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from model import layers, moe, sharding
from tests.conftest import tiny_model_config


def _moe_cfg(**kw):
  base = dict(num_experts=4, top_k=2, expert_mlp_dim=16, gating='softmax_topk',
              dispatch='dropless', capacity_factor=1.25)
  base.update(kw)
  cfg = moe.MoEConfig(**base)
  cfg.validate()
  return cfg


def _build(mcfg, seed=0, **model_kw):
  return moe.MoE(tiny_model_config(**model_kw), mcfg, nnx.Rngs(seed))


def _jit_fwd(model):
  """A jitted functional forward (eager NNX is slow)."""
  graphdef, state = nnx.split(model)
  f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
  return lambda x: f(state, x)


def _x(seed, b=2, t=8, d=32):
  return jax.random.normal(jax.random.key(seed), (b, t, d), jnp.float32)


# ---- numpy reference: one token at a time ----------------------------------------------------

def _act(name, h):
  if name == 'swiglu':
    return h / (1.0 + np.exp(-h))
  return 0.5 * h * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3)))


def _ref_route(logit_E, bias_E, mcfg):
  """(experts in choice order, weights) for one token, written with plain loops."""
  k = mcfg.top_k
  if mcfg.gating == 'sigmoid':
    s = 1.0 / (1.0 + np.exp(-logit_E))
    order = sorted(range(len(s)), key=lambda i: (-(s[i] + bias_E[i]), i))[:k]
    w = [s[i] for i in order]
    return order, [v / sum(w) for v in w]
  if mcfg.gating == 'topk_softmax':
    order = sorted(range(len(logit_E)), key=lambda i: (-(logit_E[i] + bias_E[i]), i))[:k]
    ex = [math.exp(logit_E[i] - max(logit_E[j] for j in order)) for i in order]
    return order, [v / sum(ex) for v in ex]
  ex = np.exp(logit_E - logit_E.max())
  p = ex / ex.sum()
  order = sorted(range(len(p)), key=lambda i: (-(p[i] + bias_E[i]), i))[:k]
  w = [p[i] for i in order]
  if mcfg.renormalize:
    w = [v / sum(w) for v in w]
  return order, w


def _ref_forward(model, x_BTD, keep=None):
  """Per-token loop. keep(token, choice) -> bool lets a test drop slots by hand."""
  mcfg, cfg = model.moe_cfg, model.cfg
  router = np.asarray(model.router[...], np.float64)
  bias = np.asarray(model.router_bias[...], np.float64)
  wg, wd = np.asarray(model.w_gate[...], np.float64), np.asarray(model.w_down[...], np.float64)
  wu = np.asarray(model.w_up[...], np.float64) if cfg.gated else None
  x = np.asarray(x_BTD, np.float64).reshape(-1, x_BTD.shape[-1])
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    order, w = _ref_route(x[n] @ router, bias, mcfg)
    for j, (e, we) in enumerate(zip(order, w)):
      if keep is not None and not keep(n, j):
        continue
      h = _act(cfg.activation, x[n] @ wg[e])
      if cfg.gated:
        h = h * (x[n] @ wu[e])
      y[n] += we * mcfg.routed_scaling_factor * (h @ wd[e])
  return y.reshape(x_BTD.shape)


# ---- Tests -----------------------------------------------------------------------------------

@pytest.mark.parametrize('dispatch', ['capacity', 'dropless'])
def test_one_expert_top1_equals_dense_mlp(dispatch):
  cfg = tiny_model_config()
  mlp = layers.MLP(cfg, nnx.Rngs(1))
  m = moe.MoE(cfg, _moe_cfg(num_experts=1, top_k=1, expert_mlp_dim=cfg.mlp_dim,
                            gating='topk_softmax', dispatch=dispatch), nnx.Rngs(2))
  m.w_gate[...] = mlp.w_gate[...][None]
  m.w_up[...] = mlp.w_up[...][None]
  m.w_down[...] = mlp.w_down[...][None]
  x = _x(0)
  y, aux = _jit_fwd(m)(x)
  np.testing.assert_allclose(y, jax.jit(lambda x: mlp(x))(x), rtol=1e-5, atol=1e-5)
  assert float(aux['dropped_fraction']) == 0.0


@pytest.mark.parametrize('gating,renorm,activation,scale', [
    ('softmax_topk', False, 'swiglu', 1.0), ('softmax_topk', True, 'gelu', 2.0),
    ('topk_softmax', False, 'geglu', 1.0), ('sigmoid', False, 'swiglu', 2.5)])
def test_gating_matches_per_token_loop(gating, renorm, activation, scale, dispatch='dropless'):
  # capacity_factor = E: nothing can be dropped, so both dispatches must match the loop.
  m = _build(_moe_cfg(gating=gating, renormalize=renorm, dispatch=dispatch, capacity_factor=4.0,
                      top_k=2, routed_scaling_factor=scale), activation=activation)
  m.router[...] = m.router[...] * 20.0  # Spread the router so gatings differ visibly.
  if gating == 'sigmoid':  # The bias changes the selection but not the weights.
    m.router_bias[...] = jnp.array([0.3, -0.2, 0.0, 0.1])
  x = _x(1)
  y, aux = _jit_fwd(m)(x)
  np.testing.assert_allclose(y, _ref_forward(m, x), rtol=2e-4, atol=2e-5)
  assert float(aux['dropped_fraction']) == 0.0
  np.testing.assert_allclose(float(jnp.sum(aux['load'])), 1.0, rtol=1e-6)
  if gating == 'sigmoid':  # Capacity dispatch with room for everything gives the same answer.
    m2 = _build(dataclasses.replace(m.moe_cfg, dispatch='capacity'))
    nnx.update(m2, nnx.state(m))
    np.testing.assert_allclose(_jit_fwd(m2)(x)[0], y, rtol=1e-5, atol=1e-6)


def test_route_sigmoid_bias_only_selects():
  mcfg = _moe_cfg(gating='sigmoid', top_k=1)
  logits = jnp.array([[2.0, 1.0, 0.0, -1.0]])
  idx, w, _ = moe.route(logits, jnp.array([0.0, 0.0, 0.0, 5.0]), mcfg)
  assert int(idx[0, 0]) == 3 and float(w[0, 0]) == pytest.approx(1.0)  # Renormalised over 1.


def _crafted_x(sign_T, d=32, seed=3):
  """Tokens whose features 0, 1 are (1, sign); the other features are random noise."""
  x = np.array(jax.random.normal(jax.random.key(seed), (1, len(sign_T), d)))
  x[0, :, 0] = 1.0
  x[0, :, 1] = sign_T
  return jnp.asarray(x)


@pytest.mark.parametrize('group', ['batch', 'sequence'])
def test_capacity_drops_overflow_all_to_expert0(group):
  b, t = 2, 8
  mcfg = _moe_cfg(top_k=1, dispatch='capacity', capacity_factor=1.0, capacity_group=group)
  m = _build(mcfg)
  router = np.zeros((32, 4), np.float32)
  router[0, 0] = 10.0                     # Feature 0 is 1 for every token -> expert 0.
  m.router[...] = jnp.asarray(router)
  x = np.array(_x(4, b, t))
  x[..., 0] = 1.0
  x = jnp.asarray(x)
  y, aux = _jit_fwd(m)(x)
  s = b * t if group == 'batch' else t
  c = mcfg.capacity(s)
  assert c == math.ceil(s / 4)
  kept = lambda n, j: (n % s) < c           # First C tokens of each group, by position.
  np.testing.assert_allclose(y, _ref_forward(m, x, keep=kept), rtol=2e-4, atol=2e-5)
  y = np.asarray(y).reshape(-1, 32)
  n_kept = sum(kept(n, 0) for n in range(b * t))
  assert n_kept == (b * t // s) * c
  assert np.all(np.abs(y[[not kept(n, 0) for n in range(b * t)]]) == 0.0)
  assert np.all(np.abs(y[[kept(n, 0) for n in range(b * t)]]).sum(-1) > 0)
  np.testing.assert_allclose(float(aux['dropped_fraction']), 1 - n_kept / (b * t))
  np.testing.assert_allclose(aux['load'], [1.0, 0.0, 0.0, 0.0])
  assert float(aux['aux_loss']) > 0.03  # -> coef * E = 0.04 when routing collapses (vs coef).


def test_capacity_first_choices_rank_before_second_choices():
  # Tokens 0-3 pick (expert 1, expert 0), tokens 4-7 pick (0, 1); C = 4. GShard order fills each
  # expert with first choices first, so every second choice is dropped (position order would
  # instead keep the early tokens' second choices).
  sign = np.array([1.0] * 4 + [-1.0] * 4)
  m = _build(_moe_cfg(top_k=2, dispatch='capacity', capacity_factor=1.0,
                      gating='topk_softmax'))
  router = np.zeros((32, 4), np.float32)
  router[0, :2] = 5.0
  router[1, :2] = [-1.0, 1.0]
  m.router[...] = jnp.asarray(router)
  x = _crafted_x(sign)
  assert m.moe_cfg.capacity(8) == 4
  y, aux = _jit_fwd(m)(x)
  np.testing.assert_allclose(y, _ref_forward(m, x, keep=lambda n, j: j == 0), rtol=2e-4, atol=2e-5)
  np.testing.assert_allclose(float(aux['dropped_fraction']), 0.5)


@pytest.mark.parametrize('gating', moe.GATINGS)
def test_uniform_router_aux_losses(gating):
  mcfg = _moe_cfg(gating=gating, aux_loss_coef=0.01, router_z_loss_coef=1e-3)
  m = _build(mcfg)
  m.router[...] = jnp.zeros_like(m.router[...])
  _, aux = _jit_fwd(m)(_x(5))
  np.testing.assert_allclose(float(aux['aux_loss']), 0.01, rtol=1e-6)
  np.testing.assert_allclose(float(aux['router_z_loss']), 1e-3 * math.log(4) ** 2, rtol=1e-5)
  np.testing.assert_allclose(float(aux['router_entropy']), math.log(4), rtol=1e-5)


def test_dropless_equals_capacity_when_nothing_dropped(activation='gelu'):
  mcfg = _moe_cfg(top_k=2, num_shared_experts=1, capacity_factor=4.0)
  a = _build(dataclasses.replace(mcfg, dispatch='dropless'), activation=activation)
  b = _build(dataclasses.replace(mcfg, dispatch='capacity'), activation=activation)
  x = _x(7)
  ya, auxa = _jit_fwd(a)(x)
  yb, auxb = _jit_fwd(b)(x)
  np.testing.assert_allclose(ya, yb, rtol=1e-5, atol=1e-6)
  for key in ('aux_loss', 'router_z_loss', 'load', 'router_entropy', 'dropped_fraction'):
    np.testing.assert_allclose(auxa[key], auxb[key], rtol=1e-6)


@pytest.mark.parametrize('dispatch', ['capacity', 'dropless'])
def test_gradients_reach_router_and_experts(dispatch):
  m = _build(_moe_cfg(dispatch=dispatch, num_shared_experts=1))
  graphdef, params, rest = nnx.split(m, nnx.Param, ...)
  x = _x(8)

  @jax.jit
  def loss_fn(params):
    y, aux = nnx.merge(graphdef, params, rest)(x)
    return jnp.mean(y ** 2) + aux['aux_loss'] + aux['router_z_loss']

  grads = jax.grad(loss_fn)(params)
  for name in ('router', 'w_gate', 'w_up', 'w_down'):
    assert float(jnp.abs(grads[name][...]).max()) > 0, name
  assert 'router_bias' not in grads


def test_router_learns_through_gate_weights_matches_finite_differences():
  # With both aux coefficients 0 the router gets gradient only through the gate weights that
  # scale the experts' outputs. That gradient must match central differences of the loss, and
  # both dispatches must agree when nothing is dropped.
  mcfg = _moe_cfg(top_k=2, capacity_factor=4.0, aux_loss_coef=0.0, router_z_loss_coef=0.0)
  x = _x(11)
  ct = jax.random.normal(jax.random.key(12), x.shape)
  v = jax.random.normal(jax.random.key(13), (32, 4))
  eps = 1e-3
  grads = []
  for dispatch in ('capacity', 'dropless'):
    graphdef, router, rest = nnx.split(_build(dataclasses.replace(mcfg, dispatch=dispatch)),
                                       nnx.PathContains('router'), ...)

    def loss(router, graphdef=graphdef, rest=rest):
      y, aux = nnx.merge(graphdef, router, rest)(x)
      return jnp.sum(y * ct) + aux['aux_loss'] + aux['router_z_loss']

    f = jax.jit(jax.value_and_grad(loss))
    shift = lambda sign: jax.tree.map(lambda r: r + sign * eps * v, router)
    g = f(router)[1]['router'][...]
    fd = (f(shift(1))[0] - f(shift(-1))[0]) / (2 * eps)
    assert float(jnp.abs(g).max()) > 1e-3
    np.testing.assert_allclose(float(jnp.sum(g * v)), float(fd), rtol=1e-3)
    grads.append(g)
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)


def test_block_padded_grouped_matmul_equals_ragged_dot(monkeypatch):
  # The CPU grouped matmul (rows padded per expert to whole blocks) against jax.lax.ragged_dot:
  # empty experts, one expert taking every row, and rows past sum(group_sizes) (expert-parallel
  # receive buffers) that must come back as zeros; values and gradients.
  cfg = tiny_model_config()
  e, d, f, m = 4, 32, 16, 40
  ks = jax.random.split(jax.random.key(14), 4)
  x = jax.random.normal(ks[0], (m, d))
  ws = (jax.random.normal(ks[1], (e, d, f)) * 0.2, jax.random.normal(ks[2], (e, d, f)) * 0.2,
        jax.random.normal(ks[3], (e, f, d)) * 0.2)

  all_sizes = ([10, 0, 20, 10], [0, 0, 0, 33], [1, 2, 3, 4], [40, 0, 0, 0])
  out = {}
  for native in (False, True):  # One compile each: the group sizes are a runtime argument.
    monkeypatch.setattr(moe, 'native_grouped_matmul', lambda native=native: native)
    fwd = lambda x, ws, gs: moe.experts_ragged(cfg, x, gs, *ws)
    f = jax.jit(lambda x, ws, gs: (fwd(x, ws, gs), jax.grad(
        lambda x, ws: jnp.sum(jnp.sin(fwd(x, ws, gs))), argnums=(0, 1))(x, ws)))
    out[native] = [f(x, ws, jnp.asarray(sizes, jnp.int32)) for sizes in all_sizes]
  for sizes, blk, ref in zip(all_sizes, out[False], out[True]):
    assert np.all(np.asarray(blk[0])[sum(sizes):] == 0.0)
    for a, b in zip(jax.tree.leaves(blk), jax.tree.leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bias_update_rule_and_bias_is_not_a_param():
  bias = jnp.array([0.0, 0.1, -0.1, 0.0])
  load = jnp.array([0.5, 0.25, 0.1, 0.15])   # mean 0.25: overloaded, at mean, under, under.
  np.testing.assert_allclose(moe.update_router_bias(bias, load, 1e-3),
                             [-1e-3, 0.1, -0.099, 1e-3], rtol=1e-6)
  m = _build(_moe_cfg(gating='sigmoid', bias_update_rate=1e-3))
  assert isinstance(m.router_bias, moe.RouterBias)
  assert not isinstance(m.router_bias, nnx.Param)
  assert 'router_bias' not in nnx.state(m, nnx.Param)
  assert 'router_bias' in nnx.state(m, moe.RouterBias)
  m.update_bias(load)
  np.testing.assert_allclose(m.router_bias[...], [-1e-3, 0.0, 1e-3, 1e-3], rtol=1e-6)


@pytest.mark.parametrize('activation,shared', [('swiglu', 0), ('gelu', 2)])
def test_param_counts_match_model(activation, shared):
  mcfg = _moe_cfg(num_shared_experts=shared)
  cfg = tiny_model_config(activation=activation)
  m = moe.MoE(cfg, mcfg, nnx.Rngs(0))
  n = sum(v.size for v in jax.tree.leaves(nnx.state(m, nnx.Param)))
  total, active = mcfg.layer_param_counts(cfg.d_model, cfg.gated)
  assert total == n
  per_expert = cfg.d_model * mcfg.expert_mlp_dim * (3 if cfg.gated else 2)
  assert total - active == (mcfg.num_experts - mcfg.top_k) * per_expert


@pytest.mark.parametrize('field,value', [
    ('num_experts', 0), ('top_k', 9), ('top_k', 0), ('expert_mlp_dim', -1), ('gating', 'argmax'),
    ('dispatch', 'ragged'), ('capacity_factor', 0.0), ('num_shared_experts', -1),
    ('aux_loss_coef', -1.0), ('router_z_loss_coef', -1e-3), ('bias_update_rate', -0.1),
    ('capacity_group', 'token'), ('renormalize', 1), ('routed_scaling_factor', 0.0)])
def test_bad_config_names_field(field, value):
  with pytest.raises(ValueError, match=rf'config\.model\.moe\.{field}'):
    moe.MoEConfig(**{field: value}).validate()


def test_from_dict_rejects_unknown_keys():
  with pytest.raises(ValueError, match='config.model.moe'):
    moe.MoEConfig.from_dict({'num_expert': 4})
  assert moe.MoEConfig.from_dict({'num_experts': 4, 'top_k': 1}).top_k == 1


@pytest.mark.parametrize('dispatch', ['capacity', 'dropless'])
def test_expert_sharded_matches_unsharded(dispatch):
  if jax.device_count() < 8:
    pytest.skip('needs 8 (simulated) devices')
  m = _build(_moe_cfg(num_experts=8, dispatch=dispatch, capacity_factor=2.0))
  graphdef, state = nnx.split(m)
  x = _x(9)
  f = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
  y_ref, aux_ref = f(state, x)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 8})
  # Expert weights split on their E axis across 'tensor'; everything else replicated.
  shard = lambda v: jax.device_put(
      v, NamedSharding(mesh, P('tensor') if v.ndim == 3 else P()))
  state_sh = jax.tree.map(shard, state)
  assert len(state_sh['w_gate'][...].sharding.device_set) == 8
  y, aux = f(state_sh, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(aux['load'], aux_ref['load'], rtol=1e-6)


def test_bfloat16_compute_both_dispatches_agree():
  mcfg = _moe_cfg(num_shared_experts=1, capacity_factor=4.0)
  x = _x(10).astype(jnp.bfloat16)
  ys = []
  for dispatch in ('capacity', 'dropless'):
    m = _build(dataclasses.replace(mcfg, dispatch=dispatch), dtype='bfloat16')
    y, aux = _jit_fwd(m)(x)
    assert y.dtype == jnp.bfloat16 and aux['aux_loss'].dtype == jnp.float32
    ys.append(np.asarray(y, np.float32))
  np.testing.assert_allclose(ys[0], ys[1], rtol=3e-2, atol=3e-2)
