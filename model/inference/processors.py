"""Per-row logits processing and sampling for a continuous-batching engine.

A serving engine keeps B slots, each holding a different request with its own sampling settings,
and samples one token per slot per step. Every setting here is a traced per-row array
(`SlotSampling`), so one compiled step serves any mix of requests and a request entering slot b
only rewrites row b (`SlotSampling.set_row`); nothing recompiles per request.

Per row, in order (the order of Hugging Face `generate` and vLLM):
  1. vocab limit: ids >= vocab_limit are impossible (a padded embedding table);
  2. penalties (`penalize`): repetition (HF/CTRL) over prompt + output tokens, then presence and
     frequency (OpenAI) over output tokens;
  3. the optional per-row `allowed_BV` constraint (token healing's first token);
  4. temperature 0: argmax; else divide by the temperature, keep the top-k, then the top-p
     nucleus, then min-p (`filter_logits`), and draw with key fold_in(keys_B[b], step_B[b]): a
     row's draws depend only on its own seed and on how many tokens it has generated, never on
     what else is in the batch.
Reported log-probs (`Sampled`) are those of the raw model distribution (step 1 only), as in
vLLM and the OpenAI API, not of the processed distribution the token was drawn from.
Shapes: B rows, V vocab, K returned top log-probs.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from model.inference.sampler import filter_logits, per_row

MAX_TOP = 20   # The most top log-probs a request may ask for (the OpenAI API's limit).

# field: (dtype, valid(a) on a numpy array, the expected value in words).
_RULES = {
    'temperature': (jnp.float32, lambda a: a >= 0, '>= 0 (0 = greedy)'),
    'top_k': (jnp.int32, lambda a: a >= 0, '>= 0 (0 = off)'),
    'top_p': (jnp.float32, lambda a: (a > 0) & (a <= 1), 'in (0, 1] (1 = off)'),
    'min_p': (jnp.float32, lambda a: (a >= 0) & (a <= 1), 'in [0, 1] (0 = off)'),
    'repetition_penalty': (jnp.float32, lambda a: a > 0, '> 0 (1 = off)'),
    'presence_penalty': (jnp.float32, lambda a: np.abs(a) <= 2, 'in [-2, 2] (0 = off)'),
    'frequency_penalty': (jnp.float32, lambda a: np.abs(a) <= 2, 'in [-2, 2] (0 = off)'),
}


def _checked(name: str, value, batch: int) -> jax.Array:
  """`value` (a scalar or one per row) as a [batch] array; ValueError naming `name` if invalid."""
  dtype, ok, want = _RULES[name]
  a = per_row(value, batch, dtype, name)
  if not bool(np.all(ok(np.asarray(a)))):
    raise ValueError(f'{name}={np.asarray(value).tolist()} must be {want}')
  return a


def _keys(seed, batch: int) -> jax.Array:
  s = np.asarray(seed)
  if not np.issubdtype(s.dtype, np.integer) or not bool(np.all((s >= 0) & (s < 2**32))):
    raise ValueError(f'seed={s.tolist()} must be an integer in [0, 2**32)')
  return jax.vmap(jax.random.key)(per_row(s.astype(np.uint32), batch, jnp.uint32, 'seed'))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SlotSampling:
  """Per-row sampling parameters, every field [B] and traced (one compiled program serves any
  mix). Off values: temperature 0 = greedy, top_k 0, top_p 1, min_p 0, repetition_penalty 1,
  presence/frequency_penalty 0. keys_B holds one PRNG key per row (jax.random.key(seed))."""
  temperature_B: jax.Array           # f32
  top_k_B: jax.Array                 # i32
  top_p_B: jax.Array                 # f32
  min_p_B: jax.Array                 # f32: keep p >= min_p * max p (after temperature)
  repetition_penalty_B: jax.Array    # f32: HF/CTRL, over prompt + output tokens
  presence_penalty_B: jax.Array      # f32: OpenAI, over output tokens
  frequency_penalty_B: jax.Array     # f32: OpenAI, over output tokens
  keys_B: jax.Array                  # PRNG key per row

  @classmethod
  def make(cls, batch: int, *, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
           repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
           seed=0) -> 'SlotSampling':
    """Scalars apply to every row, sequences give one value per row; checked host-side
    (ValueError naming the field: see `_RULES`; seed an integer in [0, 2**32))."""
    values = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                  repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                  frequency_penalty=frequency_penalty)
    fields = {f'{name}_B': _checked(name, v, batch) for name, v in values.items()}
    return cls(**fields, keys_B=_keys(seed, batch))

  def set_row(self, b: int, **values) -> 'SlotSampling':
    """A copy with row b's fields replaced (host-side; used when a request enters slot b).
    Names as in `make` (seed -> a fresh key); unnamed fields keep their old values."""
    batch = self.temperature_B.shape[0]
    if not 0 <= int(b) < batch:
      raise ValueError(f'row b={b} must be in [0, {batch})')
    changes = {}
    for name, value in values.items():
      if np.ndim(value) != 0:
        raise ValueError(f'{name}={np.asarray(value).tolist()} must be a scalar in set_row')
      if name == 'seed':
        changes['keys_B'] = self.keys_B.at[b].set(_keys(value, 1)[0])
      elif name in _RULES:
        changes[f'{name}_B'] = getattr(self, f'{name}_B').at[b].set(_checked(name, value, 1)[0])
      else:
        raise ValueError(f'unknown sampling field {name!r}; expected one of '
                         f'{sorted(_RULES) + ["seed"]}')
    return dataclasses.replace(self, **changes)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Sampled:
  """One step's tokens and log-probs. Log-probs are under the RAW model distribution
  (log_softmax of the unprocessed logits, ids >= vocab_limit removed), before penalties,
  temperature, filters or `allowed_BV` (the vLLM / OpenAI `logprobs` convention): they say what
  the model thought, not how likely the sampler was to pick the token."""
  token_B: jax.Array            # i32 [B]
  logprob_B: jax.Array          # f32 [B]: raw log-prob of token_B
  top_ids_BK: jax.Array         # i32 [B, K]: the K most likely ids under the raw distribution
  top_logprobs_BK: jax.Array    # f32 [B, K]: their raw log-probs, descending


def penalize(logits_BV: jax.Array, s: SlotSampling, output_counts_BV: jax.Array,
             prompt_mask_BV: jax.Array) -> jax.Array:
  """Penalized logits [B, V] f32. Repetition (HF RepetitionPenaltyLogitsProcessor / CTRL) on every
  id in the prompt (prompt_mask_BV, bool) or the output (output_counts_BV > 0): a logit > 0 is
  divided by the penalty, else multiplied. Then OpenAI's presence and frequency penalties on
  output ids: logit -= presence * (count > 0) + frequency * count."""
  logits_BV = logits_BV.astype(jnp.float32)
  counts_BV = output_counts_BV.astype(jnp.float32)
  rep_B1 = s.repetition_penalty_B[:, None]
  seen_BV = prompt_mask_BV.astype(bool) | (counts_BV > 0)
  repeated_BV = jnp.where(logits_BV > 0, logits_BV / rep_B1, logits_BV * rep_B1)
  logits_BV = jnp.where(seen_BV, repeated_BV, logits_BV)
  return (logits_BV - s.presence_penalty_B[:, None] * (counts_BV > 0)
          - s.frequency_penalty_B[:, None] * counts_BV)


def sample_next(logits_BV: jax.Array, s: SlotSampling, step_B: jax.Array,
                output_counts_BV: jax.Array, prompt_mask_BV: jax.Array,
                allowed_BV: jax.Array | None = None, vocab_limit: jax.Array | int = 0, *,
                num_top: int = 0) -> Sampled:
  """One token per row from last-position logits [B, V] (see the module docstring for the order).

  step_B [B] (or a scalar): tokens row b has generated so far; its key is
  fold_in(keys_B[b], step_B[b]). output_counts_BV [B, V] int: each id's count in row b's output;
  prompt_mask_BV [B, V] bool: ids in row b's prompt. allowed_BV [B, V] bool (optional): only
  True ids may be chosen (a row of all True is unconstrained; a row needs at least one allowed
  id below vocab_limit). vocab_limit (traced; <= 0 = off) removes ids >= vocab_limit.
  num_top (static, 0..MAX_TOP): how many raw top log-probs to return; the arrays have
  K = max(num_top, 1) columns."""
  if not isinstance(num_top, int) or not 0 <= num_top <= MAX_TOP:
    raise ValueError(f'num_top={num_top!r} must be an int in [0, {MAX_TOP}]')
  raw_BV = logits_BV.astype(jnp.float32)
  b, v = raw_BV.shape
  raw_BV = jnp.where((vocab_limit <= 0) | (jnp.arange(v) < vocab_limit), raw_BV, -jnp.inf)
  logprobs_BV = jax.nn.log_softmax(raw_BV, axis=-1)
  top_logprobs_BK, top_ids_BK = jax.lax.top_k(logprobs_BV, max(num_top, 1))

  logits_BV = penalize(raw_BV, s, output_counts_BV, prompt_mask_BV)
  if allowed_BV is not None:
    logits_BV = jnp.where(allowed_BV, logits_BV, -jnp.inf)
  greedy_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  hot_B = s.temperature_B > 0

  def draw(logits_BV):
    keys_B = jax.vmap(jax.random.fold_in)(s.keys_B, jnp.broadcast_to(step_B, (b,)))
    kept_BV = filter_logits(logits_BV, s.temperature_B, s.top_k_B, s.top_p_B, s.min_p_B)
    return jax.vmap(jax.random.categorical)(keys_B, kept_BV).astype(jnp.int32)

  # An all-greedy batch skips the sort over the vocabulary.
  drawn_B = jax.lax.cond(jnp.any(hot_B), draw, lambda _: greedy_B, logits_BV)
  token_B = jnp.where(hot_B, drawn_B, greedy_B)
  logprob_B = jnp.take_along_axis(logprobs_BV, token_B[:, None], axis=-1)[:, 0]
  return Sampled(token_B, logprob_B, top_ids_BK.astype(jnp.int32), top_logprobs_BK)


def update_counts(output_counts_BV: jax.Array, token_B: jax.Array, active_B: jax.Array
                  ) -> jax.Array:
  """output_counts_BV with 1 added at (b, token_B[b]) for every row with active_B[b] True."""
  b = output_counts_BV.shape[0]
  return output_counts_BV.at[jnp.arange(b), token_B].add(active_B.astype(output_counts_BV.dtype))
