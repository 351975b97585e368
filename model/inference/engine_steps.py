"""The serving engine's compiled steps: a prefill chunk for one sequence and a decode step for
every slot, each sampling its next token on device. Each compiles once per shape: prefill per
(chunk, table width) and decode per table-width bucket; every sampling parameter is traced.

Shapes: S slots, C prefill chunk, M table width (pages), V vocab, K top logprobs.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from model.inference import paged_cache, processors


def slot_sampling(fields: dict) -> processors.SlotSampling:
  """SlotSampling from host arrays (the keys built from uint32 seeds inside the program)."""
  keys = jax.vmap(jax.random.key)(fields['seed'])
  return processors.SlotSampling(
      temperature_B=fields['temperature'], top_k_B=fields['top_k'], top_p_B=fields['top_p'],
      min_p_B=fields['min_p'], repetition_penalty_B=fields['repetition_penalty'],
      presence_penalty_B=fields['presence_penalty'],
      frequency_penalty_B=fields['frequency_penalty'], keys_B=keys)


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_top'), donate_argnames=('pools',))
def prefill(graphdef, params, pools, tables_PM, starts_P, tokens_PC, n_valid_P, sampling: dict,
            prompt_mask_PV, allowed_PV, vocab_limit, *, num_top: int):
  """Writes one chunk of each of P prompts (row p's positions starts_P[p]..+n_valid_P[p]-1; the
  rest of the chunk is padding written to positions nobody reads; idle rows have a null table)
  and samples each row's token after its last valid position (used by the caller only on a
  prompt's last chunk). -> (pools, Sampled [P])."""
  model = nnx.merge(graphdef, params)
  logits_PCV, pools = paged_cache.forward(model, tokens_PC, pools, tables_PM, starts_P)
  last_PV = jnp.take_along_axis(logits_PCV, (n_valid_P - 1)[:, None, None], axis=1)[:, 0]
  p, v = last_PV.shape
  out = processors.sample_next(last_PV, slot_sampling(sampling), jnp.zeros((p,), jnp.int32),
                               jnp.zeros((p, v), jnp.int32), prompt_mask_PV, allowed_PV,
                               vocab_limit, num_top=num_top)
  return pools, out


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_top'),
                   donate_argnames=('pools', 'counts_SV'))
def decode(graphdef, params, pools, tables_SM, lengths_S, tokens_S, active_S, steps_S,
           sampling: dict, counts_SV, prompt_mask_SV, vocab_limit, *, num_top: int):
  """Feeds each active slot's last sampled token at its position and samples the next one.
  Idle slots write to the null page. -> (pools, counts_SV, Sampled)."""
  model = nnx.merge(graphdef, params)
  # The token being fed was generated: count it before sampling the next (penalties).
  counts_SV = processors.update_counts(counts_SV, tokens_S, active_S)
  logits_S1V, pools = paged_cache.forward(model, tokens_S[:, None], pools, tables_SM, lengths_S)
  out = processors.sample_next(logits_S1V[:, 0], slot_sampling(sampling), steps_S, counts_SV,
                               prompt_mask_SV, None, vocab_limit, num_top=num_top)
  return pools, counts_SV, out


@functools.partial(jax.jit, donate_argnames=('counts_SV', 'prompt_mask_SV'))
def reset_row(counts_SV, prompt_mask_SV, slot, prompt_mask_V):
  """A slot's penalty state for a new sequence: no outputs yet, its prompt's tokens."""
  return counts_SV.at[slot].set(0), prompt_mask_SV.at[slot].set(prompt_mask_V)
