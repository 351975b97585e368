"""Bottleneck adapters (Houlsby et al. 2019) as surgery on the `Linear` seam.

An adapter follows a sub-layer's output projection, before the residual add:

  h = W·x;   h + act(h·D)·U,   D [out..., m] (down), U [m, out...] (up)

Houlsby et al. put one after the attention output and one after the feed-forward output, so the
default targets are `attn/w_o` and `mlp/w_down`. U starts at zero, so a fresh adapter is the
identity (their near-identity initialisation); D starts like a LoRA A factor
(U(-1/sqrt(fan_in), 1/sqrt(fan_in))). The bottleneck runs in float32: it is small.
Paths: `.../attn/w_o/{base, adapter_down, adapter_up}`.
"""
from __future__ import annotations

import math
import re
import zlib

import jax
import jax.numpy as jnp
from flax import nnx

from model.peft import lora as lora_lib


class AdapterParam(nnx.Param):
  """An adapter factor: its own type, so filters can select adapters."""


class AdapterLinear(nnx.Module):
  """`base` followed by a bottleneck adapter: x [B, T, in...] -> [B, T, out...].

  adapter_down [L..., out..., m] (the base's output names, then None), adapter_up
  [L..., m, out...]; L... are the base's leading stacked axes."""

  def __init__(self, base, dim: int, key: jax.Array):
    lay = lora_lib.layout(base)
    names = tuple(base.get_metadata().get('out_sharding') or (None,) * len(base.shape))
    w = lay.specs[1]
    lead_shape, lead_names = tuple(base.shape[:lay.lead]), names[:lay.lead]
    out_names = tuple(names[lay.lead + w.index(c)] for c in lay.outs)
    out_shape = lay.out_shape(base.shape)
    down, up = lora_lib._init_factors(key, lead_shape + out_shape + (dim,),   # pylint: disable=protected-access
                                      lead_shape + (dim,) + out_shape, jnp.dtype(base.dtype),
                                      math.prod(out_shape))
    self.base = base
    self.adapter_down = AdapterParam(down, out_sharding=lead_names + out_names + (None,),
                                     eager_sharding=False)
    self.adapter_up = AdapterParam(up, out_sharding=lead_names + (None,) + out_names,
                                   eager_sharding=False)
    o = lay.outs
    m = lora_lib._free_letters(base.eq + 'bt', 1)   # pylint: disable=protected-access
    out = lay.specs[2]
    batch = out[:len(out) - len(o)]
    self.eq_down = f'{out},{o}{m}->{batch}{m}'      # e.g. btd,dm->btm
    self.eq_up = f'{batch}{m},{m}{o}->{out}'        # e.g. btm,md->btd

  def apply(self, x: jax.Array, dtype) -> jax.Array:
    h = self.base.apply(x, dtype)
    if lora_lib.is_disabled():   # The reference model (lora.disabled()).
      return h
    z = jnp.einsum(self.eq_down, h.astype(jnp.float32), self.adapter_down[...].astype(jnp.float32))
    z = jax.nn.gelu(z)
    return (h.astype(jnp.float32) +
            jnp.einsum(self.eq_up, z, self.adapter_up[...].astype(jnp.float32))).astype(dtype)


def check(p) -> None:
  """Refuses a bad `config.peft` adapter field in one line."""
  if isinstance(p.adapter_dim, bool) or not isinstance(p.adapter_dim, int) or p.adapter_dim < 1:
    raise ValueError(f'config.peft.adapter_dim={p.adapter_dim!r}: expected an int >= 1')
  try:
    re.compile(p.adapter_targets)
  except (re.error, TypeError) as e:
    raise ValueError(f'config.peft.adapter_targets={p.adapter_targets!r}: not a regular '
                     f'expression ({e})') from None


def apply_adapters(model, dim: int, targets: str, seed: int = 0) -> list[str]:
  """Wraps each targeted linear weight of `model`'s blocks (re.fullmatch over block-relative
  paths such as 'attn/w_o') in an `AdapterLinear`, in place; returns the paths."""
  regex = re.compile(targets)
  root = jax.random.key(seed)
  found, seen = [], []
  for path, rel, parent, name, value in lora_lib.sites(model):
    seen.append(rel)
    if not regex.fullmatch(rel):
      continue
    if not hasattr(value, 'apply') or isinstance(value, (AdapterLinear, lora_lib.LoraLinear)):
      raise ValueError(f'config.peft.adapter_targets={targets!r} matches {path}, which is not a '
                       'plain linear weight')
    key = jax.random.fold_in(root, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    setattr(parent, name, AdapterLinear(value, dim, key))
    found.append(path)
  if not found:
    raise ValueError(f'config.peft.adapter_targets={targets!r} matches no linear weight; '
                     f'expected a regex over paths such as {", ".join(dict.fromkeys(seen))}')
  return found
