"""LoRA (Hu et al. 2021) as module surgery on the `Linear` seam of model/layers.py.

`apply_lora` replaces each targeted `Linear` weight of the decoder blocks by a `LoraLinear`
that keeps the weight (`base`) and adds a rank-r update along the weight's own einsum:

  y = x·W + scale · (x·A)·B,   A [in..., r] (the weight's contracted axes), B [r, out...]
  scale = alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023), which
  keeps the update's size independent of the rank.

B starts at zero, so a fresh adapter leaves the model's outputs unchanged; A starts like PEFT's
default (Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))). `merge_lora`
folds W + scale·A·B back into a plain `Linear`, so a merged model has the base's parameter tree.

Paths: a site is 'stack{j}/block{p}/<module>/<weight>' (e.g. stack0/block0/attn/w_q); the
`targets` regex is matched with re.fullmatch against the block-relative '<module>/<weight>'.
Inside `stack{j}` every parameter carries a leading `layers` axis of size R (the scanned
repeats); A and B get it too, so `nnx.scan` slices them per layer with the weight. Unmerged, the
parameter tree holds `.../attn/w_q/{base,lora_a,lora_b}`; A and B are `LoraParam`s, so
`nnx.state(model, LoraParam)` or a trainable pattern 'lora_' selects only the adapters.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import re
import zlib
from typing import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from model.layers import Linear

_MODULES = ('attn', 'mlp')   # Block children holding Linear weights (the MoE FFN has none).


_DISABLED = [False]


@contextlib.contextmanager
def disabled():
  """Within it, forwards traced skip every LoRA update and adapter (model/peft/adapter.py): the
  frozen base's outputs, i.e. DPO's and RL's reference model without a second copy of the
  weights (PEFT's `disable_adapter()`). A trace-time switch: it changes the program traced."""
  old, _DISABLED[0] = _DISABLED[0], True
  try:
    yield
  finally:
    _DISABLED[0] = old


def is_disabled() -> bool:
  return _DISABLED[0]


class LoraParam(nnx.Param):
  """A LoRA factor (A or B): its own type, so filters and trainable masks select adapters."""


class DropoutKey(nnx.Variable):
  """Per-layer PRNG key data [L..., 2] (uint32) for the adapter's input dropout, set by
  `set_dropout_keys` for one training forward; never a parameter."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyperparameters. `dropout` is applied to the adapter's input only when `apply` gets
  an rng (training); inference and the model's own call sites run without it."""
  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  targets: str = r'attn/w_(q|v)'
  rslora: bool = False

  @property
  def scale(self) -> float:
    """alpha / r (Hu et al. 2021) or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
    return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

  def validate(self) -> None:
    if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
      raise ValueError(f'LoraConfig.rank={self.rank!r}: expected an int >= 1')
    if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
        or not self.alpha > 0):
      raise ValueError(f'LoraConfig.alpha={self.alpha!r}: expected a number > 0')
    if (isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float))
        or not 0 <= self.dropout < 1):
      raise ValueError(f'LoraConfig.dropout={self.dropout!r}: expected a number in [0, 1)')
    if not isinstance(self.targets, str) or not self.targets:
      raise ValueError(f'LoraConfig.targets={self.targets!r}: expected a non-empty regex')
    try:
      re.compile(self.targets)
    except re.error as e:
      raise ValueError(f'LoraConfig.targets={self.targets!r}: not a regular expression ({e})'
                       ) from None
    if not isinstance(self.rslora, bool):
      raise ValueError(f'LoraConfig.rslora={self.rslora!r}: expected a bool')


def _free_letters(eq: str, n: int) -> str:
  """n einsum letters that `eq` does not use (for the rank and the leading stacked axes)."""
  return ''.join([c for c in 'rzyxwuqponmlkjihgfedcba' if c not in eq][:n])


@dataclasses.dataclass(frozen=True)
class Layout:
  """How a weight of einsum `eq` splits: x_spec,w_spec->out_spec. `ins` are the weight's
  contracted letters (in weight order), `outs` the rest; `lead` leading stacked axes."""
  eq: str
  lead: int

  @property
  def specs(self) -> tuple[str, str, str]:
    lhs, out = self.eq.split('->')
    x, w = lhs.split(',')
    return x, w, out

  @property
  def ins(self) -> str:
    x, w, out = self.specs
    return ''.join(c for c in w if c in x and c not in out)

  @property
  def outs(self) -> str:
    x, w, out = self.specs
    return ''.join(c for c in w if c in out)

  def in_shape(self, w_shape) -> tuple[int, ...]:
    w = self.specs[1]
    return tuple(w_shape[self.lead + w.index(c)] for c in self.ins)

  def out_shape(self, w_shape) -> tuple[int, ...]:
    w = self.specs[1]
    return tuple(w_shape[self.lead + w.index(c)] for c in self.outs)


def layout(base: Linear) -> Layout:
  """The Layout of a `Linear`, its leading (stacked) axes found from value rank vs `eq`."""
  x, w, out = Layout(base.eq, 0).specs
  lead = len(base.shape) - len(w)
  if lead < 0 or any(c not in x and c not in out for c in w):
    raise ValueError(f'Linear of shape {tuple(base.shape)}: einsum {base.eq!r} does not fit LoRA')
  return Layout(base.eq, lead)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _init_factors(key, a_shape, b_shape, dtype, fan_in):
  """(A, B): A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PEFT's kaiming_uniform_(a=sqrt(5)); B = 0.
  One compiled program per shape (eager, each random op would compile on its own)."""
  bound = 1.0 / math.sqrt(fan_in)
  return (jax.random.uniform(key, a_shape, dtype, -bound, bound), jnp.zeros(b_shape, dtype))


class LoraLinear(nnx.Module):
  """A `Linear` plus a LoRA update: x [B, T, in...] -> [B, T, out...], like `base.apply`.

  lora_a [L..., in..., r] (logical names: the base's + None for the rank, kept replicated),
  lora_b [L..., r, out...] (None + the base's output names); L... are the base's leading
  stacked axes (`layers`)."""

  def __init__(self, base: Linear, cfg: LoraConfig, key: jax.Array):
    lay = layout(base)
    names = tuple(base.get_metadata().get('out_sharding') or (None,) * len(base.shape))
    w = lay.specs[1]
    lead_shape, lead_names = tuple(base.shape[:lay.lead]), names[:lay.lead]
    name_of = lambda c: names[lay.lead + w.index(c)]
    fan_in = math.prod(lay.in_shape(base.shape))
    a, b = _init_factors(key, lead_shape + lay.in_shape(base.shape) + (cfg.rank,),
                         lead_shape + (cfg.rank,) + lay.out_shape(base.shape),
                         jnp.dtype(base.dtype), fan_in)
    self.base = base
    self.lora_a = LoraParam(a, out_sharding=lead_names + tuple(map(name_of, lay.ins)) + (None,),
                            eager_sharding=False)
    self.lora_b = LoraParam(b, out_sharding=lead_names + (None,) + tuple(map(name_of, lay.outs)),
                            eager_sharding=False)
    self.scale = float(cfg.scale)
    self.dropout = float(cfg.dropout)
    self.rank = cfg.rank
    r = _free_letters(base.eq, 1)
    x, _, out = lay.specs
    batch = ''.join(c for c in x if c not in lay.ins)
    self.eq_a = f'{x},{lay.ins}{r}->{batch}{r}'          # e.g. btd,dr->btr
    self.eq_b = f'{batch}{r},{r}{lay.outs}->{out}'       # e.g. btr,rnh->btnh

  def apply(self, x: jax.Array, dtype, rng: jax.Array | None = None) -> jax.Array:
    """base.apply(x) + scale·(x·A)·B. x·A runs in the compute dtype accumulating in float32;
    the rank-r product with B stays in float32 (r is small), then one cast to `dtype`. With
    dropout > 0 and a key (`rng`, or the `dropout_key` a training forward set) the adapter's
    input is dropped (inverted dropout); without one (evaluation, serving) it is not."""
    y = self.base.apply(x, dtype)
    if _DISABLED[0]:
      return y
    key = getattr(self, 'dropout_key', None)
    if rng is None and key is not None:
      rng = jax.random.wrap_key_data(key[...])
    if rng is not None and self.dropout > 0:
      keep = jax.random.bernoulli(rng, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), 0).astype(x.dtype)
    xa = jnp.einsum(self.eq_a, x.astype(dtype), self.lora_a[...].astype(dtype),
                    preferred_element_type=jnp.float32)
    delta = jnp.einsum(self.eq_b, xa, self.lora_b[...].astype(jnp.float32),
                       preferred_element_type=jnp.float32)
    return (y.astype(jnp.float32) + self.scale * delta).astype(dtype)

  def delta(self) -> jax.Array:
    """scale·A·B in the base weight's layout (leading axes included), float32."""
    lay = layout(self.base)
    w = lay.specs[1]
    lead = _free_letters(self.base.eq, lay.lead + 1)[1:]
    r = _free_letters(self.base.eq, 1)
    eq = f'{lead}{lay.ins}{r},{lead}{r}{lay.outs}->{lead}{w}'
    return self.scale * jnp.einsum(eq, self.lora_a[...].astype(jnp.float32),
                                   self.lora_b[...].astype(jnp.float32),
                                   precision=jax.lax.Precision.HIGHEST)


def is_linear(value) -> bool:
  """A plain or quantized linear weight (model/layers.Linear, model/quant.QuantLinear), not a
  wrapper around one (LoRA, adapter)."""
  return (isinstance(value, Linear) or
          (isinstance(value, nnx.Module) and hasattr(value, 'eq') and hasattr(value, 'dequantize')))


def dequantized(base) -> jax.Array:
  """The weight of a plain or quantized linear, in its parameter dtype."""
  return base.dequantize() if hasattr(base, 'dequantize') else base[...]


def sites(model) -> Iterator[tuple[str, str, nnx.Module, str, object]]:
  """(path, block-relative path, parent module, attribute, value) for every parameter directly
  under a block's attn/mlp: a linear weight (plain, quantized, or wrapped by LoRA or an adapter),
  or another Param such as an MoE expert stack."""
  for j, (_, unit) in enumerate(model.cfg.layer_groups()):
    stack = getattr(model, f'stack{j}')
    for p in range(len(unit)):
      block = getattr(stack, f'block{p}')
      for mod_name in _MODULES:
        mod = getattr(block, mod_name)
        for name, value in list(vars(mod).items()):
          if not name.startswith('_') and (isinstance(value, nnx.Variable) or (
              isinstance(value, nnx.Module) and hasattr(value, 'apply'))):
            rel = f'{mod_name}/{name}'
            yield f'stack{j}/block{p}/{rel}', rel, mod, name, value


def targeted(model, cfg: LoraConfig) -> list[tuple[str, nnx.Module, str, Linear]]:
  """(path, parent, attribute, Linear) of the sites `cfg.targets` selects, without changing the
  model. ValueError when nothing matches, when a match is not a Linear (MoE expert or router
  weights) or already carries an adapter."""
  cfg.validate()
  regex = re.compile(cfg.targets)
  out, seen = [], []
  for path, rel, parent, name, value in sites(model):
    seen.append(rel)
    if not regex.fullmatch(rel):
      continue
    if isinstance(value, LoraLinear):
      raise ValueError(f'LoraConfig.targets={cfg.targets!r}: {path} already has a LoRA adapter')
    if not is_linear(value):
      raise ValueError(f'LoraConfig.targets={cfg.targets!r} matches {path}, which is not a '
                       'dense Linear weight (LoRA on MoE expert/router weights is unsupported)')
    out.append((path, parent, name, value))
  if not out:
    names = ', '.join(dict.fromkeys(seen))
    raise ValueError(f'LoraConfig.targets={cfg.targets!r} matches no linear weight; expected a '
                     f'regex over block-relative paths such as {names}')
  return out


def apply_lora(model, cfg: LoraConfig, seed: int = 0) -> list[str]:
  """Wraps every targeted `Linear` of `model` (a Decoder) in a `LoraLinear`, in place; returns
  the replaced paths. A's init key is derived from `seed` and the path (order-independent)."""
  found = targeted(model, cfg)
  root = jax.random.key(seed)
  for path, parent, name, base in found:
    key = jax.random.fold_in(root, zlib.crc32(path.encode()) & 0x7FFFFFFF)
    setattr(parent, name, LoraLinear(base, cfg, key))
  return [path for path, *_ in found]


def merge_lora(model) -> list[str]:
  """Replaces every `LoraLinear` by a plain `Linear` holding W + scale·A·B (float32, cast to
  the base dtype; same eq and logical names; a quantized W is dequantized first, as PEFT merges
  into a QLoRA base), in place; returns the merged paths. The merged
  model has the base model's parameter tree, so it saves and converts like one."""
  merged = []
  for path, _, parent, name, value in list(sites(model)):
    if isinstance(value, LoraLinear):
      base = value.base
      w = (dequantized(base).astype(jnp.float32) + value.delta()).astype(base.dtype)
      plain = base.to_linear(w) if hasattr(base, 'to_linear') else base.replace(w)
      setattr(parent, name, plain)
      merged.append(path)
  return merged


def set_dropout_keys(model, rng: jax.Array) -> int:
  """Gives every LoRA site with dropout > 0 fresh keys from `rng` for the next forward, one
  per stacked layer (the layer scan slices them like the weights); returns how many sites."""
  n = 0
  for i, (path, lora) in enumerate(lora_sites(model).items()):
    if lora.dropout <= 0:
      continue
    lead = lora.lora_a.shape[:layout(lora.base).lead]
    keys = jax.random.split(jax.random.fold_in(rng, i), max(1, math.prod(lead)))
    lora.dropout_key = DropoutKey(jax.random.key_data(keys).reshape(lead + (-1,)))
    n += 1
  return n


def lora_sites(model) -> dict[str, LoraLinear]:
  """{path: LoraLinear} of the adapters in `model`, in model order."""
  return {path: v for path, _, _, _, v in sites(model) if isinstance(v, LoraLinear)}


def lora_params(model) -> dict:
  """The adapters as a pure nested dict {'stack0': {'block0': {'attn': {'w_q': {'lora_a': A,
  'lora_b': B}}}}} of arrays ([R, ...] stacked), nothing else."""
  tree: dict = {}
  for path, lora in lora_sites(model).items():
    node = tree
    for k in path.split('/'):
      node = node.setdefault(k, {})
    node.update(lora_a=lora.lora_a[...], lora_b=lora.lora_b[...])
  return tree


def load_lora_params(model, tree: dict) -> None:
  """Sets the adapters from a `lora_params`-shaped tree (cast to each factor's dtype). ValueError
  naming the path on a missing, extra or misshapen entry; nothing is changed then."""
  found = lora_sites(model)
  flat = {}
  for path, lora in found.items():
    node = tree
    for k in path.split('/'):
      if not isinstance(node, dict) or k not in node:
        raise ValueError(f'LoRA params: missing {path} (the model has an adapter there)')
      node = node[k]
    for f in ('lora_a', 'lora_b'):
      var = getattr(lora, f)
      if f not in node or tuple(jnp.shape(node[f])) != tuple(var.shape):
        got = tuple(jnp.shape(node[f])) if f in node else 'nothing'
        raise ValueError(f'LoRA params: {path}/{f} is {got}, expected shape {tuple(var.shape)}')
      flat[(path, f)] = (var, node[f])
  n_tree = len(jax.tree.leaves(tree))
  if n_tree != len(flat):
    raise ValueError(f'LoRA params: the tree has {n_tree} arrays, the model {len(flat)} '
                     f'adapter factors ({", ".join(found) or "no adapters"})')
  for var, value in flat.values():
    var[...] = jnp.asarray(value, var.dtype)
