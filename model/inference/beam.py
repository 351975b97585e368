"""Beam search: the `width` most probable continuations of one prompt, as its own decoding path.

Algorithm (standard beam search, as in Hugging Face `generate(num_beams=W)`): keep W live
hypotheses with their summed token log-probs (log_softmax of the float32 logits). Each step
extends every live beam by every token (ids < vocab_limit when vocab_limit > 0; log-probs are
normalised over those ids), giving W*V candidates. The W best candidates that do not end in EOS
become the next live beams (the cache rows are gathered from their parents); each beam's EOS
candidate, and at the last step the new live beams too, are offered to a pool of W finished
hypotheses kept by score. Taking EOS candidates apart from the live top-W is what HF's "top 2W"
trick achieves: W live beams always survive however many candidates end in EOS. The loop runs
the full max_new_tokens (no early stopping), so the result is exactly the best W finished
hypotheses reachable through the live beams; with W >= V**(N-1) that is every hypothesis.

Score (HF / Wu et al. 2016 convention): score = logprob / len(tokens) ** length_penalty, where
len counts the new tokens including the EOS. length_penalty > 0 favours longer hypotheses,
0 ranks by raw logprob; live beams are always ranked by raw logprob.

The prompt is prefilled once (batch 1) into a per-row cache of size S = P + N, broadcast to W
rows, and the whole loop is one `lax.scan` compiled once per (model, W, P, N); EOS id, vocab
limit and length penalty are traced. Shapes: W beams, V vocab, P prompt, N new tokens.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from model.inference import sampler
from model.inference.kv_cache import DecodeCache


@dataclasses.dataclass(frozen=True)
class BeamResult:
  """One finished hypothesis: its new tokens (cut after EOS, inclusive), their summed log-prob
  and score = logprob / len(tokens) ** length_penalty."""
  tokens: list[int]
  logprob: float
  score: float


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BeamState:
  """Live beams (cache rows, next-token logits, summed log-probs, tokens so far) and the pool
  of finished hypotheses (tokens, lengths, log-probs, scores; empty slots score -inf)."""
  cache: DecodeCache
  last_logits_WV: jax.Array
  live_logprob_W: jax.Array
  live_tokens_WN: jax.Array
  done_tokens_WN: jax.Array
  done_len_W: jax.Array
  done_logprob_W: jax.Array
  done_score_W: jax.Array


def beam_step(model, state: BeamState, step, eos_id, vocab_limit, length_penalty) -> BeamState:
  """Extend the live beams by one token, offer finished candidates to the pool, and run the
  new live tokens through the model."""
  w, v = state.last_logits_WV.shape
  n = state.live_tokens_WN.shape[1]
  ids_V = jnp.arange(v)
  allowed_V = (vocab_limit <= 0) | (ids_V < vocab_limit)
  logits_WV = jnp.where(allowed_V, state.last_logits_WV.astype(jnp.float32), -jnp.inf)
  cand_WV = state.live_logprob_W[:, None] + jax.nn.log_softmax(logits_WV, axis=-1)
  is_eos_V = ids_V == eos_id                      # All False when eos_id = -1.

  # Live: the W best candidates not ending in EOS (lax.top_k breaks ties by lower index).
  live_logprob_W, flat_W = jax.lax.top_k(jnp.where(is_eos_V, -jnp.inf, cand_WV).reshape(-1), w)
  parent_W, tok_W = flat_W // v, (flat_W % v).astype(jnp.int32)
  live_tokens_WN = jax.lax.dynamic_update_slice_in_dim(
      state.live_tokens_WN[parent_W], tok_W[:, None], step, 1)

  # Finished candidates: each beam's EOS extension, and at the last step the live beams.
  eos_W = jnp.where(jnp.any(is_eos_V), cand_WV[:, jnp.clip(eos_id, 0, v - 1)], -jnp.inf)
  eos_tokens_WN = jax.lax.dynamic_update_slice_in_dim(
      state.live_tokens_WN, jnp.full((w, 1), eos_id, jnp.int32), step, 1)
  last_W = jnp.where(step == n - 1, live_logprob_W, -jnp.inf)
  length = (step + 1).astype(jnp.float32)
  logprob_C = jnp.concatenate([state.done_logprob_W, eos_W, last_W])
  score_C = jnp.concatenate([state.done_score_W,
                             jnp.concatenate([eos_W, last_W]) / length ** length_penalty])
  tokens_CN = jnp.concatenate([state.done_tokens_WN, eos_tokens_WN, live_tokens_WN])
  len_C = jnp.concatenate([state.done_len_W, jnp.full((2 * w,), step + 1, jnp.int32)])
  done_score_W, keep_W = jax.lax.top_k(score_C, w)

  # Reorder the cache rows to follow their parents ([R, B, S, K, H]: batch is axis 1).
  cache = state.cache
  cache = DecodeCache(jax.tree.map(lambda x: jnp.take(x, parent_W, axis=1), cache.layers),
                      cache.lengths_B[parent_W])
  logits_W1V, cache = model(tok_W[:, None], cache)
  return BeamState(cache, logits_W1V[:, 0], live_logprob_W, live_tokens_WN, tokens_CN[keep_W],
                   len_C[keep_W], logprob_C[keep_W], done_score_W)


@functools.partial(jax.jit, static_argnames=('graphdef', 'width', 'max_new_tokens'))
def search(graphdef, params, prompt_1P: jax.Array, eos_id: jax.Array | int = -1,
           vocab_limit: jax.Array | int = 0, length_penalty: jax.Array | float = 1.0, *,
           width: int, max_new_tokens: int):
  """The finished pool, best score first: (tokens_WN, lengths_W, logprob_W, score_W); slots
  never filled score -inf. Compiled once per (model, W, P, N)."""
  w, n = width, max_new_tokens
  first = sampler.prefill(nnx.merge(graphdef, params), prompt_1P, jnp.asarray(
      [prompt_1P.shape[1]], jnp.int32), n)
  # W identical rows; only row 0 is live at first, so the first step yields W distinct beams.
  cache = DecodeCache(jax.tree.map(lambda x: jnp.repeat(x, w, axis=1), first.cache.layers),
                      jnp.repeat(first.cache.lengths_B, w))
  state = BeamState(
      cache, jnp.repeat(first.last_logits_BV, w, axis=0),
      jnp.where(jnp.arange(w) == 0, 0.0, -jnp.inf).astype(jnp.float32),
      jnp.zeros((w, n), jnp.int32), jnp.zeros((w, n), jnp.int32), jnp.zeros((w,), jnp.int32),
      jnp.full((w,), -jnp.inf, jnp.float32), jnp.full((w,), -jnp.inf, jnp.float32))

  def body(state, step):
    model = nnx.merge(graphdef, params)  # Merged afresh inside the scan's trace.
    return beam_step(model, state, step, eos_id, vocab_limit, length_penalty), None

  state, _ = jax.lax.scan(body, state, jnp.arange(n, dtype=jnp.int32))
  return state.done_tokens_WN, state.done_len_W, state.done_logprob_W, state.done_score_W


def beam_search(graphdef, params, prompt: Sequence[int], *, width: int, max_new_tokens: int,
                length_penalty: float = 1.0, eos_id: int = -1, vocab_limit: int = 0,
                max_seq_len: int | None = None) -> list[BeamResult]:
  """The `width` best finished hypotheses (fewer if fewer exist), best score first. A hypothesis
  finishes on emitting `eos_id` or after `max_new_tokens`. `params` is the pure dict of
  `nnx.split(model)[1]`; with width=1 and no EOS this is greedy decoding."""
  if width < 1:
    raise ValueError(f'width={width} must be >= 1')
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  if len(prompt) == 0:
    raise ValueError('prompt is empty; expected at least one token')
  if max_seq_len is not None and len(prompt) + max_new_tokens > max_seq_len:
    raise ValueError(f'prompt of {len(prompt)} tokens + max_new_tokens={max_new_tokens} exceeds '
                     f'max_seq_len={max_seq_len}')
  out = search(graphdef, params, jnp.asarray([list(prompt)], jnp.int32), jnp.int32(eos_id),
               jnp.int32(vocab_limit), jnp.float32(length_penalty), width=width,
               max_new_tokens=max_new_tokens)
  tokens, lengths, logprobs, scores = jax.device_get(out)
  return [BeamResult(tokens=t[:n].tolist(), logprob=float(lp), score=float(s))
          for t, n, lp, s in zip(tokens, lengths, logprobs, scores) if lp > -float('inf')]
