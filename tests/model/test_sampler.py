import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import decode, transformer
from model.inference import sampler
from model.inference.sampler import Sampler, SamplingParams
from tests.conftest import random_tokens, tiny_model_config

LENGTHS = (1, 7, 30)


@pytest.mark.parametrize('overrides', [{}, dict(layer_pattern='LG', sliding_window=4)],
                         ids=['global', 'sliding_LG_4'])
def test_ragged_rows_decode_together_as_each_alone(overrides):
  cfg = tiny_model_config(**overrides)
  graphdef, params = nnx.split(transformer.build(cfg, seed=4))
  params = params.to_pure_dict()
  prompts = [np.asarray(random_tokens(10 + i, (n,), cfg.vocab_size)).tolist()
             for i, n in enumerate(LENGTHS)]
  s = Sampler(graphdef, params, max_seq_len=cfg.max_seq_len)
  together = s(prompts, max_new_tokens=6)
  for prompt, row in zip(prompts, together):
    assert s([prompt], max_new_tokens=6)[0] == row
  # Greedy ragged decoding equals the uncached forward, recomputed token by token.
  f = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
  seq = jnp.asarray([prompts[1]], jnp.int32)
  for _ in range(6):
    seq = jnp.concatenate([seq, jnp.argmax(f(params, seq)[:, -1], -1)[:, None]], axis=1)
  assert together[1] == np.asarray(seq[0, 7:]).tolist()


def test_mixed_sampling_params_compile_once():
  cfg = tiny_model_config()
  graphdef, params = nnx.split(transformer.build(cfg, seed=5))
  params = params.to_pure_dict()
  prompt = random_tokens(0, (3, 4), cfg.vocab_size)
  runs = [dict(temperature=0.0, seed=0),
          dict(temperature=[0.0, 0.7, 1.3], top_k=[0, 5, 2], top_p=[1.0, 0.9, 0.5], seed=[1, 2, 3]),
          dict(temperature=1.0, top_k=3, seed=[7, 7, 8]),
          dict(temperature=[2.0, 0.0, 1.0], top_p=0.3, seed=9)]
  before = sampler.sample._cache_size()
  outs = [decode.generate(graphdef, params, prompt, max_new_tokens=5, eos_id=3, vocab_limit=50,
                          **kw) for kw in runs]
  assert sampler.sample._cache_size() == before + 1
  assert all(int(o.max()) < 50 for o in outs)
  # Same seed and parameters on two rows with the same prompt: the same tokens.
  same = decode.generate(graphdef, params, jnp.broadcast_to(prompt[:1], (3, 4)), max_new_tokens=5,
                         temperature=1.0, seed=[4, 4, 5])
  np.testing.assert_array_equal(same[0], same[1])
  assert sampler.sample._cache_size() == before + 1
  # A greedy row is greedy whatever its neighbours do.
  np.testing.assert_array_equal(outs[1][0], outs[0][0])


def test_per_row_filters_keep_the_right_sets():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4))
  params = SamplingParams.make(4, temperature=1.0, top_k=[2, 0, 0, 0], top_p=[1.0, 0.7, 0.81, 1.0])
  seen = [set() for _ in range(4)]
  f = jax.jit(sampler.sample_logits)
  for i in range(300):
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(params.keys_B, i)
    for r, t in enumerate(f(logits, keys, params.temperature_B, params.top_k_B, params.top_p_B)):
      seen[r].add(int(t))
  assert seen == [{0, 1}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}]


def test_bad_sampling_params_are_refused_by_name():
  with pytest.raises(ValueError, match='top_p'):
    SamplingParams.make(2, top_p=0.0)
  with pytest.raises(ValueError, match='temperature'):
    SamplingParams.make(2, temperature=[-1.0, 1.0])
  with pytest.raises(ValueError, match='one value per row'):
    SamplingParams.make(2, seed=[1, 2, 3])


def test_untruncated_rows_are_only_scaled_and_mix_with_truncated_ones():
  """Plain temperature sampling skips the vocabulary sort (a lax.cond); a batch where one row
  truncates gives every row what it gets alone."""
  logits = jax.random.normal(jax.random.key(0), (3, 50)) * 3
  temp = jnp.asarray([0.7, 1.0, 1.3])
  off = sampler.filter_logits(logits, temp, jnp.zeros(3, jnp.int32), jnp.ones(3))
  np.testing.assert_array_equal(off, logits / temp[:, None])
  mixed = sampler.filter_logits(logits, temp, jnp.asarray([0, 5, 0], jnp.int32),
                                jnp.asarray([1.0, 1.0, 0.9]))
  for b, (k, p) in enumerate(((0, 1.0), (5, 1.0), (0, 0.9))):
    alone = sampler.filter_logits(logits[b:b + 1], temp[b:b + 1], jnp.asarray([k], jnp.int32),
                                  jnp.asarray([p]))
    np.testing.assert_array_equal(mixed[b], alone[0])
  assert int(jnp.sum(jnp.isfinite(mixed[1]))) == 5 and np.isfinite(mixed[0]).all()
