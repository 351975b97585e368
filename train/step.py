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
from train import loss as loss_lib, trainable
from train.objectives.lm import NextToken


def make_objective_loss(graphdef, objective) -> Callable:
  """loss_fn(params, batch, rng=None, ref_params=None) -> (total, aux) for an objective
  (train/objectives/). The total adds the MoE layers' balance and router z-losses (already
  scaled by their coefficients) of every forward the objective runs; aux holds the objective's
  metrics and, under 'moe', the first forward's per-layer MoE stats in the layer structure (for
  the router-bias update). `ref_params` (same structure as params) is the frozen reference of
  objectives that need one; without it the reference is the model with its PEFT adapters
  switched off (model/peft/lora.py:disabled)."""
  def loss_fn(params, batch, rng=None, ref_params=None):
    model = nnx.merge(graphdef, params)
    if rng is not None:   # Training-time randomness (LoRA dropout); evaluation passes none.
      from model.peft import lora
      lora.set_dropout_keys(model, rng)
    reference = None
    if getattr(objective, 'needs_reference', False):
      reference = ReferenceForward(
          model if ref_params is None else nnx.merge(graphdef, ref_params), ref_params is None)
    forward = ModelForward(model, reference)
    total, aux = objective.loss(forward, batch)
    moe_auxes = forward.moe_auxes
    for moe_aux in moe_auxes:
      for stats in _moe_leaves(moe_aux):
        total = total + jnp.sum(stats['aux_loss']) + jnp.sum(stats['router_z_loss'])
    return total, dict(aux, moe=moe_auxes[0] if moe_auxes else {})
  return loss_fn


class ReferenceForward:
  """The frozen reference's logits, `(tokens_BT, **kw) -> logits_BTV` with no gradient: a
  separate model, or (`adapters_off`) the policy's own weights with PEFT switched off."""

  def __init__(self, model, adapters_off: bool):
    self.model, self.adapters_off = model, adapters_off

  def __call__(self, tokens_BT, **kw):
    from model.peft import lora
    import contextlib
    with lora.disabled() if self.adapters_off else contextlib.nullcontext():
      logits_BTV, _, _ = self.model.forward(tokens_BT, **kw)
    return jax.lax.stop_gradient(logits_BTV)


class ModelForward:
  """What objectives call (train/objectives/base.py): `forward(tokens_BT, **kw) -> logits_BTV`,
  or `forward.cross_entropy(tokens_BT, targets_BT, weights_BT, z_loss, **kw)`, the model's
  forward fused with next-token cross-entropy (train/loss.py: no [B, T, V] logits, gradients
  computed in the forward pass); `hidden` and `score` for scalar heads (model/heads.py);
  `reference` for objectives that need one. Collects every call's MoE stats in `moe_auxes`."""

  def __init__(self, model, reference=None):
    self.model = model
    self.reference = reference
    self.moe_auxes = []

  def __call__(self, tokens_BT, **kw):
    logits_BTV, _, moe_aux = self.model.forward(tokens_BT, **kw)
    self.moe_auxes.append(moe_aux)
    return logits_BTV

  def hidden(self, tokens_BT, **kw):
    """x_BTD: the final-normed hidden states."""
    x_BTD, _, moe_aux = self.model.forward(tokens_BT, hidden=True, **kw)
    self.moe_auxes.append(moe_aux)
    return x_BTD

  def logits(self, x_BTD):
    """logits_BTV of hidden states from `hidden` (the output projection, as `__call__`)."""
    return self.model.embedder.decode(x_BTD)

  def score(self, x_BTD, name: str):
    """s_BT (float32): scalar head `name` at every position."""
    from model import heads
    return heads.score(self.model, x_BTD, name)

  def cross_entropy(self, tokens_BT, targets_BT, weights_BT=None, z_loss: float = 0.0, *,
                    chunk_tokens: int = 2048, **kw):
    x_BTD, _, moe_aux = self.model.forward(tokens_BT, hidden=True, **kw)
    self.moe_auxes.append(moe_aux)
    w_VD, softcap = self.model.embedder.head()
    with jax.named_scope('head_loss'):
      return loss_lib.fused_cross_entropy(x_BTD, w_VD, targets_BT, weights_BT, z_loss, softcap,
                                        self.model.cfg.dtype, chunk_tokens)


def make_loss_fn(graphdef, z_loss: float) -> Callable:
  """loss_fn(params, tokens_BT1, weights_BT) -> (total, aux): next-token pretraining's loss."""
  loss_fn = make_objective_loss(graphdef, NextToken(z_loss=z_loss))
  return lambda params, tokens_BT1, weights_BT=None: loss_fn(
      params, {'tokens': tokens_BT1} if weights_BT is None else
      {'tokens': tokens_BT1, 'loss_mask': weights_BT})


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
                    grad_accum: int = 1, z_loss: float = 0.0, objective=None,
                    trainable_mask=None) -> Callable:
  """step(state, batch, ref_params=None) -> (state, metrics). `batch` is a dict of the
  objective's fields (or bare tokens [B, T+1] for next-token pretraining); `objective` defaults
  to next-token prediction with `z_loss`; `ref_params` is the frozen reference of an objective
  that needs one (make_objective_loss).

  Gradients are averaged over `grad_accum` microbatches with a scan (one compiled step). With
  `trainable_mask` (train/trainable.py) only the selected parameters get gradients and
  optimizer updates; the rest stay bit-identical. If the loss or gradient norm is not finite,
  parameters and optimizer state are left unchanged and metrics['finite'] is 0; the trainer
  then stops or skips, as configured.
  """
  loss_fn = make_objective_loss(graphdef, objective or NextToken(z_loss=z_loss))

  def loss_of_trainable(train_params, frozen_params, micro, rng, ref_params):
    return loss_fn(trainable.merge(train_params, frozen_params), micro, rng, ref_params)

  grad_fn = jax.value_and_grad(loss_of_trainable, has_aux=True)

  def step(state, batch, ref_params=None):
    if not isinstance(batch, dict):
      batch = {'tokens': batch}
    params = state['params']
    train_params, frozen_params = trainable.split(params, trainable_mask)
    model_cfg = nnx.merge(graphdef, params).cfg
    bias_update_rate = model_cfg.moe.bias_update_rate if model_cfg.moe else 0.0
    b = batch['tokens'].shape[0]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), state['step'])
    if grad_accum == 1:  # No accumulation scan: it costs copies of its carry on one device.
      (_, aux), grads = grad_fn(train_params, frozen_params, batch, rng, ref_params)
    else:
      micro = jax.tree.map(lambda x: x.reshape(grad_accum, b // grad_accum, *x.shape[1:]), batch)
      # The aux structure (objective metrics, MoE stats), to accumulate over microbatches.
      aux_shape = jax.eval_shape(loss_fn, params, jax.tree.map(lambda x: x[0], micro), None,
                                 ref_params)[1]

      def accumulate(carry, one):
        one, i = one
        (_, aux), g = grad_fn(train_params, frozen_params, one, jax.random.fold_in(rng, i),
                              ref_params)
        return jax.tree.map(jnp.add, carry, (g, aux)), None

      zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (train_params, aux_shape))
      (g_sum, aux_sum), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum)))
      grads, aux = jax.tree.map(lambda x: x / grad_accum, (g_sum, aux_sum))
    loss = aux['loss']
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    @jax.named_scope('optimizer')
    def apply(_):
      updates, new_opt_state = tx.update(grads, state['opt_state'], train_params)
      new_params = trainable.merge(optax.apply_updates(train_params, updates), frozen_params)
      return update_router_biases(new_params, aux['moe'], bias_update_rate), new_opt_state

    # A conditional, not a select over every parameter and slot: the skipped branch costs nothing.
    new_params, new_opt_state = jax.lax.cond(finite, apply, lambda _: (params, state['opt_state']),
                                             None)
    new_state = {
        'params': new_params,
        'opt_state': new_opt_state,
        'step': state['step'] + 1,
        'rng': state['rng'],
    }
    objective_metrics = {k: v for k, v in aux.items() if k not in ('moe', 'weight')}
    metrics = {**objective_metrics, 'grad_norm': grad_norm,
               'lr': schedule(state['step']), 'finite': finite.astype(jnp.float32),
               'param_norm': optax.global_norm(params), **moe_metrics(aux['moe'], model_cfg)}
    return new_state, metrics

  return step


def make_eval_step(graphdef, objective=None) -> Callable:
  """eval(params, batch, weights_BT=None, ref_params=None) -> the objective's eval sums
  ({'loss_sum', 'weight', ...}); a batch of bare tokens [B, T+1] with `weights_BT` is
  next-token prediction's (the old signature)."""
  objective = objective or NextToken()

  def eval_step(params, batch, weights_BT=None, ref_params=None):
    if not isinstance(batch, dict):
      batch = {'tokens': batch, 'loss_mask': weights_BT}
    model = nnx.merge(graphdef, params)
    reference = None
    if getattr(objective, 'needs_reference', False):
      reference = ReferenceForward(
          model if ref_params is None else nnx.merge(graphdef, ref_params), ref_params is None)
    return objective.eval_sums(ModelForward(model, reference), batch)

  return eval_step
