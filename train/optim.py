"""Optimizers from `cfg.train`: AdamW, or Muon for the hidden matrices with AdamW for the rest;
linear warmup and cosine decay to a fraction of the peak; global-norm clipping."""
from __future__ import annotations

import jax
import optax

OPTIMIZERS = ('adamw', 'muon')


def learning_rate_schedule(peak: float, warmup_steps: int, total_steps: int,
                           end_fraction: float = 0.1) -> optax.Schedule:
  """Linear warmup 0 -> peak over `warmup_steps`, then cosine to `end_fraction * peak` at
  `total_steps` (Chinchilla: decaying to 10% of peak over the run's own length)."""
  warmup_steps = max(1, min(warmup_steps, total_steps))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
      decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * end_fraction)


def _stacked(path) -> bool:
  """Stacked layer params (under 'stack{j}') carry a leading layers axis."""
  return any(str(getattr(k, 'key', '')).startswith('stack') for k in path)


def decay_mask(params):
  """Matrices are decayed; norms, biases and buffers (one axis besides `layers`) are not."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim - (1 if _stacked(path) else 0) > 1, params)


def matrix_dimension_numbers(model_cfg):
  """For Muon: each hidden `Linear` weight's (reduction axes, output axes) from its einsum
  (`btd,dnh->btnh`: reduce d, output n h; the stacked `layers` axis is a batch axis), as a pure
  dict over the params; None for embeddings, the output projection, norms and MoE experts (they
  stay on AdamW, as in Jordan et al. 2024's Muon recipe)."""
  from flax import nnx
  from optax.contrib import MuonDimensionNumbers

  from model import layers, transformer

  state = nnx.state(transformer.abstract(model_cfg))

  def dims(path, var):
    if not isinstance(var, layers.Linear) or 'embedder' in path:
      return None
    lhs, out = var.eq.split('->')
    x_letters, w_letters = lhs.split(',')
    offset = 1 if any(str(k).startswith('stack') for k in path) else 0
    reduce = tuple(i + offset for i, c in enumerate(w_letters) if c in x_letters)
    output = tuple(i + offset for i, c in enumerate(w_letters) if c in out)
    return MuonDimensionNumbers(reduce, output)

  flat = {path: dims(path, var) for path, var in state.flat_state()}
  tree: dict = {}
  for path, d in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = d
  return tree


def make_optimizer(train_cfg, total_steps: int, model_cfg=None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """From `cfg.train`: optimizer, lr, warmup_steps, lr_end_fraction, b1, b2, eps, weight_decay,
  clip_norm; Muon also muon_lr (its matrices' peak rate; AdamW keeps `lr` for the rest) and
  needs `model_cfg` to know which parameters are matrices. The returned schedule is `lr`'s."""
  schedule = learning_rate_schedule(train_cfg.lr, train_cfg.warmup_steps, total_steps,
                                    train_cfg.lr_end_fraction)
  clip = (optax.clip_by_global_norm(train_cfg.clip_norm) if train_cfg.clip_norm > 0
          else optax.identity())
  name = train_cfg.get('optimizer', 'adamw')
  if name == 'adamw':
    opt = optax.adamw(schedule, b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps,
                      weight_decay=train_cfg.weight_decay, mask=decay_mask)
  elif name == 'muon':
    if model_cfg is None:
      raise ValueError("config.train.optimizer='muon' needs the model config (which "
                       'parameters are matrices)')
    from optax.contrib import muon
    muon_schedule = learning_rate_schedule(train_cfg.muon_lr, train_cfg.warmup_steps,
                                           total_steps, train_cfg.lr_end_fraction)
    opt = muon(muon_schedule, adam_learning_rate=schedule, adam_b1=train_cfg.b1,
               adam_b2=train_cfg.b2, eps=train_cfg.eps, weight_decay=train_cfg.weight_decay,
               weight_decay_mask=decay_mask, adam_weight_decay=train_cfg.weight_decay,
               muon_weight_dimension_numbers=matrix_dimension_numbers(model_cfg))
  else:
    raise ValueError(f'config.train.optimizer={name!r}; expected one of {OPTIMIZERS}')
  return optax.chain(clip, opt), schedule
