"""Tests for model/inference/processors.py: parity with Hugging Face's logits processors, OpenAI's
penalty formula, sampling distributions, batch independence, constraints, raw log-probs, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from model.inference import processors, sampler
from model.inference.processors import SlotSampling

B, V = 5, 64   # Most tests share this shape, so the jitted step compiles once for them.
_step = jax.jit(processors.sample_next, static_argnames='num_top')
penalize = jax.jit(processors.penalize)


def sample_next(logits, s, step, counts, prompt, allowed=None, vocab_limit=0):
  """The jitted step with one signature (allowed all True = unconstrained, 5 top log-probs)."""
  allowed = jnp.ones(logits.shape, bool) if allowed is None else jnp.asarray(allowed)
  return _step(jnp.asarray(logits), s, jnp.asarray(step), jnp.asarray(counts),
               jnp.asarray(prompt), allowed, jnp.int32(vocab_limit), num_top=5)


# What a hot row draws from: penalties, then temperature, top-k, top-p and min-p.
process = jax.jit(lambda logits, s, counts, prompt: processors.filter_logits(
    processors.penalize(logits, s, counts, prompt), s.temperature_B, s.top_k_B, s.top_p_B,
    s.min_p_B))

# One row each, all in one batch: (temperature, top_k, top_p, min_p, repetition_penalty).
HF_ROWS = [(0.7, 5, 1.0, 0.0, 1.3), (1.0, 0, 0.8, 0.0, 1.0), (1.5, 10, 0.9, 0.05, 0.8),
           (2.0, 0, 1.0, 0.1, 1.0), (3.0, 20, 0.6, 0.0, 2.0), (2.0, 0, 0.9, 0.1, 1.1),
           (1.0, 12, 0.9, 0.3, 1.0), (0.9, 0, 1.0, 0.0, 1.0)]


def hf_process(logits_V, input_ids, temperature, top_k, top_p, min_p, rep, skip=None):
  """HF generate's chain (repetition, temperature, top-k, top-p, min-p) on one row; `skip`
  leaves one processor out."""
  chain = [('rep', rep != 1.0, lambda: RepetitionPenaltyLogitsProcessor(rep)),
           ('temperature', True, lambda: TemperatureLogitsWarper(temperature)),
           ('top_k', top_k > 0, lambda: TopKLogitsWarper(top_k)),
           ('top_p', top_p < 1.0, lambda: TopPLogitsWarper(top_p)),
           ('min_p', min_p > 0, lambda: MinPLogitsWarper(min_p))]
  scores = torch.tensor(np.asarray(logits_V, np.float32)[None])
  ids = torch.tensor([list(input_ids)], dtype=torch.long)
  for name, on, make in chain:
    if on and name != skip:
      scores = make()(ids, scores)
  return scores[0].numpy()


def random_history(rng, b, v, n_prompt=6, n_output=5):
  """(output_counts_BV, prompt_mask_BV, per-row prompt+output id lists)."""
  counts = np.zeros((b, v), np.int32)
  prompt = np.zeros((b, v), bool)
  history = []
  for r in range(b):
    p_ids = rng.integers(0, v, n_prompt)
    o_ids = rng.integers(0, v, n_output)
    prompt[r, p_ids] = True
    np.add.at(counts[r], o_ids, 1)
    history.append(list(p_ids) + list(o_ids))
  return counts, prompt, history


def test_filters_and_repetition_match_hf_per_row_in_one_batch():
  rng = np.random.default_rng(0)
  b, v = len(HF_ROWS), 64
  logits = rng.normal(0, 3, (b, v)).astype(np.float32)
  counts, prompt, history = random_history(rng, b, v)
  t, k, p, m, rep = (list(c) for c in zip(*HF_ROWS))
  s = SlotSampling.make(b, temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=rep)
  ours = np.asarray(process(jnp.asarray(logits), s, jnp.asarray(counts), jnp.asarray(prompt)))
  matters = {}
  for r, row in enumerate(HF_ROWS):
    want = hf_process(logits[r], history[r], *row)
    np.testing.assert_array_equal(np.isfinite(ours[r]), np.isfinite(want), err_msg=f'row {r}')
    kept = np.isfinite(want)
    np.testing.assert_allclose(ours[r][kept], want[kept], rtol=1e-5, atol=1e-5)
    assert 1 < kept.sum() < v or r == len(HF_ROWS) - 1, r
    for name in ('rep', 'top_k', 'top_p', 'min_p'):
      changed = not np.array_equal(hf_process(logits[r], history[r], *row, skip=name), want)
      matters[name] = matters.get(name, 0) + changed
  # Each processor changes the result in at least two rows, so each one is really checked.
  assert min(matters.values()) >= 2, matters


def test_penalties_equal_the_openai_and_ctrl_formulas():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2, (B, V)).astype(np.float32)
  counts, prompt, _ = random_history(rng, B, V, n_output=12)
  presence, frequency = [0.5, -1.0, 2.0, 0.0, 0.0], [0.3, 1.5, -0.7, 0.0, -2.0]
  rep = [1.0, 1.0, 1.4, 0.6, 1.0]
  s = SlotSampling.make(B, presence_penalty=presence, frequency_penalty=frequency,
                        repetition_penalty=rep)
  got = np.asarray(penalize(logits, s, counts, prompt))
  r = np.asarray(rep, np.float32)[:, None]
  seen = prompt | (counts > 0)
  want = np.where(seen, np.where(logits > 0, logits / r, logits * r), logits)
  want = (want - np.asarray(presence, np.float32)[:, None] * (counts > 0)
          - np.asarray(frequency, np.float32)[:, None] * counts)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert all(not np.allclose(g, l) for g, l in zip(got, logits))


def test_greedy_rows_take_the_argmax_of_penalized_logits():
  rng = np.random.default_rng(2)
  logits = rng.normal(0, 1, (B, V)).astype(np.float32)
  top = logits.argmax(-1)
  counts = np.zeros((B, V), np.int32)
  counts[np.arange(B), top] = 3                          # The raw favourite was already emitted.
  prompt = np.zeros((B, V), bool)
  s = SlotSampling.make(B, frequency_penalty=[2.0, 0.0, 0.5, 0.0, 0.0],
                        presence_penalty=[0, 2, 0, 0, 0], repetition_penalty=[1, 1, 1, 50, 1],
                        seed=[1, 2, 3, 4, 5])
  out = sample_next(logits, s, np.zeros(B, np.int32), counts, prompt)
  pen = np.asarray(penalize(logits, s, counts, prompt))
  np.testing.assert_array_equal(out.token_B, pen.argmax(-1))
  np.testing.assert_array_equal(np.asarray(out.token_B) != top, [True] * 4 + [False])


def test_draws_follow_the_processed_distribution():
  v, n = 8, 4000
  logits = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 3.0], np.float32)
  # (temperature, top_k, top_p, min_p, repetition_penalty); id 7 counts once as output.
  rows = [(0.7, 0, 1.0, 0.0, 1.0), (1.5, 4, 1.0, 0.0, 1.0), (1.0, 0, 0.8, 0.0, 1.3),
          (1.0, 0, 1.0, 0.2, 1.0), (2.0, 5, 0.9, 0.05, 2.0)]
  b = len(rows) * n
  t, k, p, m, rep = (np.repeat(c, n) for c in zip(*rows))
  s = SlotSampling.make(b, temperature=t, top_k=k, top_p=p, min_p=m, repetition_penalty=rep,
                        presence_penalty=0.5, seed=np.repeat(np.arange(len(rows)) + 11, n))
  counts = np.zeros((b, v), np.int32)
  counts[:, 7] = 1
  step = np.tile(np.arange(n), len(rows))                # Same seed, a different step per draw.
  out = sample_next(np.broadcast_to(logits, (b, v)), s, step, counts, np.zeros((b, v), bool))
  tokens = np.asarray(out.token_B).reshape(len(rows), n)
  for r, (temperature, top_k, top_p, min_p, rep) in enumerate(rows):
    pen = logits.copy()
    pen[7] = pen[7] / rep - 0.5                        # Repetition, then presence (logit 7 > 0).
    want = hf_process(pen, [], temperature, top_k, top_p, min_p, 1.0)
    want = np.exp(want - want.max())
    want /= want.sum()
    freq = np.bincount(tokens[r], minlength=v) / n
    assert np.all(freq[want == 0] == 0), (r, freq, want)
    assert np.abs(freq - want).max() < 0.03, (r, freq, want)


def test_a_rows_draws_do_not_depend_on_the_batch():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 1, (B, V)).astype(np.float32)
  counts, prompt, _ = random_history(rng, B, V)
  s = SlotSampling.make(B, temperature=[1.0, 2.0, 0.0, 1.5, 0.8], top_k=[0, 30, 0, 0, 40],
                        top_p=[1.0, 1.0, 1.0, 0.95, 0.99], min_p=[0, 0, 0, 0, 0.01],
                        frequency_penalty=[0, 0.5, 0, 0, 1.0], seed=[5, 6, 7, 8, 9])
  steps = np.asarray([0, 3, 1, 7, 2])
  perm = np.array([3, 0, 4, 2, 1])
  pick = lambda tree, idx: jax.tree.map(lambda a: a[idx], tree)
  singles = [pick(s, slice(r, r + 1)) for r in range(B)]
  seen = []
  for shift in range(4):
    batch = np.asarray(sample_next(logits, s, steps + shift, counts, prompt).token_B)
    shuffled = sample_next(logits[perm], pick(s, perm), (steps + shift)[perm], counts[perm],
                           prompt[perm]).token_B
    np.testing.assert_array_equal(np.asarray(shuffled), batch[perm])
    for r in range(B):
      alone = sample_next(logits[r:r + 1], singles[r], (steps + shift)[r:r + 1],
                          counts[r:r + 1], prompt[r:r + 1]).token_B
      assert int(alone[0]) == batch[r], (shift, r)
    seen.append(tuple(batch))
  assert len(set(seen)) == 4                             # The step changes the draws.


def test_matches_the_legacy_sampler_without_penalties():
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 2, (B, V)).astype(np.float32)
  kw = dict(temperature=[0.0, 1.0, 0.7, 1.3, 2.0], top_k=[0, 0, 5, 10, 3],
            top_p=[1.0, 0.9, 1.0, 0.8, 0.5], seed=[1, 2, 3, 4, 5])
  s = SlotSampling.make(B, **kw)
  legacy = sampler.SamplingParams.make(B, **kw)
  zeros = np.zeros((B, V), np.int32)
  f = jax.jit(sampler.sample_logits)
  for step in range(4):
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(legacy.keys_B, step)
    want = f(logits, keys, legacy.temperature_B, legacy.top_k_B, legacy.top_p_B)
    got = sample_next(logits, s, np.full(B, step), zeros, zeros.astype(bool)).token_B
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_allowed_vocab_limit_and_raw_logprobs():
  rng = np.random.default_rng(5)
  limit = 40
  logits = rng.normal(0, 1, (B, V)).astype(np.float32)
  logits[:, 50] = 10.0                                   # Above the vocab limit: never chosen.
  allowed = np.ones((B, V), bool)
  allowed[0] = False
  allowed[0, [3, 7]] = True
  allowed[3, :30] = False
  counts, prompt, _ = random_history(rng, B, V)
  s = SlotSampling.make(B, temperature=[5.0, 5.0, 0.0, 0.0, 1.0], repetition_penalty=1.5,
                        frequency_penalty=1.0, seed=[1, 2, 3, 4, 5])
  args = (counts, prompt, allowed, limit)
  tokens = np.stack([np.asarray(sample_next(logits, s, np.full(B, i), *args).token_B)
                     for i in range(40)])
  assert set(tokens[:, 0]) == {3, 7}
  assert tokens.max() < limit and len(set(tokens[:, 1])) > 10
  out = sample_next(logits, s, np.zeros(B, np.int32), *args)
  raw = np.where(np.arange(V) < limit, logits, -np.inf)
  log_softmax = lambda x: x - x.max(-1, keepdims=True) - np.log(
      np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
  logprobs = log_softmax(raw)
  tok = np.asarray(out.token_B)
  pen = np.where(allowed, np.asarray(penalize(raw, s, counts, prompt)), -np.inf)
  assert tok[2] == np.argmax(pen[2]) and tok[3] == np.argmax(pen[3]) and 30 <= tok[3] < limit
  np.testing.assert_allclose(out.logprob_B, logprobs[np.arange(B), tok], rtol=1e-5, atol=1e-5)
  order = np.argsort(-logprobs, axis=-1)[:, :5]
  np.testing.assert_array_equal(out.top_ids_BK, order)
  np.testing.assert_allclose(out.top_logprobs_BK, np.take_along_axis(logprobs, order, -1),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(out.logprob_B, log_softmax(pen)[np.arange(B), tok])  # Raw, not processed.
  one = jax.eval_shape(lambda *a: processors.sample_next(*a, num_top=0), logits, s,
                       np.zeros(B, np.int32), counts, prompt)
  assert one.top_ids_BK.shape == (B, 1) and one.top_logprobs_BK.shape == (B, 1)


def test_set_row_and_update_counts():
  s = SlotSampling.make(3, temperature=0.5, seed=[1, 2, 3])
  t = s.set_row(1, temperature=0.0, top_k=4, min_p=0.1, frequency_penalty=-1.0, seed=42)
  np.testing.assert_array_equal(t.temperature_B, [0.5, 0.0, 0.5])
  np.testing.assert_array_equal(t.top_k_B, [0, 4, 0])
  np.testing.assert_allclose(t.min_p_B, [0, 0.1, 0])
  np.testing.assert_array_equal(t.frequency_penalty_B, [0, -1, 0])
  key_data = jax.random.key_data
  np.testing.assert_array_equal(key_data(t.keys_B[1]), key_data(jax.random.key(42)))
  np.testing.assert_array_equal(key_data(t.keys_B[0]), key_data(s.keys_B[0]))
  np.testing.assert_array_equal(s.temperature_B, [0.5, 0.5, 0.5])   # The original is unchanged.
  counts = processors.update_counts(jnp.zeros((3, 5), jnp.int32), jnp.asarray([2, 2, 4]),
                                    jnp.asarray([True, False, True]))
  counts = processors.update_counts(counts, jnp.asarray([2, 0, 4]), jnp.asarray([True] * 3))
  np.testing.assert_array_equal(counts, [[0, 0, 2, 0, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 2]])


@pytest.mark.parametrize('field, value', [
    ('temperature', -0.1), ('top_k', -1), ('top_p', 0.0), ('top_p', 1.5), ('min_p', -0.1),
    ('min_p', 1.1), ('repetition_penalty', 0.0), ('presence_penalty', 2.5),
    ('frequency_penalty', -3.0), ('temperature', float('nan')), ('seed', -1)])
def test_bad_values_are_refused_by_name(field, value):
  with pytest.raises(ValueError, match=f'^{field}='):
    SlotSampling.make(2, **{field: value})
  with pytest.raises(ValueError, match=f'^{field}='):
    SlotSampling.make(2).set_row(1, **{field: value})


def test_bad_shapes_rows_fields_and_num_top_are_refused():
  with pytest.raises(ValueError, match='top_p has shape'):
    SlotSampling.make(2, top_p=[0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match='row b=2'):
    SlotSampling.make(2).set_row(2, top_k=1)
  with pytest.raises(ValueError, match="unknown sampling field 'top_a'"):
    SlotSampling.make(2).set_row(0, top_a=1)
  logits = jnp.zeros((2, 8))
  with pytest.raises(ValueError, match='num_top=21'):
    processors.sample_next(logits, SlotSampling.make(2), 0, jnp.zeros((2, 8), jnp.int32),
                           jnp.zeros((2, 8), bool), num_top=21)
