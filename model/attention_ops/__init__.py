"""Attention backends behind one switch, `config.model.attention_impl`.

Each backend is `attend(q_BTNH, k_BSKH, v_BSKH, mask: AttentionMask, softcap) -> y_BTNH` with
queries already scaled, K | N (grouped queries), float32 softmax. Adding a kernel (e.g. a Pallas
TPU flash / splash / ragged-paged kernel) is one new file here plus one line in BACKENDS.
"""
from __future__ import annotations

from model.attention_ops import cudnn, flash, splash, xla
from model.attention_ops.mask import MASK_VALUE, AttentionMask, causal

__all__ = ['BACKENDS', 'MASK_VALUE', 'AttentionMask', 'causal', 'get']

BACKENDS = {
    'xla': xla.attend,      # reference einsum-softmax (materialises T x S)
    'flash': flash.attend,  # FlashAttention-2 in pure JAX, own VJP (memory linear in T and S)
    'splash': splash.attend,  # Pallas TPU splash kernel (jax's); KV cache etc. run 'flash'
    'cudnn': cudnn.attend,  # jax.nn.dot_product_attention(implementation='cudnn'); GPU only
}


def get(name: str):
  try:
    return BACKENDS[name]
  except KeyError:
    raise ValueError(f'config.model.attention_impl={name!r}; expected one of '
                     f'{tuple(BACKENDS)}') from None
