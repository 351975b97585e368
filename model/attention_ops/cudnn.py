"""cuDNN fused attention through `jax.nn.dot_product_attention(..., implementation='cudnn')`.

GPU only: on any other platform it refuses with one line naming config.model.attention_impl
(it does not silently fall back, so a config that asks for cuDNN gets cuDNN or an error).
cuDNN needs float16/bfloat16 inputs and has no logit soft-cap; the mask description is passed
as a dense boolean mask [B, 1, T, S].
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from model.attention_ops.mask import AttentionMask


def attend(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, softcap: float = 0.0):
  platform = jax.default_backend()
  if platform != 'gpu':
    raise ValueError(f"config.model.attention_impl='cudnn' needs an NVIDIA GPU; this run's "
                     f"platform is {platform!r}: use 'xla' or 'flash'")
  if softcap:
    raise ValueError("config.model.attention_impl='cudnn' has no attention soft-cap "
                     f'(config.model.attn_softcap={softcap}): use \'xla\' or \'flash\'')
  if q_BTNH.dtype not in (jnp.bfloat16, jnp.float16):
    raise ValueError("config.model.attention_impl='cudnn' needs config.model.dtype='bfloat16' "
                     f'(got {q_BTNH.dtype})')
  dtype = q_BTNH.dtype
  y_BTNH = jax.nn.dot_product_attention(
      q_BTNH, k_BSKH.astype(dtype), v_BSKH.astype(dtype), mask=mask.allowed()[:, None],
      scale=1.0, implementation='cudnn')
  return y_BTNH.astype(dtype)
