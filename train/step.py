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

from train.loss import cross_entropy


def make_loss_fn(graphdef, z_loss: float) -> Callable:
  def loss_fn(params, tokens_BT1, weights_BT=None):
    logits_BTV, _ = nnx.merge(graphdef, params)(tokens_BT1[:, :-1])
    return cross_entropy(logits_BTV, tokens_BT1[:, 1:], weights_BT, z_loss)
  return loss_fn


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                    grad_accum: int = 1, z_loss: float = 0.0) -> Callable:
  """step(state, tokens_BT1) -> (state, metrics).

  Gradients are averaged over `grad_accum` microbatches with a scan (one compiled step). If the
  loss or gradient norm is not finite, parameters and optimizer state are left unchanged and
  metrics['finite'] is 0; the trainer then stops or skips, as configured.
  """
  grad_fn = jax.value_and_grad(make_loss_fn(graphdef, z_loss), has_aux=True)

  def step(state, tokens_BT1):
    params = state['params']
    b = tokens_BT1.shape[0]
    micro_ABT1 = tokens_BT1.reshape(grad_accum, b // grad_accum, *tokens_BT1.shape[1:])

    def accumulate(carry, micro_BT1):
      g_sum, loss_sum, z_sum = carry
      (_, aux), g = grad_fn(params, micro_BT1)
      return (jax.tree.map(jnp.add, g_sum, g), loss_sum + aux['loss'], z_sum + aux['z_loss']), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (g_sum, loss_sum, z_sum), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro_ABT1)
    grads = jax.tree.map(lambda g: g / grad_accum, g_sum)
    loss = loss_sum / grad_accum
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    updates, new_opt_state = tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {
        'params': keep(new_params, params),
        'opt_state': keep(new_opt_state, state['opt_state']),
        'step': state['step'] + 1,
        'rng': state['rng'],
    }
    metrics = {'loss': loss, 'z_loss': z_sum / grad_accum, 'grad_norm': grad_norm,
               'lr': schedule(state['step']), 'finite': finite.astype(jnp.float32),
               'param_norm': optax.global_norm(params)}
    return new_state, metrics

  return step


def make_eval_step(graphdef) -> Callable:
  """eval(params, tokens_BT1, weights_BT) -> (sum of token losses, sum of weights)."""
  loss_fn = make_loss_fn(graphdef, 0.0)

  def eval_step(params, tokens_BT1, weights_BT):
    _, aux = loss_fn(params, tokens_BT1, weights_BT)
    return aux['loss'] * aux['weight'], aux['weight']

  return eval_step
