"""Prompt tuning (Lester, Al-Rfou & Constant 2021): P trainable vectors before every sequence.

The soft prompt is P virtual tokens with ids V..V+P-1 just past the vocabulary (V =
config.model.vocab_size). `PromptEmbedder` replaces the Decoder's embedder and looks those ids
up in `soft_prompt` [P, D] instead of the embedding table; the model never predicts them (the
logits stay [.., V]). Because the prompt is made of tokens, everything that handles tokens
handles it unchanged: packing with segment ids, positions, the KV cache, the paged engine and
its prefix cache. Whoever builds a sequence puts `virtual_ids(V, P)` first (train/sft_data.py
for SFT rows, the serving Completer and the evaluation model for prompts).

Initialised from the embeddings of P vocabulary tokens drawn by the seed, as Lester et al.
found better than random vectors.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model import sharding


class PromptParam(nnx.Param):
  """The soft prompt: its own type, so filters can select it."""


def virtual_ids(vocab_size: int, n: int) -> list[int]:
  """The soft prompt's token ids: V..V+n-1."""
  return list(range(vocab_size, vocab_size + n))


class PromptEmbedder(nnx.Module):
  """The model's `Embedder` (`base`) plus `soft_prompt` [P, D] for ids >= V."""

  def __init__(self, base, n: int, key: jax.Array):
    self.base = base
    self.cfg = base.cfg
    v = base.cfg.vocab_size
    rows = jax.random.choice(key, v, (n,), replace=False) if n <= v else jnp.arange(n) % v
    init = jnp.take(base.embedding[...], rows, axis=0)
    self.soft_prompt = PromptParam(init, out_sharding=(None, 'embed'), eager_sharding=False)

  @jax.named_scope('embed')
  def encode(self, tokens_BT: jax.Array) -> jax.Array:
    """[B, T] ids (soft-prompt ids allowed) -> [B, T, D], as `Embedder.encode`."""
    v, n = self.cfg.vocab_size, self.soft_prompt.shape[0]
    virtual_BT = tokens_BT >= v
    x_BTD = self.base.encode(jnp.where(virtual_BT, 0, tokens_BT))
    soft_BTD = jnp.take(self.soft_prompt[...], jnp.clip(tokens_BT - v, 0, n - 1), axis=0)
    if self.cfg.scale_embeddings:   # The same input scale as the table's rows get.
      soft_BTD = soft_BTD * (self.cfg.d_model ** 0.5)
    x_BTD = jnp.where(virtual_BT[..., None], soft_BTD.astype(x_BTD.dtype), x_BTD)
    return sharding.constrain(x_BTD, ('batch', 'length', 'act_embed'))

  def head(self):
    return self.base.head()

  def decode(self, x_BTD: jax.Array) -> jax.Array:
    return self.base.decode(x_BTD)


def check(p) -> None:
  """Refuses a bad `config.peft.prompt_tokens` in one line."""
  n = p.prompt_tokens
  if isinstance(n, bool) or not isinstance(n, int) or n < 1:
    raise ValueError(f'config.peft.prompt_tokens={n!r}: expected an int >= 1')


def apply_prompt(model, n: int, seed: int = 0) -> list[str]:
  """Replaces `model.embedder` by a `PromptEmbedder` with n virtual tokens, in place."""
  if isinstance(model.embedder, PromptEmbedder):
    raise ValueError('the model already has a soft prompt')
  model.embedder = PromptEmbedder(model.embedder, n, jax.random.fold_in(jax.random.key(seed), 7))
  return ['embedder/soft_prompt']
