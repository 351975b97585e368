import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import decode, transformer
from tests.conftest import jit_apply, random_tokens, tiny_model_config


@pytest.fixture(scope='module')
def setup():
  cfg = tiny_model_config(num_kv_heads=1)
  model = transformer.build(cfg, seed=3)
  graphdef, params = nnx.split(model)
  return cfg, model, graphdef, params.to_pure_dict()


def test_greedy_generation_matches_repeated_full_forward(setup):
  cfg, model, graphdef, params = setup
  prompt = random_tokens(0, (2, 5), cfg.vocab_size)
  out = decode.generate(graphdef, params, prompt, jax.random.key(0), max_new_tokens=6)
  f = jit_apply(model)
  seq = prompt
  for _ in range(6):  # No cache: recompute everything, take the argmax.
    nxt = jnp.argmax(f(seq)[0][:, -1], axis=-1).astype(jnp.int32)
    seq = jnp.concatenate([seq, nxt[:, None]], axis=1)
  np.testing.assert_array_equal(out, seq[:, 5:])


def test_sampling_is_seeded_and_filters_work(setup):
  cfg, _, graphdef, params = setup
  prompt = random_tokens(1, (4, 3), cfg.vocab_size)
  kw = dict(max_new_tokens=8, temperature=1.0)
  a = decode.generate(graphdef, params, prompt, jax.random.key(5), **kw)
  b = decode.generate(graphdef, params, prompt, jax.random.key(5), **kw)
  c = decode.generate(graphdef, params, prompt, jax.random.key(6), **kw)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  greedy = decode.generate(graphdef, params, prompt, jax.random.key(0), max_new_tokens=8)
  top1 = decode.generate(graphdef, params, prompt, jax.random.key(7), max_new_tokens=8,
                         temperature=1.0, top_k=1)
  nucleus = decode.generate(graphdef, params, prompt, jax.random.key(7), max_new_tokens=8,
                            temperature=1.0, top_p=1e-6)
  np.testing.assert_array_equal(top1, greedy)
  np.testing.assert_array_equal(nucleus, greedy)


def test_top_k_and_top_p_keep_the_right_sets():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  keys = jax.random.split(jax.random.key(0), 400)
  draw = lambda **kw: {int(decode.sample_logits(logits, k, 1.0, **kw)[0]) for k in keys}
  assert draw(top_k=2, top_p=1.0) == {0, 1}
  assert draw(top_k=0, top_p=0.7) == {0, 1}       # 0.5 < 0.7 <= 0.8
  assert draw(top_k=0, top_p=0.81) == {0, 1, 2}
  assert draw(top_k=0, top_p=1.0) == {0, 1, 2, 3}


def test_rows_stop_at_eos(setup):
  cfg, _, graphdef, params = setup
  prompt = random_tokens(2, (3, 4), cfg.vocab_size)
  greedy = decode.generate(graphdef, params, prompt, jax.random.key(0), max_new_tokens=6)
  eos = int(greedy[0, 1])  # Pretend the second greedy token of row 0 is EOS.
  out = decode.generate(graphdef, params, prompt, jax.random.key(0), max_new_tokens=6, eos_id=eos)
  first = int(np.argmax(np.asarray(out[0]) == eos))
  assert (np.asarray(out[0, first:]) == eos).all()


def test_prompt_longer_than_context_is_refused():
  cfg = tiny_model_config(max_seq_len=16)
  with pytest.raises(ValueError, match='exceeds the context config.model.max_seq_len=16'):
    decode.check_prompt(12, 8, cfg)
  with pytest.raises(ValueError, match='empty'):
    decode.check_prompt(0, 8, cfg)
