"""Autoregressive generation with a per-row KV cache: one prefill, then one token per step.

The loop and the samplers (greedy, temperature, top-k, top-p; seeded, all per row and traced)
live in model/inference/sampler.py; this module keeps the calls launch/ uses. Shapes: B samples,
P prompt length, S cache size = P + max_new_tokens, V vocab.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.inference import sampler as sampler_lib
from model.inference.sampler import SamplingParams  # noqa: F401 (re-exported)


def sample_logits(logits_BV: jax.Array, key: jax.Array, temperature=0.0, top_k=0,
                  top_p=1.0) -> jax.Array:
  """Next token ids [B] with one key for the batch (split per row); every parameter a scalar or
  one value per row. temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""
  b = logits_BV.shape[0]
  s = SamplingParams.make(b, temperature=temperature, top_k=top_k, top_p=top_p, key=key)
  return sampler_lib.sample_logits(logits_BV, s.keys_B, s.temperature_B, s.top_k_B, s.top_p_B)


def generate(graphdef, params, prompt_BP: jax.Array, key: jax.Array | None = None, *,
             max_new_tokens: int, temperature=0.0, top_k=0, top_p=1.0, eos_id: int = -1,
             vocab_limit: int = 0, prompt_lengths=None, seed=None, first_allowed=None
             ) -> jax.Array:
  """Continues each prompt row; returns new tokens [B, max_new_tokens]. `params` is the pure
  dict of `nnx.split(model)[1].to_pure_dict()` (what checkpoints hold).

  Rows may differ: `prompt_lengths` (default: all P) says how many of a right-padded row's
  tokens are the prompt; `temperature`, `top_k`, `top_p` and `seed` are scalars or one value
  per row. Row keys are `key` split per row, or jax.random.key(seed[b]) when `seed` is given.
  None of these recompile: one program per (model, B, P, max_new_tokens). After a row emits
  `eos_id` it only emits `eos_id` (callers cut there). `vocab_limit` > 0 never samples ids at or
  above it (a tokenizer may have fewer pieces than the model's padded vocabulary).
  `first_allowed` (bool [V]) restricts every row's first token (token healing)."""
  prompt_BP = jnp.asarray(prompt_BP, jnp.int32)
  b, p = prompt_BP.shape
  lengths_B = sampler_lib.per_row(p if prompt_lengths is None else prompt_lengths, b, jnp.int32,
                                   'prompt_lengths')
  if key is None and seed is None:
    raise ValueError('generate needs a PRNG `key` or per-row `seed`')
  sampling = SamplingParams.make(b, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seed=0 if seed is None else seed,
                                 key=key if seed is None else None)
  return sampler_lib.sample(graphdef, params, prompt_BP, lengths_B, sampling,
                            jnp.int32(eos_id), jnp.int32(vocab_limit),
                            None if first_allowed is None else jnp.asarray(first_allowed, bool),
                            max_new_tokens=max_new_tokens)


def check_prompt(prompt_len: int, max_new_tokens: int, cfg: ModelConfig) -> None:
  if prompt_len == 0:
    raise ValueError('the prompt is empty after tokenization; give at least one token')
  if prompt_len + max_new_tokens > cfg.max_seq_len:
    raise ValueError(
        f'prompt of {prompt_len} tokens + max_new_tokens={max_new_tokens} exceeds the context '
        f'config.model.max_seq_len={cfg.max_seq_len}; shorten the prompt or ask for fewer tokens')
