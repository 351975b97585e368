"""The pure train and eval steps (jitted by the trainer with explicit shardings).

State is a dict: {'params': pure dict, 'opt_state': optax state, 'step': int32 [], 'rng': uint32
key data}. A batch is int32 tokens [B, T+1]: inputs are [:, :-1], targets [:, 1:].
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from model import moe as moe_lib
from model.transformer import moe_layer_stats
from train.loss import cross_entropy


def make_loss_fn(graphdef, z_loss: float) -> Callable:
  """loss_fn(params, tokens_BT1, weights_BT) -> (total, aux). The total adds the MoE layers'
  balance and router z-losses (already scaled by their coefficients) to the cross-entropy;
  aux['moe'] keeps each MoE layer's stats in the layer structure (for the router-bias update)."""
  def loss_fn(params, tokens_BT1, weights_BT=None):
    logits_BTV, _, moe_aux = nnx.merge(graphdef, params).forward(tokens_BT1[:, :-1])
    total, aux = cross_entropy(logits_BTV, tokens_BT1[:, 1:], weights_BT, z_loss)
    for stats in _moe_leaves(moe_aux):
      total = total + jnp.sum(stats['aux_loss']) + jnp.sum(stats['router_z_loss'])
    return total, dict(aux, moe=moe_aux)
  return loss_fn


def _moe_leaves(moe_aux: dict) -> list[dict]:
  """The per-(stack, block) stat dicts of `Decoder.forward`'s aux tree."""
  return [stats for blocks in moe_aux.values() for stats in blocks.values()]


def update_router_biases(params: dict, moe_aux: dict, rate: float) -> dict:
  """DeepSeek-V3 auxiliary-loss-free balancing on every MoE layer, from this step's loads."""
  if not rate:
    return params
  params = jax.tree.map(lambda x: x, params)  # Copy the containers, not the arrays.
  for stack, blocks in moe_aux.items():
    for block, stats in blocks.items():
      mlp = params[stack][block]['mlp']
      mlp['router_bias'] = moe_lib.update_router_bias(mlp['router_bias'], stats['load'], rate)
  return params


def moe_metrics(moe_aux: dict, cfg) -> dict[str, jax.Array]:
  """Per-layer MoE metrics over the M MoE layers in depth order: load [M, E], dropped [M],
  entropy [M], plus the summed aux and z losses; {} for a dense model."""
  stats = moe_layer_stats(moe_aux, cfg)
  if not stats:
    return {}
  return {'moe_aux_loss': jnp.sum(stats['aux_loss']), 'moe_z_loss': jnp.sum(stats['router_z_loss']),
          'moe_load': stats['load'], 'moe_dropped': stats['dropped_fraction'],
          'moe_entropy': stats['router_entropy']}


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    grad_accum: int = 1, z_loss: float = 0.0) -> Callable:
  """step(state, tokens_BT1) -> (state, metrics).

  Gradients are averaged over `grad_accum` microbatches with a scan (one compiled step). If the
  loss or gradient norm is not finite, parameters and optimizer state are left unchanged and
  metrics['finite'] is 0; the trainer then stops or skips, as configured.
  """
  loss_fn = make_loss_fn(graphdef, z_loss)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(state, tokens_BT1):
    params = state['params']
    model_cfg = nnx.merge(graphdef, params).cfg
    bias_update_rate = model_cfg.moe.bias_update_rate if model_cfg.moe else 0.0
    b = tokens_BT1.shape[0]
    micro_ABT1 = tokens_BT1.reshape(grad_accum, b // grad_accum, *tokens_BT1.shape[1:])
    # The MoE stats' structure, to accumulate them over microbatches like the gradients.
    aux_shape = jax.eval_shape(loss_fn, params, micro_ABT1[0])[1]

    def accumulate(carry, micro_BT1):
      (_, aux), g = grad_fn(params, micro_BT1)
      return jax.tree.map(jnp.add, carry, (g, aux)), None

    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (params, aux_shape))
    (g_sum, aux_sum), _ = jax.lax.scan(accumulate, zeros, micro_ABT1)
    grads, aux = jax.tree.map(lambda x: x / grad_accum, (g_sum, aux_sum))
    loss = aux['loss']
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt_state = tx.update(grads, state['opt_state'], params)
    new_params = update_router_biases(optax.apply_updates(params, updates), aux['moe'],
                                      bias_update_rate)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        'params': keep(new_params, params),
        'opt_state': keep(new_opt_state, state['opt_state']),
        'step': state['step'] + 1,
        'rng': state['rng'],
    }
    metrics = {'loss': loss, 'z_loss': aux['z_loss'], 'grad_norm': grad_norm,
               'lr': schedule(state['step']), 'finite': finite.astype(jnp.float32),
               'param_norm': optax.global_norm(params), **moe_metrics(aux['moe'], model_cfg)}
    return new_state, metrics

  return step


def make_eval_step(graphdef) -> Callable:
  """eval(params, tokens_BT1, weights_BT) -> (sum of token losses, sum of weights)."""
  loss_fn = make_loss_fn(graphdef, 0.0)

  def eval_step(params, tokens_BT1, weights_BT):
    _, aux = loss_fn(params, tokens_BT1, weights_BT)
    return aux['loss'] * aux['weight'], aux['weight']

  return eval_step
