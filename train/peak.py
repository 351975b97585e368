"""Measures this machine's matmul peak, the denominator of MFU (figures vary run to run)."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp


def matmul_peak_flops(dtype: str = 'float32', n: int = 2048, seconds: float = 1.0) -> float:
  """Best observed FLOP/s of a jitted n x n x n matmul on the default device.

  bfloat16 inputs accumulate in float32 (`preferred_element_type`); a bf16 -> bf16 dot is
  several times slower on XLA:CPU (jax 0.10) and would understate the peak.
  """
  dt = jnp.dtype(dtype)
  a = jnp.ones((n, n), dt)
  b = jnp.ones((n, n), dt)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  f(a, b).block_until_ready()
  best = float('inf')
  deadline = time.perf_counter() + seconds
  reps = 0
  while reps < 3 or time.perf_counter() < deadline:
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
    reps += 1
  # Simulated CPU devices share the same cores; real accelerators each bring their own peak.
  devices = 1 if jax.default_backend() == 'cpu' else jax.device_count()
  return 2.0 * n ** 3 / best * devices
