"""Building blocks: parameter helper, RMSNorm, embedder, RoPE and the (gated) MLP.

Shapes: B batch, T length, D d_model, F mlp_dim, V vocab, N heads, H head_dim, h = H/2 rotary
frequencies (a lowercase letter is a part of its uppercase one; K is attention's kv heads).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from model import sharding
from model.config import ModelConfig


def param(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str], dtype) -> nnx.Param:
  """A float parameter annotated with logical axis names (resolved later by model/sharding.py)."""
  return nnx.Param(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names),
                   eager_sharding=False)


class Linear(nnx.Param):
  """A weight that owns its contraction: its logical axis names (`out_sharding`), the einsum it
  is applied with (`eq`, metadata that survives split/merge/scan) and the dtype policy (compute
  in the config dtype, accumulate in float32: `matmul`). Its path is a plain parameter's
  (`attn/w_q`), so checkpoints, the HF mapping and the sharding rules are unchanged. LoRA wraps
  `apply` (adds x·A·B) and weight quantization replaces this class (int8 value + scales)."""

  def apply(self, x: jax.Array, dtype) -> jax.Array:
    return matmul(self.eq, x, self[...], dtype)


def linear(rngs: nnx.Rngs, init, shape: Sequence[int], names: Sequence[str], dtype,
           eq: str) -> Linear:
  """A `Linear` weight of `shape` with logical axis `names`, applied as `einsum(eq, x, w)`."""
  if len(shape) != len(names) or len(eq.split('->')[0].split(',')[1]) != len(shape):
    raise ValueError(f'linear: shape {tuple(shape)}, names {tuple(names)} and einsum {eq!r} '
                     'disagree on the weight rank')
  return Linear(init(rngs.params(), tuple(shape), dtype), out_sharding=tuple(names),
                eager_sharding=False, eq=eq)


def fan_in_init(fan_in_axes: Sequence[int]):
  """N(0, 1/fan_in): PaLM's 'fan-in variance scaling' for kernels (truncated normal)."""
  return nnx.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal',
                                           in_axis=tuple(fan_in_axes), out_axis=-1)


def matmul(eq: str, x: jax.Array, w: jax.Array, dtype) -> jax.Array:
  """einsum in the compute dtype, accumulating in float32 (a bf16 x bf16 -> bf16 dot is slow on
  XLA:CPU and loses precision), then cast back to the compute dtype."""
  y = jnp.einsum(eq, x.astype(dtype), w.astype(dtype), preferred_element_type=jnp.float32)
  return y.astype(dtype)


class RMSNorm(nnx.Module):
  """x * rsqrt(mean(x^2) + eps) * gain over the last axis, computed in float32. [..., dim].

  The gain is `scale` (init 1), or `1 + scale` with scale init 0 when `norm_offset_one` (Gemma;
  weight decay then pulls the gain towards 1, not 0). `dim` defaults to d_model; QK-norm uses
  head_dim with logical name `head_dim`.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dim: int | None = None,
               name: str = 'embed'):
    self.eps = cfg.norm_eps
    self.offset = 1.0 if cfg.norm_offset_one else 0.0
    self.dtype = jnp.dtype(cfg.dtype)
    init = nnx.initializers.zeros if cfg.norm_offset_one else nnx.initializers.ones
    self.scale = param(rngs, init, (dim or cfg.d_model,), (name,), jnp.dtype(cfg.param_dtype))

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * (self.offset + self.scale[...])).astype(self.dtype)


class Embedder(nnx.Module):
  """Token embedding [V, D]; with tied embeddings it also projects back to logits.

  Init N(0, 1/D), so unit-variance inputs need the sqrt(D) input scale (`scale_embeddings`,
  Gemma) and tied output logits start at unit scale.
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    std = cfg.d_model ** -0.5
    self.embedding = param(rngs, nnx.initializers.normal(std), (cfg.vocab_size, cfg.d_model),
                           ('vocab', 'embed'), pdt)
    if not cfg.tie_embeddings:
      self.unembedding = linear(rngs, fan_in_init([0]), (cfg.d_model, cfg.vocab_size),
                                ('embed', 'vocab'), pdt, 'btd,dv->btv')

  @jax.named_scope('embed')
  def encode(self, tokens_BT: jax.Array) -> jax.Array:
    dtype = jnp.dtype(self.cfg.dtype)
    x_BTD = jnp.take(self.embedding[...], tokens_BT, axis=0).astype(dtype)
    if self.cfg.scale_embeddings:
      x_BTD = x_BTD * jnp.asarray(self.cfg.d_model ** 0.5, dtype)
    return sharding.constrain(x_BTD, ('batch', 'length', 'act_embed'))

  def head(self) -> tuple[jax.Array, float]:
    """(output weight as [V, D], logit soft-cap): what `decode` multiplies and caps, for the
    fused cross-entropy (train/loss.py) that never materialises the logits."""
    if self.cfg.tie_embeddings:
      return self.embedding[...], self.cfg.logit_softcap
    return self.unembedding[...].T, self.cfg.logit_softcap

  @jax.named_scope('head_loss')
  def decode(self, x_BTD: jax.Array) -> jax.Array:
    """[B, T, D] -> float32 logits [B, T, V]."""
    dtype = jnp.dtype(self.cfg.dtype)
    if self.cfg.tie_embeddings:
      logits_BTV = matmul('btd,vd->btv', x_BTD, self.embedding[...], dtype)
    else:
      logits_BTV = self.unembedding.apply(x_BTD, dtype)
    logits_BTV = logits_BTV.astype(jnp.float32)
    if self.cfg.logit_softcap:
      cap = self.cfg.logit_softcap
      logits_BTV = cap * jnp.tanh(logits_BTV / cap)
    return sharding.constrain(logits_BTV, ('batch', 'length', 'act_vocab'))


def rope_inv_freq(head_dim: int, base, cfg: ModelConfig, scaled=True) -> jax.Array:
  """Rotation frequencies [h = H/2]: base^(-2i/H), rescaled by cfg.rope_scaling where `scaled`.

  linear: every frequency / factor (position interpolation). llama3 (Llama 3.1): wavelengths
  longer than original_len / low_freq_factor are divided by `factor`, shorter than
  original_len / high_freq_factor kept, and those between interpolated smoothly. `base` and
  `scaled` may be traced per-layer values from the scanned stack.
  """
  inv_freq_h = base ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
  factor = cfg.rope_scaling_factor
  if cfg.rope_scaling == 'linear':
    rescaled_h = inv_freq_h / factor
  elif cfg.rope_scaling == 'llama3':
    lo, hi, orig = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
    wavelen_h = 2 * jnp.pi / inv_freq_h
    smooth_h = (orig / wavelen_h - lo) / (hi - lo)
    mid_h = (1 - smooth_h) * inv_freq_h / factor + smooth_h * inv_freq_h
    rescaled_h = jnp.where(wavelen_h > orig / lo, inv_freq_h / factor,
                           jnp.where(wavelen_h < orig / hi, inv_freq_h, mid_h))
  else:
    return inv_freq_h
  return jnp.where(scaled, rescaled_h, inv_freq_h)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, inv_freq_h: jax.Array) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), half-split layout, computed in float32.

  Channel pair (i, i + H/2) is rotated by angle position * inv_freq[i], so q.k depends only on
  the relative position of query and key.
  """
  angle_BTh = positions_BT[..., None].astype(jnp.float32) * inv_freq_h
  sin, cos = jnp.sin(angle_BTh)[:, :, None, :], jnp.cos(angle_BTh)[:, :, None, :]
  x1, x2 = jnp.split(x_BTNH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BTNH.dtype)


ACTIVATION_FNS = {
    'swiglu': jax.nn.silu,
    'geglu': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu': lambda x: jax.nn.gelu(x, approximate=True),
}


class MLP(nnx.Module):
  """Gated (SwiGLU/GeGLU: act(x W_gate) * (x W_up)) or plain GELU FFN. [B,T,D] -> [B,T,D]."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    pdt = jnp.dtype(cfg.param_dtype)
    shape_in = (cfg.d_model, cfg.mlp_dim)
    self.w_gate = linear(rngs, fan_in_init([0]), shape_in, ('embed', 'mlp'), pdt, 'btd,df->btf')
    if cfg.gated:
      self.w_up = linear(rngs, fan_in_init([0]), shape_in, ('embed', 'mlp'), pdt, 'btd,df->btf')
    self.w_down = linear(rngs, fan_in_init([0]), (cfg.mlp_dim, cfg.d_model), ('mlp', 'embed'), pdt,
                         'btf,fd->btd')

  @jax.named_scope('mlp')
  def __call__(self, x_BTD: jax.Array) -> jax.Array:
    dtype = jnp.dtype(self.cfg.dtype)
    h_BTF = ACTIVATION_FNS[self.cfg.activation](self.w_gate.apply(x_BTD, dtype))
    if self.cfg.gated:
      h_BTF = h_BTF * self.w_up.apply(x_BTD, dtype)
    h_BTF = sharding.constrain(h_BTF, ('batch', 'length', 'act_mlp'))
    return self.w_down.apply(h_BTF, dtype)
