"""Sampling in one place: per-row sampling parameters as traced arrays, so one compiled program
serves any mix of temperatures, top-k, top-p and seeds (a server never recompiles per request).

Flow: right-padded prompts [B, P] with per-row lengths prefill a per-row KV cache together; then
each step samples one token per row from the last logits and feeds it back at that row's own
position. Shapes: B rows, P padded prompt length, N new tokens, V vocab, S = P + N cache size.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.inference.kv_cache import DecodeCache


def per_row(value, batch: int, dtype, name: str) -> jax.Array:
  a = jnp.asarray(value, dtype)
  if a.ndim == 0:
    return jnp.broadcast_to(a, (batch,))
  if a.shape != (batch,):
    raise ValueError(f'{name} has shape {a.shape}; expected a scalar or one value per row ({batch})')
  return a


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """Per-row sampling: temperature_B (0 = greedy), top_k_B (0 = off), top_p_B (1 = off) and a
  PRNG key per row (row b's step-i key is fold_in(keys_B[b], i): a row samples the same tokens
  whatever else is in the batch)."""
  temperature_B: jax.Array
  top_k_B: jax.Array
  top_p_B: jax.Array
  keys_B: jax.Array

  @classmethod
  def make(cls, batch: int, *, temperature=0.0, top_k=0, top_p=1.0, seed=0,
           key: jax.Array | None = None) -> 'SamplingParams':
    """Scalars apply to every row, sequences give one value per row. Keys: `key` split per row
    if given, else jax.random.key(seed[b]) per row."""
    t = per_row(temperature, batch, jnp.float32, 'temperature')
    k = per_row(top_k, batch, jnp.int32, 'top_k')
    p = per_row(top_p, batch, jnp.float32, 'top_p')
    for name, a, ok, want in (('temperature', t, lambda a: a >= 0, '>= 0'),
                              ('top_k', k, lambda a: a >= 0, '>= 0 (0 = off)'),
                              ('top_p', p, lambda a: (a > 0) & (a <= 1), 'in (0, 1]')):
      if not isinstance(a, jax.core.Tracer) and not bool(np.all(ok(np.asarray(a)))):
        raise ValueError(f'{name}={np.asarray(a).tolist()} must be {want}')
    if key is not None:
      keys = jax.random.split(key, batch)
    else:
      keys = jax.vmap(jax.random.key)(per_row(seed, batch, jnp.uint32, 'seed'))
    return cls(t, k, p, keys)


def filter_logits(logits_BV: jax.Array, temperature_B: jax.Array, top_k_B: jax.Array,
                  top_p_B: jax.Array, min_p_B: jax.Array | float = 0.0) -> jax.Array:
  """The logits a row draws from [B, V] f32: divided by the temperature (rows with temperature 0
  are left unscaled), then ids outside the top_k largest (0 = all), outside the smallest prefix
  whose probability reaches top_p (1 = all), or with probability < min_p * the top probability
  (0 = none; HF's MinPLogitsWarper, after temperature) set to -inf. As HF's warpers applied in
  that order; the top token always stays and ties with the last kept value stay too.

  min-p is one more prefix length, since p_r >= min_p * p_0 <=> exp(l_r - l_0) >= min_p in the
  sorted (descending) order."""
  logits_BV = logits_BV.astype(jnp.float32)
  logits_BV = logits_BV / jnp.where(temperature_B > 0, temperature_B, 1.0)[:, None]
  min_p_B = jnp.broadcast_to(jnp.asarray(min_p_B, jnp.float32), top_p_B.shape)
  # Plain temperature sampling (RL rollouts) skips the sort over the vocabulary, which on
  # XLA:CPU costs more than the rest of a small model's decode step.
  truncating = jnp.any((top_k_B > 0) | (top_p_B < 1.0) | (min_p_B > 0))
  return jax.lax.cond(truncating, _truncate, _untruncated, logits_BV, top_k_B, top_p_B, min_p_B)


def _untruncated(logits_BV, *_):
  """Module-level, so eager calls hit lax.cond's cache (a new lambda each call would not)."""
  return logits_BV


def _truncate(logits_BV, top_k_B, top_p_B, min_p_B):
  """filter_logits' top-k / top-p / min-p cut of temperature-scaled logits."""
  v = logits_BV.shape[-1]
  sorted_BV = -jnp.sort(-logits_BV, axis=-1)
  rank_1V = jnp.arange(v)[None]
  top_k_B1 = top_k_B[:, None]
  sorted_BV = jnp.where((top_k_B1 <= 0) | (rank_1V < top_k_B1), sorted_BV, -jnp.inf)
  probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
  before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV   # Mass strictly above each rank.
  n_keep_B1 = jnp.sum(before_BV < top_p_B[:, None], axis=-1, keepdims=True)
  n_keep_B1 = jnp.where(top_p_B[:, None] < 1.0, n_keep_B1, v)
  n_keep_B1 = jnp.where(top_k_B1 > 0, jnp.minimum(n_keep_B1, top_k_B1), n_keep_B1)
  ratio_BV = jnp.exp(sorted_BV - sorted_BV[:, :1])        # p_r / p_0, normalisation-free.
  min_p_B1 = min_p_B[:, None]
  n_min_p_B1 = jnp.sum(ratio_BV >= min_p_B1, axis=-1, keepdims=True)
  n_keep_B1 = jnp.where(min_p_B1 > 0, jnp.minimum(n_keep_B1, n_min_p_B1), n_keep_B1)
  cutoff_B1 = jnp.take_along_axis(sorted_BV, jnp.clip(n_keep_B1 - 1, 0, v - 1), axis=-1)
  return jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)



def sample_logits(logits_BV: jax.Array, keys_B: jax.Array, temperature_B: jax.Array,
                  top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
  """Next token ids [B] (int32), every parameter per row and traced: temperature 0 = greedy,
  else a draw from `filter_logits` (temperature, top-k, top-p)."""
  logits_BV = logits_BV.astype(jnp.float32)
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  kept_BV = filter_logits(logits_BV, temperature_B, top_k_B, top_p_B)
  drawn_B = jax.vmap(jax.random.categorical)(keys_B, kept_BV).astype(jnp.int32)
  return jnp.where(temperature_B > 0, drawn_B, greedy_B)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplerState:
  """Everything a decode step reads and writes: the cache (with per-row lengths), each row's
  logits for its next token, whether it has emitted EOS, the step and the tokens so far."""
  cache: DecodeCache
  last_logits_BV: jax.Array
  done_B: jax.Array
  step: jax.Array
  tokens_BN: jax.Array


def prefill(model, prompt_BP: jax.Array, prompt_lengths_B: jax.Array, max_new_tokens: int,
            first_allowed_V: jax.Array | None = None) -> SamplerState:
  """Right-padded prompts (row b's tokens in 0..len_b-1) through the model in one pass.
  `first_allowed_V` (bool [V]) restricts the first sampled token (token healing)."""
  b, p = prompt_BP.shape
  cache = model.init_cache(b, p + max_new_tokens)
  logits_BPV, cache = model(prompt_BP, cache, 0)
  cache = cache.with_lengths(prompt_lengths_B)   # Pad slots become free slots.
  last_BV = jnp.take_along_axis(logits_BPV, (prompt_lengths_B - 1)[:, None, None], axis=1)[:, 0]
  if first_allowed_V is not None:
    last_BV = jnp.where(first_allowed_V[None], last_BV, -jnp.inf)
  return SamplerState(cache, last_BV, jnp.zeros((b,), bool), jnp.zeros((), jnp.int32),
                      jnp.zeros((b, max_new_tokens), jnp.int32))


def decode_step(model, state: SamplerState, sampling: SamplingParams, eos_id, vocab_limit
                ) -> SamplerState:
  """Sample one token per row, append it, run it through the model at each row's position."""
  last_BV = state.last_logits_BV
  v = last_BV.shape[-1]
  last_BV = jnp.where((vocab_limit <= 0) | (jnp.arange(v) < vocab_limit), last_BV, -jnp.inf)
  keys_B = jax.vmap(jax.random.fold_in, in_axes=(0, None))(sampling.keys_B, state.step)
  tok_B = sample_logits(last_BV, keys_B, sampling.temperature_B, sampling.top_k_B,
                        sampling.top_p_B)
  tok_B = jnp.where(state.done_B, eos_id, tok_B)
  done_B = state.done_B | (tok_B == eos_id)
  logits_B1V, cache = model(tok_B[:, None], state.cache)
  tokens_BN = jax.lax.dynamic_update_slice_in_dim(state.tokens_BN, tok_B[:, None], state.step, 1)
  return SamplerState(cache, logits_B1V[:, 0], done_B, state.step + 1, tokens_BN)


@functools.partial(jax.jit, static_argnames=('graphdef', 'max_new_tokens'))
def sample(graphdef, params, prompt_BP: jax.Array, prompt_lengths_B: jax.Array,
           sampling: SamplingParams, eos_id: jax.Array | int = -1,
           vocab_limit: jax.Array | int = 0, first_allowed_V: jax.Array | None = None, *,
           max_new_tokens: int) -> jax.Array:
  """New tokens [B, max_new_tokens]; compiled once per (model, B, P, max_new_tokens): sampling
  parameters, EOS id and vocab limit are traced. After a row emits `eos_id` it only emits it."""
  # Merge afresh inside each traced function: an NNX module must not cross a scan's trace.
  state = prefill(nnx.merge(graphdef, params), prompt_BP, prompt_lengths_B, max_new_tokens,
                  first_allowed_V)

  def body(state, _):
    return decode_step(nnx.merge(graphdef, params), state, sampling, eos_id, vocab_limit), None

  state, _ = jax.lax.scan(body, state, None, length=max_new_tokens)
  return state.tokens_BN


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1
                ) -> tuple[jax.Array, jax.Array]:
  """Ragged prompts -> (prompt_BP right-padded, lengths_B). `multiple` rounds P up (fewer
  distinct shapes, fewer compilations)."""
  lengths = [len(p) for p in prompts]
  if not lengths or min(lengths) == 0:
    raise ValueError('every prompt needs at least one token')
  width = -(-max(lengths) // multiple) * multiple
  arr = np.full((len(prompts), width), pad_id, np.int32)
  for i, p in enumerate(prompts):
    arr[i, :len(p)] = p
  return jnp.asarray(arr), jnp.asarray(lengths, jnp.int32)


class Sampler:
  """A model's weights plus the compiled sampling loop: `Sampler(graphdef, params)(prompts,
  max_new_tokens=..., temperature=[...], seed=[...])` -> a list of token lists, each cut after
  EOS. `params` is the pure dict of `nnx.split(model)[1]` (what checkpoints hold)."""

  def __init__(self, graphdef, params, *, eos_id: int = -1, vocab_limit: int = 0,
               max_seq_len: int | None = None, pad_multiple: int = 1):
    self.graphdef, self.params = graphdef, params
    self.eos_id, self.vocab_limit, self.pad_multiple = eos_id, vocab_limit, pad_multiple
    self.max_seq_len = max_seq_len

  def __call__(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature=0.0,
               top_k=0, top_p=1.0, seed=0) -> list[list[int]]:
    prompt_BP, lengths_B = pad_prompts(prompts, multiple=self.pad_multiple)
    if self.max_seq_len is not None and prompt_BP.shape[1] + max_new_tokens > self.max_seq_len:
      raise ValueError(f'padded prompt of {prompt_BP.shape[1]} tokens + max_new_tokens='
                       f'{max_new_tokens} exceeds config.model.max_seq_len={self.max_seq_len}')
    sampling = SamplingParams.make(len(prompts), temperature=temperature, top_k=top_k,
                                   top_p=top_p, seed=seed)
    out = sample(self.graphdef, self.params, prompt_BP, lengths_B, sampling,
                 jnp.int32(self.eos_id), jnp.int32(self.vocab_limit),
                 max_new_tokens=max_new_tokens)
    rows = jax.device_get(out).tolist()
    return [r[:r.index(self.eos_id) + 1] if self.eos_id in r else r for r in rows]
