"""The decoder: embed -> scanned stack of blocks -> final RMSNorm -> logits.

Layers are created stacked (leading `layers` axis) and applied with `nnx.scan`, so compile time
does not grow with depth; `scan_layers=False` unrolls that scan (same parameters), which is
faster for a few small layers on CPU (no dynamic slices of the stacked activations). Shapes: B batch, T length, D d_model, V vocab, L layers, S cache size, R repeats of a
scanned unit, U blocks per unit, E experts.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from model import heads, pipeline, sharding
from model.attention import Attention
from model.config import ModelConfig
from model.inference.kv_cache import DecodeCache
from model.layers import MLP, Embedder, RMSNorm
from model.moe import MoE

_REMAT_POLICIES = {
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class Block(nnx.Module):
  """Serial pre-norm: x + attn(n1(x)), then + ffn(n2(.)).
  Parallel (PaLM §2): x + attn(n(x)) + ffn(n(x)) with one shared norm.
  With `post_norms` (Gemma 2/3) each branch output is normalised again before the residual.
  The FFN is the dense MLP, or with `moe` the sparse MoE layer (which also returns aux stats)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool = False):
    self.parallel = cfg.block == 'parallel'
    self.post_norms = cfg.post_norms
    self.is_moe = moe
    self.attn_norm = RMSNorm(cfg, rngs)
    self.attn = Attention(cfg, rngs)
    if not self.parallel:
      self.mlp_norm = RMSNorm(cfg, rngs)
    self.mlp = MoE(cfg, cfg.moe, rngs) if moe else MLP(cfg, rngs)
    if cfg.post_norms:
      self.post_attn_norm = RMSNorm(cfg, rngs)
      self.post_mlp_norm = RMSNorm(cfg, rngs)

  def _ffn(self, h_BTD):
    if self.is_moe:
      return self.mlp(h_BTD)
    return self.mlp(h_BTD), {}

  def __call__(self, x_BTD, positions_BT, cache=None, index=0, window=0, rope_base=None,
               rope_scaled=True, segment_ids_BT=None):
    """-> (x_BTD, cache, aux): aux is the MoE layer's stats ({} for a dense FFN)."""
    post_attn = self.post_attn_norm if self.post_norms else (lambda y: y)
    post_mlp = self.post_mlp_norm if self.post_norms else (lambda y: y)
    h_BTD = self.attn_norm(x_BTD)
    a_BTD, cache = self.attn(h_BTD, positions_BT, cache, index, window, rope_base, rope_scaled,
                             segment_ids_BT)
    if self.parallel:
      f_BTD, aux = self._ffn(h_BTD)
      x_BTD = x_BTD + post_attn(a_BTD) + post_mlp(f_BTD)
    else:
      x_BTD = x_BTD + post_attn(a_BTD)
      f_BTD, aux = self._ffn(self.mlp_norm(x_BTD))
      x_BTD = x_BTD + post_mlp(f_BTD)
    return sharding.constrain(x_BTD, ('batch', 'length', 'act_embed')), cache, aux


class Unit(nnx.Module):
  """One scan step: consecutive blocks `block0..block{U-1}` with FFN kinds `unit` ('D'/'M').
  A dense model's unit is one block; MoE every 2nd layer makes it a dense + an MoE block."""

  def __init__(self, cfg: ModelConfig, unit: str, rngs: nnx.Rngs):
    self.size = len(unit)
    for p, kind in enumerate(unit):
      setattr(self, f'block{p}', Block(cfg, rngs, moe=kind == 'M'))

  def __call__(self, x_BTD, positions_BT, cache, index, window_U, base_U, scaled_U,
               segment_ids_BT=None):
    caches, auxes = {}, {}
    for p in range(self.size):
      name = f'block{p}'
      x_BTD, caches[name], auxes[name] = getattr(self, name)(
          x_BTD, positions_BT, None if cache is None else cache[name], index, window_U[p],
          base_U[p], scaled_U[p], segment_ids_BT)
    return x_BTD, (None if cache is None else caches), auxes


class Decoder(nnx.Module):
  """tokens_BT -> logits_BTV (float32). See `__call__` for the KV-cache mode.

  Layers live in scanned groups `stack0, stack1, ...` (`cfg.layer_groups()`), each a Unit
  stacked on a leading `layers` axis of size R (its repeats): stack{j}.block{p}.* is [R, ...].
  """

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embedder = Embedder(cfg, rngs)
    for j, (repeats, unit) in enumerate(cfg.layer_groups()):
      @nnx.split_rngs(splits=repeats)
      @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: 'layers'})
      def make_units(rngs):
        return Unit(cfg, unit, rngs)
      setattr(self, f'stack{j}', make_units(rngs))
    self.final_norm = RMSNorm(cfg, rngs)
    heads.attach(self, cfg, rngs)   # Scalar heads (reward, value) when config.model.heads asks.

  def __call__(self, tokens_BT: jax.Array, cache: DecodeCache | None = None,
               index: jax.Array | int | None = None, *, segment_ids_BT: jax.Array | None = None,
               positions_BT: jax.Array | None = None):
    """Full forward (cache=None), or prefill/decode with a KV cache from `init_cache`.

    With a cache, row b's `tokens_BT` sit at positions index[b]..index[b]+T-1, where index is
    the cache's per-row lengths (default) or the given scalar / [B] array; their K/V are written
    there and the updated cache (lengths index + T) is returned. Returns (logits_BTV, cache).
    """
    logits_BTV, cache, _ = self.forward(tokens_BT, cache, index, segment_ids_BT=segment_ids_BT,
                                        positions_BT=positions_BT)
    return logits_BTV, cache

  def init_cache(self, batch: int, size: int) -> DecodeCache:
    """An empty per-row cache: each attention layer's own `init_cache`, stacked like the layers
    ({'stack{j}': {'block{p}': LayerCache [R, B, S, K, H]}}), and lengths_B = 0."""
    cfg = self.cfg
    if size > cfg.max_seq_len:
      raise ValueError(f'KV cache size {size} exceeds config.model.max_seq_len={cfg.max_seq_len}')
    layers = {}
    for j, (repeats, unit) in enumerate(cfg.layer_groups()):
      stack = getattr(self, f'stack{j}')
      layers[f'stack{j}'] = {
          f'block{p}': jax.tree.map(
              lambda a: jnp.broadcast_to(a, (repeats,) + a.shape),
              getattr(stack, f'block{p}').attn.init_cache(batch, size))
          for p in range(len(unit))}
    return DecodeCache(layers, jnp.zeros((batch,), jnp.int32))

  def forward(self, tokens_BT: jax.Array, cache: DecodeCache | None = None,
              index: jax.Array | int | None = None, *, segment_ids_BT: jax.Array | None = None,
              positions_BT: jax.Array | None = None, hidden: bool = False):
    """-> (logits_BTV, cache, aux); with `hidden`, the final-normed hidden states x_BTD instead
    of logits (for a fused output projection + loss, `embedder.head()`). aux mirrors the layer structure, {'stack1': {'block0':
    {...}}}, holding each MoE layer's stats stacked [R, ...] (see `model.moe.MoE`).

    `segment_ids_BT` (int, no cache): a query sees only keys of its own segment, so packed
    documents never attend to each other. `positions_BT` (int): RoPE/mask positions, default
    index + arange(T) per row; give per-document positions restarting at 0 for packed rows.
    With a cache, positions must stay the slot numbers (the default)."""
    b, t = tokens_BT.shape
    if cache is not None:
      index_B = cache.lengths_B if index is None else jnp.broadcast_to(
          jnp.asarray(index, jnp.int32), (b,))
      index = index_B
    else:
      index_B = jnp.broadcast_to(jnp.asarray(0 if index is None else index, jnp.int32), (b,))
    per_row = positions_BT is not None or segment_ids_BT is not None
    if positions_BT is None:
      positions_BT = index_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    positions_BT = jnp.asarray(positions_BT, jnp.int32)
    x_BTD = self.embedder.encode(tokens_BT)
    cfg = self.cfg

    def make_scan(positions_BT, segment_ids_BT=segment_ids_BT):
      def body(x_BTD, unit, unit_cache, window_U, base_U, scaled_U):
        return unit(x_BTD, positions_BT, unit_cache, index, window_U, base_U, scaled_U,
                    segment_ids_BT)

      if cfg.remat != 'none':
        body = nnx.remat(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
      # A None cache has no leaves, so axis 0 is harmless in the training forward.
      return nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0, 0, 0), out_axes=(nnx.Carry, 0, 0),
                      unroll=not cfg.scan_layers)

    scan = make_scan(positions_BT)
    # Pipeline parallelism (model/pipeline.py) when the trainer turns it on; decoding with a
    # KV cache always runs the plain scan.
    pipe = pipeline.active() if cache is None else None
    if pipe is not None:
      pipe.check_fits(cfg.layer_groups(), b)
      if per_row:
        raise ValueError('segment_ids_BT / positions_BT are not supported with pipeline '
                         'parallelism yet (model/pipeline.py carries one row of positions)')

    kinds = cfg.layer_kinds()
    new_cache, aux, first = {}, {}, 0
    for j, (repeats, unit) in enumerate(cfg.layer_groups()):
      name = f'stack{j}'
      # Per-layer attention span, RoPE base and RoPE scaling ride along the scan as [R, U].
      span = kinds[first:first + repeats * len(unit)]
      first += len(span)
      window_RU = jnp.asarray([cfg.sliding_window if k == 'L' else 0 for k in span],
                              jnp.int32).reshape(repeats, -1)
      base_RU = jnp.asarray([cfg.rope_base_local or cfg.rope_base if k == 'L' else cfg.rope_base
                             for k in span], jnp.float32).reshape(repeats, -1)
      scaled_RU = jnp.asarray([k == 'G' for k in span]).reshape(repeats, -1)  # Global layers only.
      if pipe is not None:
        x_BTD, stack_aux = self._pipelined(getattr(self, name), make_scan, positions_BT, x_BTD,
                                           (window_RU, base_RU, scaled_RU), pipe)
        stack_cache = None
      else:
        x_BTD, stack_cache, stack_aux = scan(x_BTD, getattr(self, name),
                                             None if cache is None else cache.layers[name],
                                             window_RU, base_RU, scaled_RU)
      new_cache[name] = stack_cache
      if any(stack_aux.values()):
        aux[name] = {p: a for p, a in stack_aux.items() if a}
    x_BTD = self.final_norm(x_BTD)
    logits_BTV = x_BTD if hidden else self.embedder.decode(x_BTD)
    if cache is not None:
      new_cache = DecodeCache(new_cache, index_B + t)
    return logits_BTV, (None if cache is None else new_cache), aux

  @staticmethod
  def _pipelined(stack, make_scan, positions_BT, x_BTD, per_layer, pipe):
    """The stack's plain scan body run on each stage's chunk of layers by `pipeline.run`."""
    graphdef, state = nnx.split(stack)
    specs = nnx.get_partition_spec(state)
    names = [tuple(p) for p in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))]
    scan = make_scan(positions_BT[:x_BTD.shape[0] // pipe.microbatches], None)  # Rows identical.

    def stage_fn(chunk, x_bTD, per_layer_chunk):
      x_bTD, _, aux = scan(x_bTD, nnx.merge(graphdef, chunk), None, *per_layer_chunk)
      return x_bTD, aux

    return pipeline.run(stage_fn, state, names, per_layer, x_BTD, pipe)


def init_cache(cfg: ModelConfig, batch: int, size: int) -> DecodeCache:
  """`Decoder.init_cache` without a built model (the layers' shapes only)."""
  if size > cfg.max_seq_len:
    raise ValueError(f'KV cache size {size} exceeds config.model.max_seq_len={cfg.max_seq_len}')
  return abstract(cfg).init_cache(batch, size)


def moe_layer_stats(aux: dict, cfg: ModelConfig) -> dict[str, jax.Array]:
  """The aux tree from `Decoder.forward` as arrays over MoE layers in depth order: each stat
  [M, ...] for the M MoE layers (e.g. load [M, E]). {} for a dense model."""
  per_layer = []  # (layer index, stats)
  first = 0
  for j, (repeats, unit) in enumerate(cfg.layer_groups()):
    for p, kind in enumerate(unit):
      if kind == 'M':
        stats = aux[f'stack{j}'][f'block{p}']
        per_layer += [(first + r * len(unit) + p, jax.tree.map(lambda a, r=r: a[r], stats))
                      for r in range(repeats)]
    first += repeats * len(unit)
  if not per_layer:
    return {}
  per_layer.sort(key=lambda x: x[0])
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in per_layer])


def build(cfg: ModelConfig, seed: int = 0) -> Decoder:
  """A freshly initialised Decoder (eager, unsharded: for tests, sampling and small runs)."""
  return Decoder(cfg, nnx.Rngs(params=seed))


def abstract(cfg: ModelConfig) -> Decoder:
  """The Decoder's structure with ShapeDtypeStructs instead of arrays: no memory, any size."""
  return nnx.eval_shape(lambda: Decoder(cfg, nnx.Rngs(params=0)))


def count_params(model: nnx.Module) -> int:
  state = nnx.state(model, nnx.Param)
  return sum(int(x.size) for x in jax.tree.leaves(state))
