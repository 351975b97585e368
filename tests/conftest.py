"""Shared fixtures. Tests run on CPU with 8 simulated devices so sharding can be checked."""
import os
import sys

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from model.config import ModelConfig  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


def tiny_model_config(**overrides) -> ModelConfig:
  base = dict(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              mlp_dim=48, max_seq_len=64)
  base.update(overrides)
  cfg = ModelConfig(**base)
  cfg.validate()
  return cfg


@pytest.fixture
def tiny_cfg():
  return tiny_model_config()


def jit_apply(model):
  """A jitted functional forward (eager NNX is slow): f(tokens, cache=None, index=0)."""
  graphdef, params = nnx.split(model)

  @jax.jit
  def f(params, tokens, cache=None, index=0):
    return nnx.merge(graphdef, params)(tokens, cache, index)

  return lambda tokens, cache=None, index=0: f(params, tokens, cache, index)


def random_tokens(key, shape, vocab):
  return jax.random.randint(jax.random.key(key), shape, 0, vocab, dtype=jnp.int32)
