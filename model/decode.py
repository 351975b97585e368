"""Autoregressive generation with a KV cache: one prefill, then one token per step.

Samplers: greedy (temperature 0), temperature, top-k and top-p (nucleus), seeded. Shapes:
B samples, P prompt length, S cache size = P + max_new_tokens, V vocab.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model import transformer
from model.config import ModelConfig


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int,
                  top_p: float) -> jax.Array:
  """Next token ids [B]. temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""
  if temperature == 0.0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / temperature
  if top_k:
    kth_B1 = jax.lax.top_k(logits_BV, top_k)[0][:, -1:]
    logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
  if top_p < 1.0:
    sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
    cum_BV = jnp.cumsum(jax.nn.softmax(sorted_BV, axis=-1), axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
    n_keep_B1 = jnp.sum(cum_BV - jax.nn.softmax(sorted_BV, axis=-1) < top_p, axis=-1, keepdims=True)
    cutoff_B1 = jnp.take_along_axis(sorted_BV, n_keep_B1 - 1, axis=-1)
    logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
  return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens', 'temperature', 'top_k',
                                             'top_p', 'eos_id', 'vocab_limit'))
def generate(graphdef, params, prompt_BP: jax.Array, key: jax.Array, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             eos_id: int = -1, vocab_limit: int = 0) -> jax.Array:
  """Continues each prompt row; returns new tokens [B, max_new_tokens]. `params` is the pure
  dict of `nnx.split(model)[1].to_pure_dict()` (what checkpoints hold). After a row emits
  `eos_id` it only emits `eos_id` (callers cut there). `vocab_limit` > 0 never samples ids at or
  above it (a tokenizer may have fewer pieces than the model's padded vocabulary)."""
  # Merge afresh at each use: an NNX module must not cross into the scan's trace.
  apply = lambda tokens, cache, index: nnx.merge(graphdef, params)(tokens, cache, index)
  cfg: ModelConfig = nnx.merge(graphdef, params).cfg
  b, p = prompt_BP.shape
  cache = transformer.init_cache(cfg, b, p + max_new_tokens)
  logits_BPV, cache = apply(prompt_BP, cache, 0)

  def body(carry, i):
    last_BV, cache, key, done_B = carry
    key, sub = jax.random.split(key)
    if vocab_limit:
      last_BV = jnp.where(jnp.arange(last_BV.shape[-1]) < vocab_limit, last_BV, -jnp.inf)
    tok_B = sample_logits(last_BV, sub, temperature, top_k, top_p)
    tok_B = jnp.where(done_B, eos_id, tok_B)
    done_B = done_B | (tok_B == eos_id)
    logits_B1V, cache = apply(tok_B[:, None], cache, p + i)
    return (logits_B1V[:, 0], cache, key, done_B), tok_B

  init = (logits_BPV[:, -1], cache, key, jnp.zeros((b,), bool))
  _, toks_NB = jax.lax.scan(body, init, jnp.arange(max_new_tokens))
  return toks_NB.T


def check_prompt(prompt_len: int, max_new_tokens: int, cfg: ModelConfig) -> None:
  if prompt_len == 0:
    raise ValueError('the prompt is empty after tokenization; give at least one token')
  if prompt_len + max_new_tokens > cfg.max_seq_len:
    raise ValueError(
        f'prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the context '
        f'config.model.max_seq_len={cfg.max_seq_len}; shorten the prompt or ask for fewer tokens')
