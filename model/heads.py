"""Scalar heads on the decoder's last hidden state: a reward model's score, PPO's value.

`config.model.heads = ('reward',)` gives the Decoder a `reward_head` weight w [D] (logical name
`embed`), and `score(x_BTD, 'reward') -> s_BT = x_BTD · w` in float32: one scalar per position
of the final-normed hidden states (`Decoder.forward(..., hidden=True)`). A reward model reads it
at the last token of the completion (InstructGPT, Ouyang et al. 2022); PPO's value head at every
completion position. The weight has no bias, like the `score` Linear of transformers'
`*ForSequenceClassification`, so an HF reward model's head maps onto it one to one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model.layers import Linear

HEADS = ('reward', 'value')


def attach(model, cfg, rngs: nnx.Rngs) -> None:
  """Adds a `<name>_head` weight [D] ~ N(0, 1/D) per name in `cfg.heads` to `model`."""
  for name in cfg.heads:
    w_D = jax.random.normal(rngs.params(), (cfg.d_model,), jnp.float32) / cfg.d_model ** 0.5
    setattr(model, f'{name}_head', Linear(w_D.astype(cfg.param_dtype), out_sharding=('embed',),
                                          eager_sharding=False, eq='btd,d->bt'))


def score(model, x_BTD: jax.Array, name: str) -> jax.Array:
  """s_BT (float32): head `name` applied at every position of hidden states x_BTD."""
  head = getattr(model, f'{name}_head', None)
  if head is None:
    raise ValueError(f'the model has no {name!r} head; set config.model.heads to include '
                     f'{name!r}')
  return jnp.einsum(head.eq, x_BTD.astype(jnp.float32), head[...].astype(jnp.float32))


def last_index(mask_BT: jax.Array) -> jax.Array:
  """[B] int32: the last position where mask_BT is nonzero (0 for an empty row)."""
  t = mask_BT.shape[1]
  return jnp.max(jnp.where(mask_BT > 0, jnp.arange(t)[None, :], 0), axis=1).astype(jnp.int32)
