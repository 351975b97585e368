"""The benchmark's yardstick: the same decoder and optimizer as palmax, written as bare JAX.

No Flax, no scan, no sharding, no gradient accumulation, no NaN guard: a Python loop over layers
on a dict of arrays, float32 logits and `logsumexp` cross-entropy, and palmax's own optax chain
(`train.optim.make_optimizer`). It is what a careful researcher would write in an afternoon, so
palmax's step has to beat it to justify its machinery. Supports what the benchmark shapes need:
serial pre-norm blocks, RMSNorm, half-split RoPE, MHA/GQA/MQA, SwiGLU or GELU, tied or untied
output. Shapes: B batch, T length, D d_model, N heads, K kv heads, H head_dim, F mlp, V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from model.config import ModelConfig


def check_supported(cfg: ModelConfig) -> None:
  unsupported = {'block': cfg.block != 'serial', 'moe': cfg.moe is not None,
                 'post_norms': cfg.post_norms, 'qk_norm': cfg.qk_norm,
                 'logit_softcap': bool(cfg.logit_softcap), 'attn_softcap': bool(cfg.attn_softcap),
                 'layer_pattern': set(cfg.layer_pattern) != {'G'},
                 'rope_scaling': cfg.rope_scaling != 'none',
                 'activation': cfg.activation == 'geglu'}
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise ValueError(f'launch.bench: the bare-JAX reference step does not model config.model.'
                     f'{bad[0]}; benchmark a plain dense serial decoder')


def init_params(cfg: ModelConfig, seed: int = 0) -> dict:
  """A dict of float32 arrays, N(0, 1/fan_in) like palmax."""
  d, n, k, h, f, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim,
                      cfg.vocab_size)
  rng = np.random.default_rng(seed)
  normal = lambda shape, fan_in: jnp.asarray(rng.normal(0, fan_in ** -0.5, shape), jnp.float32)
  layers = []
  for _ in range(cfg.num_layers):
    layer = {'attn_norm': jnp.ones((d,)), 'mlp_norm': jnp.ones((d,)),
             'w_q': normal((d, n * h), d), 'w_k': normal((d, k * h), d),
             'w_v': normal((d, k * h), d), 'w_o': normal((n * h, d), n * h),
             'w_gate': normal((d, f), d), 'w_down': normal((f, d), f)}
    if cfg.gated:
      layer['w_up'] = normal((d, f), d)
    layers.append(layer)
  params = {'embedding': normal((v, d), d), 'final_norm': jnp.ones((d,)), 'layers': layers}
  if not cfg.tie_embeddings:
    params['unembedding'] = normal((d, v), d)
  return params


def _rms(x, g, eps):
  x32 = x.astype(jnp.float32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + eps) * g).astype(x.dtype)


def _rope(x_BTNH, inv_freq_h):
  t = x_BTNH.shape[1]
  angle_Th = jnp.arange(t, dtype=jnp.float32)[:, None] * inv_freq_h
  extra = (None,) * (x_BTNH.ndim - 3)  # [T, 1.., h] against [B, T, .., h]
  sin, cos = jnp.sin(angle_Th)[(slice(None),) + extra], jnp.cos(angle_Th)[(slice(None),) + extra]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, -1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTNH.dtype)


def loss_fn(params: dict, tokens_BT1: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Mean next-token cross-entropy of tokens [B, T+1]."""
  dt = jnp.dtype(cfg.dtype)
  mm = lambda x, w: jnp.dot(x.astype(dt), w.astype(dt), preferred_element_type=jnp.float32).astype(dt)
  inputs_BT, targets_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
  t = inputs_BT.shape[1]
  h = cfg.head_dim
  inv_freq_h = cfg.rope_base ** (-jnp.arange(0, h // 2, dtype=jnp.float32) * 2.0 / h)
  causal_TT = jnp.tril(jnp.ones((t, t), bool))
  act = jax.nn.silu if cfg.gated else (lambda z: jax.nn.gelu(z, approximate=True))
  with jax.named_scope('embed'):
    x = params['embedding'][inputs_BT].astype(dt)
  for p in params['layers']:
    x = _attention(x, p, cfg, dt, mm, inv_freq_h, causal_TT)
    x = _mlp(x, p, cfg, mm, act)
  with jax.named_scope('head_loss'):
    x = _rms(x, params['final_norm'], cfg.norm_eps)
    w_DV = params['embedding'].T if cfg.tie_embeddings else params['unembedding']
    logits = jnp.dot(x.astype(dt), w_DV.astype(dt), preferred_element_type=jnp.float32)
    nll = (jax.nn.logsumexp(logits, -1)
           - jnp.take_along_axis(logits, targets_BT[..., None], -1)[..., 0])
    return nll.mean()


@jax.named_scope('attention')
def _attention(x, p, cfg, dt, mm, inv_freq_h, causal_TT):
  b, t = x.shape[:2]
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  y = _rms(x, p['attn_norm'], cfg.norm_eps)
  q = _rope(mm(y, p['w_q']).reshape(b, t, k, n // k, h), inv_freq_h) * h ** -0.5
  kk = _rope(mm(y, p['w_k']).reshape(b, t, k, h), inv_freq_h)
  vv = mm(y, p['w_v']).reshape(b, t, k, h)
  s = jnp.einsum('btkgh,bskh->bkgts', q, kk, preferred_element_type=jnp.float32)
  s = jnp.where(causal_TT, s, -1e30)
  a = jnp.einsum('bkgts,bskh->btkgh', jax.nn.softmax(s, -1).astype(dt), vv,
                 preferred_element_type=jnp.float32).astype(dt)
  return x + mm(a.reshape(b, t, n * h), p['w_o'])


@jax.named_scope('mlp')
def _mlp(x, p, cfg, mm, act):
  y = _rms(x, p['mlp_norm'], cfg.norm_eps)
  hidden = act(mm(y, p['w_gate']))
  if cfg.gated:
    hidden = hidden * mm(y, p['w_up'])
  return x + mm(hidden, p['w_down'])


def make_step(cfg: ModelConfig, tx):
  """step(params, opt_state, tokens) -> (params, opt_state, loss), jitted with donation."""
  import optax

  def step(params, opt_state, tokens_BT1):
    loss, grads = jax.value_and_grad(loss_fn)(params, tokens_BT1, cfg)
    with jax.named_scope('optimizer'):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))
