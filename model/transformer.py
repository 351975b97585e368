"""The decoder: embed -> scanned stack of blocks -> final RMSNorm -> logits.

Layers are created stacked (leading `layers` axis) and applied with `nnx.scan`, so compile time
does not grow with depth. Shapes: B batch, T length, D d_model, V vocab, L layers, S cache size.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from model import sharding
from model.attention import Attention
from model.config import ModelConfig
from model.layers import MLP, Embedder, RMSNorm

_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
  """Serial pre-norm: x + attn(n1(x)), then + mlp(n2(.)).
  Parallel (PaLM §2): x + attn(n(x)) + mlp(n(x)) with one shared norm.
  With `post_norms` (Gemma 2/3) each branch output is normalised again before the residual."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.parallel = cfg.block == 'parallel'
    self.post_norms = cfg.post_norms
    self.attn_norm = RMSNorm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    if not self.parallel:
      self.mlp_norm = RMSNorm(cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    if cfg.post_norms:
      self.post_attn_norm = RMSNorm(cfg, rngs)
      self.post_mlp_norm = RMSNorm(cfg, rngs)

  def __call__(self, x_BTD, positions_BT, cache=None, index=0, window=0, rope_base=None,
               rope_scaled=True):
    post_attn = self.post_attn_norm if self.post_norms else (lambda y: y)
    post_mlp = self.post_mlp_norm if self.post_norms else (lambda y: y)
    h_BTD = self.attn_norm(x_BTD)
    a_BTD, cache = self.attn(h_BTD, positions_BT, cache, index, window, rope_base, rope_scaled)
    if self.parallel:
      x_BTD = x_BTD + post_attn(a_BTD) + post_mlp(self.mlp(h_BTD))
    else:
      x_BTD = x_BTD + post_attn(a_BTD)
      x_BTD = x_BTD + post_mlp(self.mlp(self.mlp_norm(x_BTD)))
    return sharding.constrain(x_BTD, ('batch', 'length', 'act_embed')), cache


class Decoder(nnx.Module):
  """tokens_BT -> logits_BTV (float32). See `__call__` for the KV-cache mode."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedder = Embedder(cfg, rngs)

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = RMSNorm(cfg, rngs)

  def __call__(self, tokens_BT: jax.Array, cache: dict | None = None,
               index: jax.Array | int = 0):
    """Full forward (cache=None), or prefill/decode with a KV cache from `init_cache`.

    With a cache, `tokens_BT` sit at positions index..index+T-1 of every row; their K/V are
    written there and the updated cache is returned. Returns (logits_BTV, cache).
    """
    b, t = tokens_BT.shape
    positions_BT = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
    x_BTD = self.embedder.encode(tokens_BT)

    # Per-layer attention span, RoPE base and RoPE scaling ride along the scan as [L] arrays.
    cfg = self.cfg
    kinds = cfg.layer_kinds()
    window_L = jnp.asarray([cfg.sliding_window if k == 'L' else 0 for k in kinds], jnp.int32)
    base_L = jnp.asarray([cfg.rope_base_local or cfg.rope_base if k == 'L' else cfg.rope_base
                          for k in kinds], jnp.float32)

    scaled_L = jnp.asarray([k == 'G' for k in kinds])  # RoPE scaling is for global layers.

    def body(x_BTD, block, layer_cache, window, rope_base, rope_scaled):
      return block(x_BTD, positions_BT, layer_cache, index, window, rope_base, rope_scaled)

    if self.cfg.remat != 'none':
      body = nnx.remat(body, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=False)
    # A None cache has no leaves, so axis 0 is harmless in the training forward.
    scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0, 0, 0), out_axes=(nnx.Carry, 0))
    x_BTD, cache = scan(x_BTD, self.blocks, cache, window_L, base_L, scaled_L)
    return self.embedder.decode(self.final_norm(x_BTD)), cache


def init_cache(cfg: ModelConfig, batch: int, size: int) -> dict:
  """Zeroed KV cache for all layers: {'k','v'}: [L, B, S, K, H] in the compute dtype."""
  if size > cfg.max_seq_len:
    raise ValueError(f'KV cache size {size} exceeds config.model.max_seq_len={cfg.max_seq_len}')
  shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
  dtype = jnp.dtype(cfg.dtype)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def build(cfg: ModelConfig, seed: int = 0) -> Decoder:
  """A freshly initialised Decoder (eager, unsharded: for tests, sampling and small runs)."""
  return Decoder(cfg, nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> Decoder:
  """The Decoder's structure with ShapeDtypeStructs instead of arrays: no memory, any size."""
  return nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0)))


def count_params(model: nnx.Module) -> int:
  state = nnx.state(model, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
